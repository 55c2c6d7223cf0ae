//! A node on a network that drops all UDP and lets TCP out only to a forward proxy.
//!
//! ```text
//!  node ns  10.77.0.2 ───────── 10.77.0.1  srv ns
//!    warren up (real binary)                 warren-relay  :8443 DERP  :3478 STUN
//!    iptables OUTPUT: UDP dropped,           warren-edge   :443 HTTPS + TCP tunnel  :7443 QUIC
//!    TCP only to 10.77.0.1:8888              tinyproxy     :8888 (CONNECT to 443 and 8443)
//! ```
//!
//! The node must: reach its home relay through the proxy, publish its service through the
//! TCP tunnel (through the proxy), answer a visitor (curl in the srv namespace), and move the
//! tunnel back to QUIC once the UDP rule is removed. The test prints the measured times.
//!
//! Needs root, iproute2, iptables and tinyproxy: without them it skips, unless
//! `WARREN_REQUIRE_NETNS=1` (CI sets it) makes that a failure.

use std::path::Path;
use std::time::{Duration, Instant};

use netns::{bin, control, wait_for, Netns};
use serde_json::json;

mod netns;

const TOKEN: &str = "proxylab-token-0123456789";

/// The lab: [`Netns`] with its two namespaces linked and the node's firewall in place.
fn lab() -> Netns {
    let lab = Netns::new("wp", &["srv", "node"]);
    lab.link("srv", "up0", "10.77.0.1/24", "node", "eth0", "10.77.0.2/24");
    // The node's network: no UDP at all, TCP only to the proxy.
    for rule in [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -p udp -j DROP",
        "-A OUTPUT -p tcp -d 10.77.0.1 --dport 8888 -j ACCEPT",
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
    ] {
        iptables(&lab, "node", rule);
    }
    lab
}

fn iptables(lab: &Netns, ns: &str, rule: &str) {
    let mut args = vec!["iptables"];
    args.extend(rule.split(' '));
    lab.exec(ns, &args);
}

