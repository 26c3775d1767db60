//! `LB_CT_FWD` (`lb_common::nat::CT_FORWARD`): which frontends may have forward entries in
//! `LB_CT`, so that XDP looks a flow's forward key up only where one can be.
//!
//! XDP sets a frontend's bucket before it stores a forward entry; nothing clears it. A bucket
//! that says 0 while `LB_CT` holds a forward entry of that frontend would move the entry's
//! flow to another backend at its next packet. That happens only if the map is made empty
//! beside an `LB_CT` that already has entries: an upgrade from layout 4 (every flow of
//! layout 4 has a forward entry, and `LB_CT` is kept), or a map removed by hand. So in those
//! two cases the agent sets every bucket once the programs are loaded and before they are
//! attached ([`Pending::after_load`]); an empty `LB_CT` created together with it needs
//! nothing. An upgrade that stops halfway is decided again at the next start (the layout
//! version is recorded last), which fills again.

use aya::maps::{Array, MapData};
use lb_common::nat::{CT, CT_FORWARD, CT_FORWARD_BUCKETS};

use super::{PinLayout, maps::MapsError};

/// What [`before_load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "after_load must run once the programs are loaded"]
pub struct Pending {
    /// Every bucket must say "may have" before the programs are attached.
    fill: bool,
}

/// Looks at the pins before the programs load (which creates what is missing): `upgrading`
/// says the agent upgrades pins of the previous layout (or carries such an upgrade on).
pub fn before_load(layout: &PinLayout, upgrading: bool) -> Pending {
    Pending {
        fill: upgrading || (layout.map(CT).exists() && !layout.map(CT_FORWARD).exists()),
    }
}

impl Pending {
    /// Once the programs are loaded (the map exists) and before they are attached: sets every
    /// bucket to 1 if [`before_load`] said so. Returns how many buckets it set.
    pub fn after_load(self, layout: &PinLayout) -> Result<u32, MapsError> {
        if !self.fill {
            return Ok(0);
        }
        let mut buckets: Array<MapData, u32> = super::maps::typed(layout, CT_FORWARD)?;
        for bucket in 0..CT_FORWARD_BUCKETS {
            buckets
                .set(bucket, 1, 0)
                .map_err(|source| MapsError::Open {
                    path: layout.map(CT_FORWARD).display().to_string(),
                    source,
                })?;
        }
        tracing::info!(
            buckets = CT_FORWARD_BUCKETS,
            "LB_CT kept without LB_CT_FWD (an upgrade): every frontend may have forward entries"
        );
        Ok(CT_FORWARD_BUCKETS)
    }
}
