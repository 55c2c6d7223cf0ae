//! WebSocket framing (RFC 6455), the second transport for DERP.
//!
//! DERP over WebSocket carries the same byte stream as the upgraded connection, split into
//! binary messages at arbitrary points. [`WsDecoder`] turns received WebSocket frames back into
//! that byte stream without buffering whole messages, and hands control frames (ping, pong,
//! close) to the caller. [`encode_frame`] writes one frame.
//!
//! ```text
//!  0               1               2               3
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| payload len |  extended payload length      |
//! |I|S|S|S|  (4)  |A|     (7)     |  (16 if 126, 64 if 127)       |
//! |N|V|V|V|       |S|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |  masking key (4, client to server only) |  payload ...        |
//! ```

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// The subprotocol name DERP clients ask for.
pub const SUBPROTOCOL: &str = "derp";

/// Opcodes used here.
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text message.
    pub const TEXT: u8 = 0x1;
    /// Binary message.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xa;
}

/// Largest single WebSocket frame accepted (payloads are streamed, this only bounds lengths).
pub const MAX_WS_FRAME_LEN: u64 = 16 << 20;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_LEN: usize = 125;

/// Which end of the connection this is: servers require masked input, clients unmasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts masked frames from a client.
    Server,
    /// Accepts unmasked frames from a server.
    Client,
}

/// A control frame the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Answer with a Pong carrying the same payload.
    Ping(Bytes),
    /// A Pong arrived (nothing to do).
    Pong(Bytes),
    /// The peer is closing, with an optional status code.
    Close(Option<u16>),
}

#[derive(Debug, Clone, Copy)]
struct DataFrame {
    remaining: u64,
    mask: Option<[u8; 4]>,
    mask_pos: usize,
}

/// Streaming decoder from WebSocket frames to the byte stream they carry.
#[derive(Debug, Clone)]
pub struct WsDecoder {
    role: Role,
    current: Option<DataFrame>,
    closed: bool,
}

impl WsDecoder {
    /// A decoder for the given end of the connection.
    pub fn new(role: Role) -> Self {
        WsDecoder { role, current: None, closed: false }
    }

    /// Consumes as much of `input` as possible, appending unmasked message payload bytes to
    /// `data`. Returns a control frame as soon as one is complete; call again to go on.
    ///
    /// # Errors
    /// [`DecodeError::Malformed`] or [`DecodeError::ProtocolViolation`] for frames that break
    /// RFC 6455 (reserved bits, unknown opcodes, wrong masking for the role, oversized or
    /// fragmented control frames, data after Close). The connection must then be closed.
    pub fn decode(&mut self, input: &mut BytesMut, data: &mut BytesMut) -> Result<Option<Control>, DecodeError> {
        loop {
            if let Some(cur) = &mut self.current {
                let n = usize::try_from(cur.remaining).unwrap_or(usize::MAX).min(input.len());
                let chunk = input.split_to(n);
                let start = data.len();
                data.extend_from_slice(&chunk);
                if let Some(mask) = cur.mask {
                    apply_mask(&mut data[start..], mask, cur.mask_pos);
                    cur.mask_pos += n;
                }
                cur.remaining -= n as u64;
                if cur.remaining > 0 {
                    return Ok(None);
                }
                self.current = None;
            }
            let Some(header) = self.parse_header(input)? else {
                return Ok(None);
            };
            if self.closed {
                return Err(DecodeError::ProtocolViolation("websocket frame after close"));
            }
            match header.opcode {
                opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {
                    input.advance(header.header_len);
                    self.current = Some(DataFrame { remaining: header.len, mask: header.mask, mask_pos: 0 });
                }
                _ => {
                    let len = header.len as usize; // <= 125, checked in parse_header
                    if input.len() < header.header_len + len {
                        return Ok(None);
                    }
                    input.advance(header.header_len);
                    let mut payload = input.split_to(len);
                    if let Some(mask) = header.mask {
                        apply_mask(&mut payload, mask, 0);
                    }
                    let payload = payload.freeze();
                    return Ok(Some(match header.opcode {
                        opcode::PING => Control::Ping(payload),
                        opcode::PONG => Control::Pong(payload),
                        _ => {
                            self.closed = true;
                            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                            Control::Close(code)
                        }
                    }));
                }
            }
        }
    }

