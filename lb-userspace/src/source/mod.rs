//! Where Services and endpoints come from.

pub mod convert;
pub mod kube;
pub mod manifests;
pub mod watch;
