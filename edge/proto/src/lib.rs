//! Sans-IO messages of the tunnel between a node and an edge.
//!
//! The node opens one QUIC connection to the edge (ALPN [`ALPN`]), or, where UDP does not
//! pass, one TLS connection to the edge's public port (ALPN [`ALPN_TCP`]) carrying HTTP/2 in
//! which the edge is the client: there the edge opens every stream, the control stream first
//! (`warren_tunnel::link` has the details). The streams carry the same messages either way:
//!
//! ```text
//! control stream (QUIC: the node's first bidirectional stream; TCP: the edge's first stream)
//!   node -> edge  Hello { version, name, token, ports }
//!   edge -> node  Welcome { urls } | Refused { reason }      then the stream stays open
//!   node -> edge  Hello again (same name and token): the node's ports change
//!   edge -> node  Welcome { urls } | Refused { reason }      (Refused keeps the old ports)
//!
//!   node -> edge  Publish { tcp, tls }   raw TCP ports and TLS-passthrough ports wanted
//!   edge -> node  Published { urls, refused }   (again whenever the node's wish changes)
//!
//! request stream (one bidirectional stream per visitor request, opened by the edge)
//!   edge -> node  RequestHead, then the request body bytes until the stream ends (FIN)
//!   node -> edge  ResponseHead, then the response body bytes until FIN
//!   after a 101 response both directions carry the upgraded connection's raw bytes
//!   with RequestHead.trailers (version 2; the visitor sent `te: trailers`, e.g. gRPC) the
//!   response body is framed instead: Data { bytes }*, at most one Trailers { headers }, FIN;
//!   a framed response known to be empty carries the pseudo-header [`END_STREAM`] in its head
//!   (gRPC's trailers-only answers: the visitor then gets one HEADERS frame that ends the stream)
//!
//! connection stream (one per visitor TCP connection to a TCP or TLS-passthrough port)
//!   edge -> node  Connect { kind, port, visitor, local, sni }
//!   then both directions carry the visitor's raw bytes (for TLS: the whole TLS session, from
//!   its ClientHello on); either side finishing or resetting ends the connection
//! ```
//!
//! peer link (one edge forwarding visitors to a sibling edge that holds the node's tunnel)
//!   edge A -> edge B  PeerHello { version, key } on A's first bidirectional stream
//!   edge B -> edge A  Welcome { urls: [] } | Refused { reason }
//!   then A opens one request stream per forwarded visitor request, carrying exactly what a
//!   request stream to a node carries; B splices it onto a stream to its node (one hop only)
//!
//! Every message is `length u32 BE | type u8 | fields`, length counting type and fields, at
//! most [`MAX_MESSAGE_LEN`]. Strings are `len u16 BE | UTF-8`, byte strings `len u16 BE |
//! bytes`, lists `count u16 BE | items`.

#![deny(missing_docs)]

use bytes::{Buf, BufMut, BytesMut};

/// ALPN of the tunnel over QUIC.
pub const ALPN: &[u8] = b"warren-tunnel/1";
/// ALPN of the tunnel over TCP+TLS (HTTP/2 inside, on the edge's public port).
pub const ALPN_TCP: &[u8] = b"warren-tunnel-tcp/1";
/// Protocol version sent in Hello. Version 2 adds [`RequestHead::trailers`] and the framed
/// response body; an edge accepts every version from [`MIN_VERSION`] and uses version 2
/// features only with nodes that sent version 2.
pub const VERSION: u16 = 2;
/// Oldest protocol version still accepted.
pub const MIN_VERSION: u16 = 1;
/// Pseudo-header of a framed response head whose body is empty (no HTTP header name starts
/// with ':', so it cannot clash with one).
pub const END_STREAM: &str = ":end-stream";
/// Largest body chunk in one [`Message::Data`].
pub const MAX_DATA: usize = 60 << 10;
/// Largest message (heads only: bodies are raw stream bytes).
pub const MAX_MESSAGE_LEN: usize = 64 << 10;
/// Most headers in one head.
pub const MAX_HEADERS: usize = 256;

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The bytes are not a valid message.
    #[error("malformed tunnel message: {0}")]
    Malformed(&'static str),
    /// A valid message too large or in the wrong place.
    #[error("tunnel protocol violation: {0}")]
    ProtocolViolation(&'static str),
}

impl TunnelError {
    /// A short stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::Malformed(_) => "malformed",
            TunnelError::ProtocolViolation(_) => "protocol_violation",
        }
    }
}

