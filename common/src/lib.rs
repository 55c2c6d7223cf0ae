//! The kit every Warren product builds on: config helpers, TLS (the one crypto provider, PEM
//! loading, client configs, the development CA, certificate validity), limits, HTTP CONNECT proxies, the PROXY protocol, process runtime, key files and URLs.
//! Test helpers live in [`testing`], behind the `test-support` feature, for dev-dependencies
//! only.

pub mod cidr;
pub mod config;
pub mod der;
#[cfg(feature = "callout")]
pub mod http1;
pub mod io;
pub mod keyfile;
pub mod limits;
pub mod proxy;
pub mod proxy_protocol;
pub mod runtime;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod tls;
pub mod url;
