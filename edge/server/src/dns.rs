//! Just enough DNS to check a custom domain's proof: one question (TXT or CNAME) over UDP to
//! the configured resolver, and the answers' data.
//!
//! ```text
//! query    header (id, RD) | question: name, type, class IN
//! answer   header | question (skipped) | answers: name (maybe compressed), type, class, ttl,
//!          rdlength, rdata   TXT: <len><bytes>...   CNAME: a name (maybe compressed)
//! ```
//!
//! The decoder is bounded: every read is checked against the message, a compressed name may
//! follow at most [`MAX_POINTERS`] pointers and spell at most 255 bytes, and a reply with
//! another id or question type is ignored.

use std::net::SocketAddr;
use std::time::Duration;

/// The record types asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    /// Text records (`_warren.<domain>`).
    Txt = 16,
    /// Canonical name.
    Cname = 5,
}

/// Most compression pointers followed in one name.
pub const MAX_POINTERS: usize = 16;
/// Largest reply read (EDNS is not offered, so a server sends at most 512 bytes over UDP).
const MAX_REPLY: usize = 4096;

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The reply is not a valid DNS message.
    #[error("malformed DNS reply: {0}")]
    Malformed(&'static str),
    /// The server answered with an error code other than NXDOMAIN.
    #[error("DNS server answered rcode {0}")]
    Rcode(u8),
    /// The name is not a valid DNS name.
    #[error("invalid DNS name")]
    BadName,
    /// No reply in time, or the socket failed.
    #[error("DNS lookup failed: {0}")]
    Io(String),
}

/// The query for `name`'s `ty` records, with `id`.
///
/// # Errors
/// [`DnsError::BadName`] for an empty label, a label over 63 bytes or a name over 253.
pub fn encode_query(id: u16, name: &str, ty: RecordType) -> Result<Vec<u8>, DnsError> {
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > 253 {
        return Err(DnsError::BadName);
    }
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::BadName);
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&(ty as u16).to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

/// The data of the `ty` answers in `reply` to query `id`: each TXT record's strings joined,
/// or each CNAME target (lower case, no trailing dot). NXDOMAIN is an empty list.
///
/// # Errors
/// [`DnsError::Malformed`] or [`DnsError::Rcode`].
pub fn decode_answers(reply: &[u8], id: u16, ty: RecordType) -> Result<Vec<String>, DnsError> {
    let mut r = Reader { msg: reply, pos: 0 };
    if r.u16()? != id {
        return Err(DnsError::Malformed("another id"));
    }
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("not a reply"));
    }
    match (flags & 0x000f) as u8 {
        0 => {}
        3 => return Ok(Vec::new()),
        code => return Err(DnsError::Rcode(code)),
    }
    let (questions, answers) = (r.u16()?, r.u16()?);
    r.skip(4)?;
    for _ in 0..questions {
        r.name()?;
        r.skip(4)?;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        r.name()?;
        let (rtype, _class) = (r.u16()?, r.u16()?);
        r.skip(4)?;
        let len = usize::from(r.u16()?);
        let end =
            r.pos.checked_add(len).filter(|e| *e <= reply.len()).ok_or(DnsError::Malformed("rdata past the end"))?;
        if rtype == ty as u16 {
            out.push(match ty {
                RecordType::Txt => txt(&reply[r.pos..end])?,
                RecordType::Cname => Reader { msg: reply, pos: r.pos }.name()?,
            });
        }
        r.pos = end;
    }
    Ok(out)
}

/// A TXT record's character-strings, joined.
fn txt(mut data: &[u8]) -> Result<String, DnsError> {
    let mut s = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n);
        if rest.len() < n {
            return Err(DnsError::Malformed("TXT string past its record"));
        }
        s.extend_from_slice(&rest[..n]);
        data = &rest[n..];
    }
    Ok(String::from_utf8_lossy(&s).into_owned())
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.msg.get(self.pos..self.pos + 2).ok_or(DnsError::Malformed("truncated"))?;
        self.pos += 2;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), DnsError> {
        if self.pos + n > self.msg.len() {
            return Err(DnsError::Malformed("truncated"));
        }
        self.pos += n;
        Ok(())
    }

    /// Reads a name at the position (following compression pointers), moving past it.
    fn name(&mut self) -> Result<String, DnsError> {
        let mut labels: Vec<String> = Vec::new();
        let (mut at, mut jumped, mut pointers, mut len) = (self.pos, false, 0, 0usize);
        loop {
            let &n = self.msg.get(at).ok_or(DnsError::Malformed("name past the end"))?;
            match n {
                0 => {
                    if !jumped {
                        self.pos = at + 1;
                    }
                    return Ok(labels.join(".").to_ascii_lowercase());
                }
                n if n & 0xc0 == 0xc0 => {
                    let &low = self.msg.get(at + 1).ok_or(DnsError::Malformed("pointer past the end"))?;
                    pointers += 1;
                    if pointers > MAX_POINTERS {
                        return Err(DnsError::Malformed("too many compression pointers"));
                    }
                    if !jumped {
                        self.pos = at + 2;
                        jumped = true;
                    }
                    at = (usize::from(n & 0x3f) << 8) | usize::from(low);
                }
                n if n & 0xc0 != 0 => return Err(DnsError::Malformed("unknown label type")),
                n => {
                    let n = usize::from(n);
                    let label = self.msg.get(at + 1..at + 1 + n).ok_or(DnsError::Malformed("label past the end"))?;
                    len += n + 1;
                    if len > 255 {
                        return Err(DnsError::Malformed("name over 255 bytes"));
                    }
                    labels.push(String::from_utf8_lossy(label).into_owned());
                    at += 1 + n;
                }
            }
        }
    }
}

