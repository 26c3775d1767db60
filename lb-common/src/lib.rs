//! What lb's kernel programs and its agent agree on, and nothing else.
//!
//! Every map the programs use is described here once: its pinned name, its capacity, and the
//! `#[repr(C)]` key and value types with explicit padding and a size assertion each. The agent
//! (feature `user`) gets `aya::Pod` impls for the same types, so the two sides can never drift
//! apart silently; the agent also refuses pinned maps whose shape differs from [`maps::SPECS`].
//!
//! Pure selection logic that the programs run per connection lives in [`select`], so it is
//! unit-tested on the host.
#![no_std]

pub mod addr;
pub mod csum;
pub mod maglev;
pub mod maps;
pub mod nat;
pub mod ns_affinity;
pub mod programs;
pub mod select;
pub mod stats;

pub use addr::Addr;
