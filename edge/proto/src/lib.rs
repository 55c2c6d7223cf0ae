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
//!   node -> edge  Access { generation, rules }   one rule per HTTP service (version 3)
//!   edge -> node  AccessSet { generation, refused }   (again whenever the rules change)
//!
//!   node -> edge  Domains { names }   custom domains wanted (version 3)
//!   edge -> node  DomainsSet { served, pending }   (again whenever the wish changes)
//!
//! request stream (one bidirectional stream per visitor request, opened by the edge)
//!   edge -> node  RequestHead, then the request body bytes until the stream ends (FIN)
//!   node -> edge  ResponseHead, then the response body bytes until FIN
//!   after a 101 response both directions carry the upgraded connection's raw bytes
//!   with RequestHead.trailers (version 2; the visitor sent `te: trailers`, e.g. gRPC) the
//!   response body is framed instead: Data { bytes }*, at most one Trailers { headers }, FIN;
//!   a framed response known to be empty carries the pseudo-header [`END_STREAM`] in its head
//!   (gRPC's trailers-only answers: the visitor then gets one HEADERS frame that ends the stream)
//!   with RequestHead.checked (version 3) the edge says which access rule it enforced, so the
//!   node can refuse a protected service's request the edge checked against older rules
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
/// response body, version 3 [`Message::Access`] and [`RequestHead::checked`]; an edge accepts
/// every version from [`MIN_VERSION`] and uses a version's features only with nodes that sent
/// at least that version.
pub const VERSION: u16 = 3;
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
/// Most rules in one [`Message::Access`].
pub const MAX_RULES: usize = 64;

/// Whether the mount `mount` (a clean path: `/`, `/api`) covers the path of `path_and_query`:
/// `/api` covers `/api` and `/api/…`, never `/apix`. Edge and node both route with this, so
/// the rule the edge enforces is the service the node picks.
pub fn mount_covers(mount: &str, path_and_query: &str) -> bool {
    let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
    mount == "/" || path == mount || path.strip_prefix(mount).is_some_and(|rest| rest.starts_with('/'))
}

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
    /// `0x0c` node -> edge, on the control stream after Welcome: `generation u32 | rules
    /// list<rule>`, the access rules of every HTTP service, replacing the previous ones.
    Access {
        /// Counts up with every change of the node's rules (the first set is 1).
        generation: u32,
        /// One per HTTP service (an open service has a rule with no conditions).
        rules: Vec<AccessRule>,
    },
    /// `0x0d` edge -> node: `generation u32 | refused list<str>`, the rules now enforced and
    /// why any was refused (a refused rule's service is closed to every visitor).
    AccessSet {
        /// The generation now enforced.
        generation: u32,
        /// `"<port><path>: <why>"` for each rule refused.
        refused: Vec<String>,
    },
    /// `0x0e` node -> edge, on the control stream: `names list<str>`, the custom domains the
    /// node wants to be reached at besides `<name>.<funnel domain>` (replacing earlier ones).
    Domains {
        /// Domain names, e.g. `app.example.com`.
        names: Vec<String>,
    },
    /// `0x0f` edge -> node: `served list<str> | pending list<str>`, the domains served now and,
    /// for each other one, `"<domain>: <what is missing>"` (the proof to publish).
    DomainsSet {
        /// Proven and served.
        served: Vec<String>,
        /// Not (yet) proven, with what to do.
        pending: Vec<String>,
    },
}

/// Who may reach one HTTP service, enforced by the edge before a request enters the tunnel.
///
/// ```text
/// port u16 | path str | basic list<user str, hash str> | bearer list<bytes> | allow list<str>
/// | deny list<str> | rate u32 | burst u32 | forward_auth str
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRule {
    /// The service's public port.
    pub port: u16,
    /// The service's mount.
    pub path: String,
    /// HTTP basic auth: user names and bcrypt hashes of their passwords.
    pub basic: Vec<(String, String)>,
    /// Bearer tokens, as the SHA-256 of each token (32 bytes).
    pub bearer: Vec<Vec<u8>>,
    /// Visitor networks let in (CIDR, `10.0.0.0/8`, `2001:db8::/32`); empty lets all in.
    pub allow: Vec<String>,
    /// Visitor networks kept out, checked before `allow`.
    pub deny: Vec<String>,
    /// Requests per second for the service, 0 for no limit.
    pub rate: u32,
    /// Requests at once above the rate.
    pub burst: u32,
    /// The name of an edge-configured forward-auth endpoint that decides, or empty.
    pub forward_auth: String,
}

