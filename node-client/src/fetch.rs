//! A minimal HTTP(S) GET for small documents (the region map).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use warren_common::tls::client_config as tls_config;
use warren_common::url::RelayUrl;

/// Fetches `url` with HTTP/1.1 (`Connection: close`), returning the body of a 200 response.
/// Bodies larger than `limit` and responses slower than 10 s are errors.
///
/// # Errors
/// A message describing what failed.
pub async fn get(url: &str, ca_file: Option<&Path>, limit: usize) -> Result<Vec<u8>, String> {
    let u = RelayUrl::parse(url).map_err(|e| e.to_string())?;
    let path = if url.trim_start_matches("https://").trim_start_matches("http://").contains('/') {
        u.path.clone()
    } else {
        "/".into()
    };
    let work = async {
        let tcp = TcpStream::connect((u.host.as_str(), u.port)).await.map_err(|e| e.to_string())?;
        if u.tls {
            let cfg = tls_config(ca_file).map_err(|e| e.to_string())?;
            let name = rustls_pki_types::ServerName::try_from(u.host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
            exchange(tls, &u.authority(), &path, limit).await
        } else {
            exchange(tcp, &u.authority(), &path, limit).await
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| "timed out".to_string())?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: warren\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let head_limit = 16 << 10;
    (&mut s).take((limit + head_limit) as u64 + 1).read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = resp.parse(&raw).map_err(|e| e.to_string())? else {
        return Err("incomplete response head".into());
    };
    if resp.code != Some(200) {
        return Err(format!("HTTP {}", resp.code.unwrap_or(0)));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).to_ascii_lowercase().contains("chunked")
    });
    let body = &raw[head_len..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    if body.len() > limit {
        return Err(format!("body larger than {limit} bytes"));
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
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
