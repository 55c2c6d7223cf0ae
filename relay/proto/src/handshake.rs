//! The login handshake: client and server info sealed in NaCl boxes.
//!
//! A box is X25519 key agreement + XSalsa20-Poly1305 between the sender's secret key and the
//! receiver's public key, laid out on the wire as `nonce(24) | tag(16) | ciphertext`, which is
//! what NaCl's `crypto_box` (and Go's `box.Seal` with the nonce as prefix) produce.
//!
//! ```text
//! relay  -> client  ServerKey   MAGIC | relay key
//! client -> relay   ClientInfo  client key | nonce | box_{client->relay}({"version":2,...})
//! relay  -> client  ServerInfo  nonce | box_{relay->client}({"version":2,...})
//! ```

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use crypto_box::aead::{Aead, AeadCore};
use crypto_box::SalsaBox;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::key::{PublicKey, SecretKey};
use crate::{NONCE_LEN, PROTOCOL_VERSION};

/// Largest sealed info (nonce + box) accepted from a peer, bounding the JSON parser's input.
pub const MAX_SEALED_INFO_LEN: usize = 16 << 10;

/// What a client tells the relay when it logs in (the JSON inside ClientInfo).
///
/// Field names follow the published protocol; both casings seen in the wild are accepted.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Pre-shared key that makes the client a trusted mesh peer; empty for ordinary clients.
    #[serde(rename = "meshKey", alias = "MeshKey", default, skip_serializing_if = "String::is_empty")]
    pub mesh_key: String,
    /// The DERP protocol version the client speaks.
    #[serde(rename = "version", alias = "Version", default)]
    pub version: u32,
    /// Whether the client answers Ping frames with Pong.
    #[serde(rename = "CanAckPings", alias = "canAckPings", default)]
    pub can_ack_pings: bool,
    /// Whether the client is a prober rather than a node.
    #[serde(rename = "IsProber", alias = "isProber", default, skip_serializing_if = "is_false")]
    pub is_prober: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl fmt::Debug for ClientInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientInfo")
            .field("mesh_key", &if self.mesh_key.is_empty() { "" } else { "<redacted>" })
            .field("version", &self.version)
            .field("can_ack_pings", &self.can_ack_pings)
            .field("is_prober", &self.is_prober)
            .finish()
    }
}

impl ClientInfo {
    /// The info a plain node sends: this protocol version, answers pings.
    pub fn node() -> Self {
        ClientInfo { version: PROTOCOL_VERSION, can_ack_pings: true, ..Default::default() }
    }

    /// Seals this info from `client` to `server` into a ClientInfo frame.
    pub fn seal_frame(&self, client: &SecretKey, server: &PublicKey, rng: &mut impl CryptoRngCore) -> Frame {
        // Serialising a struct of strings, integers and bools cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        Frame::ClientInfo { key: client.public_key(), sealed: seal(client, server, &json, rng) }
    }

    /// Opens the sealed part of a ClientInfo frame that `client` sent to the relay `server`.
    ///
    /// # Errors
    /// [`DecodeError::ProtocolViolation`] if the sealed part is over [`MAX_SEALED_INFO_LEN`];
    /// [`DecodeError::BadSeal`] if it does not open; [`DecodeError::Malformed`] if the JSON is bad.
    pub fn open(server: &SecretKey, client: &PublicKey, sealed: &[u8]) -> Result<Self, DecodeError> {
        let json = open(server, client, sealed)?;
        serde_json::from_slice(&json).map_err(|_| DecodeError::malformed("client info", "invalid JSON"))
    }
}

/// What the relay tells a client after login (the JSON inside ServerInfo).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The relay's protocol version.
    #[serde(rename = "version", alias = "Version", default)]
    pub version: u32,
    /// Advertised receive rate limit in bytes per second; 0 means none.
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        alias = "tokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_per_second: u64,
    /// Advertised burst in bytes; 0 means none.
    #[serde(
        rename = "TokenBucketBytesBurst",
        alias = "tokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_burst: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ServerInfo {
    /// Seals this info from the relay `server` to `client` into a ServerInfo frame.
    pub fn seal_frame(&self, server: &SecretKey, client: &PublicKey, rng: &mut impl CryptoRngCore) -> Frame {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Frame::ServerInfo { sealed: seal(server, client, &json, rng) }
    }

    /// Opens the sealed part of a ServerInfo frame the relay `server` sent to `client`.
    ///
    /// # Errors
    /// As [`ClientInfo::open`].
    pub fn open(client: &SecretKey, server: &PublicKey, sealed: &[u8]) -> Result<Self, DecodeError> {
        let json = open(client, server, sealed)?;
        serde_json::from_slice(&json).map_err(|_| DecodeError::malformed("server info", "invalid JSON"))
    }
}

