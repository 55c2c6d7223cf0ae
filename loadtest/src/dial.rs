//! Opening a visitor's connection: TCP to the URL's host (or a given address), then TLS for
//! `https` URLs, named after the URL's host.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use warren_common::url::RelayUrl;

/// A connection, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `url` (through `connect_addr` if given); failures are named `connect` or `tls`.
pub(crate) async fn dial(
    url: &RelayUrl,
    connect_addr: Option<SocketAddr>,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Box<dyn Io>, &'static str> {
    let tcp = match connect_addr {
        Some(a) => tokio::net::TcpStream::connect(a).await,
        None => tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await,
    }
    .map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Box::new(tcp)) };
    let name = rustls_pki_types::ServerName::try_from(url.host.clone()).map_err(|_| "tls")?;
    Ok(Box::new(tls.connect(name, tcp).await.map_err(|_| "tls")?))
}
