//! The lb agent as a library: the `lb` binary (`src/main.rs`) is its command line, and the
//! fuzz targets (`fuzz/`) drive its input parsing directly.
//!
//! The flow reads one way: [`source`] (manifests, the Kubernetes API) -> [`model`] ->
//! [`desired`] (with [`tracker`] keeping it incremental) -> [`plan`] -> [`kernel`], driven by
//! [`sync`]; [`health`], [`metrics`] and [`http`] report on it, [`inspect`] reads the maps.

pub mod changes;
pub mod cli;
pub mod desired;
pub mod explain;
pub mod health;
pub mod http;
pub mod inspect;
pub mod kernel;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod revindex;
pub mod run;
pub mod service_health;
pub mod source;
pub mod sync;
#[cfg(test)]
mod test_support;
pub mod topology;
pub mod tracker;
