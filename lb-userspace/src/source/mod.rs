//! Where Services and endpoints come from.

pub mod convert;
pub mod documents;
pub mod kube;
pub mod manifests;
pub mod watch;
