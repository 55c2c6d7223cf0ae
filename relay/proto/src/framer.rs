//! The byte pump between a connection and DERP frames, for either transport.
//!
//! A [`Framer`] owns the receive and transmit buffers of one connection. The async shell reads
//! socket bytes into [`Framer::rx_buf`], pulls frames with [`Framer::poll_frame`], queues frames
//! with [`Framer::queue`] and writes whatever [`Framer::take_transmit`] returns. Over WebSocket
//! the framer also unwraps binary messages, answers pings and notices the peer's close; over a
//! plain upgraded connection it is a bounded frame decoder plus an output buffer.

use bytes::{Bytes, BytesMut};
use rand_core::RngCore;

use crate::error::DecodeError;
use crate::frame::{Frame, FrameDecoder};
use crate::ws::{self, Control, Role, WsDecoder};

/// How DERP bytes are carried on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `Upgrade: DERP`: frames directly on the (TLS) byte stream.
    Derp,
    /// WebSocket with subprotocol `derp`: the stream split into binary messages.
    WebSocket,
}

impl Transport {
    /// A short stable name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Derp => "derp",
            Transport::WebSocket => "websocket",
        }
    }
}

/// Buffers and transport state of one DERP connection; see the module docs.
#[derive(Debug)]
pub struct Framer {
    role: Role,
    ws: Option<WsDecoder>,
    decoder: FrameDecoder,
    /// Raw bytes from the socket (WebSocket frames, or DERP frames directly).
    raw: BytesMut,
    /// DERP stream bytes unwrapped from WebSocket messages.
    unwrapped: BytesMut,
    /// DERP frames queued for sending, not yet wrapped.
    tx: BytesMut,
    /// WebSocket control replies queued for sending (pong, close), unmasked; a client's are
    /// re-encoded with fresh masks in take_transmit.
    tx_control: BytesMut,
    peer_closed: bool,
}

impl Framer {
    /// A framer for one end (`role`) of a connection using `transport`, refusing frames over
    /// `decoder`'s limit.
    pub fn new(role: Role, transport: Transport, decoder: FrameDecoder) -> Self {
        Framer {
            role,
            ws: (transport == Transport::WebSocket).then(|| WsDecoder::new(role)),
            decoder,
            raw: BytesMut::new(),
            unwrapped: BytesMut::new(),
            tx: BytesMut::new(),
            tx_control: BytesMut::new(),
            peer_closed: false,
        }
    }

    /// The buffer the shell reads socket bytes into (e.g. with `read_buf`).
    pub fn rx_buf(&mut self) -> &mut BytesMut {
        &mut self.raw
    }

    /// Seeds the receive buffer with bytes that were read ahead (e.g. after an HTTP head).
    pub fn push_rx(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
    }

    /// Whether the peer sent a WebSocket close; no more frames will come.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The next complete frame, or `Ok(None)` when more bytes are needed (or the peer closed).
    ///
    /// # Errors
    /// Any [`DecodeError`] from the transport or frame decoder. After an error the connection
    /// cannot be resynchronised and must be closed.
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let Some(ws) = &mut self.ws else {
            return self.decoder.decode(&mut self.raw);
        };
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.unwrapped)? {
                return Ok(Some(frame));
            }
            if self.peer_closed {
                return Ok(None);
            }
            match ws.decode(&mut self.raw, &mut self.unwrapped)? {
                None => return self.decoder.decode(&mut self.unwrapped),
                Some(Control::Ping(p)) => ws::encode_frame(&mut self.tx_control, ws::opcode::PONG, &p, None),
                Some(Control::Pong(_)) => {}
                Some(Control::Close(code)) => {
                    self.peer_closed = true;
                    let code = code.unwrap_or(1000).to_be_bytes();
                    ws::encode_frame(&mut self.tx_control, ws::opcode::CLOSE, &code, None);
                }
            }
        }
    }

    /// Queues a frame for sending.
    pub fn queue(&mut self, frame: &Frame) {
        frame.encode(&mut self.tx);
    }

    /// Bytes of DERP frames queued and not yet taken.
    pub fn queued_len(&self) -> usize {
        self.tx.len() + self.tx_control.len()
    }

    /// Everything queued, ready to write to the socket in one go, or `None` if nothing is.
    /// `rng` supplies WebSocket masking keys on the client side.
    pub fn take_transmit(&mut self, rng: &mut impl RngCore) -> Option<Bytes> {
        if self.tx.is_empty() && self.tx_control.is_empty() {
            return None;
        }
        let Some(_) = &self.ws else {
            return Some(self.tx.split().freeze());
        };
        let mut out = BytesMut::with_capacity(self.tx.len() + self.tx_control.len() + 14);
        if !self.tx_control.is_empty() {
            let control = self.tx_control.split();
            match self.role {
                Role::Server => out.extend_from_slice(&control),
                Role::Client => remask_control(&control, &mut out, rng),
            }
        }
        if !self.tx.is_empty() {
            let mask = (self.role == Role::Client).then(|| rng.next_u32().to_be_bytes());
            ws::encode_frame(&mut out, ws::opcode::BINARY, &self.tx, mask);
            self.tx.clear();
        }
        Some(out.freeze())
    }
}

