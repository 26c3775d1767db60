//! Taking over the pins of the previous layout version in place, without dropping what live
//! sockets and flows depend on.
//!
//! A layout version ([`LAYOUT_VERSION`], recorded in `LB_META`) names what every pinned map's
//! key, value and fields mean. An agent adopts pins of its own version as on any restart. Pins
//! of the previous version ([`PREVIOUS_LAYOUT`]) are upgraded, map by map, as [`CHANGES`]
//! declares; a map the list does not name must be exactly as this build expects, and an
//! undeclared difference refuses the upgrade before anything is touched. Older versions are
//! refused with the advice to upgrade one layout at a time (Cilium's policy too: "Always perform
//! rollbacks and upgrades between one minor release at a time", docs.cilium.io, "Upgrade
//! Guide"). Newer ones are refused (no downgrade).
//!
//! Order (`run.rs`), each step safe to repeat after a crash:
//!
//! 1. [`prepare`]: decide (pure: [`decide`]); then move aside every pin that gets a new map
//!    ([`Step::Replace`]) to `<pin-path>/upgrade-from-N/NAME`, and rename every map kept
//!    readable under another name ([`Step::KeepAs`]). The old programs are still attached and
//!    keep using the map objects they hold (a pin is only a name), so the datapath serves on.
//! 2. Loading the new object creates the maps that are missing ([`Step::Create`], and the new
//!    map of each [`Step::Replace`]), and adopts every other pin.
//! 3. [`Prepared::migrate`] with [`Pass::BeforeSwap`]: each migration fills its new map from
//!    the old one, so the new programs find the entries the moment they take over.
//! 4. The new programs take over every pinned link (`BPF_LINK_UPDATE`, as on a restart:
//!    `attach.rs`, `xdp.rs`): no detach, no moment without a program.
//! 5. [`Prepared::migrate`] with [`Pass::AfterSwap`]: the old programs no longer run, so this
//!    pass catches what they wrote since step 3.
//! 6. [`Prepared::remove_unused`]: pins of maps this layout no longer uses ([`Step::Remove`]).
//! 7. The agent records the new version in `LB_META`, then [`Prepared::finish`] removes the
//!    moved-aside pins (their maps are freed when nothing holds them).
//!
//! A crash before step 7 leaves the previous version recorded: the next start decides again
//! from what it finds (a moved-aside pin says its map was already replaced) and runs the rest.
//! Migrations must therefore be idempotent and never overwrite an entry the new programs wrote
//! (insert if absent). Between steps 4's first and last link update, some hooks run old and
//! some new programs for a few microseconds (every program is loaded before the first
//! update); what the old ones write to a replaced map in that window is carried by step 5.
//!
//! The precedent for replacing an incompatible pinned map only after the new programs are
//! attached is Cilium's loader (`pkg/bpf`, `commitMapPins`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuValues},
    sys::SyscallError,
};
use lb_common::maps::{LAYOUT_VERSION, MapSpec, SPECS};

use super::{Capacities, PinLayout};

/// The layout version this lb upgrades from.
pub const PREVIOUS_LAYOUT: u32 = LAYOUT_VERSION - 1;

/// When a [`Migration`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The new map exists; the old programs still run and write the old map.
    BeforeSwap,
    /// Every pinned link runs the new programs; the old map no longer changes.
    AfterSwap,
}

/// Fills the new map (second argument) from the old one (first), converting entries to the
/// new layout; returns how many entries it wrote. Runs once per [`Pass`], and again after a
/// crash, so it must be idempotent and must not overwrite entries already in the new map
/// (the new programs may have written them: insert with `BPF_NOEXIST`).
pub type Migration = fn(old: Map, new: Map, pass: Pass) -> Result<u64, MapError>;

