//! The relay end to end: real TLS on loopback, real clients, every transport.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{recv_until, start_relay};
use rand_core::OsRng;
use warren_common::config::ConfigDuration;
use warren_relay_client::ClientError;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PeerGoneReason, SecretKey, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_flow_over_every_transport() {
    let relay = start_relay(|_| {}).await;
    for (transport, fast_start) in [(Transport::Derp, false), (Transport::Derp, true), (Transport::WebSocket, false)] {
        let opts = ConnectOptions { fast_start, ..relay.opts(transport) };
        let (ka, kb) = (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng));
        let mut a = DerpClient::connect(&relay.url(), &ka, &opts).await.expect("A logs in");
        let mut b = DerpClient::connect(&relay.url(), &kb, &opts).await.expect("B logs in");
        assert_eq!(a.server_key(), relay.server.public_key());
        assert_eq!(a.server_info().version, 2);

        let big = vec![7u8; 64 << 10];
        a.send_packet(kb.public_key(), b"hello B").await.expect("send");
        a.send_packet(kb.public_key(), &big).await.expect("send max-size packet");
        let (src, got) = b.recv_packet().await.expect("B receives");
        assert_eq!((src, &got[..]), (ka.public_key(), &b"hello B"[..]), "{transport:?} fast_start={fast_start}");
        let (_, got) = b.recv_packet().await.expect("B receives the 64 KiB packet");
        assert_eq!(got.len(), big.len());
        b.send_packet(ka.public_key(), b"hello A").await.expect("send");
        let (src, got) = a.recv_packet().await.expect("A receives");
        assert_eq!((src, &got[..]), (kb.public_key(), &b"hello A"[..]));

        a.send(&Frame::Ping(*b"12345678")).await.expect("ping");
        recv_until(&mut a, |f| *f == Frame::Pong(*b"12345678")).await;
    }
    assert!(relay.metric("relay_packets_forwarded_total").await >= 9.0);
    assert!(relay.metric("relay_connections_total{transport=\"websocket\"}").await >= 2.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_gone_for_absent_and_departed_peers() {
    let relay = start_relay(|_| {}).await;
    let mut a = relay.client(Transport::Derp).await;
    let mut b = relay.client(Transport::Derp).await;
    let absent = SecretKey::generate(&mut OsRng).public_key();
    a.send_packet(absent, b"x").await.expect("send");
    let f = recv_until(&mut a, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(f, Frame::PeerGone { peer: absent, reason: PeerGoneReason::NotHere });

    // A talked to B; when A leaves, B is told.
    let akey = a.public_key();
    a.send_packet(b.public_key(), b"hi").await.expect("send");
    b.recv_packet().await.expect("recv");
    a.close().await.expect("close");
    let f = recv_until(&mut b, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(f, Frame::PeerGone { peer: akey, reason: PeerGoneReason::Disconnected });
    assert!(relay.metric("relay_packets_dropped_total{reason=\"unknown_dest\"}").await >= 1.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_replaces_the_old_connection() {
    let relay = start_relay(|_| {}).await;
    let key = SecretKey::generate(&mut OsRng);
    let mut old = relay.client_with_key(&key).await;
    let mut new = relay.client_with_key(&key).await;
    let f = recv_until(&mut old, |f| matches!(f, Frame::Health { .. })).await;
    assert!(matches!(f, Frame::Health { problem } if problem.contains("replaced")));
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = old.recv().await {
                return e;
            }
        }
    })
    .await
    .expect("old connection closes");
    assert!(matches!(end, ClientError::Closed | ClientError::Io(_)), "{end}");
    let mut sender = relay.client(Transport::Derp).await;
    sender.send_packet(key.public_key(), b"to the new one").await.expect("send");
    let (_, got) = new.recv_packet().await.expect("new connection receives");
    assert_eq!(&got[..], b"to the new one");
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_drops_are_counted_and_block_nobody() {
    let relay = start_relay(|f| f.limits.send_queue_depth = Some(8)).await;
    let mut a = relay.client(Transport::Derp).await;
    let mut b = relay.client(Transport::Derp).await;
    // `sleeper` logs in and then never reads.
    let sleeper = relay.client(Transport::Derp).await;
    let packet = Bytes::from(vec![1u8; 60_000]);
    // 2000 x 60 KB = 120 MB at a reader that never reads: far more than socket buffers hold.
    for i in 0..2000u32 {
        a.queue(&Frame::SendPacket { dst: sleeper.public_key(), packet: packet.clone() }).expect("queue");
        if i % 16 == 15 {
            tokio::time::timeout(Duration::from_secs(5), a.flush())
                .await
                .expect("sender is never blocked")
                .expect("flush");
        }
    }
    a.flush().await.expect("flush");
    // Meanwhile A -> B keeps flowing.
    for i in 0..50u32 {
        a.send_packet(b.public_key(), &i.to_be_bytes()).await.expect("send");
        let (_, got) = tokio::time::timeout(Duration::from_secs(5), b.recv_packet())
            .await
            .expect("B is not starved")
            .expect("recv");
        assert_eq!(&got[..], &i.to_be_bytes());
    }
    assert!(relay.metric("relay_packets_dropped_total{reason=\"queue_full\"}").await > 0.0);
    drop(sleeper);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_restarting_then_closes() {
    let relay = start_relay(|f| {
        f.shutdown.reconnect_in = Some(ConfigDuration::from_millis(250));
        f.shutdown.try_for = Some(ConfigDuration::from_secs(30));
    })
    .await;
    let mut a = relay.client(Transport::WebSocket).await;
    let url = relay.url();
    let opts = relay.opts(Transport::Derp);
    let stop = tokio::spawn(relay.server.shutdown());
    let f = recv_until(&mut a, |f| matches!(f, Frame::Restarting { .. })).await;
    assert_eq!(f, Frame::Restarting { reconnect_in_ms: 250, try_for_ms: 30_000 });
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = a.recv().await {
                return e;
            }
        }
    })
    .await
    .expect("closed after the grace period");
    assert!(matches!(end, ClientError::Closed | ClientError::Io(_)), "{end}");
    tokio::time::timeout(Duration::from_secs(10), stop).await.expect("shutdown finishes").expect("join");
    let again = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts).await;
    assert!(again.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints() {
    let relay = start_relay(|_| {}).await;
    let r = relay.get("/generate_204", "X-Tailscale-Challenge: abc-123.x_y:z\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(r.to_ascii_lowercase().contains("x-tailscale-response: response abc-123.x_y:z"), "{r}");
    let r = relay.get("/generate_204", "X-Tailscale-Challenge: <script>\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204") && !r.to_ascii_lowercase().contains("x-tailscale-response"), "{r}");
    for path in ["/derp/probe", "/derp/latency-check"] {
        let r = relay.get(path, "").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.to_ascii_lowercase().contains("access-control-allow-origin: *"),
            "{r}"
        );
    }
    assert!(relay.get("/healthz", "").await.starts_with("HTTP/1.1 200"));
    assert!(relay.get("/", "").await.contains("Warren relay"));
    assert!(relay.get("/derp", "").await.starts_with("HTTP/1.1 426"));
    assert!(relay.get("/nope", "").await.starts_with("HTTP/1.1 404"));
    let r = relay.get("/derp", "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: abc\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400") && r.contains("subprotocol"), "{r}");
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_info_sealed_to_the_wrong_key_is_refused() {
    let relay = start_relay(|f| f.limits.handshake_timeout = Some(ConfigDuration::from_secs(1))).await;
    let r =
        relay.https_raw(b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 101") && r.contains("Derp-Public-Key: "), "{r}");
    // A ClientInfo sealed for some other server: the relay must close without a ServerInfo.
    let me = SecretKey::generate(&mut OsRng);
    let other_server = SecretKey::generate(&mut OsRng).public_key();
    let frame = warren_relay_proto::handshake::ClientInfo::node().seal_frame(&me, &other_server, &mut OsRng);
    let mut req = b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n".to_vec();
    req.extend_from_slice(&frame.to_bytes());
    let r = relay.https_bytes(&req).await;
    // Only the ServerKey frame comes back (5-byte header + 40), then the relay closes.
    assert_eq!(r.len(), 45, "{r:?}");
    assert_eq!(r[0], 0x01);
    assert!(relay.metric("relay_handshake_failures_total{reason=\"bad_client_info\"}").await >= 1.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_binding_reports_the_source_address() {
    let relay = start_relay(|f| {
        f.stun.rate_per_second = Some(1);
        f.stun.burst = Some(4);
    })
    .await;
    let stun = relay.server.stun_addr().expect("stun enabled");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(b"definitely not stun", stun).await.expect("send garbage");
    let mut buf = [0u8; 1500];
    for i in 0..3u8 {
        let req = warren_relay_proto::stun::binding_request([i; 12]).expect("req");
        sock.send_to(&req, stun).await.expect("send");
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .expect("answer")
            .expect("recv");
        let (tx, mapped) = warren_relay_proto::stun::parse_binding_response(&buf[..n]).expect("valid response");
        assert_eq!((tx, mapped), ([i; 12], sock.local_addr().expect("addr")));
    }
    // The burst of 4 is spent (the garbage datagram took a token too): the next is refused.
    let req = warren_relay_proto::stun::binding_request([9; 12]).expect("req");
    sock.send_to(&req, stun).await.expect("send");
    assert!(tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await.is_err(), "rate limited");
    assert!(relay.metric("relay_stun_requests_total{result=\"malformed\"}").await >= 1.0);
    assert!(relay.metric("relay_stun_requests_total{result=\"rate_limited\"}").await >= 1.0);
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_answers_from_the_address_the_request_was_sent_to() {
    // A wildcard bind on a host with many addresses: loopback has all of 127.0.0.0/8.
    let relay = start_relay(|f| f.stun.listen = Some("0.0.0.0:0".into())).await;
    let port = relay.server.stun_addr().expect("stun enabled").port();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = [0u8; 1500];
    for (i, to) in ["127.0.0.2", "127.0.0.3", "127.0.0.1"].into_iter().enumerate() {
        let to = std::net::SocketAddr::new(to.parse().expect("ip"), port);
        let req = warren_relay_proto::stun::binding_request([i as u8; 12]).expect("req");
        sock.send_to(&req, to).await.expect("send");
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .expect("answer")
            .expect("recv");
        assert_eq!(from, to, "a NAT drops an answer from an address the client never sent to");
        let (tx, mapped) = warren_relay_proto::stun::parse_binding_response(&buf[..n]).expect("valid response");
        assert_eq!((tx, mapped), ([i as u8; 12], sock.local_addr().expect("addr")));
    }
    relay.server.shutdown().await;
}
