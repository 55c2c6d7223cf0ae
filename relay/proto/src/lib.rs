//! Sans-IO building blocks of the Warren relay: Tailscale's DERP v2 wire protocol.
//!
//! Nothing in this crate performs I/O, reads the clock or spawns tasks: bytes go in, frames and
//! bytes come out. The tokio shell lives in `warren-relay` (server) and `warren` (client).
//!
//! # Connection flow
//!
//! ```text
//! client                                  relay
//!   | GET /derp  Upgrade: DERP (or WebSocket, subprotocol "derp")
//!   |---------------------------------------->|
//!   |        101 Switching Protocols          |  (omitted when the client sent Derp-Fast-Start: 1)
//!   |<----------------------------------------|
//!   |        ServerKey(magic, server key)     |
//!   |<----------------------------------------|
//!   | ClientInfo(client key, nonce, box(json))|
//!   |---------------------------------------->|
//!   |        ServerInfo(nonce, box(json))     |
//!   |<----------------------------------------|
//!   | SendPacket(dst, bytes) ...              |  RecvPacket(src, bytes) to dst
//! ```
//!
//! Modules: [`frame`] (every frame type and the streaming decoder), [`handshake`] (the NaCl-box
//! sealed client and server info), [`key`] (Curve25519 keys), [`ws`] (WebSocket framing, the
//! alternative transport) and [`stun`] (the Binding responder).

#![deny(missing_docs)]

pub mod error;
pub mod frame;
pub mod framer;
pub mod handshake;
pub mod key;
pub mod stun;
pub mod ws;

pub use error::DecodeError;
pub use frame::{Frame, FrameDecoder, PeerGoneReason};
pub use framer::{Framer, Transport};
pub use key::{PublicKey, SecretKey};

/// Version of the DERP protocol spoken here (v2: RecvPacket carries the source key).
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest packet payload a client may send or receive, in bytes.
pub const MAX_PACKET_SIZE: usize = 64 << 10;

/// Length of a Curve25519 public key on the wire.
pub const KEY_LEN: usize = 32;

/// Length of a NaCl box nonce on the wire.
pub const NONCE_LEN: usize = 24;

/// The 8-byte magic that opens the ServerKey frame: `DERP` followed by U+1F511 in UTF-8.
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91];
