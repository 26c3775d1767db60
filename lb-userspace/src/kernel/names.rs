//! `LB_NAMES`: the Service (namespace/name), port name and kind of every frontend id, pinned
//! beside the datapath's maps so that `lb list` and `lb explain` can name Services from the
//! pins alone, also while the agent is down (the frontend map holds only addresses and ids).
//!
//! The agent writes it after each sync pass that adds, renames or removes frontends; nothing
//! else reads or writes it, and the programs never see it: it is not in the eBPF object, nor
//! in `lb_common::maps::SPECS` (not a kernel/user agreement), and a map of another shape is
//! simply made anew (the next pass fills it). It is a map and not a file because bpffs holds
//! only BPF objects (a regular file there is refused with EPERM), and the pins are what lives
//! on when the agent and its container are gone. `lb cleanup` removes it with the other maps.

use std::{collections::BTreeMap, fmt, os::fd::AsFd as _, path::Path};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError};

use super::{PinLayout, batch};
use crate::model::ObjectKey;

/// Pinned name, under `<pin-path>/maps/`.
pub const NAMES: &str = "LB_NAMES";

/// What kind of address a frontend is. Stored as a `u8` in [`NameRecord::kind`]; ClusterIP
/// is all lb programs today, the others are reserved for the north-south frontends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum FrontendKind {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub const fn code(self) -> u8 {
        match self {
            Self::ClusterIp => 0,
            Self::NodePort => 1,
            Self::LoadBalancer => 2,
            Self::ExternalIp => 3,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::ClusterIp),
            1 => Some(Self::NodePort),
            2 => Some(Self::LoadBalancer),
            3 => Some(Self::ExternalIp),
            _ => None,
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "externalIP",
        })
    }
}

/// Who a frontend belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub service: ObjectKey,
    /// "" for a Service's single unnamed port.
    pub port_name: String,
    pub kind: FrontendKind,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
}

impl ServiceName {
    /// The traffic policies that are not the default, for display: `iTP=Local`, `eTP=Local`,
    /// or `-`.
    pub fn policy(&self) -> String {
        let mut out: Vec<&str> = Vec::new();
        if self.internal_local {
            out.push("iTP=Local");
        }
        if self.external_local {
            out.push("eTP=Local");
        }
        if out.is_empty() {
            "-".to_owned()
        } else {
            out.join(",")
        }
    }
}

/// Value of [`NAMES`] (key: the frontend id, a `u32`). Strings are UTF-8, NUL-padded; a
/// string longer than its field (the API allows 63-byte namespaces and Service names and
/// 15-byte port names) is cut at a character boundary and `truncated` says so.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameRecord {
    pub namespace: [u8; 64],
    pub name: [u8; 64],
    pub port_name: [u8; 16],
    /// [`FrontendKind::code`].
    pub kind: u8,
    /// 1 when a string was cut to fit.
    pub truncated: u8,
    /// Bit 0: `internalTrafficPolicy: Local`; bit 1: `externalTrafficPolicy: Local`.
    pub policy: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<NameRecord>() == 152);

// SAFETY: #[repr(C)], bytes only, the padding an explicit field: any bit pattern is valid.
unsafe impl aya::Pod for NameRecord {}

/// Copies `text` into `field`, cut at a character boundary; returns whether it was cut.
fn fill(field: &mut [u8], text: &str) -> bool {
    let mut end = text.len().min(field.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&text.as_bytes()[..end]);
    end < text.len()
}

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl NameRecord {
    pub fn new(name: &ServiceName) -> Self {
        let mut record = Self {
            namespace: [0; 64],
            name: [0; 64],
            port_name: [0; 16],
            kind: name.kind.code(),
            truncated: 0,
            policy: u8::from(name.internal_local) | (u8::from(name.external_local) << 1),
            _pad: [0; 5],
        };
        let cut = fill(&mut record.namespace, &name.service.namespace)
            | fill(&mut record.name, &name.service.name)
            | fill(&mut record.port_name, &name.port_name);
        record.truncated = u8::from(cut);
        record
    }

    /// The name it holds (an unknown kind reads as ClusterIP).
    pub fn name(&self) -> ServiceName {
        ServiceName {
            service: ObjectKey::new(text(&self.namespace), text(&self.name)),
            port_name: text(&self.port_name),
            kind: FrontendKind::from_code(self.kind).unwrap_or_default(),
            internal_local: self.policy & 1 != 0,
            external_local: self.policy & 2 != 0,
        }
    }
}

/// A handle on the pinned names map.
pub struct Names {
    map: HashMap<MapData, u32, NameRecord>,
}

