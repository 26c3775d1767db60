//! The agent's pinned maps read as a test sees them from outside: through `bpftool --json`,
//! not through lb, so that a test checks what the kernel holds.

use std::{path::Path, process::Command};

/// One entry of a map: its key and value bytes, as they lie in the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Every entry of the pinned map `path` (`bpftool map dump`), or `None` when bpftool fails
/// (no such pin). An entry deleted between bpftool's key walk and its lookup comes with
/// `"value": {"error": ...}` instead of bytes; it is gone and left out.
pub fn try_dump(path: &Path) -> Option<Vec<Entry>> {
    let out = Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool runs");
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let entries = json.as_array().expect("a dump is an array");
    Some(
        entries
            .iter()
            .filter_map(|e| {
                Some(Entry {
                    key: hex_bytes(&e["key"])?,
                    value: hex_bytes(&e["value"])?,
                })
            })
            .collect(),
    )
}

/// [`try_dump`] of a map that must exist.
pub fn dump(path: &Path) -> Vec<Entry> {
    try_dump(path).unwrap_or_else(|| panic!("bpftool map dump {} failed", path.display()))
}

/// The value under `key` in the pinned map `path` (`bpftool map lookup`), `None` if there is
/// none.
pub fn lookup(path: &Path, key: &[u8]) -> Option<Vec<u8>> {
    let out = Command::new("bpftool")
        .args(["--json", "map", "lookup", "pinned"])
        .arg(path)
        .arg("key")
        .args(key.iter().map(u8::to_string))
        .output()
        .expect("bpftool runs");
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    hex_bytes(&json["value"])
}

/// Stores `value` under `key` in the pinned map `path` (`bpftool map update`); panics if
/// bpftool refuses.
pub fn update(path: &Path, key: &[u8], value: &[u8]) {
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(path)
        .arg("key")
        .args(key.iter().map(u8::to_string))
        .arg("value")
        .args(value.iter().map(u8::to_string))
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "bpftool map update {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes from bpftool's JSON form (`["0x0a", "0x00", ...]`); `None` for anything else.
fn hex_bytes(v: &serde_json::Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}
