//! The NAT lab: two nodes, each behind its own NAT, and an "internet" with two relays.
//!
//! ```text
//!  nodeA 10.1.0.2 --- 10.1.0.1 natA 198.18.1.2 --- 198.18.1.1  inet  198.18.2.1 --- 198.18.2.2 natB 10.2.0.1 --- 10.2.0.2 nodeB
//!                                                   relay1 :8443 (DERP) :3478 (STUN), region 1
//!                                                   relay2 :3479 (STUN only), region 2
//! ```
//!
//! Each namespace, process and rule belongs to one test and is removed by a drop guard, also
//! when the test fails. NAT kinds (iptables in the NAT namespace):
//! - full cone: SNAT/DNAT pinning the node's UDP port to the NAT's public address;
//! - port-restricted cone: MASQUERADE (source port kept when free);
//! - symmetric: MASQUERADE --random-fully (a new port per destination).
//!
//! Every NAT drops unsolicited packets to itself, as home routers do.
//!
//! Needs root, iproute2 and iptables: without them the tests skip, unless
//! `WARREN_REQUIRE_NETNS=1` (CI sets it) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{bin, control, wait_for, Netns};
use serde_json::{json, Value};

mod netns;

const NODE_PORT: u16 = 41641;
const PACKETS: u32 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nat {
    FullCone,
    PortRestricted,
    Symmetric,
}

impl Nat {
    fn name(self) -> &'static str {
        match self {
            Nat::FullCone => "full-cone",
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
        }
    }
}

/// The NAT lab: [`Netns`] plus what this lab does with it.
struct Lab {
    net: Netns,
}

impl std::ops::Deref for Lab {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.net
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut Netns {
        &mut self.net
    }
}

