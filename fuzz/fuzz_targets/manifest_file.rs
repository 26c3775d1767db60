//! A manifest file's bytes through everything `lb check` does with them: the bounded
//! YAML/JSON document layer, kind dispatch, conversion and validation, and the desired state
//! of the resulting snapshot. The first byte picks the format (even: YAML, odd: JSON).
//! Any panic, or an input that runs past libFuzzer's `-timeout`, is a bug.
#![no_main]

use std::path::Path;

use lb_userspace::{desired, model::Node, source::manifests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let file = if selector % 2 == 0 {
        Path::new("fuzz.yaml")
    } else {
        Path::new("fuzz.json")
    };
    let (snapshot, _errors) = manifests::load_text(file, text);
    let (_desired, problems) = desired::build(&snapshot, &Node::default(), desired::Limits::default());
    for p in &problems {
        let _text = p.describe(&snapshot);
    }
});