/// A header: name and raw value.
pub type Header = (String, Vec<u8>);

/// A tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `0x01` node -> edge: `version u16 | name str | token str | ports list<u16>`.
    Hello {
        /// Protocol version.
        version: u16,
        /// The node name: the public host is `<name>.<funnel domain>`.
        name: String,
        /// Operator-issued token authorising the name.
        token: String,
        /// Public HTTPS ports to serve (443, 8443, 10000).
        ports: Vec<u16>,
    },
    /// `0x02` edge -> node: `urls list<str>`, the public URLs now served.
    Welcome {
        /// Public URLs.
        urls: Vec<String>,
    },
    /// `0x03` edge -> node: `reason str`; the edge closes the connection.
    Refused {
        /// Why.
        reason: String,
    },
    /// `0x04` edge -> node: `method str | uri str | headers | visitor str | port u16 | sni str |
    /// tls_version str | flags u8` (bit 0 upgrade, bit 1 trailers; version 1 sent 0 or 1).
    Request(RequestHead),
    /// `0x05` node -> edge: `status u16 | headers`.
    Response(ResponseHead),
    /// `0x06` edge -> sibling edge: `version u16 | key str`, the cluster's shared key.
    PeerHello {
        /// Protocol version.
        version: u16,
        /// The cluster key.
        key: String,
    },
    /// `0x07` node -> edge, on the control stream after Welcome: `tcp list<u16> | tls
    /// list<u16>`, the raw TCP ports and the TLS-passthrough public ports the node wants now.
    Publish {
        /// Edge ports whose TCP connections go to the node as they are.
        tcp: Vec<u16>,
        /// Public HTTPS ports on which TLS for the node's name is passed through, not
        /// terminated.
        tls: Vec<u16>,
    },
    /// `0x08` edge -> node: `urls list<str> | refused list<str>`, what is published now
    /// (`tcp://host:port`, `tls://host:port`) and a reason for each port refused.
    Published {
        /// Granted, as URLs.
        urls: Vec<String>,
        /// `"<kind> <port>: <why>"` for each refused port.
        refused: Vec<String>,
    },
    /// `0x09` edge -> node, first on a connection stream: `kind u8 | port u16 | visitor str |
    /// local str | sni str`.
    Connect(ConnectHead),
    /// `0x0a` node -> edge, in a framed response body: `bytes bytes` (at most [`MAX_DATA`]).
    Data(Vec<u8>),
    /// `0x0b` node -> edge, last in a framed response body: `headers`.
    Trailers(Vec<Header>),
}

/// What a connection stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// `1`: raw TCP.
    Tcp,
    /// `2`: a TLS session passed through (the node sees the visitor's ClientHello).
    Tls,
}

/// A visitor's TCP connection as the edge accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHead {
    /// Raw TCP or TLS passthrough.
    pub kind: ConnKind,
    /// The edge port the visitor connected to.
    pub port: u16,
    /// The visitor's address, `ip:port`.
    pub visitor: String,
    /// The edge's address the visitor reached, `ip:port` (for a PROXY protocol header).
    pub local: String,
    /// The TLS server name (TLS passthrough), or empty.
    pub sni: String,
}

/// A visitor's request as the edge received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHead {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers, with X-Forwarded-* added by the edge.
    pub headers: Vec<Header>,
    /// The visitor's address, `ip:port`.
    pub visitor: String,
    /// Public port the visitor used.
    pub port: u16,
    /// TLS server name the visitor sent.
    pub sni: String,
    /// Negotiated TLS version, e.g. "TLSv1.3".
    pub tls_version: String,
    /// Whether the visitor asked for a connection upgrade (e.g. WebSocket).
    pub upgrade: bool,
    /// Whether the visitor takes trailers (`te: trailers`): the response body is then framed.
    pub trailers: bool,
}

