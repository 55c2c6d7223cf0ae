//! Byte movers under the connection actors: the relay's lean TLS and the framed DERP stream.

pub(crate) mod framed;
pub(crate) mod lean_tls;
