//! `tcp` and `tls` services: a visitor's connection, carried on one tunnel stream, joined to a
//! TCP connection to the target.
//!
//! ```text
//! Connect { Tcp | Tls, port, visitor, local, sni } ──▶ connect to the target (10 s)
//!   proxy_protocol: a PROXY v2 header first (visitor -> local)
//!   tls with cert_file/key_file: TLS ends here, the plain stream goes to the target
//!   otherwise: the bytes go as they are (for tls, the target ends TLS itself)
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;
use warren_tunnel_proto::ConnectHead;

use super::{ServiceError, ServiceSpec};

/// Time to connect to a target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a visitor has to finish a TLS handshake the node ends.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The raw side of a service, ready to join connections.
#[derive(Clone)]
pub struct Raw {
    addr: String,
    tls: Option<TlsAcceptor>,
    proxy_protocol: bool,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("addr", &self.addr)
            .field("ends_tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

impl Raw {
    /// Reads the service's certificate, when it has one.
    ///
    /// # Errors
    /// [`ServiceError::Open`] naming the unreadable file.
    pub(crate) fn open(addr: &str, spec: &ServiceSpec) -> Result<Raw, ServiceError> {
        let tls = match (&spec.cert_file, &spec.key_file) {
            (Some(cert), Some(key)) => {
                let cfg = warren_common::tls::load_manual(cert, key).map_err(|e| ServiceError::Open(e.to_string()))?;
                Some(TlsAcceptor::from(cfg))
            }
            _ => None,
        };
        Ok(Raw { addr: addr.to_owned(), tls, proxy_protocol: spec.proxy_protocol })
    }

    /// Whether the node ends TLS itself.
    pub fn ends_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Joins the visitor's stream `visitor` (the tunnel stream) to a new connection to the
    /// target until either side ends. Returns the bytes sent towards the visitor.
    ///
    /// # Errors
    /// A message for the log: the target could not be reached, or the TLS handshake failed.
    pub async fn join<S>(&self, head: &ConnectHead, visitor: S) -> Result<u64, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut target = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| format!("{} did not accept within 10 s", self.addr))?
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        let _ = target.set_nodelay(true);
        if self.proxy_protocol {
            let header = proxy_v2(head.visitor.parse().ok(), head.local.parse().ok());
            target.write_all(&header).await.map_err(|e| format!("PROXY header to {}: {e}", self.addr))?;
        }
        let copied = match &self.tls {
            Some(acceptor) => {
                let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(visitor))
                    .await
                    .map_err(|_| "the visitor's TLS handshake timed out".to_owned())?
                    .map_err(|e| format!("TLS handshake with the visitor: {e}"))?;
                tokio::io::copy_bidirectional(&mut tls, &mut target).await
            }
            None => {
                let mut visitor = visitor;
                tokio::io::copy_bidirectional(&mut visitor, &mut target).await
            }
        };
        match copied {
            Ok((_, down)) => Ok(down),
            Err(e) => {
                debug!(target = %self.addr, error = %e, "connection ended with an error");
                Ok(0)
            }
        }
    }
}

/// The PROXY protocol v2 header for a TCP connection from `src` to `dst` (`LOCAL` when either
/// is unknown). Mixed families are given as IPv6, IPv4 mapped.
pub fn proxy_v2(src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Vec<u8> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut out = SIGNATURE.to_vec();
    let (Some(src), Some(dst)) = (src, dst) else {
        out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]); // version 2, LOCAL, unspecified
        return out;
    };
    out.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0x00, 12]); // TCP over IPv4, 12 address bytes
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                SocketAddr::V6(a) => *a.ip(),
            };
            out.extend_from_slice(&[0x21, 0x00, 36]); // TCP over IPv6, 36 address bytes
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn proxy_headers_as_the_spec_lays_them_out() {
        let v4 = proxy_v2("192.0.2.1:5555".parse().ok(), "198.51.100.7:443".parse().ok());
        assert_eq!(hex(&v4), "0d0a0d0a000d0a515549540a211100 0cc0000201c6336407 15b301bb".replace(' ', ""));
        let v6 = proxy_v2("[2001:db8::1]:1".parse().ok(), "198.51.100.7:2".parse().ok());
        assert_eq!(v6.len(), 16 + 36);
        assert_eq!(&v6[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(
            &v6[16 + 16..16 + 32],
            &"198.51.100.7".parse::<std::net::Ipv4Addr>().expect("ip").to_ipv6_mapped().octets()
        );
        let local = proxy_v2(None, "198.51.100.7:2".parse().ok());
        assert_eq!(hex(&local[12..]), "20000000");
    }
}
