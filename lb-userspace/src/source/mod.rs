//! Where Services and endpoints come from.

pub mod convert;
pub mod manifests;
pub mod watch;
