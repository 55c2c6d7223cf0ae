//! Peer-to-peer messages: path discovery and data, sealed between the two nodes' keys.
//!
//! Every message travels in the same envelope, directly over UDP or as the opaque payload of a
//! DERP SendPacket (the relay sees only the envelope's sender key, which DERP already tells it):
//!
//! ```text
//! +------+----------------+-----------+------------------------------------------+
//! | WRN1 | sender key(32) | nonce(24) | box_{sender->receiver}(type(1) | body)    |
//! +------+----------------+-----------+------------------------------------------+
//!
//! type 0x01 Ping         tx id(12)
//! type 0x02 Pong         tx id(12) | observed source address (addr)
//! type 0x03 CallMeMaybe  count(1) | count x addr (count <= 16) | home region (u32, optional)
//! type 0x10 Data         application packet
//! addr = family(1: 4 or 6) | ip(4 or 16) | port(2, big-endian)
//! ```
//!
//! Boxes are NaCl crypto_box (X25519 + XSalsa20-Poly1305), the same construction as the DERP
//! handshake, so a message opens only for its receiver and proves its sender.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use crypto_box::aead::{Aead, AeadCore};
use crypto_box::SalsaBox;
use rand_core::CryptoRngCore;
use warren_relay_proto::{DecodeError, PublicKey, SecretKey};

/// Envelope magic.
pub const MAGIC: [u8; 4] = *b"WRN1";
/// Magic + sender key + nonce.
pub const HEADER_LEN: usize = 4 + 32 + 24;
/// Endpoints in one CallMeMaybe.
pub const MAX_ENDPOINTS: usize = 16;
/// Largest application packet carried.
pub const MAX_DATA: usize = warren_relay_proto::MAX_PACKET_SIZE - HEADER_LEN - 16 - 1;

/// A message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Is this path alive? Answered with a Pong on the same path.
    Ping {
        /// Transaction id echoed in the Pong.
        tx: [u8; 12],
    },
    /// Answer to a Ping.
    Pong {
        /// The Ping's transaction id.
        tx: [u8; 12],
        /// The address the Ping came from, as the answering node saw it.
        src: SocketAddr,
    },
    /// "These are my endpoints: ping me there." Sent through the relay.
    CallMeMaybe {
        /// The sender's candidate endpoints.
        endpoints: Vec<SocketAddr>,
        /// The region of the sender's home relay, where it can be reached through the relay.
        home_region: Option<u32>,
    },
    /// An application packet.
    Data(Bytes),
}

/// Whether `packet` carries the envelope magic.
pub fn is_envelope(packet: &[u8]) -> bool {
    packet.starts_with(&MAGIC)
}

/// The precomputed box between this node and one peer.
pub struct PeerBox(SalsaBox);

impl std::fmt::Debug for PeerBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerBox(..)")
    }
}

impl PeerBox {
    /// Precomputes the shared key between `ours` and `theirs` (an X25519 operation: cache it).
    pub fn new(ours: &SecretKey, theirs: &PublicKey) -> Self {
        let their = crypto_box::PublicKey::from_bytes(*theirs.as_bytes());
        let our = crypto_box::SecretKey::from_bytes(ours.to_bytes());
        PeerBox(SalsaBox::new(&their, &our))
    }

    /// Seals `msg` into an envelope from `sender` (our public key).
    pub fn seal(&self, sender: &PublicKey, msg: &Message, rng: &mut impl CryptoRngCore) -> Bytes {
        let mut plain = BytesMut::with_capacity(64);
        encode_body(msg, &mut plain);
        let nonce = SalsaBox::generate_nonce(rng);
        // Encrypting an in-memory buffer fails only for lengths near 2^64.
        let sealed = self.0.encrypt(&nonce, &plain[..]).unwrap_or_default();
        let mut out = BytesMut::with_capacity(HEADER_LEN + sealed.len());
        out.put_slice(&MAGIC);
        out.put_slice(sender.as_bytes());
        out.put_slice(&nonce);
        out.put_slice(&sealed);
        out.freeze()
    }

    /// Opens an envelope sealed by this box's peer.
    ///
    /// # Errors
    /// [`DecodeError::BadSeal`] if it does not authenticate; [`DecodeError::Malformed`] for a
    /// short envelope or a bad body.
    pub fn open(&self, packet: &[u8]) -> Result<Message, DecodeError> {
        if packet.len() < HEADER_LEN + 16 || !is_envelope(packet) {
            return Err(malformed("envelope too short or without magic"));
        }
        let nonce = &packet[36..HEADER_LEN];
        let plain = self.0.decrypt(nonce.into(), &packet[HEADER_LEN..]).map_err(|_| DecodeError::BadSeal)?;
        decode_body(&plain)
    }
}

/// The first 8 bytes of an envelope's nonce, which tell its copies apart from other envelopes.
pub fn nonce_tag(packet: &[u8]) -> Option<u64> {
    let bytes = packet.get(36..44)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The sender key of an envelope (unauthenticated until [`PeerBox::open`] succeeds).
///
/// # Errors
/// [`DecodeError::Malformed`] if `packet` is not an envelope.
pub fn sender(packet: &[u8]) -> Result<PublicKey, DecodeError> {
    if packet.len() < HEADER_LEN || !is_envelope(packet) {
        return Err(malformed("not an envelope"));
    }
    PublicKey::from_slice(&packet[4..36])
}

fn malformed(detail: &'static str) -> DecodeError {
    DecodeError::Malformed { what: "disco message", detail }
}

fn encode_body(msg: &Message, out: &mut BytesMut) {
    match msg {
        Message::Ping { tx } => {
            out.put_u8(0x01);
            out.put_slice(tx);
        }
        Message::Pong { tx, src } => {
            out.put_u8(0x02);
            out.put_slice(tx);
            put_addr(out, *src);
        }
        Message::CallMeMaybe { endpoints, home_region } => {
            out.put_u8(0x03);
            let n = endpoints.len().min(MAX_ENDPOINTS);
            out.put_u8(n as u8);
            for ep in &endpoints[..n] {
                put_addr(out, *ep);
            }
            if let Some(r) = home_region {
                out.put_u32(*r);
            }
        }
        Message::Data(d) => {
            out.reserve(1 + d.len());
            out.put_u8(0x10);
            out.put_slice(d);
        }
    }
}

fn put_addr(out: &mut BytesMut, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            out.put_u8(4);
            out.put_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.put_u8(6);
            out.put_slice(&v6.octets());
        }
    }
    out.put_u16(a.port());
}

