//! A relay behind a TCP load balancer that speaks the PROXY protocol: the header of a trusted
//! balancer names the client for per-address limits; a header from anyone else, or a broken
//! one, closes that connection, is counted, and the relay serves on.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::start_relay;
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use warren_common::proxy_protocol::encode_v2;
use warren_relay_client::DerpClient;
use warren_relay_proto::{SecretKey, Transport};

/// The balancer's own address toward the relay (trusted); clients reach it on 127.0.0.1.
const LB_ADDR: &str = "127.0.0.5";

/// A TCP balancer in front of `relay`: each connection it accepts gets the next of `headers`
/// written before the client's bytes.
async fn load_balancer(relay: SocketAddr, headers: Arc<Mutex<VecDeque<Vec<u8>>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let header = headers.lock().expect("lock").pop_front().unwrap_or_default();
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().expect("socket");
                socket.bind(SocketAddr::new(LB_ADDR.parse().expect("ip"), 0)).expect("bind the balancer's address");
                let Ok(mut upstream) = socket.connect(relay).await else { return };
                if upstream.write_all(&header).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    addr
}

/// Writes `bytes`, ends the sending side, and reports whether the relay closed without a word
/// (a reset, when it left some of the bytes unread, counts as closing).
async fn closed_unanswered(tcp: &mut TcpStream, bytes: &[u8]) -> bool {
    tcp.write_all(bytes).await.expect("write");
    tcp.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    read.is_ok() && rest.is_empty()
}

