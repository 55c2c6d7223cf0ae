//! Curve25519 keys: the addresses of the relay.

use std::fmt;

use rand_core::CryptoRngCore;

use crate::error::DecodeError;
use crate::KEY_LEN;

/// A node's or relay's Curve25519 public key, the address packets are routed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(bytes)
    }

    /// Reads a key from the first 32 bytes of `b`.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] when `b` is shorter than 32 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, DecodeError> {
        let raw: [u8; KEY_LEN] = b
            .get(..KEY_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(DecodeError::malformed("public key", "shorter than 32 bytes"))?;
        Ok(PublicKey(raw))
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lower-case hex of all 32 bytes (the form of the `Derp-Public-Key` header).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits, optionally prefixed `nodekey:` or `mkey:`.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] for anything else.
    pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
        let s = s.trim();
        let s = s.strip_prefix("nodekey:").or_else(|| s.strip_prefix("mkey:")).unwrap_or(s);
        let mut raw = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut raw).map_err(|_| DecodeError::malformed("public key", "not 64 hex digits"))?;
        Ok(PublicKey(raw))
    }

    /// A short form for logs: the first 8 hex digits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nodekey:{}", self.to_hex())
    }
}

/// A Curve25519 secret key. Its `Debug` never prints the key material.
#[derive(Clone)]
pub struct SecretKey(crypto_box::SecretKey);

impl SecretKey {
    /// Generates a fresh key from a cryptographic RNG.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        SecretKey(crypto_box::SecretKey::generate(rng))
    }

    /// Wraps 32 raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SecretKey(crypto_box::SecretKey::from_bytes(bytes))
    }

    /// The raw bytes. Handle with care: this is the secret.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.public_key().to_bytes())
    }

    pub(crate) fn inner(&self) -> &crypto_box::SecretKey {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(pub {}, secret redacted)", self.public_key().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_prefixes() {
        let k = PublicKey::from_bytes([0xab; 32]);
        assert_eq!(PublicKey::from_hex(&k.to_hex()), Ok(k));
        assert_eq!(PublicKey::from_hex(&k.to_string()), Ok(k));
        assert!(PublicKey::from_hex("abcd").is_err());
        assert!(PublicKey::from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = SecretKey::from_bytes([7; 32]);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&hex::encode([7u8; 32])), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn short_slice_is_an_error() {
        assert!(PublicKey::from_slice(&[1; 31]).is_err());
        assert!(PublicKey::from_slice(&[1; 33]).is_ok());
    }
}
