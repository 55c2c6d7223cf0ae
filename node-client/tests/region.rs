//! A meshed region of three `warren-relay` processes on loopback with relay-only nodes spread
//! over them: packets cross the mesh, a killed relay's node moves to a sibling and its traffic
//! resumes, and a draining relay costs the nodes on the other relays nothing.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::OsRng;
use warren::node::{Node, NodeConfig};
use warren::regionmap::RegionMap;
use warren_common::testing::free_tcp_port;
use warren_relay_proto::{PublicKey, SecretKey};

const MESH_KEY: &str = "region-test-mesh-key-abcdef0123";

fn bin(name: &str) -> PathBuf {
    // Binaries of the workspace live next to this package's own.
    let path = PathBuf::from(env!("CARGO_BIN_EXE_warren")).with_file_name(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first", path.display());
    path
}

struct RelayProc {
    child: Child,
    derp: u16,
    admin: u16,
}

/// Relay processes, killed when the test ends however it ends.
struct Region {
    relays: Vec<RelayProc>,
    dir: tempfile::TempDir,
}

impl Drop for Region {
    fn drop(&mut self) {
        for r in &mut self.relays {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

impl Region {
    fn start(n: usize) -> Region {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_tcp_port(), free_tcp_port())).collect();
        let peers: Vec<String> = ports.iter().map(|(d, _)| format!("\"https://localhost:{d}\"")).collect();
        let mut region = Region { relays: Vec::new(), dir };
        for (i, (derp, admin)) in ports.into_iter().enumerate() {
            let state = region.dir.path();
            let config = format!(
                "listen = \"127.0.0.1:{derp}\"\nstate_dir = \"{s}\"\nkey_file = \"{s}/relay-{i}.key\"\n\
                 [tls]\nmode = \"dev\"\n[stun]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [shutdown]\ngrace_period = \"3s\"\nreconnect_in = \"100ms\"\n\
                 [mesh]\npeers = [{}]\nca_file = \"{s}/dev-ca.pem\"\n",
                peers.join(", "),
                s = state.display()
            );
            let path = state.join(format!("relay-{i}.toml"));
            std::fs::write(&path, config).expect("write config");
            let log = std::fs::File::create(state.join(format!("relay-{i}.log"))).expect("log");
            let child = Command::new(bin("warren-relay"))
                .arg("--config")
                .arg(&path)
                .env("WARREN_MESH_KEY", MESH_KEY)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("relay starts");
            region.relays.push(RelayProc { child, derp, admin });
            // The first relay creates the shared dev CA; the others start once it exists.
            wait_until(Duration::from_secs(10), "relay listening", || {
                TcpStream::connect(("127.0.0.1", derp)).is_ok() && state.join("dev-ca.pem").exists()
            });
        }
        for i in 0..n {
            wait_until(Duration::from_secs(10), "mesh links up", || {
                region.metric(i, "relay_mesh_peers") == n as f64 - 1.0
            });
        }
        region
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("dev-ca.pem")
    }

    /// A region map listing the relays starting from `first`: nodes prefer the first entry.
    fn map_from(&self, first: usize) -> RegionMap {
        let n = self.relays.len();
        let nodes: Vec<_> = (0..n)
            .map(|k| {
                let r = &self.relays[(first + k) % n];
                serde_json::json!({"Name": format!("1{k}"), "HostName": "localhost", "IPv4": "127.0.0.1",
                    "DERPPort": r.derp, "STUNPort": -1})
            })
            .collect();
        let map = serde_json::json!({"Regions": {"1": {"RegionID": 1, "RegionCode": "lo", "Nodes": nodes}}});
        RegionMap::parse(map.to_string().as_bytes()).expect("map")
    }

    fn metric(&self, i: usize, name: &str) -> f64 {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.relays[i].admin)) else { return -1.0 };
        let _ = std::io::Write::write_all(&mut tcp, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = tcp.read_to_string(&mut out);
        out.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(-1.0)
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("relay-{i}.log"))).unwrap_or_default()
    }
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn relay_only_node(map: RegionMap, ca: &FsPath) -> Node {
    let mut cfg = NodeConfig::new(SecretKey::generate(&mut OsRng), map);
    cfg.ca_file = Some(ca.to_path_buf());
    cfg.udp_bind = "127.0.0.1:0".parse().expect("addr");
    cfg.relay_only = true;
    let node = Node::start(cfg).await.expect("node starts");
    let start = Instant::now();
    while !node.status().await.is_ok_and(|s| s.relay_connected) {
        assert!(start.elapsed() < Duration::from_secs(10), "node connects to its relay");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node
}

/// Sends numbered packets every `gap` from `from` to `to` until `stop`; returns how many.
async fn stream(from: &Node, to: PublicKey, gap: Duration, stop: tokio::sync::watch::Receiver<bool>) -> u32 {
    let mut seq = 0u32;
    while !*stop.borrow() {
        let _ = from.send(to, Bytes::copy_from_slice(&seq.to_be_bytes())).await;
        seq += 1;
        tokio::time::sleep(gap).await;
    }
    seq
}

/// Receives until `want` packets from `from` arrived or `limit` passed; returns (count, arrival
/// time of each sequence number).
async fn collect(node: &Node, from: PublicKey, limit: Duration) -> Vec<(u32, Instant)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Ok(r)) = tokio::time::timeout_at(deadline, node.recv()).await {
        if r.from == from && r.data.len() == 4 {
            let seq = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
            got.push((seq, Instant::now()));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_node_moves_to_a_sibling_and_traffic_resumes() {
    let mut region = Region::start(3);
    let ca = region.ca();
    // Node i prefers relay i: the nodes are spread over the region.
    let a = relay_only_node(region.map_from(0), &ca).await;
    let b = relay_only_node(region.map_from(1), &ca).await;
    let c = relay_only_node(region.map_from(2), &ca).await;
    for (i, want) in [(0usize, 1.0), (1, 1.0), (2, 1.0)] {
        assert_eq!(region.metric(i, "relay_clients_connected"), want, "one node per relay");
    }
    for (x, y) in [(&a, &b), (&b, &c), (&c, &a)] {
        x.send(y.public_key(), Bytes::from_static(b"hello")).await.expect("send");
        let r = tokio::time::timeout(Duration::from_secs(5), y.recv()).await.expect("through the mesh").expect("recv");
        assert_eq!((r.from, &r.data[..]), (x.public_key(), &b"hello"[..]));
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ka, kb) = (a.public_key(), b.public_key());
    let sending = stream(&a, kb, Duration::from_millis(10), stop.clone());
    let receiving = collect(&b, ka, Duration::from_secs(6));
    let killing = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed_at = Instant::now();
        region.relays[0].child.kill().expect("SIGKILL relay 0");
        let _ = region.relays[0].child.wait();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _ = stop_tx.send(true);
        killed_at
    };
    let (sent, got, killed_at) = tokio::join!(sending, receiving, killing);
    let before = got.iter().filter(|(_, t)| *t < killed_at).count();
    let resumed = got.iter().find(|(_, t)| *t > killed_at).map(|(_, t)| t.duration_since(killed_at));
    eprintln!(
        "relay killed: a->b sent {sent}, received {} ({before} before the kill), traffic resumed {resumed:?} after the kill",
        got.len()
    );
    let resumed = resumed.unwrap_or_else(|| panic!("traffic never resumed\nrelay 1 log:\n{}", region.log(1)));
    assert!(resumed < Duration::from_secs(2), "traffic resumed within 2 s, took {resumed:?}");
    assert!(before > 0);
    assert_eq!(region.metric(1, "relay_clients_connected"), 2.0, "a moved to relay 1, the next in its map");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_loses_no_packets_between_nodes_on_other_relays() {
    let mut region = Region::start(3);
    let ca = region.ca();
    let a = relay_only_node(region.map_from(0), &ca).await;
    let b = relay_only_node(region.map_from(1), &ca).await;
    let c = relay_only_node(region.map_from(2), &ca).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ka, kb, kc) = (a.public_key(), b.public_key(), c.public_key());
    let drain = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = region.relays[0].child.id();
        let term = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(term.success());
        let drained_at = Instant::now();
        let status = loop {
            if let Some(status) = region.relays[0].child.try_wait().expect("wait") {
                break status;
            }
            assert!(drained_at.elapsed() < Duration::from_secs(10), "the relay exits after its grace period");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "drained relay exits cleanly");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = stop_tx.send(true);
        drained_at
    };
    // b -> c crosses the mesh between the two surviving relays; a -> b starts on the draining one.
    let (sent_bc, got_bc, sent_ab, got_ab, drained_at) = tokio::join!(
        stream(&b, kc, Duration::from_millis(5), stop.clone()),
        collect(&c, kb, Duration::from_secs(7)),
        stream(&a, kb, Duration::from_millis(10), stop.clone()),
        collect(&b, ka, Duration::from_secs(7)),
        drain,
    );
    let mut seqs: Vec<u32> = got_bc.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let gap = got_ab.iter().find(|(_, t)| *t > drained_at).map(|(_, t)| t.duration_since(drained_at));
    eprintln!(
        "drain: b->c (surviving relays) sent {sent_bc}, received {}; a->b (moving node) sent {sent_ab}, received {}, first after the drain began {gap:?}",
        seqs.len(),
        got_ab.len()
    );
    assert_eq!(seqs.len() as u32, sent_bc, "no packet lost between nodes on surviving relays");
    assert!(gap.is_some(), "the moving node's traffic continues");
}
