//! Tests of the lean TLS stream: a rustls client against it on loopback (TLS 1.2 and 1.3,
//! records cut into small segments, tampering, close_notify, idle buffers).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren_common::testing::noise;
use warren_common::tls::DevCa;

use super::*;

/// A dev CA, a server configuration from it, and a listener on loopback.
struct Lab {
    dir: tempfile::TempDir,
    ca: DevCa,
    server_config: Arc<ServerConfig>,
    listener: TcpListener,
    addr: std::net::SocketAddr,
}

impl Lab {
    async fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::open_or_create(dir.path()).expect("ca");
        let server_config = ca.server_config(&["localhost".into()]).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        Lab { dir, ca, server_config, listener, addr }
    }
}

/// A client configuration trusting only `ca`, limited to `versions`.
fn client_config(ca: &DevCa, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca.ca_cert_path).expect("ca pem");
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(warren_common::tls::provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

struct Pair {
    server: LeanTls,
    client: tokio_rustls::client::TlsStream<TcpStream>,
}

async fn pair(versions: &[&'static rustls::SupportedProtocolVersion]) -> (Pair, tempfile::TempDir) {
    let Lab { dir, ca, server_config, listener: l, addr } = Lab::new().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        accept(tcp, server_config).await.expect("server handshake")
    });
    let client_config = client_config(&ca, versions);
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let client = tokio_rustls::TlsConnector::from(client_config).connect(name, tcp).await.expect("client handshake");
    (Pair { server: server.await.expect("server task"), client }, dir)
}

/// Large transfers both ways, checked byte for byte, in reads and writes of odd sizes.
async fn round_trip(p: Pair) {
    let Pair { mut server, mut client } = p;
    let mut seed = 7;
    let up = noise(&mut seed, 1 << 20);
    let down = noise(&mut seed, 3 << 20);
    let (up2, down2) = (up.clone(), down.clone());
    let server_side = tokio::spawn(async move {
        let mut got = vec![0u8; up2.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 517).min(got.len());
            let n = server.read(&mut got[at..end]).await.expect("server read");
            assert!(n > 0, "early EOF at {at}");
            at += n;
        }
        assert!(got == up2, "upload intact");
        for chunk in down2.chunks(70_001) {
            server.write_all(chunk).await.expect("server write");
        }
        server.flush().await.expect("flush");
        server.shutdown().await.expect("close_notify");
        server
    });
    for chunk in up.chunks(3_333) {
        client.write_all(chunk).await.expect("client write");
    }
    client.flush().await.expect("flush");
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.expect("read to a clean close_notify");
    assert!(got == down, "download intact");
    let server = server_side.await.expect("server");
    assert_eq!(server.buffered_capacity(), 0, "a quiet connection holds no buffers");
}

#[tokio::test]
async fn tls13_round_trip_and_close() {
    round_trip(pair(&[&rustls::version::TLS13]).await.0).await;
}

#[tokio::test]
async fn tls12_round_trip_and_close() {
    round_trip(pair(&[&rustls::version::TLS12]).await.0).await;
}

#[tokio::test]
async fn idle_connections_hold_no_buffers_and_a_client_close_is_an_end() {
    let (Pair { mut server, mut client }, _dir) = pair(&[&rustls::version::TLS13]).await;
    client.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
    // A read waiting on a quiet socket allocates nothing.
    assert!(tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await.is_err());
    assert_eq!(server.buffered_capacity(), 0);
    client.shutdown().await.expect("client close_notify");
    assert_eq!(server.read(&mut buf).await.expect("clean end"), 0);
}

#[tokio::test]
async fn records_split_across_segments_are_reassembled() {
    // The client's TLS bytes reach the server one byte per TCP segment.
    let Lab { dir: _dir, ca, server_config, listener: l, addr } = Lab::new().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = accept(tcp, server_config).await.expect("handshake over 1-byte segments");
        let mut got = vec![0u8; 5000];
        s.read_exact(&mut got).await.expect("read");
        got
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let slow = Trickle(tcp);
    let cfg = client_config(&ca, rustls::DEFAULT_VERSIONS);
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut client = tokio_rustls::TlsConnector::from(cfg).connect(name, slow).await.expect("handshake");
    let mut seed = 3;
    let data = noise(&mut seed, 5000);
    client.write_all(&data).await.expect("write");
    client.flush().await.expect("flush");
    assert!(server.await.expect("server") == data);
}

/// A TCP stream whose writes send one byte at a time.
struct Trickle(TcpStream);

impl AsyncRead for Trickle {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, &data[..data.len().min(1)])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn corrupted_records_end_the_stream_with_an_error() {
    let Lab { dir: _dir, ca, server_config, listener: l, addr } = Lab::new().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = accept(tcp, server_config).await.expect("handshake");
        let mut buf = [0u8; 64];
        let first = s.read(&mut buf).await;
        let second = s.read(&mut buf).await;
        (first.map(|n| buf[..n].to_vec()), second.map(|_| ()))
    });
    // A sans-IO client: its records can be tampered with before they are sent.
    let cfg = client_config(&ca, rustls::DEFAULT_VERSIONS);
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut client = rustls::ClientConnection::new(cfg, name).expect("client");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    while client.is_handshaking() {
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).expect("write_tls");
        }
        tcp.write_all(&out).await.expect("send");
        if client.is_handshaking() {
            let mut buf = vec![0u8; 16 << 10];
            let n = tcp.read(&mut buf).await.expect("recv");
            assert!(n > 0);
            client.read_tls(&mut &buf[..n]).expect("read_tls");
            client.process_new_packets().expect("process");
        }
    }
    let mut send_record = |data: &[u8], corrupt: bool| {
        std::io::Write::write_all(&mut client.writer(), data).expect("plaintext");
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).expect("write_tls");
        }
        if corrupt {
            let last = out.len() - 1;
            out[last] ^= 0x55;
        }
        out
    };
    let good = send_record(b"intact", false);
    let bad = send_record(b"tampered", true);
    tcp.write_all(&good).await.expect("send");
    tcp.write_all(&bad).await.expect("send");
    let (first, second) = server.await.expect("server");
    // The first record may be preceded by the client's Finished handling; it arrives intact.
    assert_eq!(first.expect("first record"), b"intact");
    let err = second.expect_err("a tampered record is an error, not data");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}
