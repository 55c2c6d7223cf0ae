//! The prober against a real region of two meshed relays on loopback: every check passes, and
//! a relay that goes away shows as down in the metrics within one probe interval.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_common::testing::free_tcp_port;
use warren_relay::config::{Config, FileConfig};
use warren_relay::Server;

const MESH_KEY: &str = "probe-test-region-mesh-key-0123";

async fn relay(state: &Path, i: usize, ports: &[u16]) -> Server {
    let mut f = FileConfig::parse(
        "[tls]\nmode = \"dev\"\n[stun]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n[shutdown]\ngrace_period = \"100ms\"\n",
    )
    .expect("config");
    f.listen = Some(format!("127.0.0.1:{}", ports[i]));
    f.state_dir = Some(state.to_path_buf());
    f.key_file = Some(state.join(format!("relay-{i}.key")));
    f.mesh.key = Some(MESH_KEY.into());
    f.mesh.peers = ports.iter().map(|p| format!("https://localhost:{p}")).collect();
    f.mesh.ca_file = Some(state.join("dev-ca.pem"));
    Server::spawn(Config::try_from(f).expect("valid"), None).await.expect("relay starts")
}

fn region_map(relays: &[&Server]) -> String {
    let nodes: Vec<String> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                r#"{{"Name":"r{i}","HostName":"localhost","IPv4":"127.0.0.1","DERPPort":{},"STUNPort":{}}}"#,
                r.http_addr().port(),
                r.stun_addr().expect("stun").port()
            )
        })
        .collect();
    format!(r#"{{"Regions":{{"1":{{"RegionID":1,"RegionCode":"lab","Nodes":[{}]}}}}}}"#, nodes.join(","))
}

fn metrics(port: u16) -> Option<String> {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).ok()?;
    Some(out)
}

fn gauge(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prober_passes_a_healthy_region_and_sees_a_relay_go_down_within_one_interval() {
    let state = tempfile::tempdir().expect("tempdir");
    let ports = [free_tcp_port(), free_tcp_port()];
    let a = relay(state.path(), 0, &ports).await;
    let b = relay(state.path(), 1, &ports).await;
    let start = Instant::now();
    while a.mesh_link_count() < 1 || b.mesh_link_count() < 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "mesh up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let map = state.path().join("regions.json");
    std::fs::write(&map, region_map(&[&a, &b])).expect("write map");
    let ca = state.path().join("dev-ca.pem");
    let bin = env!("CARGO_BIN_EXE_warren-loadtest");

    // One round by hand: everything passes, the exit status says so.
    let once = Command::new(bin)
        .args(["probe", "--once", "--timeout", "2s", "--region-map"])
        .arg(&map)
        .arg("--ca")
        .arg(&ca)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(once.status.success(), "{text}\n{}", String::from_utf8_lossy(&once.stderr));
    for line in ["lab/r0: stun ok", "lab/r1: stun ok", "lab: r0 -> r1 -> r0: ok", "lab: r1 -> r1 -> r1: ok"] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }

    // Continuous, with metrics.
    let listen = free_tcp_port();
    let interval = Duration::from_secs(1);
    let mut child = Command::new(bin)
        .args(["probe", "--interval", "1s", "--timeout", "1s", "--region-map"])
        .arg(&map)
        .arg("--ca")
        .arg(&ca)
        .arg("--listen")
        .arg(format!("127.0.0.1:{listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prober starts");
    let up =
        |relay: &str, check: &str| format!("warren_probe_up{{region=\"lab\",relay=\"{relay}\",check=\"{check}\"}}");
    let mesh = |from: &str, to: &str| format!("warren_probe_mesh_up{{region=\"lab\",from=\"{from}\",to=\"{to}\"}}");
    let start = Instant::now();
    let healthy = loop {
        if let Some(m) = metrics(listen).filter(|m| m.contains("warren_probe_rounds_total")) {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the first round is exported");
        std::thread::sleep(Duration::from_millis(50));
    };
    for relay in ["r0", "r1"] {
        for check in ["stun", "tls", "derp"] {
            assert_eq!(gauge(&healthy, &up(relay, check)), Some(1.0), "{relay} {check}:\n{healthy}");
        }
        let expiry = format!("warren_probe_cert_expiry_seconds{{region=\"lab\",relay=\"{relay}\"}}");
        assert!(gauge(&healthy, &expiry).is_some_and(|s| s > 86_400.0), "{healthy}");
    }
    for (from, to) in [("r0", "r0"), ("r0", "r1"), ("r1", "r1")] {
        assert_eq!(gauge(&healthy, &mesh(from, to)), Some(1.0), "{from} -> {to}:\n{healthy}");
    }

    // r1 goes away: its checks and the pairs through it go to 0 within one interval (plus the
    // round's own checks, each bounded by the timeout).
    b.shutdown().await;
    let gone = Instant::now();
    let down = loop {
        let m = metrics(listen).expect("metrics");
        if gauge(&m, &up("r1", "derp")) == Some(0.0) {
            break m;
        }
        assert!(gone.elapsed() < interval * 4, "r1 not reported down:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen_after = gone.elapsed();
    eprintln!("r1 reported down {seen_after:?} after it stopped (interval {interval:?})");
    assert!(seen_after <= interval + Duration::from_secs(1), "seen after {seen_after:?}");
    assert_eq!(gauge(&down, &up("r1", "tls")), Some(0.0));
    assert_eq!(gauge(&down, &up("r1", "stun")), Some(0.0));
    assert_eq!(gauge(&down, &mesh("r0", "r1")), Some(0.0));
    assert_eq!(gauge(&down, &up("r0", "derp")), Some(1.0), "r0 is still fine");
    assert_eq!(gauge(&down, &mesh("r0", "r0")), Some(1.0));

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().expect("exits");
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("log");
    assert!(status.success(), "{log}");
    assert!(log.contains("probe failing"), "the failure is logged:\n{log}");
    a.shutdown().await;
}