fn from(ip: &str) -> Vec<u8> {
    encode_v2(SocketAddr::new(ip.parse().expect("ip"), 40000), "127.0.0.1:443".parse().expect("addr"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancer_names_the_client_and_untrusted_or_broken_headers_are_refused() {
    let relay = start_relay(|f| {
        f.limits.max_conns_per_ip = Some(2);
        f.proxy_protocol.trusted = vec![format!("{LB_ADDR}/32")];
    })
    .await;
    let headers = Arc::new(Mutex::new(VecDeque::new()));
    let lb = load_balancer(relay.server.http_addr(), headers.clone()).await;
    let via_lb = format!("https://localhost:{}", lb.port());
    let opts = relay.opts(Transport::Derp);
    let login = |url: String| {
        let opts = opts.clone();
        async move { DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts).await }
    };

    // Two clients behind one address fill its quota; a third from it is refused, while one
    // from another address, and the balancer's own v1 header, still get in.
    let mut held = Vec::new();
    for h in [from("198.51.100.7"), from("198.51.100.7")] {
        headers.lock().expect("lock").push_back(h);
        held.push(login(via_lb.clone()).await.expect("under the per-address cap"));
    }
    headers.lock().expect("lock").push_back(from("198.51.100.7"));
    assert!(login(via_lb.clone()).await.is_err(), "a third connection from 198.51.100.7 is closed");
    assert_eq!(relay.metric("relay_connections_rejected_total{reason=\"per_ip\"}").await, 1.0);
    headers.lock().expect("lock").push_back(b"PROXY TCP4 198.51.100.8 127.0.0.1 40000 443\r\n".to_vec());
    held.push(login(via_lb.clone()).await.expect("another client address"));
    headers.lock().expect("lock").push_back(from("198.51.100.8"));
    held.push(login(via_lb.clone()).await.expect("its second connection"));
    assert_eq!(relay.server.client_count(), 4);

    // Broken headers from the balancer: garbage, truncated, oversized, none at all.
    let mut oversized = from("198.51.100.9");
    oversized[14..16].copy_from_slice(&8192u16.to_be_bytes());
    for bad in [b"PROXY TCP4 nonsense\r\n".to_vec(), from("198.51.100.9")[..20].to_vec(), oversized, Vec::new()] {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(LB_ADDR.parse().expect("ip"), 0)).expect("bind");
        let mut tcp = socket.connect(relay.server.http_addr()).await.expect("connect");
        assert!(closed_unanswered(&mut tcp, &bad).await, "a connection without a valid header is closed");
    }
    assert_eq!(relay.metric("relay_handshake_failures_total{reason=\"proxy_header\"}").await, 4.0);

    // A client that is not a trusted balancer cannot name another address.
    let mut direct = TcpStream::connect(relay.server.http_addr()).await.expect("connect");
    assert!(closed_unanswered(&mut direct, &from("203.0.113.50")).await);
    assert_eq!(relay.metric("relay_handshake_failures_total{reason=\"proxy_untrusted\"}").await, 1.0);

    // Nothing already accepted was lost, and direct clients still log in.
    assert_eq!(relay.server.client_count(), 4);
    login(relay.url()).await.expect("a direct client");
    drop(held);
    relay.server.shutdown().await;
}

/// Debian's HAProxy in TCP mode on two ports in front of `relay`: `send-proxy-v2` on the first,
/// `send-proxy` (v1) on the second. `None` when haproxy is missing and not required
/// (`WARREN_REQUIRE_PROXY=1`, set by scripts/test.sh as root, requires it).
struct Haproxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    v2: u16,
    v1: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy(relay: SocketAddr) -> Option<Haproxy> {
    if std::process::Command::new("haproxy").arg("-v").output().is_err() {
        assert!(std::env::var_os("WARREN_REQUIRE_PROXY").is_none_or(|v| v != "1"), "haproxy is required");
        eprintln!("skipping: haproxy is not installed (apt-get install haproxy)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (v2, v1) = (warren_common::testing::free_tcp_port(), warren_common::testing::free_tcp_port());
    let config = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend derp_v2\n  bind 127.0.0.1:{v2}\n  default_backend relay_v2\n\
         backend relay_v2\n  server relay {relay} send-proxy-v2\n\
         frontend derp_v1\n  bind 127.0.0.1:{v1}\n  default_backend relay_v1\n\
         backend relay_v1\n  server relay {relay} send-proxy\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).expect("write config");
    let child = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let h = Haproxy { child, _dir: dir, v2, v1 };
    // HAProxy passes each probe on to the relay. Each port is probed from its own address until
    // it answers once, so no probe ever counts against the per-address cap a test sets.
    let start = std::time::Instant::now();
    let mut waiting = vec![(v2, [127, 0, 0, 21]), (v1, [127, 0, 0, 22])];
    while !waiting.is_empty() {
        waiting.retain(|(port, from)| !probe(*port, *from));
        assert!(start.elapsed() < Duration::from_secs(10), "haproxy listens");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(h)
}

/// Whether a TCP connection from `from` to 127.0.0.1:`port` is accepted.
fn probe(port: u16, from: [u8; 4]) -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else { return false };
    let local = SocketAddr::from((from, 0));
    let remote = SocketAddr::from(([127, 0, 0, 1], port));
    socket.bind(&local.into()).is_ok() && socket.connect(&remote.into()).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_relay_limits_each_client_by_the_address_haproxy_saw() {
    // HAProxy reaches the relay from 127.0.0.1 (trusted); clients reach HAProxy from 127.0.0.9
    // and 127.0.0.10, one connection each allowed.
    let relay = start_relay(|f| {
        f.limits.max_conns_per_ip = Some(1);
        f.proxy_protocol.trusted = vec!["127.0.0.1/32".into()];
    })
    .await;
    let Some(h) = haproxy(relay.server.http_addr()) else { return };
    let login = |port: u16, from: &str| {
        let mut opts = relay.opts(Transport::Derp);
        opts.bind_ip = Some(from.parse().expect("ip"));
        async move {
            DerpClient::connect(&format!("https://localhost:{port}"), &SecretKey::generate(&mut OsRng), &opts).await
        }
    };
    let mut nine = login(h.v2, "127.0.0.9").await.expect("v2: 127.0.0.9 logs in");
    assert!(login(h.v1, "127.0.0.9").await.is_err(), "v1: a second connection from 127.0.0.9 is over its cap");
    assert_eq!(relay.metric("relay_connections_rejected_total{reason=\"per_ip\"}").await, 1.0);
    let mut ten = login(h.v1, "127.0.0.10").await.expect("v1: 127.0.0.10 logs in");
    assert!(login(h.v2, "127.0.0.10").await.is_err(), "v2: a second connection from 127.0.0.10 is over its cap");
    assert_eq!(relay.metric("relay_connections_rejected_total{reason=\"per_ip\"}").await, 2.0);
    assert_eq!(relay.metric("relay_handshake_failures_total{reason=\"proxy_header\"}").await, 0.0);
    nine.send_packet(ten.public_key(), b"through haproxy").await.expect("send");
    let (src, got) =
        tokio::time::timeout(Duration::from_secs(5), ten.recv_packet()).await.expect("in time").expect("recv");
    assert_eq!((src, &got[..]), (nine.public_key(), &b"through haproxy"[..]));
    assert_eq!(relay.server.client_count(), 2);
    relay.server.shutdown().await;
}
