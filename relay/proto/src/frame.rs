//! DERP v2 frames: every frame type, its byte layout, and a bounded streaming decoder.
//!
//! Every frame is a 5-byte header followed by the payload:
//!
//! ```text
//! +--------+----------------------+-------------------------+
//! | type u8| length u32 big-endian| payload (length bytes)  |
//! +--------+----------------------+-------------------------+
//! ```
//!
//! Unknown frame types decode to [`Frame::Unknown`] so callers can skip them, as the protocol
//! requires. Fields a newer peer appends after the ones described here are ignored, as DERP
//! peers do; missing fields are an error.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::key::PublicKey;
use crate::{KEY_LEN, MAGIC, MAX_PACKET_SIZE, NONCE_LEN};

/// Length of the frame header: type byte plus big-endian u32 length.
pub const HEADER_LEN: usize = 5;

/// Largest frame this crate will accept by default: a ForwardPacket of the largest packet.
pub const MAX_FRAME_LEN: usize = MAX_PACKET_SIZE + 2 * KEY_LEN;

/// Smallest sealed box: the Poly1305 tag over an empty message.
const BOX_OVERHEAD: usize = 16;

/// The frame type bytes of DERP v2.
pub mod frame_type {
    /// 8B magic + 32B server public key (+ bytes reserved for future use).
    pub const SERVER_KEY: u8 = 0x01;
    /// 32B client public key + 24B nonce + NaCl box of JSON.
    pub const CLIENT_INFO: u8 = 0x02;
    /// 24B nonce + NaCl box of JSON.
    pub const SERVER_INFO: u8 = 0x03;
    /// 32B destination key + packet bytes.
    pub const SEND_PACKET: u8 = 0x04;
    /// 32B source key + packet bytes.
    pub const RECV_PACKET: u8 = 0x05;
    /// No payload.
    pub const KEEP_ALIVE: u8 = 0x06;
    /// 1 byte: 0x01 if this relay is the client's home, else 0x00.
    pub const NOTE_PREFERRED: u8 = 0x07;
    /// 32B key of the peer that is gone + optional 1 byte reason.
    pub const PEER_GONE: u8 = 0x08;
    /// 32B key + optional 16B IP + 2B port + optional 1 byte flags.
    pub const PEER_PRESENT: u8 = 0x09;
    /// 32B source key + 32B destination key + packet bytes (mesh only).
    pub const FORWARD_PACKET: u8 = 0x0a;
    /// No payload (mesh only): subscribe to presence of the relay's clients.
    pub const WATCH_CONNS: u8 = 0x10;
    /// 32B key of the client to disconnect (mesh only).
    pub const CLOSE_PEER: u8 = 0x11;
    /// 8 bytes to be echoed in a Pong.
    pub const PING: u8 = 0x12;
    /// 8 bytes copied from the Ping being answered.
    pub const PONG: u8 = 0x13;
    /// UTF-8 text of a problem; empty clears it.
    pub const HEALTH: u8 = 0x14;
    /// u32 reconnect-in ms + u32 try-for ms, both big-endian.
    pub const RESTARTING: u8 = 0x15;
    /// Warren extension, 32B key: is this peer connected to this relay's region?
    pub const FIND_PEER: u8 = 0x40;
    /// Warren extension, 32B key + 1 byte (0x01 present in the region, 0x00 not).
    pub const PEER_PRESENCE: u8 = 0x41;
}

/// Why a PeerGone frame was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerGoneReason {
    /// The peer was connected to this relay and has disconnected (0x00).
    Disconnected,
    /// The relay does not know the peer (0x01).
    NotHere,
    /// A reason byte this version does not know.
    Other(u8),
}

impl PeerGoneReason {
    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0x00,
            PeerGoneReason::NotHere => 0x01,
            PeerGoneReason::Other(b) => b,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x00 => PeerGoneReason::Disconnected,
            0x01 => PeerGoneReason::NotHere,
            other => PeerGoneReason::Other(other),
        }
    }
}

/// Bit flags of a PeerPresent frame.
pub mod peer_present_flags {
    /// An ordinary client.
    pub const IS_REGULAR: u8 = 1 << 0;
    /// A relay of the same region connected as a mesh peer.
    pub const IS_MESH_PEER: u8 = 1 << 1;
    /// A prober.
    pub const IS_PROBER: u8 = 1 << 2;
    /// The client said this relay is not its ideal node.
    pub const NOT_IDEAL: u8 = 1 << 3;
}

