//! Objects as the API source receives them (JSON from the API server, deserialized into
//! k8s-openapi types by kube-rs) through lb's conversion and validation. The first byte picks
//! the kind: Service, EndpointSlice or Endpoints. Any panic is a bug.
#![no_main]

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_userspace::source::convert;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(svc) = serde_json::from_slice::<core::Service>(json) {
                let _converted = convert::service(&svc);
            }
        }
        1 => {
            if let Ok(slice) = serde_json::from_slice::<discovery::EndpointSlice>(json) {
                let _converted = convert::endpoint_slice(&slice);
            }
        }
        _ => {
            if let Ok(eps) = serde_json::from_slice::<core::Endpoints>(json) {
                let _converted = convert::endpoints(&eps);
            }
        }
    }
});