/// What a layout change does to one pinned map.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// New in this layout: created empty when the programs load.
    Create,
    /// Same shape, and a field gained a meaning, but every entry the previous programs wrote
    /// stays valid for the new ones: adopted as it is. `why` is the reviewed argument.
    Keep { why: &'static str },
    /// A new map replaces the pinned one (its shape or meaning changed); `migrate` carries the
    /// old entries over (see [`Migration`]; [`start_empty`] for state that may restart, such
    /// as counters).
    Replace { migrate: Migration },
    /// The pinned map stays readable by the new programs under the pinned name `name` (a map
    /// of the old shape in this layout's `SPECS`, which the new programs read for what was
    /// made before the upgrade, until it drains); a new map takes the original name.
    KeepAs { name: &'static str },
    /// No longer used: unpinned once the new programs have taken over.
    Remove,
    /// Cannot be carried over: the upgrade is refused, and `what_to_do` tells the operator.
    Refuse { what_to_do: &'static str },
}

/// One declared difference between the previous layout and this one.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    /// The pinned name (the previous layout's, for [`Step::Remove`] and [`Step::KeepAs`]).
    pub map: &'static str,
    /// What changed, for the log and for the error of a refused upgrade.
    pub what: &'static str,
    pub step: Step,
}

/// What changed from layout [`PREVIOUS_LAYOUT`] to [`LAYOUT_VERSION`], map by map, reviewed
/// with every change of `lb_common::maps` or `lb_common::nat`. A map not listed here must be
/// unchanged in shape and meaning.
pub const CHANGES: &[Change] = &[
    Change {
        map: lb_common::maps::REVERSE,
        what: "new: TCP backend -> the one frontend whose connects write no per-socket state",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::REVERSE_FILTER,
        what: "new: a bit per hash of a TCP backend that may have an LB_REVERSE entry",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::UDP_OWNERS,
        what: "new: which open UDP socket (cookie) owns each LB_UDP_SOCKS slot",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::UDP_SOCKS,
        what: "new: a UDP socket's state in a slot picked by its cookie, freed by the new \
               sock_release program when the socket closes (LB_DGRAMS holds it only when \
               another socket holds the slot)",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::TCP_OWNERS,
        what: "new: which open TCP socket (cookie) owns each LB_TCP_SOCKS slot",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::TCP_SOCKS,
        what: "new: a TCP socket's state in a slot picked by its cookie, freed by the new \
               sock_release program when the socket closes (LB_SOCKS holds it only when \
               another socket holds the slot, for MPTCP, and where the agent gives it)",
        step: Step::Create,
    },
    Change {
        map: lb_common::nat::CT_FORWARD,
        what: "new: which frontends may have forward (5-tuple) entries in LB_CT; XDP looks a \
               flow's forward key up only for those. Every layout-4 flow has one, so the \
               agent sets every bucket before the new programs are attached \
               (kernel/ct_forward.rs)",
        step: Step::Create,
    },
    Change {
        map: lb_common::nat::CT4,
        what: "new: the client entries of IPv4 flows to a backend on this node, under an 8-byte \
               key (LB_CT keeps IPv6 client entries and every 5-tuple entry)",
        step: Step::Create,
    },
    Change {
        map: lb_common::maps::DGRAMS,
        what: "new UDP sockets keep their state in LB_UDP_SOCKS; LB_DGRAMS only when their \
               slot is taken",
        step: Step::Keep {
            why: "same value; the layout-5 programs read a socket's LB_UDP_SOCKS entry first and \
                  its LB_DGRAMS storage next, so the sockets the layout-4 programs translated \
                  keep their state; the takeover swaps the readers (recvmsg, getpeername) \
                  before the writers (attach.rs HOOKS), so a slot is never written while an \
                  old reader runs. A socket gets both only if, in the microseconds between the \
                  first and the last writer's swap, a new connect gives it a slot and an old \
                  sendmsg then storage: that datagram's replies show the backend",
        },
    },
    Change {
        map: lb_common::maps::STATS,
        what: "nine counters appended (connect_no_storage, connect_direct_marked, \
               getpeername_reverse, udp_socks_taken, udp_socks_claimed, udp_socks_released, \
               tcp_socks_taken, tcp_socks_claimed, tcp_socks_released)",
        step: Step::Replace {
            migrate: copy_counters,
        },
    },
    Change {
        map: lb_common::maps::SOCKS,
        what: "SockXlate::flags has SOCK_DIRECT; new TCP sockets keep their state in \
               LB_TCP_SOCKS, LB_SOCKS only when their slot is taken (and for MPTCP)",
        step: Step::Keep {
            why: "same value; layout-4 programs never set SOCK_DIRECT and always create \
                  storage on a Service connect; a socket with state never reads LB_REVERSE, \
                  and LB_REVERSE gets entries only after the first sync, when the layout-5 \
                  programs are attached. The layout-5 programs read a TCP socket's \
                  LB_TCP_SOCKS slot first and its LB_SOCKS storage next, so the sockets the \
                  layout-4 programs translated keep their state; the takeover swaps \
                  getpeername before connect (attach.rs HOOKS), so a slot is never written \
                  while an old getpeername runs",
        },
    },
    Change {
        map: lb_common::nat::CT,
        what: "a flow to a backend on this node is one entry keyed by the client (CT_DIR_CLIENT; \
               IPv6 flows here, IPv4 ones in the new LB_CT4); \
               CtEntry::flags gains CT_FIN_CLIENT and CT_FIN_BACKEND (bits 2 and 3, a client \
               entry's per-side FIN), and CT_CLOSING now means closed (an RST, or a FIN in a \
               one-direction entry)",
        step: Step::Keep {
            why: "key and value sizes are unchanged; layout-5 programs still read layout-4 forward \
              and reply entries (SNAT'd flows and a client port's second flow are still \
              stored that way), and the layout-4 programs that run until the swap only make \
              such entries; layout-4 programs never set bits 2 and 3, and set CT_CLOSING only \
              on a FIN or RST in the direction of their one-direction entry, which layout 5 \
              still reads as that entry's close (10 s), as layout 4 did",
        },
    },
];

/// A [`Migration`] that carries nothing: the new map starts empty (counters restart from 0,
/// which Prometheus reads as a counter reset).
pub fn start_empty(_old: Map, _new: Map, _pass: Pass) -> Result<u64, MapError> {
    Ok(0)
}

/// A [`Migration`] for a per-CPU array of `u64` counters that grew (`LB_STATS` with counters
/// appended, `lb_common::stats`): per index the old map has and per CPU, the new value becomes
/// the larger of the two, in both passes. Idempotent, and never lowers what the new programs
/// counted; what the old programs counted in the microseconds between the first pass and the
/// takeover may be lost. Indexes keep their meaning (counters are appended, never renumbered).
pub fn copy_counters(old: Map, new: Map, _pass: Pass) -> Result<u64, MapError> {
    let old: PerCpuArray<MapData, u64> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<MapData, u64> = PerCpuArray::try_from(new)?;
    let mut written = 0;
    for index in 0..old.len().min(new.len()) {
        let before = old.get(&index, 0)?;
        let now = new.get(&index, 0)?;
        if before.iter().zip(now.iter()).all(|(b, n)| b <= n) {
            continue;
        }
        let merged: Vec<u64> = before
            .iter()
            .zip(now.iter())
            .map(|(b, n)| (*b).max(*n))
            .collect();
        let values = PerCpuValues::try_from(merged).map_err(|io_error| SyscallError {
            call: "per-CPU values",
            io_error,
        })?;
        new.set(index, values, 0)?;
        written += 1;
    }
    Ok(written)
}

/// A map's shape as the kernel reports it (or as a spec asks for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    /// The shape `spec` asks for under `capacities`.
    pub fn of(spec: &MapSpec, capacities: Capacities) -> Self {
        Self {
            map_type: super::object::map_type(spec.kind),
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: capacities.of(spec),
            flags: spec.flags,
        }
    }

    fn of_info(info: &MapInfo) -> Result<Self, MapError> {
        Ok(Self {
            map_type: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// How `self` (found) differs from `expected`, if it does. The capacity of an agent-sized
    /// map is not compared here: `object::check_pinned` reports that with its own advice.
    fn differs(&self, expected: &Self, spec: Option<&MapSpec>) -> Option<String> {
        let sized_by_agent = spec.is_some_and(|s| s.sized_by_agent);
        if self.map_type != expected.map_type {
            return Some(format!(
                "is a {:?} map, not {:?}",
                self.map_type, expected.map_type
            ));
        }
        let sizes = [
            ("key size", self.key_size, expected.key_size),
            ("value size", self.value_size, expected.value_size),
            (
                "capacity",
                if sized_by_agent {
                    expected.max_entries
                } else {
                    self.max_entries
                },
                expected.max_entries,
            ),
            ("flags", self.flags, expected.flags),
        ];
        sizes
            .into_iter()
            .find(|(_, found, want)| found != want)
            .map(|(what, found, want)| format!("has {what} {found}, not {want}"))
    }
}

/// What is pinned under a pin path, as [`decide`] needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pins {
    /// The layout version in `LB_META` (`None`: no `LB_META`; 0: an agent created the maps
    /// and stopped before it recorded its version).
    pub version: Option<u32>,
    /// Every map pinned under `maps/` except `LB_NAMES` (the agent's own, `names.rs`).
    pub maps: BTreeMap<String, Shape>,
    /// The maps an unfinished upgrade from [`PREVIOUS_LAYOUT`] moved aside.
    pub aside: BTreeSet<String>,
}

/// One map's part in an upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Unchanged (or [`Step::Keep`]): the new programs use it as it is.
    Adopt(&'static str),
    /// New: created when the programs load (or already, by an interrupted upgrade).
    Create(&'static str),
    /// Moved aside, replaced by a new map and migrated; `moved`: already aside.
    Replace { map: &'static str, moved: bool },
    /// Renamed from `from` to `to` (`done`: already), a new map takes `from`.
    KeepAs {
        from: &'static str,
        to: &'static str,
        done: bool,
    },
    /// Unpinned after the takeover.
    Remove(&'static str),
}

/// What the agent does with what it found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pinned, or pins of this layout: adopted as on a restart.
    Adopt,
    /// Pins of the previous layout, every difference covered: upgraded in place.
    Upgrade { from: u32, actions: Vec<Action> },
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "pinned maps under {pin} have layout version {found}, newer than this lb's {current}: \
         lb does not downgrade. Nothing was changed and the running datapath keeps serving. Run \
         an lb of layout {found} on these pins, or run `lb cleanup --pin-path {pin}` and start \
         this lb (Service traffic stops until it runs, and sockets opened before show their pod \
         in getpeername and UDP replies)"
    )]
    Newer {
        pin: PathBuf,
        found: u32,
        current: u32,
    },
    #[error(
        "pinned maps under {pin} have layout version {found}, this lb uses {current} and \
         upgrades pins of layout {previous} only, one layout at a time. Nothing was changed and \
         the running datapath keeps serving. Upgrade through the lb release of layout \
         {previous} first: start it on these pins (it takes them over), stop it, then start this \
         lb. Or run `lb cleanup --pin-path {pin}` and start this lb (Service traffic stops until \
         it runs, and sockets opened before show their pod in getpeername and UDP replies)"
    )]
    Older {
        pin: PathBuf,
        found: u32,
        current: u32,
        previous: u32,
    },
    #[error(
        "cannot upgrade the pins under {pin} from layout {from} to {to}: map {map} {what}, and \
         its entries cannot be carried over. Nothing was changed and the running datapath keeps \
         serving. {what_to_do}"
    )]
    Refused {
        pin: PathBuf,
        from: u32,
        to: u32,
        map: &'static str,
        what: &'static str,
        what_to_do: &'static str,
    },
    #[error(
        "cannot upgrade the pins under {pin} from layout {from} to {to}: pinned map {map} \
         {problem}, and this lb's list of layout changes does not say what to do with it (a bug \
         of this build: report it). Nothing was changed and the running datapath keeps serving; \
         keep running the lb of layout {from}, or run `lb cleanup --pin-path {pin}` and start \
         this lb (Service traffic stops until it runs)"
    )]
    Uncovered {
        pin: PathBuf,
        from: u32,
        to: u32,
        map: String,
        problem: String,
    },
    #[error("the list of layout changes is inconsistent: {0} (a bug of this build)")]
    Declaration(String),
    #[error("reading pinned map {path}")]
    Pinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("migrating map {map} ({pass:?})")]
    Migrate {
        map: &'static str,
        pass: Pass,
        #[source]
        source: MapError,
    },
}

