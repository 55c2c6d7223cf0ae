//! `warren`: the node client of the Warren mesh.
//!
//! A node keeps a home relay connection through the DERP client ([`derp`], shared with the
//! relays' mesh links), punches direct UDP paths to peers ([`node`], [`paths`], [`disco`]) and
//! publishes local services through an edge ([`funnel`]).

pub mod control;
pub mod disco;
pub mod fetch;
pub mod funnel;
pub mod node;
pub mod paths;
pub mod regionmap;

pub use warren_common::derp::{ClientError, ConnectOptions, DerpClient};
/// The DERP client lives in `warren-common` (the relay's mesh links use it too).
pub use warren_common::{derp, url};