/// The access rule an edge enforced on a request (see [`Message::Access`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// The generation of the node's rules the edge held.
    pub generation: u32,
    /// The mount of the rule applied; empty when no rule covered the request.
    pub mount: String,
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
    /// The access rule the edge enforced (version 3; flags bit 2, then `generation u32 |
    /// mount str`).
    pub checked: Option<Checked>,
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
            Message::Access { .. } => 0x0c,
            Message::AccessSet { .. } => 0x0d,
            Message::Domains { .. } => 0x0e,
            Message::DomainsSet { .. } => 0x0f,
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
                out.put_u8(u8::from(h.upgrade) | (u8::from(h.trailers) << 1) | (u8::from(h.checked.is_some()) << 2));
                if let Some(c) = &h.checked {
                    out.put_u32(c.generation);
                    put_str(out, &c.mount)?;
                }
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
            Message::Access { generation, rules } => {
                if rules.len() > MAX_RULES {
                    return Err(TunnelError::ProtocolViolation("too many access rules"));
                }
                out.put_u32(*generation);
                put_count(out, rules.len())?;
                rules.iter().try_for_each(|r| put_rule(out, r))?;
            }
            Message::AccessSet { generation, refused } => {
                out.put_u32(*generation);
                put_strs(out, refused)?;
            }
            Message::Domains { names } => put_strs(out, names)?,
            Message::DomainsSet { served, pending } => {
                put_strs(out, served)?;
                put_strs(out, pending)?;
            }
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
                if flags & !0b111 != 0 {
                    return Err(TunnelError::Malformed("unknown request flags"));
                }
                head.upgrade = flags & 1 != 0;
                head.trailers = flags & 2 != 0;
                if flags & 4 != 0 {
                    head.checked = Some(Checked { generation: get_u32(&mut r)?, mount: get_str(&mut r)? });
                }
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
            0x0c => {
                let generation = get_u32(&mut r)?;
                let n = usize::from(get_u16(&mut r)?);
                if n > MAX_RULES {
                    return Err(TunnelError::ProtocolViolation("too many access rules"));
                }
                Message::Access { generation, rules: (0..n).map(|_| get_rule(&mut r)).collect::<Result<_, _>>()? }
            }
            0x0d => Message::AccessSet { generation: get_u32(&mut r)?, refused: get_strs(&mut r)? },
            0x0e => Message::Domains { names: get_strs(&mut r)? },
            0x0f => Message::DomainsSet { served: get_strs(&mut r)?, pending: get_strs(&mut r)? },
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

fn put_rule(out: &mut BytesMut, r: &AccessRule) -> Result<(), TunnelError> {
    out.put_u16(r.port);
    put_str(out, &r.path)?;
    put_count(out, r.basic.len())?;
    for (user, hash) in &r.basic {
        put_str(out, user)?;
        put_str(out, hash)?;
    }
    put_count(out, r.bearer.len())?;
    r.bearer.iter().try_for_each(|b| put_bytes(out, b))?;
    put_strs(out, &r.allow)?;
    put_strs(out, &r.deny)?;
    out.put_u32(r.rate);
    out.put_u32(r.burst);
    put_str(out, &r.forward_auth)
}

fn get_rule(r: &mut &[u8]) -> Result<AccessRule, TunnelError> {
    let port = get_u16(r)?;
    let path = get_str(r)?;
    let n = get_u16(r)?;
    let basic = (0..n).map(|_| Ok((get_str(r)?, get_str(r)?))).collect::<Result<_, _>>()?;
    let n = get_u16(r)?;
    let bearer = (0..n).map(|_| get_bytes(r)).collect::<Result<_, _>>()?;
    Ok(AccessRule {
        port,
        path,
        basic,
        bearer,
        allow: get_strs(r)?,
        deny: get_strs(r)?,
        rate: get_u32(r)?,
        burst: get_u32(r)?,
        forward_auth: get_str(r)?,
    })
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

fn get_u32(r: &mut &[u8]) -> Result<u32, TunnelError> {
    if r.len() < 4 {
        return Err(TunnelError::Malformed("truncated"));
    }
    Ok(r.get_u32())
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
                checked: Some(Checked { generation: 7, mount: "/upload".into() }),
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
            Message::Access {
                generation: 3,
                rules: vec![
                    AccessRule { port: 443, path: "/".into(), ..AccessRule::default() },
                    AccessRule {
                        port: 443,
                        path: "/admin".into(),
                        basic: vec![("alice".into(), "$2b$04$abcdefghijklmnopqrstuu".into())],
                        bearer: vec![vec![0xab; 32]],
                        allow: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
                        deny: vec!["10.9.0.0/16".into()],
                        rate: 10,
                        burst: 20,
                        forward_auth: "sso".into(),
                    },
                ],
            },
            Message::AccessSet { generation: 3, refused: vec!["443/admin: unknown forward_auth \"sso\"".into()] },
            Message::Domains { names: vec!["app.example.com".into()] },
            Message::DomainsSet { served: vec![], pending: vec!["app.example.com: no proof yet".into()] },
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
        let mut b = BytesMut::new();
        let open = AccessRule { port: 443, path: "/".into(), ..AccessRule::default() };
        Message::Access { generation: 1, rules: vec![open] }.encode(&mut b).expect("encodes");
        let want = ["0000001e", "0c", "00000001", "0001", "01bb", "00012f", "0000", "0000", "0000", "0000"];
        assert_eq!(hex(&b), want.concat() + "00000000" + "00000000" + "0000");
    }

    #[test]
    fn a_checked_head_carries_generation_and_mount_after_the_flags() {
        let head = RequestHead { checked: Some(Checked { generation: 2, mount: "/a".into() }), ..Default::default() };
        let mut b = BytesMut::new();
        Message::Request(head.clone()).encode(&mut b).expect("encodes");
        // method, uri, headers, visitor, port, sni, tls_version: all empty or zero; flags 0b100.
        let fields = "0000".repeat(7);
        assert_eq!(hex(&b), ["00000018", "04", &fields, "04", "00000002", "00022f61"].concat());
        assert_eq!(Message::decode(&mut b), Ok(Some(Message::Request(head))));
    }

    #[test]
    fn mounts_cover_whole_segments_only() {
        assert!(mount_covers("/", "/anything?x=1"));
        assert!(mount_covers("/api", "/api"));
        assert!(mount_covers("/api", "/api/users?id=3"));
        assert!(mount_covers("/api", "/api?x"));
        assert!(!mount_covers("/api", "/apix"));
        assert!(!mount_covers("/api", "/ap"));
        assert!(!mount_covers("/api", "/x/api"));
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
        fn perturbed_messages_never_panic(i in 0usize..15, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..5)) {
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
