//! `warren-relay`: a DERP v2 relay with STUN.
//!
//! Nodes that cannot reach each other directly send end-to-end encrypted packets through the
//! relay, addressed by Curve25519 public key. The wire protocol is Tailscale's DERP v2, over an
//! HTTP/1.1 upgrade or WebSocket, usually inside TLS. The relay also answers STUN Binding
//! requests so nodes can learn their public address.
//!
//! Layout: `core` (the forwarding policy and each connection's session: synchronous, no I/O,
//! `now` passed in), the shells that move bytes for it (`conn`: one actor per client;
//! `mesh_conn`: a sibling connected to us; `mesh`: our links to siblings), [`config`] (file +
//! CLI → typed config), [`server`] (listeners and shutdown), [`reload`] (SIGHUP and changed
//! certificate files), `web` (routing of the DERP port),
//! `stun`, `io` (lean TLS, the framed stream), `state` (what the tasks share), `tls` and `keyfile` (re-exported from `warren-common`), [`metrics`].

pub mod admission;
pub mod config;
mod conn;
mod core;
mod io;
mod mesh;
mod mesh_conn;
pub mod metrics;
pub mod reload;
pub mod server;
mod state;
mod stun;
mod web;

pub use config::Config;

/// Entry points for fuzz targets (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    /// Parses an HTTP request head and routes it, as the DERP port does with its first bytes.
    pub fn http_head(data: &[u8]) {
        if let Ok(Some((head, len))) = crate::web::parse_head_for_fuzzing(data) {
            assert!(len <= data.len());
            let _ = crate::web::route(&head);
        }
    }

    /// A whole conversation of clients and a mesh sibling with the relay's core, scripted by
    /// `script` (see `core/conversation.rs`), starting at `start`.
    pub fn relay_conversation(script: &[u8], start: std::time::Instant) {
        crate::core::conversation::run(script, start);
    }
}
pub use reload::{ReloadError, Reloaded};
pub use server::{Server, ServerError};
pub use warren_common::{keyfile, limits, tls};