/// One DERP v2 frame. Payloads are [`Bytes`], so decoding from a [`BytesMut`] copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `0x01` relay → client, first frame: `MAGIC(8) | server key(32) | reserved(..)`.
    ServerKey {
        /// The relay's public key.
        key: PublicKey,
    },
    /// `0x02` client → relay: `client key(32) | nonce(24) | box(json)`.
    ClientInfo {
        /// The client's public key (its address).
        key: PublicKey,
        /// Nonce followed by the sealed JSON; see [`crate::handshake`].
        sealed: Bytes,
    },
    /// `0x03` relay → client: `nonce(24) | box(json)`.
    ServerInfo {
        /// Nonce followed by the sealed JSON.
        sealed: Bytes,
    },
    /// `0x04` client → relay: `destination key(32) | packet`.
    SendPacket {
        /// Whom the packet is for.
        dst: PublicKey,
        /// The end-to-end encrypted packet, at most [`MAX_PACKET_SIZE`] bytes.
        packet: Bytes,
    },
    /// `0x05` relay → client: `source key(32) | packet`.
    RecvPacket {
        /// Who sent the packet.
        src: PublicKey,
        /// The packet as the source sent it.
        packet: Bytes,
    },
    /// `0x06` relay → client, no payload.
    KeepAlive,
    /// `0x07` client → relay: `preferred(1)`.
    NotePreferred {
        /// Whether this relay is the client's home relay.
        preferred: bool,
    },
    /// `0x08` relay → client: `peer key(32) | reason(1, optional)`.
    PeerGone {
        /// The peer that is gone.
        peer: PublicKey,
        /// Why.
        reason: PeerGoneReason,
    },
    /// `0x09` relay → mesh watcher: `peer key(32) | ip(16) port(2) (optional) | flags(1, optional)`.
    PeerPresent {
        /// The peer now connected.
        peer: PublicKey,
        /// Where it connected from, when the relay tells.
        endpoint: Option<SocketAddr>,
        /// [`peer_present_flags`] bits, when the relay tells.
        flags: Option<u8>,
    },
    /// `0x0a` mesh relay → relay: `source key(32) | destination key(32) | packet`.
    ForwardPacket {
        /// Original sender.
        src: PublicKey,
        /// Final recipient.
        dst: PublicKey,
        /// The packet.
        packet: Bytes,
    },
    /// `0x10` mesh relay → relay, no payload.
    WatchConns,
    /// `0x11` mesh relay → relay: `peer key(32)`.
    ClosePeer {
        /// The client to disconnect.
        peer: PublicKey,
    },
    /// `0x12` either way: `data(8)`.
    Ping([u8; 8]),
    /// `0x13` either way: `data(8)` echoed from the Ping.
    Pong([u8; 8]),
    /// `0x14` relay → client: UTF-8 problem text; empty clears the problem.
    Health {
        /// The problem, or empty.
        problem: String,
    },
    /// `0x15` relay → client: `reconnect in ms(u32) | try for ms(u32)`.
    Restarting {
        /// How long to wait before reconnecting.
        reconnect_in_ms: u32,
        /// How long to keep trying.
        try_for_ms: u32,
    },
    /// `0x40` client → relay (Warren extension): is `peer` connected to this relay or to a
    /// mesh sibling of its region? Answered with [`Frame::PeerPresence`]; other DERP relays
    /// skip it as an unknown frame.
    FindPeer {
        /// The key asked about.
        peer: PublicKey,
    },
    /// `0x41` relay → client (Warren extension): `peer key(32) | present(1)`, the answer to
    /// [`Frame::FindPeer`].
    PeerPresence {
        /// The key asked about.
        peer: PublicKey,
        /// Connected to this relay or to a sibling in its region.
        present: bool,
    },
    /// A frame type this version does not know; skipped by receivers.
    Unknown {
        /// The type byte.
        frame_type: u8,
        /// The raw payload.
        payload: Bytes,
    },
}

