//! A meshed region of three `warren-relay` processes on loopback with relay-only nodes spread
//! over them: packets cross the mesh, a killed relay's node moves to a sibling and its traffic
//! resumes, and a draining relay costs the nodes on the other relays nothing. And two regions,
//! each its own mesh on its own loopback address, whose nodes reach each other through links to
//! the other region's relays.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::OsRng;
use warren::node::{Node, NodeConfig};
use warren::regionmap::RegionMap;
use warren_common::testing::{free_tcp_port, free_udp_port};
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
    stun: u16,
    admin: u16,
}

/// Relay processes, killed when the test ends however it ends.
struct Region {
    relays: Vec<RelayProc>,
    /// The state directory (the dev CA, configs, logs); owned by the first region started.
    dir: PathBuf,
    _owned: Option<tempfile::TempDir>,
    ip: &'static str,
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
        Region::start_on(n, "127.0.0.1", None)
    }

    /// `n` meshed relays listening on `ip`; `beside` shares its state directory (and dev CA).
    fn start_on(n: usize, ip: &'static str, beside: Option<&Region>) -> Region {
        let (dir, owned) = match beside {
            Some(r) => (r.dir.clone(), None),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_tcp_port(), free_udp_port(), free_tcp_port())).collect();
        let peers: Vec<String> = ports.iter().map(|(d, _, _)| format!("\"https://{ip}:{d}\"")).collect();
        let mut region = Region { relays: Vec::new(), dir, _owned: owned, ip };
        for (i, (derp, stun, admin)) in ports.into_iter().enumerate() {
            let state = region.dir.as_path();
            let config = format!(
                "listen = \"{ip}:{derp}\"\nhostname = \"{ip}\"\nstate_dir = \"{s}\"\nkey_file = \"{s}/relay-{ip}-{i}.key\"\n\
                 [tls]\nmode = \"dev\"\n[stun]\nlisten = \"{ip}:{stun}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [shutdown]\ngrace_period = \"3s\"\nreconnect_in = \"100ms\"\n\
                 [mesh]\npeers = [{}]\nca_file = \"{s}/dev-ca.pem\"\n",
                peers.join(", "),
                s = state.display()
            );
            let path = state.join(format!("relay-{ip}-{i}.toml"));
            std::fs::write(&path, config).expect("write config");
            let log = std::fs::File::create(state.join(format!("relay-{ip}-{i}.log"))).expect("log");
            let child = Command::new(bin("warren-relay"))
                .arg("--config")
                .arg(&path)
                .env("WARREN_MESH_KEY", MESH_KEY)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("relay starts");
            region.relays.push(RelayProc { child, derp, stun, admin });
            // The first relay creates the shared dev CA; the others start once it exists.
            wait_until(Duration::from_secs(10), "relay listening", || {
                TcpStream::connect((ip, derp)).is_ok() && state.join("dev-ca.pem").exists()
            });
        }
        let start = Instant::now();
        for i in 0..n {
            while region.metric(i, "relay_mesh_peers") != n as f64 - 1.0 {
                assert!(start.elapsed() < Duration::from_secs(10), "mesh links up on {ip}\nlog:\n{}", region.log(i));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        region
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("dev-ca.pem")
    }

    /// This region's entry of a region map: `id`, its relays in order, `avoid` as given.
    fn map_entry(&self, id: u32, avoid: bool) -> serde_json::Value {
        let nodes: Vec<_> = self
            .relays
            .iter()
            .enumerate()
            .map(|(k, r)| {
                serde_json::json!({"Name": format!("{id}{k}"), "HostName": "localhost", "IPv4": self.ip,
                    "DERPPort": r.derp, "STUNPort": r.stun})
            })
            .collect();
        serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "Nodes": nodes, "Avoid": avoid})
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
        std::fs::read_to_string(self.dir.join(format!("relay-{}-{i}.log", self.ip))).unwrap_or_default()
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
    relay_only_node_with(map, ca, |_| {}).await
}

