//! `LB_CT_FWD` (`lb_common::nat::CT_FORWARD`): which frontends may have forward entries in
//! `LB_CT`, so that XDP looks a flow's forward key up only where one can be.
//!
//! XDP sets a frontend's bucket before it stores a forward entry; nothing clears it. A bucket
//! that says 0 while `LB_CT` holds a forward entry of that frontend would move the entry's
//! flow to another backend at its next packet. That can happen only if the buckets are new
//! beside an `LB_CT` that already has entries: an upgrade from layout 4 (every flow of layout
//! 4 has a forward entry, and `LB_CT` is kept), a map removed by hand, or a start that stopped
//! between creating the map and filling it. So every start, once the programs are loaded and
//! before they are attached ([`Pending::after_load`]), the agent sets every bucket in those
//! cases and then marks the map consistent (`CT_FORWARD_CONSISTENT`); the mark is what a
//! later start trusts. An empty `LB_CT` created together with the map needs no bucket set.

use aya::maps::{Array, MapData};
use lb_common::nat::{CT, CT_FORWARD, CT_FORWARD_BUCKETS, CT_FORWARD_CONSISTENT};

use super::{PinLayout, maps::MapsError};

/// What [`before_load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "after_load must run once the programs are loaded"]
pub struct Pending {
    /// `LB_CT` was pinned before this start (it may hold entries).
    ct_pinned: bool,
    /// The agent upgrades pins of the previous layout (or carries such an upgrade on).
    upgrading: bool,
}

/// Looks at the pins before the programs load (which creates what is missing).
pub fn before_load(layout: &PinLayout, upgrading: bool) -> Pending {
    Pending {
        ct_pinned: layout.map(CT).exists(),
        upgrading,
    }
}

/// Whether every bucket must be set: an upgrade, or an `LB_CT` that existed before this start
/// beside buckets not marked consistent (`consistent`: the mark; 0 for a map just created).
fn must_fill(pending: Pending, consistent: u32) -> bool {
    pending.upgrading || (pending.ct_pinned && consistent == 0)
}

impl Pending {
    /// Once the programs are loaded (the map exists) and before they are attached: sets every
    /// bucket to 1 if [`must_fill`], then marks the map consistent. Returns how many buckets
    /// it set.
    pub fn after_load(self, layout: &PinLayout) -> Result<u32, MapsError> {
        let mut buckets: Array<MapData, u32> = super::maps::typed(layout, CT_FORWARD)?;
        let wrap = |source| MapsError::Open {
            path: layout.map(CT_FORWARD).display().to_string(),
            source,
        };
        let consistent = buckets.get(&CT_FORWARD_CONSISTENT, 0).map_err(wrap)?;
        let fill = must_fill(self, consistent);
        if fill {
            for bucket in 0..CT_FORWARD_BUCKETS {
                buckets.set(bucket, 1, 0).map_err(wrap)?;
            }
            tracing::info!(
                buckets = CT_FORWARD_BUCKETS,
                "LB_CT may hold forward entries LB_CT_FWD does not record (an upgrade): every frontend's bucket set"
            );
        }
        if consistent == 0 {
            buckets.set(CT_FORWARD_CONSISTENT, 1, 0).map_err(wrap)?;
        }
        Ok(if fill { CT_FORWARD_BUCKETS } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_set_where_ct_may_hold_forward_entries_they_miss() {
        let p = |ct_pinned, upgrading| Pending {
            ct_pinned,
            upgrading,
        };
        // (case, pending, consistent mark, must fill)
        let cases = [
            ("fresh start: both maps new", p(false, false), 0, false),
            ("restart: both pinned, marked", p(true, false), 1, false),
            (
                "map removed by hand, or a start that stopped before the mark",
                p(true, false),
                0,
                true,
            ),
            (
                "upgrade from layout 4: LB_CT kept, the map new",
                p(true, true),
                0,
                true,
            ),
            (
                "an interrupted upgrade carried on: marked already",
                p(true, true),
                1,
                true,
            ),
        ];
        for (case, pending, consistent, want) in cases {
            assert_eq!(must_fill(pending, consistent), want, "{case}");
        }
    }
}
