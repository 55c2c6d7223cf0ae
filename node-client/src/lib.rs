//! `warren`: the node client of the Warren mesh.
//!
//! A node keeps a home relay connection through the DERP client (`warren-relay-client`, shared
//! with the relays' mesh links and the load harness), punches direct UDP paths to peers
//! ([`node`], [`paths`], [`disco`]) and publishes local services through an edge ([`funnel`]).

pub mod control;
pub mod disco;
pub mod fetch;
pub mod funnel;
pub mod node;
pub mod paths;
pub mod regionmap;