/// The origin's response head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<Header>,
}

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0x01,
            Message::Welcome { .. } => 0x02,
            Message::Refused { .. } => 0x03,
            Message::Request(_) => 0x04,
            Message::Response(_) => 0x05,
            Message::PeerHello { .. } => 0x06,
            Message::Publish { .. } => 0x07,
            Message::Published { .. } => 0x08,
            Message::Connect(_) => 0x09,
            Message::Data(_) => 0x0a,
            Message::Trailers(_) => 0x0b,
        }
    }

    /// Appends the encoded message.
    ///
    /// # Errors
    /// [`TunnelError::ProtocolViolation`] if a field or the message exceeds the limits (the
    /// buffer is left as it was).
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), TunnelError> {
        let start = out.len();
        out.put_u32(0);
        out.put_u8(self.type_byte());
        let r = self.encode_fields(out);
        let len = out.len() - start - 4;
        if r.is_err() || len > MAX_MESSAGE_LEN {
            out.truncate(start);
            return r.and(Err(TunnelError::ProtocolViolation("message too long")));
        }
        out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    fn encode_fields(&self, out: &mut BytesMut) -> Result<(), TunnelError> {
        match self {
            Message::Hello { version, name, token, ports } => {
                out.put_u16(*version);
                put_str(out, name)?;
                put_str(out, token)?;
                put_count(out, ports.len())?;
                ports.iter().for_each(|p| out.put_u16(*p));
            }
            Message::Welcome { urls } => {
                put_count(out, urls.len())?;
                for u in urls {
                    put_str(out, u)?;
                }
            }
            Message::Refused { reason } => put_str(out, reason)?,
            Message::Request(h) => {
                put_str(out, &h.method)?;
                put_str(out, &h.uri)?;
                put_headers(out, &h.headers)?;
                put_str(out, &h.visitor)?;
                out.put_u16(h.port);
                put_str(out, &h.sni)?;
                put_str(out, &h.tls_version)?;
                out.put_u8(u8::from(h.upgrade) | (u8::from(h.trailers) << 1));
            }
            Message::Response(h) => {
                out.put_u16(h.status);
                put_headers(out, &h.headers)?;
            }
            Message::PeerHello { version, key } => {
                out.put_u16(*version);
                put_str(out, key)?;
            }
            Message::Publish { tcp, tls } => {
                put_ports(out, tcp)?;
                put_ports(out, tls)?;
            }
            Message::Published { urls, refused } => {
                put_strs(out, urls)?;
                put_strs(out, refused)?;
            }
            Message::Connect(c) => {
                out.put_u8(match c.kind {
                    ConnKind::Tcp => 1,
                    ConnKind::Tls => 2,
                });
                out.put_u16(c.port);
                put_str(out, &c.visitor)?;
                put_str(out, &c.local)?;
                put_str(out, &c.sni)?;
            }
            Message::Data(d) => {
                if d.len() > MAX_DATA {
                    return Err(TunnelError::ProtocolViolation("data chunk over the limit"));
                }
                put_bytes(out, d)?;
            }
            Message::Trailers(h) => put_headers(out, h)?,
        }
        Ok(())
    }

    /// Removes and returns the next complete message from `buf`, or `Ok(None)` if more bytes
    /// are needed.
    ///
    /// # Errors
    /// [`TunnelError`] for oversized, malformed or trailing-byte messages.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, TunnelError> {
        let Some(len) = buf.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
            return Ok(None);
        };
        if len > MAX_MESSAGE_LEN {
            return Err(TunnelError::ProtocolViolation("message length over the limit"));
        }
        if len == 0 {
            return Err(TunnelError::Malformed("empty message"));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let body = buf.split_to(len);
        let mut r = &body[..];
        let ty = r.get_u8();
        let msg = match ty {
            0x01 => {
                let version = get_u16(&mut r)?;
                let name = get_str(&mut r)?;
                let token = get_str(&mut r)?;
                let n = get_u16(&mut r)?;
                let ports = (0..n).map(|_| get_u16(&mut r)).collect::<Result<_, _>>()?;
                Message::Hello { version, name, token, ports }
            }
            0x02 => {
                let n = get_u16(&mut r)?;
                Message::Welcome { urls: (0..n).map(|_| get_str(&mut r)).collect::<Result<_, _>>()? }
            }
            0x03 => Message::Refused { reason: get_str(&mut r)? },
            0x04 => {
                let mut head = RequestHead {
                    method: get_str(&mut r)?,
                    uri: get_str(&mut r)?,
                    headers: get_headers(&mut r)?,
                    visitor: get_str(&mut r)?,
                    port: get_u16(&mut r)?,
                    sni: get_str(&mut r)?,
                    tls_version: get_str(&mut r)?,
                    ..Default::default()
                };
                let flags = get_u8(&mut r)?;
                if flags & !0b11 != 0 {
                    return Err(TunnelError::Malformed("unknown request flags"));
                }
                head.upgrade = flags & 1 != 0;
                head.trailers = flags & 2 != 0;
                Message::Request(head)
            }
            0x05 => Message::Response(ResponseHead { status: get_u16(&mut r)?, headers: get_headers(&mut r)? }),
            0x06 => Message::PeerHello { version: get_u16(&mut r)?, key: get_str(&mut r)? },
            0x07 => Message::Publish { tcp: get_ports(&mut r)?, tls: get_ports(&mut r)? },
            0x08 => Message::Published { urls: get_strs(&mut r)?, refused: get_strs(&mut r)? },
            0x09 => Message::Connect(ConnectHead {
                kind: match get_u8(&mut r)? {
                    1 => ConnKind::Tcp,
                    2 => ConnKind::Tls,
                    _ => return Err(TunnelError::Malformed("unknown connection kind")),
                },
                port: get_u16(&mut r)?,
                visitor: get_str(&mut r)?,
                local: get_str(&mut r)?,
                sni: get_str(&mut r)?,
            }),
            0x0a => {
                let data = get_bytes(&mut r)?;
                if data.len() > MAX_DATA {
                    return Err(TunnelError::ProtocolViolation("data chunk over the limit"));
                }
                Message::Data(data)
            }
            0x0b => Message::Trailers(get_headers(&mut r)?),
            _ => return Err(TunnelError::Malformed("unknown message type")),
        };
        if !r.is_empty() {
            return Err(TunnelError::Malformed("trailing bytes"));
        }
        Ok(Some(msg))
    }
}

