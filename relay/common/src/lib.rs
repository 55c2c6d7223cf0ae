//! Pieces shared by Warren's binaries: key files and TLS (the one crypto provider, PEM loading,
//! the development CA).

pub mod keyfile;
pub mod tls;
