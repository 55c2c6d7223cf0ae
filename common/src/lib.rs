//! The kit every Warren product builds on: config helpers, TLS (the one crypto provider, PEM
//! loading, client configs, the development CA, certificate validity, an SNI certificate store,
//! ACME behind the `acme` feature), limits, HTTP CONNECT proxies, the PROXY protocol, process runtime, key files and URLs.
//! Test helpers live in [`testing`], behind the `test-support` feature, for dev-dependencies
//! only.

#[cfg(feature = "acme")]
pub mod acme;
pub mod certs;
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
#[cfg(feature = "ws-echo")]
pub mod ws_echo;