/// Re-encodes unmasked control frames (as queued) with fresh client masks.
fn remask_control(control: &[u8], out: &mut BytesMut, rng: &mut impl RngCore) {
    let mut rest = control;
    // Each queued control frame is `b0, len(<=125), payload`: written by control_reply.
    while let [b0, len, tail @ ..] = rest {
        let n = usize::from(*len & 0x7f).min(tail.len());
        ws::encode_frame(out, b0 & 0x0f, &tail[..n], Some(rng.next_u32().to_be_bytes()));
        rest = &tail[n..];
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rand_core::OsRng;

    use super::*;
    use crate::key::PublicKey;

    fn pair(t: Transport) -> (Framer, Framer) {
        (Framer::new(Role::Client, t, FrameDecoder::default()), Framer::new(Role::Server, t, FrameDecoder::default()))
    }

    fn pump(from: &mut Framer, to: &mut Framer) -> Vec<Frame> {
        if let Some(bytes) = from.take_transmit(&mut OsRng) {
            // Deliver in awkward chunk sizes to exercise partial reads.
            for chunk in bytes.chunks(7) {
                to.push_rx(chunk);
            }
        }
        let mut got = Vec::new();
        while let Some(f) = to.poll_frame().expect("valid") {
            got.push(f);
        }
        got
    }

    #[test]
    fn both_transports_carry_frames_both_ways() {
        for t in [Transport::Derp, Transport::WebSocket] {
            let (mut c, mut s) = pair(t);
            let frames = vec![
                Frame::SendPacket { dst: PublicKey::from_bytes([3; 32]), packet: Bytes::from(vec![9; 3000]) },
                Frame::Ping(*b"pingpong"),
            ];
            for f in &frames {
                c.queue(f);
            }
            assert_eq!(pump(&mut c, &mut s), frames, "{t:?} client->server");
            s.queue(&Frame::KeepAlive);
            assert_eq!(pump(&mut s, &mut c), vec![Frame::KeepAlive], "{t:?} server->client");
        }
    }

    #[test]
    fn websocket_ping_is_answered_and_close_is_noticed() {
        let (mut c, mut s) = pair(Transport::WebSocket);
        let mut wire = BytesMut::new();
        ws::encode_frame(&mut wire, ws::opcode::PING, b"p1", Some([1, 2, 3, 4]));
        ws::encode_frame(&mut wire, ws::opcode::CLOSE, &1001u16.to_be_bytes(), Some([5, 6, 7, 8]));
        s.push_rx(&wire);
        assert_eq!(s.poll_frame(), Ok(None));
        assert!(s.peer_closed());
        let reply = s.take_transmit(&mut OsRng).expect("pong and close queued");
        c.push_rx(&reply);
        assert_eq!(c.poll_frame(), Ok(None));
        assert!(c.peer_closed(), "client sees the server's close reply");
        // Client-side control replies are masked (servers refuse unmasked frames).
        let (mut c2, mut s2) = pair(Transport::WebSocket);
        let mut wire = BytesMut::new();
        ws::encode_frame(&mut wire, ws::opcode::PING, b"x", None);
        c2.push_rx(&wire);
        assert_eq!(c2.poll_frame(), Ok(None));
        c2.queue(&Frame::KeepAlive);
        let out = c2.take_transmit(&mut OsRng).expect("queued");
        s2.push_rx(&out);
        assert_eq!(s2.poll_frame(), Ok(Some(Frame::KeepAlive)), "masked pong accepted, then data");
        assert!(!s2.peer_closed());
    }

    #[test]
    fn oversized_frame_is_an_error_over_websocket_too() {
        let (mut c, mut s) = pair(Transport::WebSocket);
        let mut raw = BytesMut::new();
        raw.extend_from_slice(&[0x04, 0x7f, 0xff, 0xff, 0xff]);
        c.tx.extend_from_slice(&raw);
        let bytes = c.take_transmit(&mut OsRng).expect("queued");
        s.push_rx(&bytes);
        assert!(s.poll_frame().is_err());
    }
}
