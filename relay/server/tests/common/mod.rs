//! Shared helpers: a real relay on loopback with dev TLS, raw HTTPS requests, metrics.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rand_core::OsRng;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_common::tls::client_config as tls_config;
use warren_relay::config::{Config, FileConfig};
use warren_relay::Server;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{SecretKey, Transport};

pub struct Relay {
    pub server: Server,
    pub dir: TempDir,
    pub prometheus: PrometheusHandle,
}

/// One Prometheus recorder per test process (nextest runs each test in its own process).
pub fn prometheus() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let h = PrometheusBuilder::new().install_recorder().expect("recorder");
        warren_relay::metrics::describe();
        h
    })
    .clone()
}

/// The configuration [`start_relay`] starts with: loopback, ephemeral ports, dev TLS with its
/// state in `dir`, then `tweak`.
pub fn relay_config(dir: &std::path::Path, tweak: impl FnOnce(&mut FileConfig)) -> Config {
    let mut f = FileConfig::parse(
        "listen = \"127.0.0.1:0\"\n[tls]\nmode = \"dev\"\n[stun]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"300ms\"\n",
    )
    .expect("config");
    f.state_dir = Some(dir.to_path_buf());
    tweak(&mut f);
    Config::try_from(f).expect("valid config")
}

pub async fn start_relay(tweak: impl FnOnce(&mut FileConfig)) -> Relay {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = relay_config(dir.path(), tweak);
    let prometheus = prometheus();
    let server = Server::spawn(config, Some(prometheus.clone())).await.expect("relay starts");
    Relay { server, dir, prometheus }
}

impl Relay {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.server.http_addr().port())
    }

    pub fn ca(&self) -> PathBuf {
        self.server.dev_ca_cert().expect("dev mode").to_path_buf()
    }

    pub fn opts(&self, transport: Transport) -> ConnectOptions {
        ConnectOptions { transport, ca_file: Some(self.ca()), timeout: Duration::from_secs(5), ..Default::default() }
    }

    pub async fn client(&self, transport: Transport) -> DerpClient {
        let key = SecretKey::generate(&mut OsRng);
        DerpClient::connect(&self.url(), &key, &self.opts(transport)).await.expect("client logs in")
    }

    pub async fn client_with_key(&self, key: &SecretKey) -> DerpClient {
        DerpClient::connect(&self.url(), key, &self.opts(Transport::Derp)).await.expect("client logs in")
    }

    /// Sends raw bytes over TLS and returns everything the relay answers until it closes.
    pub async fn https_raw(&self, request: &[u8]) -> String {
        String::from_utf8_lossy(&self.https_bytes(request).await).into_owned()
    }

    /// As [`Relay::https_raw`], as bytes.
    pub async fn https_bytes(&self, request: &[u8]) -> Vec<u8> {
        let tcp = TcpStream::connect(self.server.http_addr()).await.expect("connect");
        let connector = tokio_rustls::TlsConnector::from(tls_config(Some(&self.ca())).expect("tls"));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("tls handshake");
        tls.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        out
    }

    pub async fn get(&self, path: &str, extra_headers: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra_headers}\r\n");
        self.https_raw(req.as_bytes()).await
    }

    /// Value of a metric line (exact name with labels) from the admin listener.
    pub async fn metric(&self, series: &str) -> f64 {
        let admin = self.server.admin_addr().expect("admin");
        let mut tcp = TcpStream::connect(admin).await.expect("admin connect");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        out.lines()
            .find_map(|l| {
                l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

pub fn shared<T>(v: T) -> Arc<tokio::sync::Mutex<T>> {
    Arc::new(tokio::sync::Mutex::new(v))
}

/// Receives frames until `pred` matches one, within 5 s.
pub async fn recv_until(
    c: &mut DerpClient,
    mut pred: impl FnMut(&warren_relay_proto::Frame) -> bool,
) -> warren_relay_proto::Frame {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let f = c.recv().await.expect("frame");
            if pred(&f) {
                return f;
            }
        }
    })
    .await
    .expect("expected frame within 5s")
}
