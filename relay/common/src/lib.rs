//! Pieces shared by Warren's binaries: key files, TLS (the one crypto provider, PEM loading,
//! the development CA), the DERP client (used by nodes and by relays' mesh links) and the async
//! side of the node-edge tunnel.

pub mod config;
pub mod derp;
pub mod keyfile;
pub mod limits;
pub mod runtime;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod tunnel_io;
pub mod url;
