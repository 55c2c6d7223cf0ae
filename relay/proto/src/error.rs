//! The one error type of the protocol crate, split by blame.

/// Why bytes from the network could not be turned into a frame, handshake or message.
///
/// Variants are split by blame: [`DecodeError::Malformed`] (bad bytes),
/// [`DecodeError::ProtocolViolation`] (well-formed bytes the peer was not allowed to send) and
/// [`DecodeError::Misuse`] (a caller bug on this side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a valid encoding of what was expected.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The structure being decoded.
        what: &'static str,
        /// What was wrong with it.
        detail: &'static str,
    },
    /// The peer sent something the protocol forbids at this point or at this size.
    #[error("protocol violation: {0}")]
    ProtocolViolation(&'static str),
    /// The sealed box did not open with the keys at hand (wrong key or tampered bytes).
    #[error("sealed box failed to open")]
    BadSeal,
    /// The caller asked for something impossible (e.g. encoding an oversized packet).
    #[error("misuse: {0}")]
    Misuse(&'static str),
}

impl DecodeError {
    /// A short stable name, for use as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::ProtocolViolation(_) => "protocol_violation",
            DecodeError::BadSeal => "bad_seal",
            DecodeError::Misuse(_) => "misuse",
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: &'static str) -> Self {
        DecodeError::Malformed { what, detail }
    }
}