fn take_addr(b: &mut &[u8]) -> Result<SocketAddr, DecodeError> {
    let (ip, rest): (IpAddr, &[u8]) = match b.split_first() {
        Some((4, r)) if r.len() >= 6 => (Ipv4Addr::new(r[0], r[1], r[2], r[3]).into(), &r[4..]),
        Some((6, r)) if r.len() >= 18 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&r[..16]);
            (Ipv6Addr::from(o).into(), &r[16..])
        }
        _ => return Err(malformed("bad address")),
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    *b = &rest[2..];
    Ok(SocketAddr::new(ip, port))
}

fn take_tx(b: &mut &[u8]) -> Result<[u8; 12], DecodeError> {
    let tx: [u8; 12] = b.get(..12).and_then(|s| s.try_into().ok()).ok_or(malformed("short transaction id"))?;
    *b = &b[12..];
    Ok(tx)
}

/// Decodes a message body as it is after opening the box (for fuzz targets).
#[doc(hidden)]
pub fn decode_plaintext(plain: &[u8]) -> Result<Message, DecodeError> {
    decode_body(plain)
}

fn decode_body(plain: &[u8]) -> Result<Message, DecodeError> {
    let (&ty, mut b) = plain.split_first().ok_or(malformed("empty body"))?;
    let msg = match ty {
        0x01 => Message::Ping { tx: take_tx(&mut b)? },
        0x02 => {
            let tx = take_tx(&mut b)?;
            Message::Pong { tx, src: take_addr(&mut b)? }
        }
        0x03 => {
            let (&n, rest) = b.split_first().ok_or(malformed("missing count"))?;
            b = rest;
            if usize::from(n) > MAX_ENDPOINTS {
                return Err(malformed("too many endpoints"));
            }
            let endpoints = (0..n).map(|_| take_addr(&mut b)).collect::<Result<_, _>>()?;
            let home_region = match b.len() {
                0 => None,
                4 => {
                    let r = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    b = &[];
                    Some(r)
                }
                _ => return Err(malformed("bad home region")),
            };
            Message::CallMeMaybe { endpoints, home_region }
        }
        0x10 => return Ok(Message::Data(Bytes::copy_from_slice(b))),
        _ => return Err(malformed("unknown message type")),
    };
    if !b.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn pair() -> (SecretKey, SecretKey) {
        (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng))
    }

    #[test]
    fn every_message_round_trips() {
        let (a, b) = pair();
        let ab = PeerBox::new(&a, &b.public_key());
        let ba = PeerBox::new(&b, &a.public_key());
        let msgs = vec![
            Message::Ping { tx: [1; 12] },
            Message::Pong { tx: [2; 12], src: "198.51.100.7:41641".parse().expect("addr") },
            Message::Pong { tx: [3; 12], src: "[2001:db8::5]:1".parse().expect("addr") },
            Message::CallMeMaybe {
                endpoints: vec!["10.0.0.1:1".parse().expect("a"), "[::1]:2".parse().expect("a")],
                home_region: None,
            },
            Message::CallMeMaybe { endpoints: vec![], home_region: Some(7) },
            Message::CallMeMaybe { endpoints: vec!["10.0.0.1:1".parse().expect("a")], home_region: Some(u32::MAX) },
            Message::Data(Bytes::from_static(b"payload")),
        ];
        for m in msgs {
            let env = ab.seal(&a.public_key(), &m, &mut OsRng);
            assert_eq!(sender(&env), Ok(a.public_key()));
            assert_eq!(ba.open(&env), Ok(m));
        }
    }

    #[test]
    fn only_the_receiver_opens_and_tampering_fails() {
        let (a, b) = pair();
        let c = SecretKey::generate(&mut OsRng);
        let env = PeerBox::new(&a, &b.public_key()).seal(&a.public_key(), &Message::Ping { tx: [0; 12] }, &mut OsRng);
        assert_eq!(PeerBox::new(&c, &a.public_key()).open(&env), Err(DecodeError::BadSeal));
        let mut t = env.to_vec();
        t[HEADER_LEN + 3] ^= 1;
        assert_eq!(PeerBox::new(&b, &a.public_key()).open(&t), Err(DecodeError::BadSeal));
        assert!(PeerBox::new(&b, &a.public_key()).open(&env[..20]).is_err());
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for body in [
            &[][..],
            &[0x01, 1, 2],
            &[0x02; 13],
            &[0x03, 17],
            &[0x03, 1, 4, 1, 2],
            &[0x03, 0, 1, 2],
            &[0x03, 0, 1, 2, 3, 4, 5],
            &[0x7f],
            &[0x01; 14],
        ] {
            assert!(decode_body(body).is_err(), "{body:?}");
        }
        let mut seed = 7u32;
        for len in 0..300 {
            let body: Vec<u8> = (0..len % 40)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = decode_body(&body);
        }
    }
}
