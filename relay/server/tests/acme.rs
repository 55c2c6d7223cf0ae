//! The relay's certificate from an ACME CA: Debian's `pebble` issues it (TLS-ALPN-01 on the DERP
//! port, HTTP-01 on its own listener) and, with a short lifetime, the relay renews it while a
//! client stays connected; a CA that cannot be reached is counted and the relay keeps serving.
//!
//! Needs `pebble`; without it the pebble tests skip unless `WARREN_REQUIRE_PEBBLE=1` (CI sets it).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::start_relay;
use rand_core::OsRng;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use warren_common::testing::{free_tcp_port, pebble_available, Pebble};
use warren_relay::config::{FileConfig, TlsModeName};
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::SecretKey;

const NAME: &str = "relay.test";

fn acme_mode(f: &mut FileConfig, directory: &str, ca: &Path, challenge: &str, http01: u16) {
    f.hostname = Some(NAME.into());
    f.tls.mode = Some(TlsModeName::Acme);
    let text = format!(
        "directory = \"{directory}\"\nca_file = \"{}\"\nchallenge = \"{challenge}\"\nhttp01_listen = \"127.0.0.1:{http01}\"\nrenew_check_interval = \"1s\"\n",
        ca.display()
    );
    f.acme = toml::from_str(&text).expect("acme section");
}

/// The leaf a TLS client trusting only `root` is shown by `addr` for [`NAME`], once the relay
/// has a certificate.
async fn presented(addr: SocketAddr, root: &Path, limit: Duration) -> CertificateDer<'static> {
    let config = warren_common::tls::client_config(Some(root)).expect("tls");
    let start = Instant::now();
    loop {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from(NAME).expect("name");
        match tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await {
            Ok(tls) => return tls.get_ref().1.peer_certificates().expect("certificates")[0].clone().into_owned(),
            Err(e) => {
                assert!(start.elapsed() < limit, "no valid certificate for {NAME} after {limit:?}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn opts(root: &Path, addr: SocketAddr) -> ConnectOptions {
    ConnectOptions {
        ca_file: Some(root.to_path_buf()),
        connect_addr: Some(addr),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn exchange(a: &mut DerpClient, b: &mut DerpClient, what: &[u8]) {
    a.send_packet(b.public_key(), what).await.expect("send");
    let (src, got) =
        tokio::time::timeout(Duration::from_secs(5), b.recv_packet()).await.expect("in time").expect("recv");
    assert_eq!((src, &got[..]), (a.public_key(), what));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_certificate_is_renewed_while_a_client_stays_connected() {
    if !pebble_available() {
        return;
    }
    let port = free_tcp_port();
    // Certificates live 12 s: renewed from 8 s on (two thirds), checked every second.
    let pebble = Pebble::start_with_validity(free_tcp_port(), port, Some(Duration::from_secs(12)));
    let root = pebble.root();
    let relay = start_relay(|f| {
        f.listen = Some(format!("127.0.0.1:{port}"));
        acme_mode(f, &pebble.directory, &pebble.listener_ca(), "tls-alpn-01", free_tcp_port());
    })
    .await;
    let addr = relay.server.http_addr();
    let first = presented(addr, &root, Duration::from_secs(60)).await;
    let url = format!("https://{NAME}:{port}");
    let mut a = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts(&root, addr)).await.expect("a");
    let cached = relay.dir.path().join("acme").join(format!("{NAME}.crt"));
    assert!(cached.exists(), "the certificate is cached in the state dir");

    let renewed = {
        let start = Instant::now();
        loop {
            let now = presented(addr, &root, Duration::from_secs(5)).await;
            if now != first {
                break now;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "not renewed within 30 s\n{}", pebble.log());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    assert_ne!(renewed, first);
    let mut b = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts(&root, addr)).await.expect("b");
    exchange(&mut a, &mut b, b"the first client is still connected").await;
    exchange(&mut b, &mut a, b"and hears the new one").await;
    assert!(relay.metric("relay_acme_orders_total{result=\"ok\"}").await >= 2.0);
    assert!(relay.metric("relay_cert_expiry_seconds").await > 0.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_certificate_is_issued_and_cached_for_the_next_start() {
    if !pebble_available() {
        return;
    }
    let http01 = free_tcp_port();
    let pebble = Pebble::start(http01, free_tcp_port());
    let root = pebble.root();
    let state = tempfile::tempdir().expect("tempdir");
    let start = |pebble_dir: String| {
        let state = state.path().to_path_buf();
        let ca = pebble.listener_ca();
        start_relay(move |f| {
            f.state_dir = Some(state);
            acme_mode(f, &pebble_dir, &ca, "http-01", http01);
        })
    };
    let relay = start(pebble.directory.clone()).await;
    let issued = presented(relay.server.http_addr(), &root, Duration::from_secs(60)).await;
    relay.server.shutdown().await;

    // Started again with the CA gone: the cached certificate is served at once, and the failed
    // renewal check costs nothing (the certificate is fresh: no order is even attempted).
    let relay = start("https://127.0.0.1:1/dir".into()).await;
    let again = presented(relay.server.http_addr(), &root, Duration::from_secs(2)).await;
    assert_eq!(again, issued, "served from the cache");
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_acme_directory_is_counted_and_the_relay_keeps_serving() {
    let ca = tempfile::NamedTempFile::new().expect("file");
    let relay =
        start_relay(|f| acme_mode(f, "https://127.0.0.1:1/dir", ca.path(), "tls-alpn-01", free_tcp_port())).await;
    let start = Instant::now();
    while relay.metric("relay_acme_orders_total{result=\"error\"}").await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the failed order is counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving: the admin listener answers and the DERP port accepts connections (TLS
    // fails until a certificate exists, but nothing crashed or stopped).
    let admin = relay.server.admin_addr().expect("admin");
    let mut tcp = TcpStream::connect(admin).await.expect("admin up");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    TcpStream::connect(relay.server.http_addr()).await.expect("the DERP port still accepts");
    relay.server.shutdown().await;
}
