//! The PROXY protocol (versions 1 and 2, as HAProxy defines them): the header a load balancer
//! writes before a connection's own bytes to say which client it accepted.
//!
//! ```text
//! v1:  PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n          (text, at most 107 bytes)
//! v2:  \r\n\r\n\0\r\nQUIT\n | ver/cmd | family/transport | length u16 | addresses | TLVs
//! ```
//!
//! A server reads the header only from the addresses it trusts: anyone else could name any
//! client. [`parse`] is the sans-IO decoder: it never panics, never reads past the header and
//! refuses a header longer than [`MAX_HEADER`]. [`read_header`] reads exactly one header from
//! a stream, so the bytes after it (a TLS ClientHello) stay in the socket for whoever reads
//! next.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The twelve bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest v2 header accepted, TLVs included. Load balancers send tens of bytes of TLVs (AWS
/// adds a VPC endpoint id); 4 KiB leaves room for TLS details without letting a header pin
/// the 64 KiB its length field allows.
pub const MAX_HEADER: usize = 4096;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The load balancer relays this client.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The load balancer speaks for itself (a health check: v2 `LOCAL`), or relays something
    /// without an IP address (v1 `UNKNOWN`, v2 `UNSPEC` or a Unix socket): the connection's own
    /// peer address stands.
    Local,
}

impl Header {
    /// The client's address: the header's source, or `peer` for [`Header::Local`].
    pub fn source_or(self, peer: SocketAddr) -> SocketAddr {
        match self {
            Header::Proxied { source, .. } => source,
            Header::Local => peer,
        }
    }
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The bytes do not start with a PROXY header of either version.
    #[error("no PROXY protocol header (the connection starts with other bytes)")]
    Missing,
    /// A v1 header that does not follow the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    /// A v2 header with an unknown version, command, family or transport, or addresses that
    /// do not fit its length.
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    /// Longer than [`MAX_V1`] or [`MAX_HEADER`].
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// The connection ended or failed inside the header.
    #[error("connection ended inside the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyHeaderError {
    /// A short stable name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyHeaderError::Missing => "missing",
            ProxyHeaderError::BadV1(_) | ProxyHeaderError::BadV2(_) => "malformed",
            ProxyHeaderError::TooLong(_) => "too_long",
            ProxyHeaderError::Io(_) => "truncated",
        }
    }
}

/// Which version `buf` opens, as far as its bytes go: `Some(2)` while they match the v2
/// signature, `Some(1)` while they match `PROXY `, `None` for anything else.
fn opening(buf: &[u8]) -> Option<u8> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return Some(2);
    }
    let n = buf.len().min(6);
    (buf[..n] == b"PROXY "[..n]).then_some(1)
}

/// Whether `start`, the first bytes of a connection, begins a PROXY header: at least five bytes
/// of either version's opening (fewer could be the start of `PUT`). For telling an untrusted
/// sender that uses the protocol apart from plain garbage.
pub fn looks_like_header(start: &[u8]) -> bool {
    start.len() >= 5 && opening(start).is_some()
}

