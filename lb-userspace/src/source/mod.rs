//! Where Services and endpoints come from.

mod api_store;
mod assembly;
pub mod convert;
pub mod documents;
pub mod kube;
pub mod manifests;
mod objects;
pub mod watch;
