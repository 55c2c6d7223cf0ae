//! Admission control and abuse limits on a real relay: allow-list (with reload), HTTP callout
//! (cached, fail-closed and fail-open), connections per source address, accept rate, the
//! per-client send budget, and secrets kept out of logs and metrics.

mod common;

use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{recv_until, start_relay, Relay};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand_core::OsRng;
use tokio::net::{TcpListener, TcpStream};
use warren_relay::config::AdmissionMode;
use warren_relay_client::DerpClient;
use warren_relay_proto::{Frame, PublicKey, SecretKey, Transport};

/// Logs in as `key` and reports whether the relay admitted it: a refused client gets a Health
/// frame saying so and is closed.
async fn admitted(relay: &Relay, key: &SecretKey) -> bool {
    let mut c = DerpClient::connect(&relay.url(), key, &relay.opts(Transport::Derp)).await.expect("login completes");
    c.send(&Frame::Ping(*b"admitted")).await.expect("ping");
    let f = recv_until(&mut c, |f| matches!(f, Frame::Pong(_) | Frame::Health { .. })).await;
    match f {
        Frame::Pong(_) => true,
        Frame::Health { problem } => {
            assert!(problem.starts_with("not admitted: "), "{problem}");
            assert!(c.recv().await.is_err(), "closed after the refusal");
            false
        }
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_admits_listed_keys_and_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("allow.txt");
    let (listed, other) = (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng));
    std::fs::write(&list, format!("# test\n{}\n", listed.public_key())).expect("write");
    let path = list.clone();
    let relay = start_relay(move |f| {
        f.admission.mode = Some(AdmissionMode::AllowList);
        f.admission.allow_list_file = Some(path);
    })
    .await;
    assert!(admitted(&relay, &listed).await);
    assert!(!admitted(&relay, &other).await);
    assert_eq!(relay.metric("relay_admission_total{result=\"denied\"}").await, 1.0);

    // A broken edit keeps the previous list; a good one is picked up within a few seconds.
    std::fs::write(&list, "not a key\n").expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(admitted(&relay, &listed).await, "a bad file does not empty the list");
    std::fs::write(&list, format!("{}\n{}\n", listed.public_key(), other.public_key().to_hex())).expect("write");
    let start = Instant::now();
    while !admitted(&relay, &other).await {
        assert!(start.elapsed() < Duration::from_secs(10), "the new list is loaded");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.server.shutdown().await;
}

/// An admission endpoint that allows only `allow` and counts its calls.
async fn callout_server(allow: PublicKey, calls: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        assert!(v["Source"].as_str().is_some_and(|s| s == "127.0.0.1"), "{v}");
                        let ok = v["NodePublic"].as_str() == Some(allow.to_string().as_str());
                        let answer = serde_json::json!({"Allow": ok}).to_string();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callout_decides_is_cached_and_fails_closed_or_open() {
    let (good, bad) = (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng));
    let calls = Arc::new(AtomicUsize::new(0));
    let endpoint = callout_server(good.public_key(), calls.clone()).await;
    let relay = start_relay(|f| {
        f.admission.mode = Some(AdmissionMode::Callout);
        f.admission.callout_url = Some(format!("http://{endpoint}/verify"));
    })
    .await;
    assert!(admitted(&relay, &good).await);
    assert!(!admitted(&relay, &bad).await);
    assert!(admitted(&relay, &good).await);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the second login of the same key used the cache");
    relay.server.shutdown().await;

    // Nothing listens at the callout: fail closed by default, open when configured.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    for (n, fail_open) in [(1.0, false), (2.0, true)] {
        let relay = start_relay(|f| {
            f.admission.mode = Some(AdmissionMode::Callout);
            f.admission.callout_url = Some(format!("http://{dead}/verify"));
            f.admission.fail_open = Some(fail_open);
        })
        .await;
        assert_eq!(admitted(&relay, &good).await, fail_open);
        // One recorder per test process: the count runs on across the two relays.
        assert_eq!(relay.metric("relay_admission_total{result=\"callout_error\"}").await, n);
        relay.server.shutdown().await;
    }
}