impl Frame {
    /// The type byte of this frame.
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Frame::ServerKey { .. } => SERVER_KEY,
            Frame::ClientInfo { .. } => CLIENT_INFO,
            Frame::ServerInfo { .. } => SERVER_INFO,
            Frame::SendPacket { .. } => SEND_PACKET,
            Frame::RecvPacket { .. } => RECV_PACKET,
            Frame::KeepAlive => KEEP_ALIVE,
            Frame::NotePreferred { .. } => NOTE_PREFERRED,
            Frame::PeerGone { .. } => PEER_GONE,
            Frame::PeerPresent { .. } => PEER_PRESENT,
            Frame::ForwardPacket { .. } => FORWARD_PACKET,
            Frame::WatchConns => WATCH_CONNS,
            Frame::ClosePeer { .. } => CLOSE_PEER,
            Frame::Ping(_) => PING,
            Frame::Pong(_) => PONG,
            Frame::Health { .. } => HEALTH,
            Frame::Restarting { .. } => RESTARTING,
            Frame::FindPeer { .. } => FIND_PEER,
            Frame::PeerPresence { .. } => PEER_PRESENCE,
            Frame::Unknown { frame_type, .. } => *frame_type,
        }
    }

    /// A short stable name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::ServerKey { .. } => "server_key",
            Frame::ClientInfo { .. } => "client_info",
            Frame::ServerInfo { .. } => "server_info",
            Frame::SendPacket { .. } => "send_packet",
            Frame::RecvPacket { .. } => "recv_packet",
            Frame::KeepAlive => "keep_alive",
            Frame::NotePreferred { .. } => "note_preferred",
            Frame::PeerGone { .. } => "peer_gone",
            Frame::PeerPresent { .. } => "peer_present",
            Frame::ForwardPacket { .. } => "forward_packet",
            Frame::WatchConns => "watch_conns",
            Frame::ClosePeer { .. } => "close_peer",
            Frame::Ping(_) => "ping",
            Frame::Pong(_) => "pong",
            Frame::Health { .. } => "health",
            Frame::Restarting { .. } => "restarting",
            Frame::FindPeer { .. } => "find_peer",
            Frame::PeerPresence { .. } => "peer_presence",
            Frame::Unknown { .. } => "unknown",
        }
    }

    /// Length of the payload (without the 5-byte header).
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ServerKey { .. } => MAGIC.len() + KEY_LEN,
            Frame::ClientInfo { sealed, .. } => KEY_LEN + sealed.len(),
            Frame::ServerInfo { sealed } => sealed.len(),
            Frame::SendPacket { packet, .. } | Frame::RecvPacket { packet, .. } => KEY_LEN + packet.len(),
            Frame::KeepAlive | Frame::WatchConns => 0,
            Frame::NotePreferred { .. } => 1,
            Frame::PeerGone { .. } => KEY_LEN + 1,
            Frame::PeerPresent { endpoint, flags, .. } => {
                // Flags can only be sent after an endpoint; encode() writes an unspecified
                // endpoint when flags come alone.
                match (endpoint, flags) {
                    (None, None) => KEY_LEN,
                    (_, None) => KEY_LEN + 18,
                    (_, Some(_)) => KEY_LEN + 19,
                }
            }
            Frame::ForwardPacket { packet, .. } => 2 * KEY_LEN + packet.len(),
            Frame::ClosePeer { .. } | Frame::FindPeer { .. } => KEY_LEN,
            Frame::PeerPresence { .. } => KEY_LEN + 1,
            Frame::Ping(_) | Frame::Pong(_) | Frame::Restarting { .. } => 8,
            Frame::Health { problem } => problem.len(),
            Frame::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Length of the whole encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Checks the size limits an encoder must respect.
    ///
    /// # Errors
    /// [`DecodeError::Misuse`] when a packet exceeds [`MAX_PACKET_SIZE`] or a payload does not
    /// fit the u32 length field.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let packet_len = match self {
            Frame::SendPacket { packet, .. }
            | Frame::RecvPacket { packet, .. }
            | Frame::ForwardPacket { packet, .. } => packet.len(),
            _ => 0,
        };
        if packet_len > MAX_PACKET_SIZE {
            return Err(DecodeError::Misuse("packet larger than MAX_PACKET_SIZE"));
        }
        if u32::try_from(self.payload_len()).is_err() {
            return Err(DecodeError::Misuse("payload does not fit a u32 length"));
        }
        Ok(())
    }

    /// Appends the encoded frame to `buf`.
    ///
    /// Call [`Frame::validate`] first for frames built from untrusted sizes; a payload longer
    /// than `u32::MAX` has its length field saturated (and is refused by every receiver).
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.frame_type());
        buf.put_u32(u32::try_from(self.payload_len()).unwrap_or(u32::MAX));
        match self {
            Frame::ServerKey { key } => {
                buf.put_slice(&MAGIC);
                buf.put_slice(key.as_bytes());
            }
            Frame::ClientInfo { key, sealed } => {
                buf.put_slice(key.as_bytes());
                buf.put_slice(sealed);
            }
            Frame::ServerInfo { sealed } => buf.put_slice(sealed),
            Frame::SendPacket { dst: key, packet } | Frame::RecvPacket { src: key, packet } => {
                buf.put_slice(key.as_bytes());
                buf.put_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred { preferred } => buf.put_u8(u8::from(*preferred)),
            Frame::PeerGone { peer, reason } => {
                buf.put_slice(peer.as_bytes());
                buf.put_u8(reason.to_byte());
            }
            Frame::PeerPresent { peer, endpoint, flags } => {
                buf.put_slice(peer.as_bytes());
                if endpoint.is_some() || flags.is_some() {
                    let ep = endpoint.unwrap_or(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0));
                    let ip = match ep.ip() {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                        IpAddr::V6(v6) => v6,
                    };
                    buf.put_slice(&ip.octets());
                    buf.put_u16(ep.port());
                }
                if let Some(f) = flags {
                    buf.put_u8(*f);
                }
            }
            Frame::ForwardPacket { src, dst, packet } => {
                buf.put_slice(src.as_bytes());
                buf.put_slice(dst.as_bytes());
                buf.put_slice(packet);
            }
            Frame::ClosePeer { peer } | Frame::FindPeer { peer } => buf.put_slice(peer.as_bytes()),
            Frame::PeerPresence { peer, present } => {
                buf.put_slice(peer.as_bytes());
                buf.put_u8(u8::from(*present));
            }
            Frame::Ping(d) | Frame::Pong(d) => buf.put_slice(d),
            Frame::Health { problem } => buf.put_slice(problem.as_bytes()),
            Frame::Restarting { reconnect_in_ms, try_for_ms } => {
                buf.put_u32(*reconnect_in_ms);
                buf.put_u32(*try_for_ms);
            }
            Frame::Unknown { payload, .. } => buf.put_slice(payload),
        }
    }

    /// Encodes into a fresh buffer of exactly [`Frame::encoded_len`] bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }

    /// Decodes one frame from its type byte and complete payload.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] when a known frame type lacks required fields or has a bad
    /// magic; [`DecodeError::ProtocolViolation`] when a packet exceeds [`MAX_PACKET_SIZE`].
    pub fn decode(frame_type: u8, mut payload: Bytes) -> Result<Frame, DecodeError> {
        use frame_type::*;
        let need = |p: &Bytes, n: usize, what: &'static str| -> Result<(), DecodeError> {
            if p.len() < n {
                Err(DecodeError::malformed(what, "payload too short"))
            } else {
                Ok(())
            }
        };
        let frame = match frame_type {
            SERVER_KEY => {
                need(&payload, MAGIC.len() + KEY_LEN, "server key frame")?;
                if payload[..MAGIC.len()] != MAGIC {
                    return Err(DecodeError::malformed("server key frame", "bad magic"));
                }
                Frame::ServerKey { key: PublicKey::from_slice(&payload[MAGIC.len()..])? }
            }
            CLIENT_INFO => {
                need(&payload, KEY_LEN + NONCE_LEN + BOX_OVERHEAD, "client info frame")?;
                let key = take_key(&mut payload)?;
                Frame::ClientInfo { key, sealed: payload }
            }
            SERVER_INFO => {
                need(&payload, NONCE_LEN + BOX_OVERHEAD, "server info frame")?;
                Frame::ServerInfo { sealed: payload }
            }
            SEND_PACKET | RECV_PACKET => {
                need(&payload, KEY_LEN, "packet frame")?;
                let key = take_key(&mut payload)?;
                check_packet_len(&payload)?;
                if frame_type == SEND_PACKET {
                    Frame::SendPacket { dst: key, packet: payload }
                } else {
                    Frame::RecvPacket { src: key, packet: payload }
                }
            }
            KEEP_ALIVE => Frame::KeepAlive,
            NOTE_PREFERRED => {
                need(&payload, 1, "note preferred frame")?;
                Frame::NotePreferred { preferred: payload[0] != 0 }
            }
            PEER_GONE => {
                need(&payload, KEY_LEN, "peer gone frame")?;
                let peer = take_key(&mut payload)?;
                // Servers before reasons existed sent only the key: that meant "disconnected".
                let reason = payload.first().map_or(PeerGoneReason::Disconnected, |b| PeerGoneReason::from_byte(*b));
                Frame::PeerGone { peer, reason }
            }
            PEER_PRESENT => decode_peer_present(payload)?,
            FORWARD_PACKET => {
                need(&payload, 2 * KEY_LEN, "forward packet frame")?;
                let src = take_key(&mut payload)?;
                let dst = take_key(&mut payload)?;
                check_packet_len(&payload)?;
                Frame::ForwardPacket { src, dst, packet: payload }
            }
            WATCH_CONNS => Frame::WatchConns,
            CLOSE_PEER => {
                need(&payload, KEY_LEN, "close peer frame")?;
                Frame::ClosePeer { peer: take_key(&mut payload)? }
            }
            PING | PONG => {
                need(&payload, 8, "ping frame")?;
                let mut d = [0u8; 8];
                d.copy_from_slice(&payload[..8]);
                if frame_type == PING {
                    Frame::Ping(d)
                } else {
                    Frame::Pong(d)
                }
            }
            HEALTH => Frame::Health { problem: String::from_utf8_lossy(&payload).into_owned() },
            RESTARTING => {
                need(&payload, 8, "restarting frame")?;
                Frame::Restarting { reconnect_in_ms: payload.get_u32(), try_for_ms: payload.get_u32() }
            }
            FIND_PEER => {
                need(&payload, KEY_LEN, "find peer frame")?;
                Frame::FindPeer { peer: take_key(&mut payload)? }
            }
            PEER_PRESENCE => {
                need(&payload, KEY_LEN + 1, "peer presence frame")?;
                let peer = take_key(&mut payload)?;
                Frame::PeerPresence { peer, present: payload[0] == 1 }
            }
            other => Frame::Unknown { frame_type: other, payload },
        };
        Ok(frame)
    }
}

