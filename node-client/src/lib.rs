//! `warren`: the node client of the Warren mesh.
//!
//! A node keeps a home relay connection through the DERP client (`warren-relay-client`, shared
//! with the relays' mesh links and the load harness), punches direct UDP paths to peers
//! ([`core`]: sans-IO peers, paths, home choice and disco; [`node`]: the shell that owns the
//! socket; `relay_link`: the home relay connection) and publishes local services through an
//! edge ([`funnel`]).

pub mod config;
pub mod control;
pub mod core;
pub mod fetch;
pub mod funnel;
pub mod metrics;
pub mod net;
pub mod node;
pub mod regionmap;
mod relay_link;
pub mod services;

pub use crate::core::{disco, paths};