fn edge_transport(sock: &Path) -> Option<String> {
    let f = control(sock, json!({"cmd": "funnel_status"}));
    let e = &f["funnel"]["edges"][0];
    (e["connected"] == true).then(|| e["transport"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_node_behind_a_udp_blocking_proxy_network_publishes_over_tcp_and_moves_back_to_quic() {
    if !netns::available("proxy lab", &["tinyproxy"]) {
        return;
    }
    let mut lab = lab();
    let state = lab.path("srv");
    std::fs::create_dir_all(&state).expect("state dir");
    let st = state.display().to_string();
    // The relay.
    let key = format!("{st}/relay.key");
    lab.spawn(
        "srv",
        "relay.log",
        &[
            &bin("warren-relay").display().to_string(),
            "--dev",
            "--state-dir",
            &format!("{st}/relay"),
            "--key-file",
            &key,
            "--hostname",
            "relay1.lab",
            "--listen",
            "10.77.0.1:8443",
            "--stun-listen",
            "10.77.0.1:3478",
            "--admin-listen",
            "127.0.0.1:9090",
        ],
    );
    wait_for(Duration::from_secs(15), || lab.log("relay.log").contains("relay listening"), || lab.log("relay.log"));
    // The edge.
    let edge_conf = lab.path("edge.toml");
    std::fs::write(
        &edge_conf,
        format!(
            "funnel_domain = \"funnel.test\"\nhostname = \"edge.lab\"\nstate_dir = \"{st}/edge\"\npublic_listen = [\"10.77.0.1:443\"]\ntunnel_listen = \"10.77.0.1:7443\"\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n"
        ),
    )
    .expect("edge config");
    let edge_conf = edge_conf.display().to_string();
    lab.spawn("srv", "edge.log", &[&bin("warren-edge").display().to_string(), "--config", &edge_conf]);
    wait_for(Duration::from_secs(15), || lab.log("edge.log").contains("edge listening"), || lab.log("edge.log"));
    // The proxy.
    let proxy_conf = lab.path("tinyproxy.conf");
    std::fs::write(
        &proxy_conf,
        "Port 8888\nListen 10.77.0.1\nTimeout 600\nMaxClients 50\nAllow 10.77.0.0/24\nConnectPort 443\nConnectPort 8443\nLogLevel Connect\n",
    )
    .expect("proxy config");
    let proxy_conf = proxy_conf.display().to_string();
    lab.spawn("srv", "tinyproxy.log", &["tinyproxy", "-d", "-c", &proxy_conf]);
    wait_for(
        Duration::from_secs(10),
        || lab.output("srv", &["bash", "-c", "exec 3<>/dev/tcp/10.77.0.1/8888"]).status.success(),
        || format!("tinyproxy did not start: {}", lab.log("tinyproxy.log")),
    );
    // The site the node publishes: a file, so nothing else needs a port in the node's namespace.
    let site = lab.path("site");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("index.html"), "published through a proxy\n").expect("page");
    let map = json!({"Regions": {"1": {"RegionID": 1, "RegionCode": "r1", "Nodes": [
        {"Name": "1a", "HostName": "relay1.lab", "IPv4": "10.77.0.1", "DERPPort": 8443, "STUNPort": 3478}]}}});
    std::fs::write(lab.path("map.json"), map.to_string()).expect("map");
    let sock = lab.path("node.sock");
    let node_conf = lab.path("node.toml");
    std::fs::write(
        &node_conf,
        format!(
            "region_map = \"map.json\"\nca_file = \"srv/relay/dev-ca.pem\"\nkey_file = \"node.key\"\ncontrol = \"node.sock\"\nproxy = \"http://10.77.0.1:8888\"\n\
             [funnel]\nedges = [\"10.77.0.1:7443\"]\nedge_name = \"edge.lab\"\nedge_ca = \"srv/edge/dev-ca.pem\"\ntoken = \"{TOKEN}\"\nname = \"web\"\n\
             quic_fallback_after = \"2s\"\nquic_retry = \"2s\"\n[admin]\nenabled = true\nlisten = \"127.0.0.1:9092\"\n\
             [[service]]\ntarget = \"./site\"\n"
        ),
    )
    .expect("node config");
    let node_conf = node_conf.display().to_string();
    let started = Instant::now();
    lab.spawn("node", "node.log", &[env!("CARGO_BIN_EXE_warren"), "up", "--config", &node_conf]);
    // The relay, through the proxy.
    wait_for(
        Duration::from_secs(30),
        || control(&sock, json!({"cmd": "status"}))["status"]["relay_connected"] == true,
        || format!("no relay through the proxy: {}\n{}", lab.log("node.log"), lab.log("tinyproxy.log")),
    );
    // The funnel, over TCP through the proxy.
    wait_for(
        Duration::from_secs(30),
        || edge_transport(&sock).as_deref() == Some("tcp"),
        || format!("no TCP tunnel: {}\n{}", control(&sock, json!({"cmd": "funnel_status"})), lab.log("node.log")),
    );
    let fell_back = started.elapsed();
    let funnel = control(&sock, json!({"cmd": "funnel_status"}));
    assert_eq!(funnel["funnel"]["edges"][0]["proxy"], "http://10.77.0.1:8888", "{funnel}");
    let curl = |lab: &Netns| {
        let out = lab.output(
            "srv",
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                &format!("{st}/edge/dev-ca.pem"),
                "--resolve",
                "web.funnel.test:443:10.77.0.1",
                "https://web.funnel.test/",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&lab), "published through a proxy\n");
    // The node's own metrics say it is on the TCP tunnel (gauges refresh every second).
    let tcp_gauge = |lab: &Netns| {
        let out = lab.output("node", &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9092/metrics"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("node_funnel_edges_tcp "))
            .map(str::to_owned)
    };
    wait_for(
        Duration::from_secs(10),
        || tcp_gauge(&lab).as_deref() == Some("node_funnel_edges_tcp 1"),
        || format!("metrics: {:?}", tcp_gauge(&lab)),
    );
    // The proxy was the only way: the node's namespace cannot open the edge's port itself.
    let direct = lab.output("node", &["bash", "-c", "exec 3<>/dev/tcp/10.77.0.1/443"]);
    assert!(!direct.status.success(), "the node's network lets TCP past the proxy");
    // UDP passes again: back to QUIC.
    iptables(&lab, "node", "-D OUTPUT -p udp -j DROP");
    iptables(&lab, "node", "-I OUTPUT 1 -p udp -d 10.77.0.1 --dport 7443 -j ACCEPT");
    let moved = wait_for(
        Duration::from_secs(30),
        || edge_transport(&sock).as_deref() == Some("quic"),
        || format!("not back on QUIC: {}\n{}", control(&sock, json!({"cmd": "funnel_status"})), lab.log("node.log")),
    );
    assert_eq!(curl(&lab), "published through a proxy\n");
    wait_for(
        Duration::from_secs(10),
        || tcp_gauge(&lab).as_deref() == Some("node_funnel_edges_tcp 0"),
        || format!("metrics: {:?}", tcp_gauge(&lab)),
    );
    eprintln!(
        "figure: node start to funnel on TCP via tinyproxy {:.2} s (quic_fallback_after 2 s); UDP allowed to back on QUIC {:.2} s (quic_retry 2 s, jittered 1-3 s)",
        fell_back.as_secs_f64(),
        moved.as_secs_f64()
    );
}