fn put_count(out: &mut BytesMut, n: usize) -> Result<(), TunnelError> {
    out.put_u16(u16::try_from(n).map_err(|_| TunnelError::ProtocolViolation("list too long"))?);
    Ok(())
}

fn put_ports(out: &mut BytesMut, ports: &[u16]) -> Result<(), TunnelError> {
    put_count(out, ports.len())?;
    ports.iter().for_each(|p| out.put_u16(*p));
    Ok(())
}

fn put_strs(out: &mut BytesMut, v: &[String]) -> Result<(), TunnelError> {
    put_count(out, v.len())?;
    v.iter().try_for_each(|s| put_str(out, s))
}

fn get_ports(r: &mut &[u8]) -> Result<Vec<u16>, TunnelError> {
    let n = get_u16(r)?;
    (0..n).map(|_| get_u16(r)).collect()
}

fn get_strs(r: &mut &[u8]) -> Result<Vec<String>, TunnelError> {
    let n = get_u16(r)?;
    (0..n).map(|_| get_str(r)).collect()
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) -> Result<(), TunnelError> {
    put_count(out, b.len())?;
    out.put_slice(b);
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str) -> Result<(), TunnelError> {
    put_bytes(out, s.as_bytes())
}

fn put_headers(out: &mut BytesMut, h: &[Header]) -> Result<(), TunnelError> {
    if h.len() > MAX_HEADERS {
        return Err(TunnelError::ProtocolViolation("too many headers"));
    }
    put_count(out, h.len())?;
    for (n, v) in h {
        put_str(out, n)?;
        put_bytes(out, v)?;
    }
    Ok(())
}

fn get_u8(r: &mut &[u8]) -> Result<u8, TunnelError> {
    if r.is_empty() {
        return Err(TunnelError::Malformed("truncated"));
    }
    Ok(r.get_u8())
}

fn get_u16(r: &mut &[u8]) -> Result<u16, TunnelError> {
    if r.len() < 2 {
        return Err(TunnelError::Malformed("truncated"));
    }
    Ok(r.get_u16())
}

fn get_bytes(r: &mut &[u8]) -> Result<Vec<u8>, TunnelError> {
    let n = usize::from(get_u16(r)?);
    if r.len() < n {
        return Err(TunnelError::Malformed("truncated"));
    }
    let v = r[..n].to_vec();
    r.advance(n);
    Ok(v)
}

fn get_str(r: &mut &[u8]) -> Result<String, TunnelError> {
    String::from_utf8(get_bytes(r)?).map_err(|_| TunnelError::Malformed("invalid UTF-8"))
}