    fn parse_header(&self, input: &[u8]) -> Result<Option<Header>, DecodeError> {
        let [b0, b1, ..] = *input else { return Ok(None) };
        if b0 & 0x70 != 0 {
            return Err(DecodeError::malformed("websocket frame", "reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let op = b0 & 0x0f;
        let is_control = op & 0x08 != 0;
        if !matches!(op, 0x0..=0x2 | 0x8..=0xa) {
            return Err(DecodeError::malformed("websocket frame", "unknown opcode"));
        }
        let masked = b1 & 0x80 != 0;
        if masked != (self.role == Role::Server) {
            return Err(DecodeError::ProtocolViolation("websocket masking does not match the role"));
        }
        let (len, mut pos) = match b1 & 0x7f {
            126 => match input.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match input.get(2..10) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    (u64::from_be_bytes(a), 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if is_control && (!fin || len > MAX_CONTROL_LEN as u64) {
            return Err(DecodeError::ProtocolViolation("bad websocket control frame"));
        }
        if len > MAX_WS_FRAME_LEN {
            return Err(DecodeError::ProtocolViolation("websocket frame too long"));
        }
        let mask = if masked {
            let Some(m) = input.get(pos..pos + 4) else { return Ok(None) };
            pos += 4;
            Some([m[0], m[1], m[2], m[3]])
        } else {
            None
        };
        Ok(Some(Header { opcode: op, len, mask, header_len: pos }))
    }
}

struct Header {
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
    header_len: usize,
}

/// Appends one final (FIN) frame with `opcode` and `payload`, masked with `mask` if given
/// (clients must mask, servers must not).
pub fn encode_frame(out: &mut BytesMut, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(14 + payload.len());
    out.put_u8(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(m) => {
            out.put_slice(&m);
            let start = out.len();
            out.put_slice(payload);
            apply_mask(&mut out[start..], m, 0);
        }
        None => out.put_slice(payload),
    }
}

/// XORs `buf` with the masking key, `offset` bytes into the masked stream (RFC 6455 §5.3).
/// Works eight bytes at a time; the result equals the byte-by-byte definition.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let m = [mask[offset & 3], mask[(offset + 1) & 3], mask[(offset + 2) & 3], mask[(offset + 3) & 3]];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // Whole words keep the key's phase (8 is a multiple of 4), so the tail starts at m[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut h = sha1_smol::Sha1::new();
    h.update(client_key.trim().as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(dec: &mut WsDecoder, bytes: &[u8]) -> Result<(Vec<u8>, Vec<Control>), DecodeError> {
        let mut input = BytesMut::from(bytes);
        let mut data = BytesMut::new();
        let mut ctl = Vec::new();
        while let Some(c) = dec.decode(&mut input, &mut data)? {
            ctl.push(c);
        }
        Ok((data.to_vec(), ctl))
    }

    #[test]
    fn word_masking_equals_the_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..70 {
            for offset in 0..9 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut fast = data.clone();
                apply_mask(&mut fast, mask, offset);
                let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(offset + i) & 3]).collect();
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn rfc6455_accept_key_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn rfc6455_masked_hello_example() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let frame = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (data, ctl) = decode_all(&mut WsDecoder::new(Role::Server), &frame).expect("valid");
        assert_eq!(data, b"Hello");
        assert!(ctl.is_empty());
        let mut out = BytesMut::new();
        encode_frame(&mut out, opcode::TEXT, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(&out[..], &frame);
    }

    #[test]
    fn byte_at_a_time_streaming_and_control_frames() {
        let mut wire = BytesMut::new();
        let payload: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        encode_frame(&mut wire, opcode::BINARY, &payload[..300], Some([1, 2, 3, 4]));
        encode_frame(&mut wire, opcode::PING, b"hi", Some([9, 9, 9, 9]));
        encode_frame(&mut wire, opcode::BINARY, &payload[300..], Some([5, 6, 7, 8]));
        encode_frame(&mut wire, opcode::CLOSE, &1000u16.to_be_bytes(), Some([0, 0, 0, 1]));
        let mut dec = WsDecoder::new(Role::Server);
        let mut input = BytesMut::new();
        let mut data = BytesMut::new();
        let mut ctl = Vec::new();
        for b in wire.iter() {
            input.put_u8(*b);
            while let Some(c) = dec.decode(&mut input, &mut data).expect("valid") {
                ctl.push(c);
            }
        }
        assert_eq!(&data[..], &payload[..]);
        assert_eq!(ctl, vec![Control::Ping(Bytes::from_static(b"hi")), Control::Close(Some(1000))]);
    }

    #[test]
    fn role_masking_and_rfc_violations_are_errors() {
        let mut unmasked = BytesMut::new();
        encode_frame(&mut unmasked, opcode::BINARY, b"x", None);
        assert!(decode_all(&mut WsDecoder::new(Role::Server), &unmasked).is_err());
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &unmasked).is_ok());
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &[0xc2, 0x00]).is_err(), "rsv bit");
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &[0x83, 0x00]).is_err(), "opcode 3");
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &[0x09, 0x00]).is_err(), "fragmented ping");
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &[0x89, 126, 0, 200]).is_err(), "long ping");
        let huge = [0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_all(&mut WsDecoder::new(Role::Client), &huge).is_err());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let len = (seed % 40) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                bytes.push(seed as u8);
            }
            let _ = decode_all(&mut WsDecoder::new(Role::Server), &bytes);
            let _ = decode_all(&mut WsDecoder::new(Role::Client), &bytes);
        }
    }
}