async fn relay_only_node_with(map: RegionMap, ca: &FsPath, tune: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut cfg = NodeConfig::new(SecretKey::generate(&mut OsRng), map);
    cfg.ca_file = Some(ca.to_path_buf());
    cfg.udp_bind = "127.0.0.1:0".parse().expect("addr");
    cfg.relay_only = true;
    tune(&mut cfg);
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

/// A map of region 1 (`r1`) and region 2 (`r2`), the one not named `home` marked Avoid.
fn two_region_map(r1: &Region, r2: &Region, home: u32) -> RegionMap {
    let map = serde_json::json!({"Regions": {"1": r1.map_entry(1, home != 1), "2": r2.map_entry(2, home != 2)}});
    RegionMap::parse(map.to_string().as_bytes()).expect("map")
}

async fn recv_from(node: &Node, from: PublicKey) -> Bytes {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = tokio::time::timeout_at(deadline, node.recv()).await.expect("a packet in time").expect("recv");
        if r.from == from {
            return r.data;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_homed_in_different_regions_reach_each_other_with_and_without_a_hint() {
    let r1 = Region::start_on(2, "127.0.0.1", None);
    let r2 = Region::start_on(2, "127.0.0.2", Some(&r1));
    let ca = r1.ca();
    let idle = |c: &mut NodeConfig| c.link_idle = Duration::from_secs(2);
    let a = relay_only_node_with(two_region_map(&r1, &r2, 1), &ca, idle).await;
    let b = relay_only_node_with(two_region_map(&r1, &r2, 2), &ca, idle).await;
    let c = std::sync::Arc::new(relay_only_node_with(two_region_map(&r1, &r2, 1), &ca, idle).await);
    let (ka, kb, kc) = (a.public_key(), b.public_key(), c.public_key());
    let present = "relay_peer_lookups_total{result=\"present\"}";
    let clients =
        |r: &Region| r.metric(0, "relay_clients_connected").max(0.0) + r.metric(1, "relay_clients_connected").max(0.0);
    assert_eq!((clients(&r1), clients(&r2)), (2.0, 1.0), "a and c homed in region 1, b in region 2");

    // No hint: region 1 says b is not there, region 2 says it is, and the packet goes there.
    a.send(kb, Bytes::from_static(b"no hint")).await.expect("send");
    assert_eq!(&recv_from(&b, ka).await[..], b"no hint");
    b.send(ka, Bytes::from_static(b"reply")).await.expect("send");
    assert_eq!(&recv_from(&a, kb).await[..], b"reply");
    let (path, rtt) = a.ping(kb, Duration::from_secs(3)).await.expect("ping across regions");
    eprintln!("a -> b (homed in region 2): ping over {path:?} in {rtt:?}");
    let lookups = r2.metric(0, present).max(0.0) + r2.metric(1, present).max(0.0);
    assert_eq!(lookups, 1.0, "one lookup answered present by region 2");
    let status = a.status().await.expect("status");
    let peer = status.peers.iter().find(|p| p.key == kb.to_hex()).expect("b in a's status");
    assert_eq!(peer.home_region, Some(2));
    assert!(peer.relay.as_deref().is_some_and(|u| u.contains(&r2.relays[0].derp.to_string())), "{peer:?}");
    assert_eq!(status.region_links.iter().map(|l| l.region_id).collect::<Vec<_>>(), vec![2]);

    // A hint, as `warren send KEY@r2` gives it: straight to region 2, no lookup.
    let daemon = std::sync::Arc::new(warren::control::Daemon::new(c.clone(), None, None).expect("daemon"));
    let sock = r1.dir.join("c.sock");
    let cancel = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn({
        let (sock, cancel) = (sock.clone(), cancel.clone());
        async move { warren::control::serve(daemon, &sock, cancel).await }
    });
    wait_until(Duration::from_secs(5), "control socket", || sock.exists());
    let send = serde_json::json!({"cmd": "send", "peer": format!("{}@r2", kb.to_hex()), "data": "hinted"});
    let r = warren::control::request(&sock, &send).await.expect("control answers");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(&recv_from(&b, kc).await[..], b"hinted");
    b.send(kc, Bytes::from_static(b"reply")).await.expect("send");
    assert_eq!(&recv_from(&c, kb).await[..], b"reply");
    let lookups = r2.metric(0, present).max(0.0) + r2.metric(1, present).max(0.0);
    assert_eq!(lookups, 1.0, "the hinted send asked no one");

    // A region the map does not have is a clear error.
    let bad = serde_json::json!({"cmd": "ping", "peer": format!("{}@9", kb.to_hex())});
    let r = warren::control::request(&sock, &bad).await.expect("control answers");
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("region \"9\"") && e.contains("regions with relays: 1 (r1), 2 (r2)"), "{e}");
    cancel.cancel();
    let _ = serving.await;

    // Idle links close: region 2 keeps only b, region 1 only a and c.
    wait_until(Duration::from_secs(10), "idle region links closed", || (clients(&r1), clients(&r2)) == (2.0, 1.0));
    let status = a.status().await.expect("status");
    assert!(status.region_links.is_empty(), "{:?}", status.region_links);
    for n in [&a, &b, &*c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_homed_in_different_regions_find_a_direct_path() {
    let r1 = Region::start_on(1, "127.0.0.1", None);
    let r2 = Region::start_on(1, "127.0.0.2", Some(&r1));
    let ca = r1.ca();
    let direct = |c: &mut NodeConfig| c.relay_only = false;
    let a = relay_only_node_with(two_region_map(&r1, &r2, 1), &ca, direct).await;
    let b = relay_only_node_with(two_region_map(&r1, &r2, 2), &ca, direct).await;
    let (ka, kb) = (a.public_key(), b.public_key());
    a.send(kb, Bytes::from_static(b"first")).await.expect("send");
    assert_eq!(&recv_from(&b, ka).await[..], b"first");
    let started = Instant::now();
    let path = loop {
        let status = a.status().await.expect("status");
        let path = status.peers.iter().find(|p| p.key == kb.to_hex()).map(|p| p.path.clone()).unwrap_or_default();
        if path.starts_with("direct") || started.elapsed() > Duration::from_secs(5) {
            break path;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("a (region 1) -> b (region 2): {path} after {:?}", started.elapsed());
    let b_udp = b.status().await.expect("status").udp_local;
    assert_eq!(path, format!("direct {b_udp}"), "the CallMeMaybe crossed regions and the pings met");
    a.send(kb, Bytes::from_static(b"second")).await.expect("send");
    let second = loop {
        let r = tokio::time::timeout(Duration::from_secs(5), b.recv()).await.expect("in time").expect("recv");
        if r.from == ka {
            break r;
        }
    };
    assert!(matches!(second.path, warren::paths::Path::Direct(_)), "{:?}", second.path);
    assert_eq!(&second.data[..], b"second");
    a.shutdown().await;
    b.shutdown().await;
}