/// Seals `msg` from `ours` to `theirs` with a random nonce: `nonce | box`.
pub fn seal(ours: &SecretKey, theirs: &PublicKey, msg: &[u8], rng: &mut impl CryptoRngCore) -> Bytes {
    let nonce = SalsaBox::generate_nonce(rng);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&nonce);
    seal_with_nonce(ours, theirs, &n, msg)
}

/// Seals `msg` with a caller-chosen nonce. Only for test vectors: a nonce must never repeat.
pub fn seal_with_nonce(ours: &SecretKey, theirs: &PublicKey, nonce: &[u8; NONCE_LEN], msg: &[u8]) -> Bytes {
    let b = SalsaBox::new(&crypto_box::PublicKey::from_bytes(*theirs.as_bytes()), ours.inner());
    // Encryption of an in-memory buffer only fails on lengths near 2^64.
    let ct = b.encrypt(nonce.into(), msg).unwrap_or_default();
    let mut out = BytesMut::with_capacity(NONCE_LEN + ct.len());
    out.put_slice(nonce);
    out.put_slice(&ct);
    out.freeze()
}

/// Opens `nonce | box` sent by `theirs` to `ours`.
///
/// # Errors
/// [`DecodeError::ProtocolViolation`] when over [`MAX_SEALED_INFO_LEN`], [`DecodeError::Malformed`]
/// when shorter than a nonce, [`DecodeError::BadSeal`] when authentication fails.
pub fn open(ours: &SecretKey, theirs: &PublicKey, sealed: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if sealed.len() > MAX_SEALED_INFO_LEN {
        return Err(DecodeError::ProtocolViolation("sealed info too long"));
    }
    let (nonce, ct) =
        sealed.split_at_checked(NONCE_LEN).ok_or(DecodeError::malformed("sealed box", "shorter than a nonce"))?;
    let b = SalsaBox::new(&crypto_box::PublicKey::from_bytes(*theirs.as_bytes()), ours.inner());
    b.decrypt(nonce.into(), ct).map_err(|_| DecodeError::BadSeal)
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    #[test]
    fn client_info_round_trip() {
        let client = SecretKey::generate(&mut OsRng);
        let server = SecretKey::generate(&mut OsRng);
        let info = ClientInfo { mesh_key: "m".into(), ..ClientInfo::node() };
        let Frame::ClientInfo { key, sealed } = info.seal_frame(&client, &server.public_key(), &mut OsRng) else {
            panic!("seal_frame must build a ClientInfo frame");
        };
        assert_eq!(key, client.public_key());
        let got = ClientInfo::open(&server, &key, &sealed).expect("opens");
        assert_eq!(got, info);
    }

    #[test]
    fn wrong_key_or_tampering_is_bad_seal() {
        let client = SecretKey::generate(&mut OsRng);
        let server = SecretKey::generate(&mut OsRng);
        let other = SecretKey::generate(&mut OsRng);
        let sealed = seal(&client, &server.public_key(), b"{}", &mut OsRng);
        assert_eq!(open(&server, &other.public_key(), &sealed), Err(DecodeError::BadSeal));
        let mut t = sealed.to_vec();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(open(&server, &client.public_key(), &t), Err(DecodeError::BadSeal));
        assert!(matches!(open(&server, &client.public_key(), &t[..10]), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn go_style_json_is_accepted() {
        let j = br#"{"version":2,"meshKey":"abc","CanAckPings":true,"IsProber":false}"#;
        let info: ClientInfo = serde_json::from_slice(j).expect("parses");
        assert_eq!(info.version, 2);
        assert!(info.can_ack_pings);
        assert_eq!(info.mesh_key, "abc");
        assert!(!format!("{info:?}").contains("abc"), "mesh key must be redacted in Debug");
        let s: ServerInfo = serde_json::from_slice(br#"{"version":2,"TokenBucketBytesPerSecond":10}"#).expect("parses");
        assert_eq!(s.token_bucket_bytes_per_second, 10);
        assert_eq!(
            serde_json::to_string(&ServerInfo { version: 2, ..Default::default() }).ok().as_deref(),
            Some(r#"{"version":2}"#)
        );
    }

    #[test]
    fn oversized_sealed_info_is_refused() {
        let k = SecretKey::generate(&mut OsRng);
        let big = vec![0u8; MAX_SEALED_INFO_LEN + 1];
        assert!(matches!(open(&k, &k.public_key(), &big), Err(DecodeError::ProtocolViolation(_))));
    }
}
