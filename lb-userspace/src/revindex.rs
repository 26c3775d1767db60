//! `crate::plan::reverse_wanted` (test-only), kept up to date pass by pass: a pass recomputes the
//! reverse entries of the frontends it touched only, and hands the reverse-map thread the
//! entries that changed, so that a one-Service change costs the sync loop the same at 10
//! and at 100 000 Services (issue 11: "one changed file with 10 000 Services loaded reaches
//! the kernel within 50 ms").
//!
//! The choice is that of `crate::plan::reverse_wanted` (built for tests only), which stays the reference (the tests
//! compare the two after every change): per TCP backend (address, port), the TCP ClusterIP
//! frontend in the kernel with a non-zero count of the lowest (namespace, name, port,
//! frontend key) that has it among its backends; none for a backend whose address and port
//! are themselves a frontend.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use lb_common::maps::{FrontendKey, IPPROTO_TCP, RevNat};

use crate::desired::{Desired, FrontendKind};
use crate::kernel::state::KernelState;
use crate::model::ObjectKey;

/// What orders the frontends claiming one backend: the lowest wins. Unique per frontend (it
/// ends with the frontend's key), shared by the claim and every backend's set of claimants.
type Rank = Arc<(ObjectKey, u16, FrontendKey)>;

/// One frontend's claim: its rank, the entry it would be (address, port, id), and the
/// backends it claims.
struct Claim {
    rank: Rank,
    service: RevNat,
    backends: Vec<FrontendKey>,
}

/// A change of the wanted entries: `Some` puts, `None` removes.
pub type ReverseDelta = Vec<(FrontendKey, Option<RevNat>)>;

/// The claims behind the wanted reverse entries, between passes.
#[derive(Default)]
pub struct ReverseIndex {
    claims: HashMap<FrontendKey, Claim>,
    /// Per backend key, the ranks of the frontends claiming it (usually one; 100 000 when
    /// every Service shares the backend), lowest first: adding, removing and finding the
    /// owner are logarithmic.
    claimants: HashMap<FrontendKey, BTreeSet<Rank>>,
    /// The wanted entries, as last handed out.
    wanted: BTreeMap<FrontendKey, RevNat>,
}

