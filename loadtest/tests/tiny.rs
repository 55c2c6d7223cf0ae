//! Tiny scenarios that prove the harness counts correctly (benchmarks run outside the tests).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use warren_loadtest::relay::{run, Mode, RelayScenario};
use warren_relay::config::{Config, FileConfig};
use warren_relay::Server;

async fn relay(depth: usize, prometheus: Option<PrometheusHandle>) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (relay_in(dir.path(), depth, prometheus).await, dir)
}

/// A relay keeping its state (and dev CA) in `dir`: relays sharing it share the CA.
async fn relay_in(dir: &std::path::Path, depth: usize, prometheus: Option<PrometheusHandle>) -> Server {
    let toml = format!("listen = \"127.0.0.1:0\"\n[tls]\nmode = \"dev\"\n[stun]\nenabled = false\n[admin]\nenabled = false\n[limits]\nsend_queue_depth = {depth}\n");
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(dir.to_path_buf());
    Server::spawn(Config::try_from(f).expect("valid"), prometheus).await.expect("relay")
}

fn scenario(s: &Server, mode: Mode, pairs: usize, max: u64) -> RelayScenario {
    RelayScenario {
        url: format!("https://localhost:{}", s.http_addr().port()),
        ca: s.dev_ca_cert().map(Into::into),
        pairs,
        size: 1200,
        mode,
        duration: Duration::from_secs(10),
        websocket: false,
        source_ips: 4,
        max_packets_per_pair: max,
        probe_rate: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_delivers_everything_and_measures_latency() {
    let (s, _dir) = relay(128, None).await;
    let r = run(&scenario(&s, Mode::Closed { window: 16 }, 2, 200)).await.expect("runs");
    assert_eq!((r.sent, r.received, r.lost), (400, 400, 0), "{r}");
    assert_eq!(r.latency.count, 400);
    assert!(r.latency.p50_us > 0.0 && r.latency.max_us >= r.latency.p99_us);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_relay_reports_exactly_the_loss_the_relay_counted() {
    // One test process each under nextest, so this recorder is ours alone.
    let Ok(prom) = PrometheusBuilder::new().install_recorder() else {
        eprintln!("skipping: a metrics recorder is already installed in this process");
        return;
    };
    // A 1-deep queue and an open-loop burst: the relay must drop, and count what it drops.
    let (s, _dir) = relay(1, Some(prom.clone())).await;
    let r = run(&scenario(&s, Mode::Paced { rate: 200_000.0 }, 2, 300)).await.expect("runs");
    let dropped: f64 = prom
        .render()
        .lines()
        .filter(|l| l.starts_with("relay_packets_dropped_total{reason=\"queue_full\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(r.sent, 600);
    assert!(r.lost > 0, "expected loss with a 1-deep queue: {r}");
    assert_eq!(r.lost as f64, dropped, "harness-counted loss equals relay-counted drops: {r}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_pair_beside_the_load_is_reported_on_its_own() {
    let (s, _dir) = relay(128, None).await;
    let load = RelayScenario { probe_rate: Some(1000.0), ..scenario(&s, Mode::Closed { window: 16 }, 2, 200) };
    let r = run(&load).await.expect("runs");
    assert_eq!((r.sent, r.received), (400, 400), "the load's own figures leave the probe out");
    let p = r.probe.expect("a probe report");
    assert_eq!((p.sent, p.received), (200, 200), "the probe paced its 200 packets, all delivered");
    assert_eq!(p.latency.count, 200, "and timed each");
}

fn soak(
    urls: Vec<String>,
    ca: Option<std::path::PathBuf>,
    pairs: usize,
    seconds: u64,
) -> warren_loadtest::soak::SoakScenario {
    warren_loadtest::soak::SoakScenario {
        relays: urls,
        ca,
        pairs,
        rate: 50.0,
        size: 64,
        churn: 10.0,
        churn_life: Duration::from_millis(200),
        visit_url: None,
        edges: Vec::new(),
        edge_ca: None,
        visit_rate: 0.0,
        upload_size: 0,
        duration: Duration::from_secs(seconds),
        interval: Duration::from_secs(1),
        settle: Duration::from_millis(500),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_clients_judge_every_packet_and_count_switches() {
    let (a, dir) = relay(128, None).await;
    let url = |s: &Server| format!("https://localhost:{}", s.http_addr().port());
    // One relay: everything arrives, churn included.
    let t = warren_loadtest::soak::run(soak(vec![url(&a)], a.dev_ca_cert().map(Into::into), 2, 2), |_| {})
        .await
        .expect("runs");
    assert!(t.delivered >= 100 && t.delivered == t.sent, "every packet judged and delivered: {t:?}");
    assert_eq!((t.lost, t.switch_lost, t.switches, t.duplicates), (0, 0, 0, 0), "{t:?}");
    assert!(t.churn_logins > 0 && t.churn_received == t.churn_sent, "{t:?}");

    // Two relays that are not meshed: the sender's packets cannot reach the receiver on the
    // other one and are all counted lost, until the receiver's relay stops and it moves to the
    // sender's.
    let b = relay_in(dir.path(), 128, None).await;
    let both = vec![url(&a), url(&b)];
    let ca = a.dev_ca_cert().map(Into::into);
    let run = tokio::spawn(async move {
        let mut ticks = Vec::new();
        let total = warren_loadtest::soak::run(soak(both, ca, 1, 4), |t| ticks.push(t.clone())).await;
        (total, ticks)
    });
    tokio::time::sleep(Duration::from_millis(2000)).await;
    b.shutdown().await;
    let (total, _) = run.await.expect("task");
    let t = total.expect("runs");
    assert!(t.lost > 0, "packets to a relay that does not hold the receiver are lost: {t:?}");
    assert_eq!(t.switches, 1, "the receiver moved once: {t:?}");
    assert!(t.delivered > 0, "and got what came after: {t:?}");
    a.shutdown().await;
}