impl Lab {
    fn new(a: Nat, b: Nat) -> Lab {
        let lab = Lab { net: Netns::new("wl", &["inet", "natA", "nodeA", "natB", "nodeB"]) };
        lab.link("inet", "toa", "198.18.1.1/24", "natA", "wan", "198.18.1.2/24");
        lab.link("inet", "tob", "198.18.2.1/24", "natB", "wan", "198.18.2.2/24");
        lab.link("natA", "lan", "10.1.0.1/24", "nodeA", "eth0", "10.1.0.2/24");
        lab.link("natB", "lan", "10.2.0.1/24", "nodeB", "eth0", "10.2.0.2/24");
        for (nat, gw) in [("natA", "198.18.1.1"), ("natB", "198.18.2.1")] {
            lab.ip(nat, &["route", "add", "default", "via", gw]);
        }
        lab.ip("nodeA", &["route", "add", "default", "via", "10.1.0.1"]);
        lab.ip("nodeB", &["route", "add", "default", "via", "10.2.0.1"]);
        for n in ["inet", "natA", "natB"] {
            lab.exec(n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        lab.nat("natA", a, "10.1.0.2", "198.18.1.2");
        lab.nat("natB", b, "10.2.0.2", "198.18.2.2");
        lab
    }

    fn nat(&self, ns: &str, kind: Nat, inside: &str, public: &str) {
        let port = NODE_PORT.to_string();
        match kind {
            Nat::FullCone => {
                let to_src = format!("{public}:{port}");
                let to_dst = format!("{inside}:{port}");
                self.exec(
                    ns,
                    &[
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-o",
                        "wan",
                        "-p",
                        "udp",
                        "-s",
                        inside,
                        "--sport",
                        &port,
                        "-j",
                        "SNAT",
                        "--to-source",
                        &to_src,
                    ],
                );
                self.exec(
                    ns,
                    &[
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-i",
                        "wan",
                        "-p",
                        "udp",
                        "--dport",
                        &port,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to_dst,
                    ],
                );
                self.exec(ns, &["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]);
            }
            Nat::PortRestricted => {
                self.exec(ns, &["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"])
            }
            Nat::Symmetric => self.exec(
                ns,
                &["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", "--random-fully"],
            ),
        }
        // Unsolicited packets to the NAT itself are dropped, as home routers do.
        self.exec(
            ns,
            &["iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"],
        );
    }

    /// Two relays sharing one dev CA, and the region map: region 1 is the home relay, region 2
    /// a STUN-only node (a second STUN server tells whether a NAT's mapping varies).
    fn start_relays(&mut self) -> PathBuf {
        let relay = bin("warren-relay");
        let relay = relay.to_str().expect("utf-8 path").to_owned();
        let state = self.path("relays");
        let state = state.to_str().expect("utf-8").to_owned();
        // Each STUN socket is bound to its own address: a UDP server on 0.0.0.0 of this
        // two-armed host would answer from the other arm's address, which NATs (rightly) drop.
        let relays = [
            ("0.0.0.0:8443", "198.18.1.1:3478", "127.0.0.1:9090"),
            ("0.0.0.0:8444", "198.18.2.1:3479", "127.0.0.1:9091"),
        ];
        for (i, (derp, stun, admin)) in relays.into_iter().enumerate() {
            let key = format!("{state}/relay{}.key", i + 1);
            let host = format!("relay{}.lab", i + 1);
            let log = format!("relay{}.log", i + 1);
            self.spawn(
                "inet",
                &log,
                &[
                    &relay,
                    "--dev",
                    "--state-dir",
                    &state,
                    "--key-file",
                    &key,
                    "--hostname",
                    &host,
                    "--listen",
                    derp,
                    "--stun-listen",
                    stun,
                    "--admin-listen",
                    admin,
                ],
            );
            wait_for(
                Duration::from_secs(10),
                || self.log(&log).contains("relay listening"),
                || format!("relay{} did not start: {}", i + 1, self.log(&log)),
            );
        }
        let map = json!({"Regions": {
            "1": {"RegionID": 1, "RegionCode": "r1", "Nodes": [{"Name": "1a", "HostName": "relay1.lab", "IPv4": "198.18.1.1", "DERPPort": 8443, "STUNPort": 3478}]},
            "2": {"RegionID": 2, "RegionCode": "r2", "Nodes": [{"Name": "2s", "HostName": "relay2.lab", "IPv4": "198.18.2.1", "STUNPort": 3479, "STUNOnly": true}]},
        }});
        let path = self.path("map.json");
        std::fs::write(&path, map.to_string()).expect("write map");
        path
    }

    /// Starts `warren up` in `ns`; returns (control socket, public key hex).
    fn start_node(&mut self, ns: &str, who: &str, map: &Path) -> (PathBuf, String) {
        let warren = env!("CARGO_BIN_EXE_warren");
        let key = self.path(&format!("{who}.key"));
        let out = Command::new(warren).args(["key", "--key-file"]).arg(&key).output().expect("warren key");
        let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let control = self.path(&format!("{who}.sock"));
        let (ca, udp) = (self.path("relays/dev-ca.pem"), format!("0.0.0.0:{NODE_PORT}"));
        let args: Vec<String> = vec![
            warren.into(),
            "up".into(),
            "--region-map".into(),
            map.display().to_string(),
            "--ca".into(),
            ca.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            "--udp".into(),
            udp,
            "--control".into(),
            control.display().to_string(),
            "--stun-interval".into(),
            "5".into(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(ns, &format!("{who}.log"), &argv);
        (control, public)
    }
}

fn status(sock: &Path) -> Value {
    control(sock, json!({"cmd": "status"}))["status"].clone()
}

fn peer<'a>(status: &'a Value, key: &str) -> &'a Value {
    status["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["key"] == key)).unwrap_or(&Value::Null)
}

struct Outcome {
    direct: bool,
    time_to_direct_ms: Option<f64>,
    rx_direct: u64,
    rx_relay: u64,
    a_mapping_varies: Option<bool>,
}

/// Starts the lab's relays and nodes, sends `PACKETS` packets from A to B, 100 ms apart, and
/// reports the path they took.
fn exchange(lab: &mut Lab) -> (Outcome, (PathBuf, String), (PathBuf, String)) {
    let map = lab.start_relays();
    let a = lab.start_node("nodeA", "a", &map);
    let b = lab.start_node("nodeB", "b", &map);
    for (sock, who) in [(&a.0, "a"), (&b.0, "b")] {
        wait_for(
            Duration::from_secs(15),
            || {
                let s = status(sock);
                s["relay_connected"] == true
                    && s["endpoints"]
                        .as_array()
                        .is_some_and(|e| e.iter().any(|x| x.as_str().is_some_and(|x| x.starts_with("198.18."))))
            },
            || {
                format!(
                    "node {who} never got a relay and a public endpoint: {}\n{}",
                    status(sock),
                    lab.log(&format!("{who}.log"))
                )
            },
        );
    }
    for i in 0..PACKETS {
        let r = control(&a.0, json!({"cmd": "send", "peer": b.1, "data": format!("packet {i}")}));
        assert_eq!(r["ok"], true, "send: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything sent has arrived (or never will): wait until B's counters stop moving.
    let total =
        |s: &Value| peer(s, &a.1)["rx_direct"].as_u64().unwrap_or(0) + peer(s, &a.1)["rx_relay"].as_u64().unwrap_or(0);
    wait_for(
        Duration::from_secs(5),
        || total(&status(&b.0)) >= u64::from(PACKETS),
        || format!("B got {} of {PACKETS}: {}", total(&status(&b.0)), status(&b.0)),
    );
    let sa = status(&a.0);
    let sb = status(&b.0);
    let pa = peer(&sa, &b.1);
    let pb = peer(&sb, &a.1);
    let outcome = Outcome {
        direct: pa["path"].as_str().is_some_and(|p| p.starts_with("direct")),
        time_to_direct_ms: pa["time_to_direct_ms"].as_f64(),
        rx_direct: pb["rx_direct"].as_u64().unwrap_or(0),
        rx_relay: pb["rx_relay"].as_u64().unwrap_or(0),
        a_mapping_varies: sa["mapping_varies_by_dest"].as_bool(),
    };
    (outcome, a, b)
}

fn report(a: Nat, b: Nat, o: &Outcome) {
    eprintln!(
        "natlab {} <-> {}: path {}, time to direct {:?} ms, B received {} direct / {} relayed of {PACKETS}, A's mapping varies by destination: {:?}",
        a.name(),
        b.name(),
        if o.direct { "direct" } else { "relay" },
        o.time_to_direct_ms.map(|t| t.round()),
        o.rx_direct,
        o.rx_relay,
        o.a_mapping_varies
    );
}

fn case(a: Nat, b: Nat, want_direct: bool) {
    if !netns::available("NAT lab", &[]) {
        return;
    }
    let mut lab = Lab::new(a, b);
    let (o, _, _) = exchange(&mut lab);
    report(a, b, &o);
    assert_eq!(o.rx_direct + o.rx_relay, u64::from(PACKETS), "every packet delivered");
    assert_eq!(o.direct, want_direct, "path for {} <-> {}\nA log:\n{}", a.name(), b.name(), lab.log("a.log"));
    if want_direct {
        assert!(o.rx_direct > 0 && o.time_to_direct_ms.is_some());
    } else {
        assert_eq!(o.rx_direct, 0);
    }
    assert_eq!(o.a_mapping_varies, Some(a == Nat::Symmetric), "hard NAT detection for A ({})", a.name());
}

#[test]
fn cone_to_cone_goes_direct() {
    case(Nat::PortRestricted, Nat::PortRestricted, true);
}

#[test]
fn full_cone_to_symmetric_goes_direct() {
    case(Nat::Symmetric, Nat::FullCone, true);
}

#[test]
fn port_restricted_to_symmetric_stays_on_the_relay() {
    case(Nat::Symmetric, Nat::PortRestricted, false);
}

#[test]
fn symmetric_to_symmetric_stays_on_the_relay() {
    case(Nat::Symmetric, Nat::Symmetric, false);
}

#[test]
fn cut_direct_path_fails_over_to_the_relay_losing_nothing() {
    if !netns::available("NAT lab", &[]) {
        return;
    }
    let mut lab = Lab::new(Nat::PortRestricted, Nat::PortRestricted);
    let (o, a, b) = exchange(&mut lab);
    assert!(o.direct, "direct before the cut");
    // Cut every UDP packet through A's NAT (DERP runs over TCP and survives), sending every
    // 20 ms throughout.
    lab.exec("natA", &["iptables", "-I", "FORWARD", "-p", "udp", "-j", "DROP"]);
    let cut = Instant::now();
    let mut switched = None;
    let mut sent = 0u32;
    while cut.elapsed() < Duration::from_secs(4) {
        let r = control(&a.0, json!({"cmd": "send", "peer": b.1, "data": format!("after the cut {sent}")}));
        assert_eq!(r["ok"], true);
        sent += 1;
        if switched.is_none() && peer(&status(&a.0), &b.1)["path"] == "relay" {
            switched = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let switched = switched.expect("A fell back to the relay");
    let received = |s: &Value| {
        let p = peer(s, &a.1);
        p["rx_direct"].as_u64().unwrap_or(0) + p["rx_relay"].as_u64().unwrap_or(0) - u64::from(PACKETS)
    };
    let all = u64::from(sent);
    wait_for(Duration::from_secs(5), || received(&status(&b.0)) >= all, || format!("B: {}", status(&b.0)));
    let (pa, pb) = (peer(&status(&a.0), &b.1).clone(), peer(&status(&b.0), &a.1).clone());
    eprintln!(
        "natlab failover: relay after {:.0} ms; {} of {sent} packets sent after the cut arrived; A resent {}, B dropped {} copies",
        switched.as_secs_f64() * 1e3,
        received(&status(&b.0)),
        pa["tx_resent"],
        pb["rx_duplicate"]
    );
    assert!(switched < Duration::from_secs(2), "gave the direct path up well before its trust window");
    assert_eq!(received(&status(&b.0)), all, "nothing lost in the switch, nothing delivered twice");
    assert!(pa["tx_resent"].as_u64().unwrap_or(0) > 0, "what the cut path held went over the relay: {pa}");
    assert!(pb["rx_relay"].as_u64().unwrap_or(0) > 0);
}
