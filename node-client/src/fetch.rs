//! A minimal HTTP(S) GET for small documents (the region map).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use warren_common::tls::{client_config as tls_config, TlsError};
use warren_common::url::{RelayUrl, UrlError};

/// Fetches `url` with HTTP/1.1 (`Connection: close`), returning the body of a 200 response.
/// Bodies larger than `limit` and responses slower than 10 s are errors.
///
/// # Errors
/// [`FetchError`] saying which step failed.
pub async fn get(url: &str, ca_file: Option<&Path>, limit: usize) -> Result<Vec<u8>, FetchError> {
    let u = RelayUrl::parse(url)?;
    let path = if url.trim_start_matches("https://").trim_start_matches("http://").contains('/') {
        u.path.clone()
    } else {
        "/".into()
    };
    let work = async {
        let tcp = TcpStream::connect((u.host.as_str(), u.port)).await.map_err(FetchError::Connect)?;
        if u.tls {
            let cfg = tls_config(ca_file)?;
            let name = rustls_pki_types::ServerName::try_from(u.host.clone())
                .map_err(|_| FetchError::ServerName(u.host.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(FetchError::Tls)?;
            exchange(tls, &u.authority(), &path, limit).await
        } else {
            exchange(tcp, &u.authority(), &path, limit).await
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| FetchError::Timeout)?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
    limit: usize,
) -> Result<Vec<u8>, FetchError> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: warren\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(FetchError::Io)?;
    let mut raw = Vec::new();
    let head_limit = 16 << 10;
    (&mut s).take((limit + head_limit) as u64 + 1).read_to_end(&mut raw).await.map_err(FetchError::Io)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = resp.parse(&raw)? else {
        return Err(FetchError::BadResponse("incomplete response head"));
    };
    if resp.code != Some(200) {
        return Err(FetchError::Status(resp.code.unwrap_or(0)));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).to_ascii_lowercase().contains("chunked")
    });
    let body = &raw[head_len..];
    let body = if chunked { dechunk(body).map_err(FetchError::BadResponse)? } else { body.to_vec() };
    if body.len() > limit {
        return Err(FetchError::TooLarge(limit));
    }
    Ok(body)
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL is invalid.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The server could not be reached.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The CA file is unusable.
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The URL's host is not a valid TLS name.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The TLS handshake failed (e.g. an untrusted certificate).
    #[error("tls: {0}")]
    Tls(std::io::Error),
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The response head is not HTTP.
    #[error("bad response head: {0}")]
    Head(#[from] httparse::Error),
    /// The response is cut short or badly framed.
    #[error("bad response: {0}")]
    BadResponse(&'static str),
    /// The server answered with another status than 200.
    #[error("HTTP {0}")]
    Status(u16),
    /// The body is over the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// No complete answer within 10 s.
    #[error("timed out")]
    Timeout,
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_str = std::str::from_utf8(&b[..line_end]).map_err(|_| "bad chunk size")?;
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16).map_err(|_| "bad chunk size")?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_and_refuses_garbage() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(), Ok(&b"abcde"[..]));
        for bad in [&b"zz\r\n"[..], b"5\r\nab", b"3\r\nabc", b""] {
            assert!(dechunk(bad).is_err());
        }
    }
}