/// Asks `server` for `name`'s `ty` records, waiting at most `timeout`.
///
/// # Errors
/// [`DnsError`]: no reply in time, a malformed one, or an error code.
pub async fn lookup(
    server: SocketAddr,
    name: &str,
    ty: RecordType,
    timeout: Duration,
) -> Result<Vec<String>, DnsError> {
    let id = rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u16;
    let query = encode_query(id, name, ty)?;
    let bind: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let io = |e: std::io::Error| DnsError::Io(e.to_string());
    let sock = tokio::net::UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    sock.send(&query).await.map_err(io)?;
    let mut buf = vec![0u8; MAX_REPLY];
    let wait = async {
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            // A stray datagram (another id) is not the answer: keep waiting for it.
            match decode_answers(&buf[..n], id, ty) {
                Err(DnsError::Malformed("another id")) => continue,
                other => return other,
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| DnsError::Io("no reply in time".into()))?
}

/// The first nameserver of `/etc/resolv.conf`, port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `query` with `answers` (type, rdata), the answer names compressed to the
    /// question's.
    fn reply(query: &[u8], rcode: u8, answers: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut r = query.to_vec();
        r[2] = 0x81;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (ty, data) in answers {
            r.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        r
    }

    #[test]
    fn a_query_in_bytes() {
        let q = encode_query(0x1234, "_warren.a.example.", RecordType::Txt).expect("valid");
        let want =
            [&[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..], b"\x07_warren\x01a\x07example\x00", &[0, 16, 0, 1]]
                .concat();
        assert_eq!(q, want);
        for bad in ["", "a..b", &"x".repeat(64), &["a"; 130].join(".")] {
            assert_eq!(encode_query(1, bad, RecordType::Txt), Err(DnsError::BadName), "{bad}");
        }
    }

    #[test]
    fn txt_and_cname_answers_are_read_with_compression() {
        let q = encode_query(7, "app.example.com", RecordType::Txt).expect("valid");
        let txt = reply(&q, 0, &[(16, b"\x05hello\x06-world".to_vec()), (1, vec![127, 0, 0, 1])]);
        assert_eq!(decode_answers(&txt, 7, RecordType::Txt), Ok(vec!["hello-world".into()]));
        assert_eq!(decode_answers(&txt, 8, RecordType::Txt), Err(DnsError::Malformed("another id")));
        // CNAME: "web.funnel" + a pointer to "example.com" inside the question.
        let q = encode_query(9, "app.example.com", RecordType::Cname).expect("valid");
        let cname = reply(&q, 0, &[(5, [&b"\x03WEB\x06funnel"[..], &[0xc0, 16]].concat())]);
        assert_eq!(decode_answers(&cname, 9, RecordType::Cname), Ok(vec!["web.funnel.example.com".into()]));
        assert_eq!(decode_answers(&reply(&q, 3, &[]), 9, RecordType::Cname), Ok(vec![]), "NXDOMAIN: none");
        assert_eq!(decode_answers(&reply(&q, 2, &[]), 9, RecordType::Cname), Err(DnsError::Rcode(2)));
    }

    #[test]
    fn hostile_replies_are_refused_not_followed() {
        let q = encode_query(3, "a.example", RecordType::Cname).expect("valid");
        let mut looped = reply(&q, 0, &[(5, vec![0xc0, 0])]);
        let at = looped.len() - 2;
        looped[at + 1] = at as u8; // a pointer to itself
        assert!(matches!(decode_answers(&looped, 3, RecordType::Cname), Err(DnsError::Malformed(_))));
        let mut long = reply(&q, 0, &[(16, b"\x09short".to_vec())]);
        assert!(decode_answers(&long, 3, RecordType::Txt).is_err(), "a string past its record");
        let n = long.len();
        long[n - 8] = 0xff; // rdlength past the end
        assert!(decode_answers(&long, 3, RecordType::Txt).is_err());
        for cut in 0..q.len() {
            let _ = decode_answers(&reply(&q, 0, &[(16, b"\x01x".to_vec())])[..cut], 3, RecordType::Txt);
        }
    }
}