/// Opens a TCP connection and reports whether the relay kept it open (a TLS handshake works).
async fn accepted(relay: &Relay) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(relay.server.http_addr()).await.ok()?;
    let connector =
        tokio_rustls::TlsConnector::from(warren_common::tls::client_config(Some(&relay.ca())).expect("tls"));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.ok()?.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_and_accept_rate_are_capped() {
    let relay = start_relay(|f| f.limits.max_conns_per_ip = Some(3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(accepted(&relay).await.expect("under the cap"));
    }
    assert!(accepted(&relay).await.is_none(), "a fourth connection from the same address is closed");
    assert_eq!(relay.metric("relay_connections_rejected_total{reason=\"per_ip\"}").await, 1.0);
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(accepted(&relay).await.is_some(), "a closed connection frees its place");
    relay.server.shutdown().await;

    let relay = start_relay(|f| {
        f.limits.accept_rate = Some(1);
        f.limits.accept_burst = Some(2);
    })
    .await;
    let mut open = 0;
    for _ in 0..5 {
        if accepted(&relay).await.is_some() {
            open += 1;
        }
    }
    assert!((2..=3).contains(&open), "a burst of 2 at 1/s admits 2 (3 if a second passed), got {open}");
    assert!(relay.metric("relay_connections_rejected_total{reason=\"accept_rate\"}").await >= 2.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_send_budget_is_slowed_and_others_are_not() {
    let relay = start_relay(|f| {
        f.limits.client_bytes_per_second = Some(200_000);
        f.limits.client_burst_bytes = Some(128 << 10);
    })
    .await;
    let mut flood = relay.client(Transport::Derp).await;
    assert_eq!(flood.server_info().token_bucket_bytes_per_second, 200_000, "advertised in ServerInfo");
    assert_eq!(flood.server_info().token_bucket_bytes_burst, 128 << 10);
    let mut sink = relay.client(Transport::Derp).await;
    let mut a = relay.client(Transport::Derp).await;
    let mut b = relay.client(Transport::Derp).await;
    let sink_key = sink.public_key();
    // 600 packets of 1000 bytes: the burst covers ~130 KB, the rest drains at 200 KB/s.
    let packet = vec![0u8; 1000];
    let start = Instant::now();
    let flooding = tokio::spawn(async move {
        for _ in 0..600 {
            flood.send_packet(sink_key, &packet).await.expect("send");
        }
        flood
    });
    let draining = tokio::spawn(async move {
        for _ in 0..600 {
            tokio::time::timeout(Duration::from_secs(10), sink.recv_packet()).await.expect("arrives").expect("recv");
        }
    });
    // Meanwhile another pair is not held up.
    let t = Instant::now();
    a.send_packet(b.public_key(), b"unaffected").await.expect("send");
    let (_, got) = tokio::time::timeout(Duration::from_secs(2), b.recv_packet()).await.expect("prompt").expect("recv");
    assert_eq!(&got[..], b"unaffected");
    let other_latency = t.elapsed();
    draining.await.expect("all delivered, slowly");
    let took = start.elapsed();
    let _flood = flooding.await.expect("flood");
    eprintln!("600 kB at a 200 kB/s budget took {took:?}; another pair's packet took {other_latency:?}");
    assert!(took >= Duration::from_millis(2000), "(600 kB - 131 kB burst) / 200 kB/s >= 2.3 s, took {took:?}");
    assert!(relay.metric("relay_clients_throttled_total").await >= 1.0);
    relay.server.shutdown().await;
}

#[test]
fn secrets_never_reach_logs_or_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mesh_key = "secret-mesh-key-must-not-leak-0042";
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-relay"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0"])
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin_port}"))
        .arg("--state-dir")
        .arg(dir.path())
        // A sibling that is not there: the relay logs its attempts.
        .args(["--mesh-peer", "https://localhost:1"])
        .env("WARREN_MESH_KEY", mesh_key)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay starts");
    let start = Instant::now();
    let metrics = loop {
        if let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", admin_port)) {
            let _ =
                std::io::Write::write_all(&mut tcp, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = tcp.read_to_string(&mut out);
            break out;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "relay up");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("read log");
    let key_line = std::fs::read_to_string(dir.path().join("relay.key")).expect("key file");
    let private_hex = key_line.trim().strip_prefix("privkey:").expect("key format");
    assert!(log.contains("mesh sibling") || log.contains("region mesh on"), "the log was captured:\n{log}");
    for (what, secret) in [("mesh key", mesh_key), ("private key", private_hex)] {
        assert!(!log.contains(secret), "the {what} appears in the log");
        assert!(!metrics.contains(secret), "the {what} appears in the metrics");
    }
}