/// Decodes the header at the start of `buf`: `Ok(None)` while more bytes are needed, or the
/// header and its length in bytes.
///
/// # Errors
/// [`ProxyHeaderError`] as soon as the bytes cannot be a valid header.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match opening(buf) {
        Some(2) => parse_v2(buf),
        Some(_) => parse_v1(buf),
        None => Err(ProxyHeaderError::Missing),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let Some(lf) = buf.iter().take(MAX_V1).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_V1 { Err(ProxyHeaderError::TooLong(MAX_V1)) } else { Ok(None) };
    };
    let line = buf[..lf].strip_suffix(b"\r").ok_or(ProxyHeaderError::BadV1("line does not end in CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyHeaderError::BadV1("not ASCII"))?;
    let mut words = line.split(' ');
    let (_proxy, family) = (words.next(), words.next());
    let header = match family {
        Some("UNKNOWN") => Header::Local,
        Some(f @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = words.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(ProxyHeaderError::BadV1("expected source, destination and two ports"));
            };
            let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
                let ip = if f == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| ProxyHeaderError::BadV1("address does not match the family"))
            };
            let port = |s: &str| -> Result<u16, ProxyHeaderError> {
                let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
                let leading_zero = s.len() > 1 && s.starts_with('0');
                s.parse().ok().filter(|_| digits && !leading_zero).ok_or(ProxyHeaderError::BadV1("bad port"))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(ProxyHeaderError::BadV1("family is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Some((header, lf + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let total = v2_len(buf);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::BadV2("version is not 2"));
    }
    if total > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong(MAX_HEADER));
    }
    if fam & 0x0f > 2 {
        return Err(ProxyHeaderError::BadV2("transport is not UNSPEC, STREAM or DGRAM"));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match (ver_cmd & 0x0f, fam >> 4) {
        (0, _) => Header::Local,
        (1, 0 | 3) => Header::Local,
        (1, 1) => {
            let a: &[u8; 12] = body
                .get(..12)
                .and_then(|a| a.try_into().ok())
                .ok_or(ProxyHeaderError::BadV2("INET addresses do not fit the length"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied { source: SocketAddr::new(ip(0), port(8)), destination: SocketAddr::new(ip(4), port(10)) }
        }
        (1, 2) => {
            let a: &[u8; 36] = body
                .get(..36)
                .and_then(|a| a.try_into().ok())
                .ok_or(ProxyHeaderError::BadV2("INET6 addresses do not fit the length"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied { source: SocketAddr::new(ip(0), port(32)), destination: SocketAddr::new(ip(16), port(34)) }
        }
        (1, _) => return Err(ProxyHeaderError::BadV2("family is not UNSPEC, INET, INET6 or UNIX")),
        _ => return Err(ProxyHeaderError::BadV2("command is not LOCAL or PROXY")),
    };
    Ok(Some((header, total)))
}

/// The whole length of a v2 header whose first 16 bytes are in `buf`.
fn v2_len(buf: &[u8]) -> usize {
    16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
}

/// Reads one header from `io`, and not one byte more.
///
/// The first 15 bytes tell the version (no valid header is shorter); a v2 header's length is
/// known from its 16th, and the rest of a v1 line is read a byte at a time (at most 92 reads,
/// from a load balancer only).
///
/// # Errors
/// [`ProxyHeaderError`]: no header, a malformed or oversized one, or the stream ended inside
/// it. The caller bounds the time.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<Header, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(MAX_V1);
    buf.resize(15, 0);
    // The shortest v1 header, "PROXY UNKNOWN\r\n", is 15 bytes; a v2 header is at least 16.
    io.read_exact(&mut buf).await?;
    loop {
        if let Some((header, len)) = parse(&buf)? {
            debug_assert_eq!(len, buf.len(), "read_header reads exactly the header");
            return Ok(header);
        }
        let want = if buf.starts_with(&V2_SIGNATURE) && buf.len() >= 16 { v2_len(&buf) } else { buf.len() + 1 };
        let have = buf.len();
        buf.resize(want, 0);
        io.read_exact(&mut buf[have..]).await?;
    }
}

/// A v2 header naming `source` and `destination` (both of one family), for tests and tools.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\nGET";
        let (header, len) = parse(h).expect("valid").expect("complete");
        assert_eq!(len, h.len() - 3);
        assert_eq!(
            header,
            Header::Proxied { source: addr("198.51.100.7:51234"), destination: addr("203.0.113.1:443") }
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n";
        let (header, _) = parse(h6).expect("valid").expect("complete");
        assert_eq!(header.source_or(addr("10.0.0.1:1")), addr("[2001:db8::7]:1"));
        let (header, len) = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").expect("valid").expect("complete");
        assert_eq!((header, len), (Header::Local, 35));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").expect("valid").expect("complete").0, Header::Local);
        assert!(parse(b"PROXY TCP4 198.51.100.7 203.0.").expect("so far so good").is_none());
        assert!(parse(b"PROX").expect("a prefix").is_none());
    }

    #[test]
    fn bad_v1_headers_are_refused() {
        for bad in [
            &b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\n"[..],
            b"PROXY TCP4 2001:db8::1 203.0.113.1 1 2\r\n",
            b"PROXY TCP6 198.51.100.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 65536 443\r\n",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 +1 443\r\n",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 0443 443\r\n",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 1\r\n",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 1 2 3\r\n",
            b"PROXY UDP4 198.51.100.7 203.0.113.1 1 2\r\n",
            b"PROXY TCP4  198.51.100.7 203.0.113.1 1 2\r\n",
        ] {
            assert!(matches!(parse(bad), Err(ProxyHeaderError::BadV1(_))), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::TooLong(MAX_V1))));
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00"), Err(ProxyHeaderError::Missing)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing)));
    }

    #[test]
    fn v2_headers_round_trip_and_local_keeps_the_peer() {
        for (s, d) in [("198.51.100.7:51234", "203.0.113.1:443"), ("[2001:db8::7]:1", "[2001:db8::1]:443")] {
            let mut h = encode_v2(addr(s), addr(d));
            let len = h.len();
            h.extend_from_slice(b"\x16\x03\x01");
            let (header, n) = parse(&h).expect("valid").expect("complete");
            assert_eq!((header, n), (Header::Proxied { source: addr(s), destination: addr(d) }, len));
            for cut in 0..len {
                assert!(parse(&h[..cut]).expect("a prefix is not an error").is_none(), "cut at {cut}");
            }
        }
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).expect("valid").expect("complete"), (Header::Local, 16));
        assert_eq!(Header::Local.source_or(addr("10.0.0.9:7")), addr("10.0.0.9:7"));
        // TLVs after the addresses are skipped.
        let mut tlv = encode_v2(addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        tlv[15] += 7;
        tlv.extend_from_slice(&[0x05, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&tlv).expect("valid").expect("complete").1, tlv.len());
    }

    #[test]
    fn bad_v2_headers_are_refused() {
        let good = encode_v2(addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            parse(&h)
        };
        assert!(matches!(with(12, 0x11), Err(ProxyHeaderError::BadV2(_))), "version 1 in a v2 header");
        assert!(matches!(with(12, 0x22), Err(ProxyHeaderError::BadV2(_))), "command 2");
        assert!(matches!(with(13, 0x41), Err(ProxyHeaderError::BadV2(_))), "family 4");
        assert!(matches!(with(13, 0x13), Err(ProxyHeaderError::BadV2(_))), "transport 3");
        assert!(matches!(with(13, 0x21), Err(ProxyHeaderError::BadV2(_))), "INET6 in 12 bytes");
        assert!(matches!(with(14, 0x20), Err(ProxyHeaderError::TooLong(MAX_HEADER))), "8 KiB claimed");
        assert!(matches!(with(3, b'x'), Err(ProxyHeaderError::Missing)), "broken signature");
    }

    #[test]
    fn untrusted_senders_are_recognised() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"PROXY"));
        assert!(!looks_like_header(b"PRO"), "too few bytes to tell");
        assert!(looks_like_header(&V2_SIGNATURE[..5]));
        assert!(!looks_like_header(b"\x16\x03\x01"));
        assert!(!looks_like_header(b"GET /derp"));
        assert!(!looks_like_header(b""));
    }

    #[tokio::test]
    async fn read_header_leaves_the_next_bytes_in_the_stream() {
        for header in [
            b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            encode_v2(addr("[2001:db8::7]:1"), addr("[2001:db8::1]:443")),
        ] {
            let mut stream: &[u8] = &[header.as_slice(), b"\x16\x03\x01rest"].concat();
            read_header(&mut stream).await.expect("header");
            assert_eq!(stream, b"\x16\x03\x01rest");
        }
        let mut truncated: &[u8] = b"PROXY TCP4 198.51.100.7 203";
        assert!(matches!(read_header(&mut truncated).await, Err(ProxyHeaderError::Io(_))));
        let mut tls: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh";
        assert!(matches!(read_header(&mut tls).await, Err(ProxyHeaderError::Missing)));
    }
}
