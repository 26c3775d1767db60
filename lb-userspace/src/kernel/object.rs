//! The embedded eBPF object, loaded against the pinned maps after checking that they have
//! the shape this build expects.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, MapInfo, MapType},
};
use lb_common::maps::{MapKind, MapSpec, SPECS};

use super::{Capacities, PinLayout};

/// The object lb-userspace's build.rs compiled from lb-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this lb was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with `cargo build --release`"
    )]
    NoObject,
    #[error(
        "pinned map {path} holds {found} entries at most, and lb was asked for {flag} {asked}: \
         start lb with {flag} {found} to keep serving from it, or run `lb cleanup --pin-path {pin}` \
         (Service traffic stops until lb runs again) to recreate it with the new size"
    )]
    Capacity {
        path: PathBuf,
        pin: PathBuf,
        found: u32,
        asked: u32,
        flag: &'static str,
    },
    #[error(
        "pinned map {path} was made by another version of lb: its {what} is {found}, this lb needs {expected}. \
         Run `lb cleanup --pin-path {pin}` (Service traffic stops until lb runs again) and start lb again"
    )]
    Shape {
        path: PathBuf,
        pin: PathBuf,
        what: &'static str,
        found: String,
        expected: String,
    },
    #[error("reading pinned map {path}")]
    Pinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("creating {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object (maps pinned under {pin})")]
    Load {
        pin: PathBuf,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the eBPF object has no map {0}: lb-ebpf and lb-common disagree (build bug)")]
    MissingMap(&'static str),
}

/// The aya map type of `kind`.
pub(crate) fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::SkStorage => MapType::SkStorage,
        MapKind::LpmTrie => MapType::LpmTrie,
    }
}

/// Compares one pinned map with its spec.
fn check_shape(
    layout: &PinLayout,
    spec: &MapSpec,
    info: &MapInfo,
    capacities: Capacities,
) -> Result<(), LoadError> {
    let shape_error = |what, found: String, expected: String| LoadError::Shape {
        path: layout.map(spec.name),
        pin: layout.root().to_owned(),
        what,
        found,
        expected,
    };
    let found_type = info.map_type().map_err(|source| LoadError::Pinned {
        path: layout.map(spec.name),
        source,
    })?;
    if found_type != map_type(spec.kind) {
        return Err(shape_error(
            "type",
            format!("{found_type:?}"),
            format!("{:?}", map_type(spec.kind)),
        ));
    }
    let sizes = [
        ("key size", info.key_size(), spec.key_size),
        ("value size", info.value_size(), spec.value_size),
        // The agent-sized maps' capacity is checked below, with its own advice.
        (
            "capacity",
            if spec.sized_by_agent {
                spec.max_entries
            } else {
                info.max_entries()
            },
            spec.max_entries,
        ),
        ("flags", info.map_flags(), spec.flags),
    ];
    for (what, found, expected) in sizes {
        if found != expected {
            return Err(shape_error(what, found.to_string(), expected.to_string()));
        }
    }
    if spec.sized_by_agent && info.max_entries() != capacities.of(spec) {
        return Err(LoadError::Capacity {
            path: layout.map(spec.name),
            pin: layout.root().to_owned(),
            found: info.max_entries(),
            asked: capacities.of(spec),
            flag: match spec.name {
                lb_common::maps::FRONTENDS => "--max-frontends",
                lb_common::nat::CT | lb_common::nat::CT4 => "--max-ct-entries",
                _ => "--max-backends",
            },
        });
    }
    Ok(())
}

/// Checks every pinned map of this build's specs that exists (after `upgrade::prepare` has
/// checked the layout version and moved aside what an upgrade replaces). Returns how many maps
/// were found (0: a fresh start).
pub fn check_pinned(layout: &PinLayout, capacities: Capacities) -> Result<usize, LoadError> {
    let mut found = 0;
    for spec in SPECS {
        let path = layout.map(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::Pinned {
            path: path.clone(),
            source,
        })?;
        check_shape(layout, spec, &info, capacities)?;
        found += 1;
    }
    Ok(found)
}

/// Loads the programs (not attached yet) with their maps pinned under `layout`: existing pins
/// are reused, missing ones created and pinned.
pub fn load(layout: &PinLayout, capacities: Capacities) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let maps_dir = layout.maps_dir();
    std::fs::create_dir_all(&maps_dir).map_err(|source| LoadError::Dir {
        path: maps_dir.clone(),
        source,
    })?;
    let mut loader = EbpfLoader::new();
    for spec in SPECS.iter().filter(|s| s.sized_by_agent) {
        loader.map_max_entries(spec.name, capacities.of(spec));
    }
    let ebpf = loader
        .default_map_pin_directory(&maps_dir)
        .load(OBJECT)
        .map_err(|source| LoadError::Load {
            pin: layout.root().to_owned(),
            source: Box::new(source),
        })?;
    for spec in SPECS {
        if ebpf.map(spec.name).is_none() {
            return Err(LoadError::MissingMap(spec.name));
        }
    }
    Ok(ebpf)
}
