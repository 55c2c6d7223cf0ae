//! Tokens never reach the edge's logs or metrics, neither the valid one nor one a stranger
//! offers, even at debug level.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren::funnel::{Funnel, FunnelConfig};
use warren::services::ServiceSpec;
use warren_common::testing::{free_tcp_port, free_udp_port};

const TOKEN: &str = "edge-token-that-must-not-leak-7f3a";
const WRONG: &str = "stranger-token-that-must-not-leak-91c2";

fn admin_get(port: u16, path: &str) -> Option<String> {
    common::plain_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs_or_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (public, tunnel, admin) = (free_tcp_port(), free_udp_port(), free_tcp_port());
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:{public}\"]\ntunnel_listen = \"127.0.0.1:{tunnel}\"\nstate_dir = \"{}\"\n[tls]\nmode = \"dev\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n",
            dir.path().display()
        ),
    )
    .expect("write config");
    let log_path = dir.path().join("edge.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-edge"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("edge starts");
    let start = Instant::now();
    while admin_get(admin, "/healthz").is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "edge up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let funnel = |token: &str| {
        Funnel::start(FunnelConfig {
            edges: vec![format!("127.0.0.1:{tunnel}")],
            edge_name: Some("localhost".into()),
            ca_file: Some(dir.path().join("dev-ca.pem")),
            token: token.into(),
            name: "web".into(),
            services: vec![ServiceSpec::new(public, "http://127.0.0.1:9")],
            transport: Default::default(),
            domains: Vec::new(),
        })
    };
    let good = funnel(TOKEN);
    good.wait_registered(Duration::from_secs(10)).await.expect("the valid token registers");
    let bad = funnel(WRONG);
    assert!(bad.wait_registered(Duration::from_secs(2)).await.is_err(), "a wrong token is refused");
    let metrics = admin_get(admin, "/metrics").expect("metrics");
    assert!(metrics.contains("edge_tunnel_registrations_total"), "metrics were read:\n{metrics}");
    drop((good, bad));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("node registered"), "the log was captured:\n{log}");
    for secret in [TOKEN, WRONG] {
        assert!(!log.contains(secret), "a token appears in the log");
        assert!(!metrics.contains(secret), "a token appears in the metrics");
    }
}
