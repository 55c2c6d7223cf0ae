//! `warren-edge`: Funnel. Publishes nodes' local services on public HTTPS URLs.
//!
//! A node opens one QUIC connection to the edge and registers `<name>` with an operator-issued
//! token ([`tunnel`]); visitors of `https://<name>.<funnel domain>` reach the edge's public
//! listeners, where TLS is terminated with a certificate chosen by SNI ([`certs`]) and each
//! request becomes one bidirectional QUIC stream to the node ([`proxy`]), opened through the
//! route table (`routes`: one `Routes::open` and one `RouteError` for the proxy and for
//! requests forwarded by a sibling). Several edges can share certificates and routes in Redis
//! and forward to each other (`cluster`). Raw TCP ports and TLS for a name can be passed to a
//! node without terminating anything here (`passthrough`).

mod access;
pub use warren_common::{acme, certs};
mod cluster;
pub mod config;
pub mod credentials;
pub mod dns;
pub mod domains;
pub mod metrics;
mod pages;
mod passthrough;
mod proxy;
mod routes;
pub mod server;
mod state;
pub mod store;
mod tcp_ports;
mod tunnel;

/// Entry points for the fuzz targets (`warren-fuzz`); not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Reads an `Authorization` header value as the access rules do; whether it held
    /// credentials the edge can check.
    pub fn authorization(value: &[u8]) -> bool {
        let headers = [("authorization".to_owned(), value.to_vec())];
        crate::access::fuzzing_presented(&headers)
    }
}

pub use config::Config;
pub use server::{Edge, EdgeError};
