//! The edge scenario run tiny against a real edge, funnel agent and origin on loopback: it must
//! count every answer, and count failures by kind.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use warren::funnel::{Funnel, FunnelConfig};
use warren::services::ServiceSpec;
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;
use warren_loadtest::edge::{run, EdgeScenario};

/// A WebSocket echo origin (upgrade on any path, echo every text message).
async fn ws_origin() -> SocketAddr {
    warren_common::testing::http_origin(|mut req: hyper::Request<hyper::body::Incoming>| async move {
        let r = warren_common::testing::ws_echo_upgrade(&mut req);
        Ok::<_, Infallible>(r.map(|()| Full::new(Bytes::new())))
    })
    .await
}

/// An origin that reads the whole body and answers with its length.
async fn origin() -> SocketAddr {
    warren_common::testing::http_origin(|req: hyper::Request<hyper::body::Incoming>| async move {
        let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(n.to_string()))))
    })
    .await
}

fn scenario(edge: &Edge, name: &str, http2: bool, body_size: usize, max: u64) -> EdgeScenario {
    let port = edge.public_addrs()[0].port();
    EdgeScenario {
        url: format!("https://{name}.funnel.test:{port}/"),
        connect_addr: Some(edge.public_addrs()[0]),
        ca: edge.dev_ca_cert().map(Into::into),
        connections: 2,
        streams: if http2 { 4 } else { 1 },
        http2,
        rate: None,
        body_size,
        duration: Duration::from_secs(20),
        max_requests_per_worker: max,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_scenario_counts_answers_and_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:0\"]\ntunnel_listen = \"127.0.0.1:0\"\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"t0ken-for-the-test\"\nnames = [\"web\", \"gone\"]\n";
    let mut f = FileConfig::parse(toml).expect("config");
    f.state_dir = Some(dir.path().to_path_buf());
    let edge = Edge::spawn(Config::try_from(f).expect("valid"), None).await.expect("edge");
    let target = origin().await;
    let funnel = Funnel::start(FunnelConfig {
        edges: vec![edge.tunnel_addr().to_string()],
        edge_name: Some("localhost".into()),
        ca_file: edge.dev_ca_cert().map(Into::into),
        token: "t0ken-for-the-test".into(),
        name: "web".into(),
        services: vec![ServiceSpec::new(edge.public_addrs()[0].port(), format!("http://{target}"))],
        transport: Default::default(),
        domains: Vec::new(),
    });
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");

    let r = run(&scenario(&edge, "web", false, 0, 100)).await.expect("h1 runs");
    assert_eq!((r.ok, r.errors.len()), (200, 0), "{r}");
    assert_eq!(r.latency.count, 200);
    let r = run(&scenario(&edge, "web", true, 256 << 10, 10)).await.expect("h2 runs");
    assert_eq!((r.ok, r.errors.len(), r.workers), (80, 0, 8), "8 HTTP/2 workers x 10 POSTs of 256 KiB: {r}");
    // A name no node holds: every answer is a 503, counted as such.
    let r = run(&scenario(&edge, "gone", false, 0, 25)).await.expect("runs");
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.get("status_503"), Some(&50), "{r}");
    // Nothing listens: connection failures are counted, not fatal.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let mut s = scenario(&edge, "web", false, 0, 5);
    s.connect_addr = Some(dead);
    let r = run(&s).await.expect("runs");
    assert_eq!(r.errors.get("connect"), Some(&2), "{r}");

    // WebSocket echo sessions through the same edge, to a node publishing an echo origin.
    let echo = ws_origin().await;
    let ws_funnel = Funnel::start(FunnelConfig {
        edges: vec![edge.tunnel_addr().to_string()],
        edge_name: Some("localhost".into()),
        ca_file: edge.dev_ca_cert().map(Into::into),
        token: "t0ken-for-the-test".into(),
        name: "gone".into(),
        services: vec![ServiceSpec::new(edge.public_addrs()[0].port(), format!("http://{echo}"))],
        transport: Default::default(),
        domains: Vec::new(),
    });
    ws_funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let port = edge.public_addrs()[0].port();
    let scenario = warren_loadtest::ws::WsScenario {
        url: format!("https://gone.funnel.test:{port}/ws"),
        connect_addr: Some(edge.public_addrs()[0]),
        ca: edge.dev_ca_cert().map(Into::into),
        sessions: 3,
        messages: 40,
        size: 300,
        timeout: Duration::from_secs(20),
    };
    let r = warren_loadtest::ws::run(&scenario).await.expect("ws runs");
    assert_eq!((r.sessions_ok, r.echoed, r.errors.len()), (3, 120, 0), "{r}");
    assert_eq!(r.latency.count, 120);
    // Not a WebSocket endpoint: the sessions fail as such, counted.
    let r = warren_loadtest::ws::run(&warren_loadtest::ws::WsScenario {
        url: format!("https://web.funnel.test:{port}/"),
        ..scenario
    })
    .await
    .expect("runs");
    assert_eq!((r.sessions_ok, r.errors.get("not_upgraded")), (0, Some(&3)), "{r}");
    edge.shutdown().await;
}

/// A forwarder made here: accept on the returned address, copy both ways to `sink_port`.
async fn forwarder(sink_port: u16) -> std::net::SocketAddr {
    let via = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let via_addr = via.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut a, _)) = via.accept().await {
            tokio::spawn(async move {
                let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", sink_port)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    via_addr
}

fn free_port() -> u16 {
    warren_common::testing::free_tcp_port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_scenario_counts_bytes_through_a_forwarder() {
    let sink_port = free_port();
    let via_addr = forwarder(sink_port).await;
    let r = warren_loadtest::tcp::run(via_addr, sink_port, 2, Duration::from_millis(300)).await.expect("runs");
    assert!(r.received_bytes >= 64 << 10 && r.mbps > 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_tcp_scenario_times_every_message() {
    let sink_port = free_port();
    let via_addr = forwarder(sink_port).await;
    // 2 connections x 500 messages/s x 0.4 s: about 400 messages, each timed.
    let r = warren_loadtest::tcp::paced(via_addr, sink_port, 2, 300, 500.0, Duration::from_millis(400))
        .await
        .expect("runs");
    let latency = r.latency.expect("paced runs are timed");
    assert!(latency.count > 300 && latency.count < 500, "{r}");
    assert_eq!(r.received_bytes, latency.count * 300, "every message that arrived was timed");
    assert!(latency.p50_us > 0.0 && latency.p50_us <= latency.max_us, "{r}");
}