/// Checks that `changes` can be applied to a layout of `specs`: every name means something,
/// no map twice, `LB_META` (which holds the version) never changes.
pub fn validate(specs: &[MapSpec], changes: &[Change]) -> Result<(), UpgradeError> {
    let in_specs = |name: &str| specs.iter().any(|s| s.name == name);
    let bad = |msg: String| Err(UpgradeError::Declaration(msg));
    for (i, change) in changes.iter().enumerate() {
        if changes[..i].iter().any(|c| c.map == change.map) {
            return bad(format!("{} is declared twice", change.map));
        }
        if change.map == lb_common::maps::META {
            return bad(format!(
                "{} holds the layout version and cannot change",
                change.map
            ));
        }
        match change.step {
            Step::Create | Step::Keep { .. } | Step::Replace { .. } | Step::Refuse { .. } => {
                if !in_specs(change.map) {
                    return bad(format!("{} is not a map of this layout", change.map));
                }
            }
            Step::KeepAs { name } => {
                if !in_specs(change.map) || !in_specs(name) {
                    return bad(format!(
                        "{} kept as {name}: both must be maps of this layout",
                        change.map
                    ));
                }
                if changes.iter().any(|c| c.map == name) {
                    return bad(format!("{name} is the target of a KeepAs and declared too"));
                }
            }
            Step::Remove => {
                if in_specs(change.map) {
                    return bad(format!(
                        "{} is removed but is still a map of this layout",
                        change.map
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Decides what to do with `pins` (pure). `current` and `previous` are the layout versions,
/// `specs` this build's maps, `changes` the declared differences, `capacities` the agent's
/// sizes; `pin` only names the pin path in errors.
pub fn decide(
    pin: &Path,
    pins: &Pins,
    current: u32,
    specs: &[MapSpec],
    changes: &[Change],
    capacities: Capacities,
) -> Result<Decision, UpgradeError> {
    let previous = current.saturating_sub(1);
    let from = match pins.version {
        None | Some(0) => return Ok(Decision::Adopt),
        Some(v) if v == current => return Ok(Decision::Adopt),
        Some(v) if v > current => {
            return Err(UpgradeError::Newer {
                pin: pin.to_owned(),
                found: v,
                current,
            });
        }
        Some(v) if v < previous => {
            return Err(UpgradeError::Older {
                pin: pin.to_owned(),
                found: v,
                current,
                previous,
            });
        }
        Some(v) => v,
    };
    validate(specs, changes)?;
    let uncovered = |map: &str, problem: String| UpgradeError::Uncovered {
        pin: pin.to_owned(),
        from,
        to: current,
        map: map.to_owned(),
        problem,
    };
    let spec_of = |name: &str| specs.iter().find(|s| s.name == name);
    let pinned = |name: &str| pins.maps.get(name);
    // The found shape must be what `spec` asks for.
    let check = |name: &str, spec: &MapSpec| -> Result<(), UpgradeError> {
        match pinned(name) {
            Some(found) => match found.differs(&Shape::of(spec, capacities), Some(spec)) {
                Some(problem) => Err(uncovered(name, problem)),
                None => Ok(()),
            },
            None => Ok(()),
        }
    };
    for change in changes {
        if let Step::Refuse { what_to_do } = change.step
            && (pinned(change.map).is_some() || pins.aside.contains(change.map))
        {
            return Err(UpgradeError::Refused {
                pin: pin.to_owned(),
                from,
                to: current,
                map: change.map,
                what: change.what,
                what_to_do,
            });
        }
    }
    let keep_as_targets: BTreeSet<&str> = changes
        .iter()
        .filter_map(|c| match c.step {
            Step::KeepAs { name } => Some(name),
            _ => None,
        })
        .collect();
    let mut actions = Vec::new();
    for spec in specs {
        let change = changes.iter().find(|c| c.map == spec.name);
        match change.map(|c| c.step) {
            // The target of a KeepAs is handled with its source.
            None if keep_as_targets.contains(spec.name) => {}
            None | Some(Step::Keep { .. }) => {
                check(spec.name, spec)?;
                actions.push(if pinned(spec.name).is_some() {
                    Action::Adopt(spec.name)
                } else {
                    Action::Create(spec.name)
                });
            }
            Some(Step::Create) => {
                // Pinned already: an interrupted upgrade created it.
                check(spec.name, spec)?;
                actions.push(Action::Create(spec.name));
            }
            Some(Step::Replace { .. }) => {
                let moved = pins.aside.contains(spec.name);
                if moved {
                    // What is pinned under the name now is the new map.
                    check(spec.name, spec)?;
                    actions.push(Action::Replace {
                        map: spec.name,
                        moved,
                    });
                } else if pinned(spec.name).is_some() {
                    actions.push(Action::Replace {
                        map: spec.name,
                        moved,
                    });
                } else {
                    actions.push(Action::Create(spec.name));
                }
            }
            Some(Step::KeepAs { name }) => {
                let target = spec_of(name).ok_or_else(|| {
                    UpgradeError::Declaration(format!("{name} is not a map of this layout"))
                })?;
                let done = pinned(name).is_some();
                if done {
                    // Renamed already: the original name, if pinned, holds the new map.
                    check(name, target)?;
                    check(spec.name, spec)?;
                } else {
                    check(spec.name, target)?;
                }
                actions.push(Action::KeepAs {
                    from: spec.name,
                    to: name,
                    done,
                });
            }
            Some(Step::Remove | Step::Refuse { .. }) => {}
        }
    }
    for name in pins.maps.keys() {
        if spec_of(name).is_some() {
            continue;
        }
        match changes.iter().find(|c| c.map == name.as_str()) {
            Some(Change {
                map,
                step: Step::Remove,
                ..
            }) => actions.push(Action::Remove(map)),
            _ => {
                return Err(uncovered(name, "is not a map of this layout".to_owned()));
            }
        }
    }
    Ok(Decision::Upgrade { from, actions })
}

/// The directory that holds the pins an upgrade from layout `from` moved aside.
pub fn aside_dir(layout: &PinLayout, from: u32) -> PathBuf {
    layout.root().join(format!("upgrade-from-{from}"))
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UpgradeError + 'a {
    move |source| UpgradeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The names of the pins in `dir` (none if it does not exist).
fn pin_names(dir: &Path) -> Result<BTreeSet<String>, UpgradeError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => return Err(io_err("listing", dir)(source)),
    };
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            names.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Reads what is pinned under `layout`.
pub fn read_pins(layout: &PinLayout) -> Result<Pins, UpgradeError> {
    let mut pins = Pins::default();
    for name in pin_names(&layout.maps_dir())? {
        if name == super::names::NAMES {
            continue;
        }
        let path = layout.map(&name);
        let pinned_err = |source| UpgradeError::Pinned {
            path: path.clone(),
            source,
        };
        let info = MapInfo::from_pin(&path).map_err(pinned_err)?;
        let shape = Shape::of_info(&info).map_err(pinned_err)?;
        if name == lb_common::maps::META {
            pins.version = Some(super::maps::read_layout_version(&path).map_err(pinned_err)?);
        }
        pins.maps.insert(name, shape);
    }
    pins.aside = pin_names(&aside_dir(layout, PREVIOUS_LAYOUT))?;
    Ok(pins)
}

/// What [`prepare`] decided and did; the agent calls its steps in order (module docs).
#[derive(Debug)]
pub struct Prepared {
    decision: Decision,
}

/// Reads the pins, decides, and (for an upgrade) moves aside and renames the pins that the
/// new object must not adopt. Nothing is touched unless the whole upgrade is covered.
pub fn prepare(layout: &PinLayout, capacities: Capacities) -> Result<Prepared, UpgradeError> {
    let pins = read_pins(layout)?;
    let decision = decide(
        layout.root(),
        &pins,
        LAYOUT_VERSION,
        SPECS,
        CHANGES,
        capacities,
    )?;
    if let Decision::Upgrade { from, actions } = &decision {
        tracing::info!(
            from = *from,
            to = LAYOUT_VERSION,
            pin_path = %layout.root().display(),
            steps = ?actions,
            "upgrading the pinned maps"
        );
        let aside = aside_dir(layout, *from);
        for action in actions {
            match action {
                Action::Replace { map, moved: false } => {
                    std::fs::create_dir_all(&aside).map_err(io_err("creating", &aside))?;
                    let to = aside.join(map);
                    std::fs::rename(layout.map(map), &to).map_err(io_err("moving aside", &to))?;
                }
                Action::KeepAs {
                    from: old,
                    to,
                    done: false,
                } => {
                    let to = layout.map(to);
                    std::fs::rename(layout.map(old), &to).map_err(io_err("renaming to", &to))?;
                }
                _ => {}
            }
        }
    }
    Ok(Prepared { decision })
}

impl Prepared {
    /// The decision.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Runs the migrations of the replaced maps for `pass` (after the new object is loaded).
    pub fn migrate(&self, layout: &PinLayout, pass: Pass) -> Result<(), UpgradeError> {
        let Decision::Upgrade { from, actions } = &self.decision else {
            return Ok(());
        };
        for action in actions {
            let Action::Replace { map, .. } = action else {
                continue;
            };
            let Some(Step::Replace { migrate }) =
                CHANGES.iter().find(|c| c.map == *map).map(|c| c.step)
            else {
                continue;
            };
            let old_path = aside_dir(layout, *from).join(map);
            let open = |path: &Path| {
                MapData::from_pin(path)
                    .and_then(Map::from_map_data)
                    .map_err(|source| UpgradeError::Pinned {
                        path: path.to_owned(),
                        source,
                    })
            };
            let old = open(&old_path)?;
            let new = open(&layout.map(map))?;
            let written = migrate(old, new, pass).map_err(|source| UpgradeError::Migrate {
                map,
                pass,
                source,
            })?;
            tracing::info!(map = *map, pass = ?pass, entries = written, "migrated");
        }
        Ok(())
    }

    /// Unpins the maps this layout no longer uses (after the new programs took over).
    pub fn remove_unused(&self, layout: &PinLayout) -> Result<(), UpgradeError> {
        let Decision::Upgrade { actions, .. } = &self.decision else {
            return Ok(());
        };
        for action in actions {
            if let Action::Remove(map) = action {
                let path = layout.map(map);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(io_err("removing", &path)(source)),
                }
            }
        }
        Ok(())
    }

    /// After the new version is recorded: removes the moved-aside pins of this and any earlier
    /// upgrade (also those of an upgrade that crashed after recording its version).
    pub fn finish(&self, layout: &PinLayout) -> Result<(), UpgradeError> {
        if let Decision::Upgrade { from, .. } = &self.decision {
            tracing::info!(
                from = *from,
                to = LAYOUT_VERSION,
                "pinned maps upgraded; layout version recorded"
            );
        }
        let root = layout.root();
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_err("listing", root)(source)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("listing", root))?;
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("upgrade-from-")
            {
                continue;
            }
            let dir = entry.path();
            for name in pin_names(&dir)? {
                let path = dir.join(name);
                std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
            }
            std::fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{BPF_F_NO_PREALLOC, MapKind};

    use super::*;

    const A: &str = "LB_A";
    const B: &str = "LB_B";
    const NEW: &str = "LB_NEW";
    const OLD: &str = "LB_OLD";
    const META: &str = lb_common::maps::META;

    const fn spec(name: &'static str, value_size: u32) -> MapSpec {
        MapSpec {
            name,
            kind: MapKind::Hash,
            key_size: 4,
            value_size,
            max_entries: 16,
            flags: BPF_F_NO_PREALLOC,
            agent_writes: true,
            sized_by_agent: false,
        }
    }

    /// This layout (5 in the tests): A unchanged, B's value grew from 8 to 16, NEW is new,
    /// and the previous layout had OLD.
    const SPECS5: &[MapSpec] = &[spec(META, 4), spec(A, 8), spec(B, 16), spec(NEW, 8)];

    fn migrate_b(_: Map, _: Map, _: Pass) -> Result<u64, MapError> {
        Ok(0)
    }

    const COVERED: &[Change] = &[
        Change {
            map: B,
            what: "value grew to 16 bytes",
            step: Step::Replace { migrate: migrate_b },
        },
        Change {
            map: NEW,
            what: "new",
            step: Step::Create,
        },
        Change {
            map: OLD,
            what: "no longer used",
            step: Step::Remove,
        },
    ];

    fn shape(value_size: u32) -> Shape {
        Shape::of(&spec("x", value_size), Capacities::default())
    }

    /// Pins of version `version` as the layout-4 agent leaves them.
    fn layout4(version: u32) -> Pins {
        Pins {
            version: Some(version),
            maps: [(META, 4), (A, 8), (B, 8), (OLD, 8)]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), shape(v)))
                .collect(),
            aside: BTreeSet::new(),
        }
    }

    fn decide5(pins: &Pins, changes: &[Change]) -> Result<Decision, UpgradeError> {
        decide(
            Path::new("/sys/fs/bpf/lb"),
            pins,
            5,
            SPECS5,
            changes,
            Capacities::default(),
        )
    }

    #[test]
    fn decisions() {
        let upgrade = Decision::Upgrade {
            from: 4,
            actions: vec![
                Action::Adopt(META),
                Action::Adopt(A),
                Action::Replace {
                    map: B,
                    moved: false,
                },
                Action::Create(NEW),
                Action::Remove(OLD),
            ],
        };
        let mut same = layout4(5);
        same.maps.remove(OLD);
        // (name, what is pinned, the declared changes, the decision or a part of the error)
        type Case = (
            &'static str,
            Pins,
            &'static [Change],
            Result<Decision, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing pinned",
                Pins::default(),
                COVERED,
                Ok(Decision::Adopt),
            ),
            (
                "version not recorded yet",
                layout4(0),
                COVERED,
                Ok(Decision::Adopt),
            ),
            ("same layout", same, &[], Ok(Decision::Adopt)),
            (
                "previous layout, every change covered",
                layout4(4),
                COVERED,
                Ok(upgrade),
            ),
            (
                "previous layout, B changed but not declared",
                layout4(4),
                &COVERED[1..],
                Err("pinned map LB_B has value size 8, not 16"),
            ),
            (
                "previous layout, OLD gone but not declared",
                layout4(4),
                &COVERED[..2],
                Err("pinned map LB_OLD is not a map of this layout"),
            ),
            (
                "previous layout, a change declared as refused",
                layout4(4),
                &[Change {
                    map: A,
                    what: "keys are hashed differently",
                    step: Step::Refuse {
                        what_to_do: "Run `lb cleanup` first.",
                    },
                }],
                Err("map LB_A keys are hashed differently"),
            ),
            (
                "older layout",
                layout4(3),
                COVERED,
                Err("Upgrade through the lb release of layout 4 first"),
            ),
            (
                "newer layout",
                layout4(6),
                COVERED,
                Err("lb does not downgrade"),
            ),
        ];
        for (name, pins, changes, want) in cases {
            let got = decide5(&pins, changes);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{name}"),
                (Err(got), Err(want)) => {
                    let got = got.to_string();
                    assert!(got.contains(want), "{name}: {got:?} lacks {want:?}");
                    assert!(
                        got.contains("Nothing was changed"),
                        "{name}: {got:?} must say that nothing was changed"
                    );
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// After a crash mid-upgrade: B is aside and the new B pinned, NEW created, OLD still
    /// pinned; the next start carries on.
    #[test]
    fn an_interrupted_upgrade_resumes() {
        let mut pins = layout4(4);
        pins.maps.insert(B.to_owned(), shape(16));
        pins.maps.insert(NEW.to_owned(), shape(8));
        pins.aside.insert(B.to_owned());
        let Ok(Decision::Upgrade { actions, .. }) = decide5(&pins, COVERED) else {
            panic!("not an upgrade");
        };
        assert!(actions.contains(&Action::Replace {
            map: B,
            moved: true
        }));
        assert!(actions.contains(&Action::Create(NEW)));
        // A new B of the wrong shape is not taken for the migrated one.
        pins.maps.insert(B.to_owned(), shape(8));
        assert!(decide5(&pins, COVERED).is_err());
    }

    #[test]
    fn keep_as_renames_the_old_map() {
        const SPECS: &[MapSpec] = &[spec(META, 4), spec(A, 16), spec(OLD, 8)];
        const CHANGES: &[Change] = &[Change {
            map: A,
            what: "value grew; sockets made before read the old map",
            step: Step::KeepAs { name: OLD },
        }];
        let mut pins = layout4(4);
        pins.maps.remove(B);
        pins.maps.remove(OLD);
        let decide = |pins: &Pins| {
            decide(
                Path::new("/p"),
                pins,
                5,
                SPECS,
                CHANGES,
                Capacities::default(),
            )
        };
        let want = |done| Decision::Upgrade {
            from: 4,
            actions: vec![
                Action::Adopt(META),
                Action::KeepAs {
                    from: A,
                    to: OLD,
                    done,
                },
            ],
        };
        assert_eq!(decide(&pins).ok(), Some(want(false)));
        // Renamed, and the new A created, before a crash.
        pins.maps.insert(OLD.to_owned(), shape(8));
        pins.maps.insert(A.to_owned(), shape(16));
        assert_eq!(decide(&pins).ok(), Some(want(true)));
    }

    #[test]
    fn inconsistent_declarations_are_refused() {
        let twice = [COVERED[0], COVERED[0]];
        let meta = [Change {
            map: META,
            what: "",
            step: Step::Keep { why: "" },
        }];
        let removed_but_used = [Change {
            map: A,
            what: "",
            step: Step::Remove,
        }];
        let unknown = [Change {
            map: "LB_NOPE",
            what: "",
            step: Step::Create,
        }];
        for changes in [&twice[..], &meta, &removed_but_used, &unknown] {
            assert!(
                matches!(validate(SPECS5, changes), Err(UpgradeError::Declaration(_))),
                "{changes:?}"
            );
        }
        assert!(validate(SPECS5, COVERED).is_ok());
    }

    /// The real list, against the real maps: fails the build's tests if a declaration names
    /// a map that does not exist, or changes LB_META.
    #[test]
    fn this_layouts_changes_are_consistent() {
        validate(SPECS, CHANGES).expect("CHANGES");
        assert_eq!(PREVIOUS_LAYOUT + 1, LAYOUT_VERSION);
    }
}