fn take_key(payload: &mut Bytes) -> Result<PublicKey, DecodeError> {
    let key = PublicKey::from_slice(payload)?;
    payload.advance(KEY_LEN);
    Ok(key)
}

fn check_packet_len(packet: &Bytes) -> Result<(), DecodeError> {
    if packet.len() > MAX_PACKET_SIZE {
        return Err(DecodeError::ProtocolViolation("packet larger than 64 KiB"));
    }
    Ok(())
}

fn decode_peer_present(mut payload: Bytes) -> Result<Frame, DecodeError> {
    if payload.len() < KEY_LEN {
        return Err(DecodeError::malformed("peer present frame", "payload too short"));
    }
    let peer = take_key(&mut payload)?;
    let mut endpoint = None;
    let mut flags = None;
    if payload.len() >= 18 {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&payload[..16]);
        payload.advance(16);
        let port = payload.get_u16();
        let ip = Ipv6Addr::from(ip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        if !(ip.is_unspecified() && port == 0) {
            endpoint = Some(SocketAddr::new(ip, port));
        }
        flags = payload.first().copied();
    }
    Ok(Frame::PeerPresent { peer, endpoint, flags })
}

/// Parses a frame header: `(type, payload length)`, or `None` if fewer than 5 bytes are given.
pub fn decode_header(b: &[u8]) -> Option<(u8, u32)> {
    let h: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
    Some((h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]])))
}

/// Cuts complete frames off the front of a byte buffer, refusing oversized ones before any of
/// their payload is buffered.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { max_frame_len: MAX_FRAME_LEN }
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder { max_frame_len }
    }

    /// The payload limit.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// How many more bytes `buf` needs before the next frame is complete (0 if it is).
    pub fn bytes_wanted(&self, buf: &[u8]) -> usize {
        match decode_header(buf) {
            None => HEADER_LEN - buf.len(),
            Some((_, len)) => (HEADER_LEN + len as usize).saturating_sub(buf.len()),
        }
    }

    /// Removes and returns the next complete frame from `buf`, or `Ok(None)` if more bytes are
    /// needed.
    ///
    /// # Errors
    /// [`DecodeError::ProtocolViolation`] as soon as a header announces a payload over the limit
    /// (the stream cannot be resynchronised: close it); any error of [`Frame::decode`], after
    /// which the bad frame has been consumed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some((ty, len)) = decode_header(buf) else {
            return Ok(None);
        };
        let len = len as usize;
        if len > self.max_frame_len {
            return Err(DecodeError::ProtocolViolation("frame length over the limit"));
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Frame::decode(ty, payload).map(Some)
    }
}

#[cfg(test)]
mod tests;
