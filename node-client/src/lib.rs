//! `warren`: the node client of the Warren mesh.
//!
//! For now it holds the DERP client ([`derp`]) that talks to a Warren relay (or any DERP v2
//! server) over the HTTP upgrade or WebSocket, with or without TLS. Path selection, hole
//! punching and the funnel agent grow on top of it.

pub mod control;
pub mod derp;
pub mod disco;
pub mod fetch;
pub mod funnel;
pub mod node;
pub mod paths;
pub mod regionmap;
pub mod url;

pub use derp::{ClientError, ConnectOptions, DerpClient};