fn get_headers(r: &mut &[u8]) -> Result<Vec<Header>, TunnelError> {
    let n = usize::from(get_u16(r)?);
    if n > MAX_HEADERS {
        return Err(TunnelError::ProtocolViolation("too many headers"));
    }
    (0..n).map(|_| Ok((get_str(r)?, get_bytes(r)?))).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Vec<Message> {
        vec![
            Message::Hello { version: 1, name: "node1".into(), token: "t0k".into(), ports: vec![443, 8443] },
            Message::Welcome { urls: vec!["https://node1.funnel.example:443/".into()] },
            Message::Refused { reason: "bad token".into() },
            Message::Request(RequestHead {
                method: "POST".into(),
                uri: "/upload?x=1".into(),
                headers: vec![
                    ("content-type".into(), b"text/plain".to_vec()),
                    ("x-forwarded-for".into(), b"192.0.2.1".to_vec()),
                ],
                visitor: "192.0.2.1:5555".into(),
                port: 443,
                sni: "node1.funnel.example".into(),
                tls_version: "TLSv1.3".into(),
                upgrade: false,
                trailers: true,
            }),
            Message::Response(ResponseHead { status: 101, headers: vec![("upgrade".into(), b"websocket".to_vec())] }),
            Message::PeerHello { version: 1, key: "cluster-key-0123456789".into() },
            Message::Publish { tcp: vec![20001, 20002], tls: vec![443] },
            Message::Published {
                urls: vec!["tcp://node1.funnel.example:20001".into()],
                refused: vec!["tcp 20002: taken by another node".into()],
            },
            Message::Connect(ConnectHead {
                kind: ConnKind::Tls,
                port: 443,
                visitor: "192.0.2.1:5555".into(),
                local: "198.51.100.7:443".into(),
                sni: "node1.funnel.example".into(),
            }),
            Message::Data(b"a chunk of a framed body".to_vec()),
            Message::Trailers(vec![("grpc-status".into(), b"0".to_vec())]),
        ]
    }

    #[test]
    fn hex_snapshot_of_hello() {
        let mut b = BytesMut::new();
        Message::Hello { version: 1, name: "n".into(), token: "t".into(), ports: vec![443] }
            .encode(&mut b)
            .expect("encodes");
        assert_eq!(hex(&b), "0000000d01000100016e000174000101bb");
        let mut b = BytesMut::new();
        Message::PeerHello { version: 1, key: "k".into() }.encode(&mut b).expect("encodes");
        assert_eq!(hex(&b), "0000000606000100016b");
        let mut b = BytesMut::new();
        Message::Publish { tcp: vec![5432], tls: vec![] }.encode(&mut b).expect("encodes");
        assert_eq!(hex(&b), "0000000707000115380000");
        let mut b = BytesMut::new();
        let connect =
            ConnectHead { kind: ConnKind::Tcp, port: 5432, visitor: "v".into(), local: "l".into(), sni: String::new() };
        Message::Connect(connect).encode(&mut b).expect("encodes");
        assert_eq!(hex(&b), "0000000c0901153800017600016c0000");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = BytesMut::new();
        for m in sample() {
            m.encode(&mut wire).expect("encodes");
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(m) = Message::decode(&mut buf).expect("valid") {
                got.push(m);
            }
        }
        assert_eq!(got, sample());
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let too_many =
            Message::Response(ResponseHead { status: 200, headers: vec![("a".into(), vec![]); MAX_HEADERS + 1] });
        let mut b = BytesMut::from(&b"keep"[..]);
        assert!(too_many.encode(&mut b).is_err());
        assert_eq!(&b[..], b"keep", "a refused message leaves the buffer untouched");
        let huge = Message::Refused { reason: "x".repeat(70_000) };
        assert!(huge.encode(&mut BytesMut::new()).is_err());
        let mut over = BytesMut::from(&[0x00, 0x02, 0x00, 0x00][..]);
        assert!(matches!(Message::decode(&mut over), Err(TunnelError::ProtocolViolation(_))));
        let mut trailing = BytesMut::from(&[0, 0, 0, 4, 0x03, 0, 0, 9][..]);
        assert!(Message::decode(&mut trailing).is_err());
        assert!(Message::Data(vec![0; MAX_DATA + 1]).encode(&mut BytesMut::new()).is_err());
        let mut big = BytesMut::new();
        big.put_u32(3 + MAX_DATA as u32 + 1);
        big.put_u8(0x0a);
        big.put_u16(MAX_DATA as u16 + 1);
        big.put_bytes(0, MAX_DATA + 1);
        assert!(matches!(Message::decode(&mut big), Err(TunnelError::ProtocolViolation(_))));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Message::decode(&mut buf) {}
        }

        #[test]
        fn perturbed_messages_never_panic(i in 0usize..11, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..5)) {
            let mut wire = BytesMut::new();
            sample()[i].encode(&mut wire).expect("encodes");
            for (pos, x) in flips {
                let n = wire.len();
                wire[pos % n] ^= x;
            }
            while let Ok(Some(_)) = Message::decode(&mut wire) {}
        }
    }
}