/// The names map could not be made, opened or written.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("{what} {path}")]
    Map {
        what: &'static str,
        path: String,
        #[source]
        source: MapError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn open_pinned(path: &Path) -> Result<HashMap<MapData, u32, NameRecord>, MapError> {
    HashMap::try_from(Map::from_map_data(MapData::from_pin(path)?)?)
}

impl Names {
    /// Opens the pinned map (`Ok(None)` when there is none: pins of an older lb).
    pub fn open(layout: &PinLayout) -> Result<Option<Self>, NamesError> {
        let path = layout.map(NAMES);
        if !path.exists() {
            return Ok(None);
        }
        open_pinned(&path)
            .map(|map| Some(Self { map }))
            .map_err(|source| NamesError::Map {
                what: "opening",
                path: path.display().to_string(),
                source,
            })
    }

    /// Opens the pinned map, or makes and pins it (again, when the pinned one has another
    /// shape) with room for `capacity` frontends.
    pub fn open_or_create(layout: &PinLayout, capacity: u32) -> Result<Self, NamesError> {
        let path = layout.map(NAMES);
        let map_err = |what, source| NamesError::Map {
            what,
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            match open_pinned(&path) {
                Ok(map) if map.map().info().is_ok_and(|i| i.max_entries() == capacity) => {
                    return Ok(Self { map });
                }
                // Another shape or size (key and value sizes are checked by try_from):
                // only names, which the next pass writes again.
                Ok(_)
                | Err(MapError::InvalidKeySize { .. } | MapError::InvalidValueSize { .. }) => {
                    tracing::info!(path = %path.display(), "recreating the frontend names map");
                    std::fs::remove_file(&path).map_err(|source| NamesError::Io {
                        what: "removing",
                        path: path.display().to_string(),
                        source,
                    })?;
                }
                Err(source) => return Err(map_err("opening", source)),
            }
        }
        let def = aya_obj::maps::bpf_map_def {
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            key_size: size_of::<u32>() as u32,
            value_size: size_of::<NameRecord>() as u32,
            max_entries: capacity,
            map_flags: lb_common::maps::BPF_F_NO_PREALLOC,
            ..Default::default()
        };
        let obj = aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
            def,
            inner_def: None,
            section_index: 0,
            section_kind: aya_obj::EbpfSectionKind::Maps,
            symbol_index: None,
            data: Vec::new(),
        });
        let data = MapData::create(obj, NAMES, None).map_err(|e| map_err("creating", e))?;
        data.pin(&path).map_err(|e| NamesError::Io {
            what: "pinning",
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let map = HashMap::try_from(Map::from_map_data(data).map_err(|e| map_err("opening", e))?)
            .map_err(|e| map_err("opening", e))?;
        Ok(Self { map })
    }

    /// Every id's name. Records that cannot be read are left out.
    pub fn read_all(&self) -> BTreeMap<u32, ServiceName> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(id, record)| (id, record.name()))
            .collect()
    }

    pub fn put(&mut self, id: u32, name: &ServiceName) -> Result<(), MapError> {
        self.map.insert(id, NameRecord::new(name), 0)
    }

    /// Deletes `id`'s name; one that is not there is not an error.
    pub fn delete(&mut self, id: u32) -> Result<(), MapError> {
        match self.map.remove(&id) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    /// Puts `names` with batched syscalls (a first sync writes one per frontend). On
    /// failure: the index of the first name not written (all before it were) and the error.
    pub fn put_all(&mut self, names: &[(u32, ServiceName)]) -> Result<(), (usize, std::io::Error)> {
        let (ids, records): (Vec<u32>, Vec<NameRecord>) = names
            .iter()
            .map(|(id, name)| (*id, NameRecord::new(name)))
            .unzip();
        let target = batch::Updates {
            map: self.map.map().fd().as_fd(),
            keys: &ids,
            values: &records,
        };
        let threads = batch::threads_for(ids.len(), super::maps::WRITER_THREADS);
        batch::write(&target, ids.len(), batch::CHUNK, threads).map_err(|s| (s.index, s.error))
    }

    /// Deletes the names of `ids` with batched syscalls; one that is not there is not an
    /// error. On failure: as [`Names::put_all`].
    pub fn delete_all(&mut self, ids: &[u32]) -> Result<(), (usize, std::io::Error)> {
        let target = batch::Deletes {
            map: self.map.map().fd().as_fd(),
            keys: ids,
        };
        batch::write(&target, ids.len(), batch::CHUNK, 1).map_err(|s| (s.index, s.error))
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::cluster_ip("shop", "web", "http", FrontendKind::ClusterIp, false)]
    #[case::unnamed_port("default", "kubernetes", "", FrontendKind::NodePort, false)]
    #[case::longest_names(&"n".repeat(63), &"s".repeat(63), &"p".repeat(15), FrontendKind::LoadBalancer, false)]
    #[case::too_long_is_cut(&"n".repeat(70), "web", "http", FrontendKind::ExternalIp, true)]
    #[case::cut_at_a_character_boundary(&"é".repeat(40), "web", "http", FrontendKind::ClusterIp, true)]
    fn records_round_trip(
        #[case] namespace: &str,
        #[case] name: &str,
        #[case] port: &str,
        #[case] kind: FrontendKind,
        #[case] cut: bool,
    ) {
        let want = ServiceName {
            service: ObjectKey::new(namespace, name),
            port_name: port.to_owned(),
            kind,
            internal_local: false,
            external_local: true,
        };
        let record = NameRecord::new(&want);
        assert_eq!(record.truncated == 1, cut);
        let got = record.name();
        if cut {
            assert!(namespace.starts_with(&got.service.namespace));
            assert!(got.service.namespace.len() <= 64 && got.service.namespace.len() >= 62);
            assert_eq!(
                (got.service.name, got.port_name, got.kind),
                (want.service.name, want.port_name, kind)
            );
        } else {
            assert_eq!(got, want);
        }
    }

    #[rstest]
    #[case::known(2, Some(FrontendKind::LoadBalancer))]
    #[case::unknown(9, None)]
    fn kind_codes(#[case] code: u8, #[case] want: Option<FrontendKind>) {
        assert_eq!(FrontendKind::from_code(code), want);
        if let Some(kind) = want {
            assert_eq!(kind.code(), code);
        }
    }
}
