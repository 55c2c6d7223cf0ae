//! `warren-loadtest`: load scenarios for Warren relays and edges.
//!
//! Every figure is counted at the clients: a packet is lost when a sender sent it and its
//! receiver never got it; latency is the receiver's clock minus the timestamp the sender put in
//! the payload (both in this process, one clock). Results are meant to be read as ratios against
//! a baseline measured in the same run on the same machine.

mod dial;
pub mod edge;
pub mod idle;
pub mod origin;
pub mod probe;
pub mod relay;
pub mod report;
pub mod soak;
pub mod tcp;
pub mod ws;

pub use report::{Latency, RelayReport};
