//! The TCP ports nodes hold on this edge: one node per port, a stop token per listener.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;
use tracing::info;

/// TCP ports held by nodes.
#[derive(Debug, Default)]
pub(crate) struct TcpPorts {
    held: Mutex<HashMap<u16, Held>>,
}

#[derive(Debug)]
struct Held {
    name: String,
    tunnel: u64,
    stop: CancellationToken,
}

impl TcpPorts {
    /// Records that tunnel `tunnel` of node `name` holds `port`, listened on until `stop`.
    pub(crate) fn insert(&self, port: u16, name: &str, tunnel: u64, stop: CancellationToken) {
        let held = Held { name: name.to_owned(), tunnel, stop };
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(port, held);
    }

    /// Makes tunnel `tunnel` (the same node's newer one) the holder of `port`.
    pub(crate) fn adopt(&self, port: u16, tunnel: u64) {
        if let Some(h) = self.held.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&port) {
            h.tunnel = tunnel;
        }
    }

    /// Closes the ports of tunnel `id` for which `drop` says so.
    pub(crate) fn release(&self, id: u64, drop: impl Fn(u16) -> bool) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).retain(|port, h| {
            let keep = h.tunnel != id || !drop(*port);
            if !keep {
                h.stop.cancel();
                info!(name = %h.name, port, "TCP service withdrawn");
            }
            keep
        });
    }

    /// Closes every listener (shutdown).
    pub(crate) fn close_all(&self) {
        for h in self.held.lock().unwrap_or_else(|e| e.into_inner()).values() {
            h.stop.cancel();
        }
    }

    /// The name and tunnel holding `port`.
    pub(crate) fn holder(&self, port: u16) -> Option<(String, u64)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&port).map(|h| (h.name.clone(), h.tunnel))
    }
}
