//! Nodes on loopback with real relays: packets, direct paths, and moving home on Restarting.

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::OsRng;
use warren::node::{Node, NodeConfig};
use warren::paths::Path;
use warren::regionmap::RegionMap;
use warren_relay::config::{Config, FileConfig};
use warren_relay::Server;
use warren_relay_proto::SecretKey;

async fn relay(state: &FsPath, name: &str) -> Server {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nkey_file = \"{}/{name}.key\"\n[tls]\nmode = \"dev\"\n[stun]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n[shutdown]\ngrace_period = \"300ms\"\nreconnect_in = \"100ms\"\n",
        state.display()
    );
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(state.to_path_buf());
    Server::spawn(Config::try_from(f).expect("valid"), None).await.expect("relay starts")
}

fn region(id: u32, s: &Server) -> serde_json::Value {
    serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "Nodes": [{
        "Name": format!("{id}a"), "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": s.http_addr().port(), "STUNPort": s.stun_addr().expect("stun").port(),
    }]})
}

async fn node(map: &serde_json::Value, ca: &FsPath) -> Node {
    let map = RegionMap::parse(map.to_string().as_bytes()).expect("map");
    let mut cfg = NodeConfig::new(SecretKey::generate(&mut OsRng), map);
    cfg.ca_file = Some(ca.to_path_buf());
    cfg.udp_bind = "127.0.0.1:0".parse().expect("addr");
    Node::start(cfg).await.expect("node starts")
}

async fn until<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_packets_and_go_direct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = relay(dir.path(), "r1").await;
    let map = serde_json::json!({"Regions": {"1": region(1, &r)}});
    let ca = r.dev_ca_cert().expect("dev ca").to_path_buf();
    let (a, b) = (node(&map, &ca).await, node(&map, &ca).await);
    for n in [&a, &b] {
        until(Duration::from_secs(10), async || n.status().await.ok().filter(|s| s.relay_connected)).await;
    }
    a.send(b.public_key(), Bytes::from_static(b"first")).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), b.recv()).await.expect("delivered").expect("recv");
    assert_eq!((got.from, &got.data[..]), (a.public_key(), &b"first"[..]));
    // The direct path comes up within a few probe rounds; later packets use it.
    until(Duration::from_secs(10), async || {
        a.send(b.public_key(), Bytes::from_static(b"again")).await.ok()?;
        let r = tokio::time::timeout(Duration::from_secs(2), b.recv()).await.ok()?.ok()?;
        matches!(r.path, Path::Direct(_)).then_some(())
    })
    .await;
    let (path, rtt) = a.ping(b.public_key(), Duration::from_secs(3)).await.expect("pong");
    assert!(matches!(path, Path::Direct(_)) && rtt < Duration::from_secs(1));
    let s = a.status().await.expect("status");
    let peer = s.peers.iter().find(|p| p.key == b.public_key().to_hex()).expect("peer listed");
    assert!(peer.path.starts_with("direct") && peer.time_to_direct_ms.is_some() && peer.tx_direct > 0);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_moves_when_the_relay_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r1 = relay(dir.path(), "r1").await;
    let r2 = relay(dir.path(), "r2").await;
    let map = serde_json::json!({"Regions": {"1": region(1, &r1), "2": region(2, &r2)}});
    let ca = r1.dev_ca_cert().expect("dev ca").to_path_buf();
    let n = node(&map, &ca).await;
    let first = until(Duration::from_secs(10), async || {
        let s = n.status().await.ok()?;
        s.relay_connected.then_some(s.home?.region_id)
    })
    .await;
    let (stopping, other) = if first == 1 { (r1, r2) } else { (r2, r1) };
    stopping.shutdown().await;
    let moved = until(Duration::from_secs(10), async || {
        let s = n.status().await.ok()?;
        let home = s.home?.region_id;
        (s.relay_connected && home != first).then_some(home)
    })
    .await;
    assert_ne!(moved, first);
    assert_eq!(other.client_count(), 1, "the node is logged in at the other relay");
    other.shutdown().await;
}