/// The reverse-entry key of a TCP backend.
fn backend_key(addr: lb_common::Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

impl ReverseIndex {
    /// The wanted entries now.
    pub fn wanted(&self) -> &BTreeMap<FrontendKey, RevNat> {
        &self.wanted
    }

    /// Recomputes everything (the first pass, a full plan); returns the changes.
    pub fn rebuild(&mut self, desired: &Desired, state: &KernelState) -> ReverseDelta {
        let keys: std::collections::HashSet<FrontendKey> = self
            .claims
            .keys()
            .copied()
            .chain(desired.frontends.keys().copied())
            .collect();
        self.update(desired, state, keys)
    }

    /// Recomputes the claims of the frontends `touched` (written, deleted or changed by the
    /// pass, in any protocol: a frontend added at a backend's address takes that backend's
    /// entry away) and the entries of their backends; returns the changes.
    pub fn update(
        &mut self,
        desired: &Desired,
        state: &KernelState,
        touched: impl IntoIterator<Item = FrontendKey>,
    ) -> ReverseDelta {
        let mut affected: Vec<FrontendKey> = Vec::new();
        for key in touched {
            // The backend at this frontend's own address and port (if any) is re-decided.
            affected.push(backend_key(key.addr, key.port));
            if let Some(old) = self.claims.remove(&key) {
                for b in &old.backends {
                    if let Some(set) = self.claimants.get_mut(b) {
                        set.remove(&old.rank);
                        if set.is_empty() {
                            self.claimants.remove(b);
                        }
                    }
                    affected.push(*b);
                }
            }
            let Some(want) = desired.frontends.get(&key) else {
                continue;
            };
            if key.proto != IPPROTO_TCP || want.kind != FrontendKind::ClusterIp {
                continue;
            }
            let Some(frontend) = state.frontends().get(&key).filter(|f| f.count != 0) else {
                continue;
            };
            let backends: Vec<FrontendKey> = want
                .backends
                .iter()
                .map(|b| backend_key(b.addr, b.port))
                .collect();
            let rank: Rank = Arc::new((want.service.clone(), u16::from_be(key.port), key));
            for b in &backends {
                self.claimants.entry(*b).or_default().insert(rank.clone());
                affected.push(*b);
            }
            self.claims.insert(
                key,
                Claim {
                    rank,
                    service: RevNat {
                        addr: key.addr,
                        port: key.port,
                        _pad: [0; 2],
                        id: frontend.id,
                    },
                    backends,
                },
            );
        }
        affected.sort_unstable();
        affected.dedup();
        let mut delta = ReverseDelta::new();
        for b in affected {
            let now = self.entry_of(desired, &b);
            if self.wanted.get(&b) != now.as_ref() {
                match now {
                    Some(service) => self.wanted.insert(b, service),
                    None => self.wanted.remove(&b),
                };
                delta.push((b, now));
            }
        }
        delta
    }

    /// The entry backend `b` should have: its lowest claimant's, unless `b` is a frontend.
    fn entry_of(&self, desired: &Desired, b: &FrontendKey) -> Option<RevNat> {
        if desired.frontends.contains_key(b) {
            return None;
        }
        let lowest = self.claimants.get(b)?.first()?;
        self.claims.get(&lowest.2).map(|c| c.service)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::desired::DesiredFrontend;
    use crate::plan::reverse_wanted;

    use crate::test_support::{be, fkey};

    fn frontend(service: &str, kind: FrontendKind, backends: &[u8]) -> DesiredFrontend {
        DesiredFrontend {
            service: ObjectKey::new("default", service),
            port_name: String::new(),
            kind,
            policy: crate::desired::TrafficPolicy::default(),
            affinity_timeout_s: 0,
            backends: backends.iter().map(|&b| be(b)).collect(),
            external: None,
            source_ranges: Vec::new(),
        }
    }

    /// Random desired states, written to the kernel state, each followed by an update with
    /// only the touched frontends: the index (and the deltas applied to a copy, as the
    /// reverse-map thread does) always equals the full computation.
    #[test]
    fn incremental_updates_match_the_full_computation() {
        let mut next = crate::test_support::xorshift(0x5eed_1234_abcd_0001);
        let mut state = KernelState::default();
        let mut index = ReverseIndex::default();
        let mut copy: BTreeMap<FrontendKey, RevNat> = BTreeMap::new();
        let mut before = Desired::default();
        let mut entries = 0;
        for round in 0..400 {
            let mut d = Desired::default();
            for f in 0..(next(7) as u8) {
                let backends: Vec<u8> = (0..next(5)).map(|_| next(8) as u8).collect();
                let kind = if next(6) == 0 {
                    FrontendKind::NodePort
                } else {
                    FrontendKind::ClusterIp
                };
                // Services named out of key order, so the rank is not the key's.
                let name = format!("s{}", next(4));
                let mut key = fkey(f);
                if next(8) == 0 {
                    // A frontend at a backend's own address and port.
                    let b = be(next(8) as u8);
                    key = FrontendKey {
                        addr: b.addr,
                        port: b.port,
                        ..key
                    };
                } else if next(8) == 0 {
                    key.proto = lb_common::maps::IPPROTO_UDP;
                }
                d.frontends.insert(key, frontend(&name, kind, &backends));
            }
            let kernel_before = state.frontends().clone();
            let ops: Vec<_> = state.plan(&d).into_iter().flatten().collect();
            state.apply_all(&ops);
            let delta = if round % 50 == 0 {
                index.rebuild(&d, &state)
            } else {
                let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
                for key in before.frontends.keys().chain(d.frontends.keys()) {
                    if before.frontends.get(key) != d.frontends.get(key) {
                        touched.insert(*key);
                    }
                }
                for key in kernel_before.keys().chain(state.frontends().keys()) {
                    if kernel_before.get(key) != state.frontends().get(key) {
                        touched.insert(*key);
                    }
                }
                index.update(&d, &state, touched)
            };
            for (k, v) in delta {
                match v {
                    Some(v) => copy.insert(k, v),
                    None => copy.remove(&k),
                };
            }
            let full = reverse_wanted(&d, &state);
            entries += full.len();
            assert_eq!(index.wanted(), &full, "round {round}");
            assert_eq!(copy, full, "round {round}");
            before = d;
        }
        // The sequence is not trivial: about three entries a round.
        assert!(entries > 400, "{entries}");
    }
}
