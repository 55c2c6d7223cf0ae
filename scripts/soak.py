#!/usr/bin/env python3
"""A region and an edge cluster under churn and random kills, for a set time.

Starts Redis, three meshed relays, two clustered edges, an origin and a node publishing it;
runs `warren-loadtest soak` against them (stable pairs across the relays, churning clients,
funnel visitors); every --kill-every seconds SIGKILLs or SIGTERMs (drains) a random relay (one
that has clients: moved clients stay where they went) or edge and starts it again. Samples
every process's RSS and open files, Redis's keys and the relays' drop counters. Writes a JSON report (figures per minute, events, checks) and, when
matplotlib is there, a PNG; exits 1 if a check failed.

Checks: no packet lost between peers outside the switch window of a moved client; visitor
requests fail only in flight on an edge just SIGKILLed (none on a drained one); RSS and open
files of each process incarnation that lived long enough grow less than --max-growth after
warm-up; Redis keys stay bounded.

Use scripts/soak.sh, which builds the binaries and installs what is missing.
"""
import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MESH_KEY = "soak-mesh-key-0123456789abcdef"
CLUSTER_KEY = "soak-cluster-key-0123456789abcdef"
TOKEN = "soak-node-token"


def free_port(kind=socket.SOCK_STREAM, ip="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait(what, check, limit=30.0):
    start = time.time()
    while time.time() - start < limit:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"soak: timed out waiting for {what}")


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode(errors="replace")


def tcp_open(ip, port):
    with socket.create_connection((ip, port), timeout=0.5):
        return True


class Proc:
    """A server the soak starts, kills and starts again (same command, same ports)."""

    def __init__(self, name, cmd, env, log, ready):
        self.name, self.cmd, self.env, self.log, self.ready = name, cmd, env, log, ready
        self.p = None
        self.incarnation = 0

    def start(self):
        logf = open(self.log, "ab")
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=logf)
        self.incarnation += 1
        wait(f"{self.name} ready", self.ready)

    def stop(self, sig, grace=20.0):
        if self.p is None:
            return
        self.p.send_signal(sig)
        try:
            self.p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.p = None

    @property
    def pid(self):
        return self.p.pid if self.p and self.p.poll() is None else None


def proc_sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, StopIteration):
        return None


def redis_keys(port):
    """Keys by prefix (the part before the first ':')."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"KEYS *\r\n")
        data = b""
        s.settimeout(2)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            lines = data.split(b"\r\n")
            if lines and lines[0].startswith(b"*"):
                n = int(lines[0][1:])
                if len(lines) >= 1 + 2 * n + 1:
                    break
    lines = data.split(b"\r\n")
    n = int(lines[0][1:]) if lines and lines[0].startswith(b"*") else 0
    keys = [lines[2 + 2 * i].decode(errors="replace") for i in range(n)]
    by = {}
    for k in keys:
        p = k.split(":", 1)[0]
        by[p] = by.get(p, 0) + 1
    return len(keys), by


def relay_metrics(admin_port):
    """The relay's drops by reason, and its logged-in clients."""
    try:
        _, text = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    except OSError:
        return None, None
    drops = {}
    for m in re.finditer(r'^relay_packets_dropped_total\{reason="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M):
        drops[m.group(1)] = float(m.group(2))
    m = re.search(r"^relay_clients_connected ([0-9.e+]+)$", text, re.M)
    return drops, (int(float(m.group(1))) if m else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="directory with warren-relay, warren-edge, warren, warren-loadtest")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--kill-every", type=float, default=180, help="seconds between kills")
    ap.add_argument("--down-for", type=float, default=3, help="seconds a killed server stays down")
    ap.add_argument("--pairs", type=int, default=120)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--churn", type=float, default=20)
    ap.add_argument("--visit-rate", type=float, default=10)
    ap.add_argument("--interval", default="10s")
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=120, help="seconds before growth is measured")
    ap.add_argument("--max-growth", type=float, default=5.0, help="percent")
    ap.add_argument("--judge-growth", action="store_true", help="fail on RSS/fd growth (the full run)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default="soak-report.json")
    ap.add_argument("--png", default="soak-report.png")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    b = lambda n: os.path.join(a.bin, n)
    tmp = tempfile.mkdtemp(prefix="warren-soak-")
    rdir, edir = os.path.join(tmp, "relays"), os.path.join(tmp, "edges")
    os.makedirs(rdir)
    os.makedirs(edir)
    env = dict(os.environ, WARREN_MESH_KEY=MESH_KEY, WARREN_EDGE_CLUSTER_KEY=CLUSTER_KEY, RUST_LOG="info")
    procs = {}
    fixed = {}
    keep = bool(os.environ.get("KEEP_SOAK_STATE"))
    try:
        # Redis.
        rport = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp], stdout=open(os.path.join(tmp, "redis.log"), "wb"), stderr=subprocess.DEVNULL)
        fixed["redis"] = redis
        wait("redis", lambda: redis_keys(rport) is not None)

        # Three meshed relays; the first creates the shared dev CA.
        rports = [(free_port(), free_port(socket.SOCK_DGRAM), free_port()) for _ in range(3)]
        peers = ", ".join(f'"https://localhost:{d}"' for d, _, _ in rports)
        for i, (derp, stun, admin) in enumerate(rports):
            cfg = os.path.join(rdir, f"relay{i}.toml")
            with open(cfg, "w") as f:
                f.write(f'listen = "127.0.0.1:{derp}"\nhostname = "localhost"\nstate_dir = "{rdir}"\n'
                        f'key_file = "{rdir}/relay{i}.key"\n[tls]\nmode = "dev"\n[stun]\nlisten = "127.0.0.1:{stun}"\n'
                        f'[admin]\nlisten = "127.0.0.1:{admin}"\n[shutdown]\ngrace_period = "3s"\nreconnect_in = "100ms"\n'
                        f'[mesh]\npeers = [{peers}]\nca_file = "{rdir}/dev-ca.pem"\n')
            ready = (lambda d=derp: tcp_open("127.0.0.1", d) and os.path.exists(f"{rdir}/dev-ca.pem"))
            p = Proc(f"relay{i}", [b("warren-relay"), "--config", cfg], env, os.path.join(tmp, f"relay{i}.log"), ready)
            p.start()
            procs[p.name] = p
        meshed = lambda i: http_get(f"http://127.0.0.1:{rports[i][2]}/metrics")[1]
        wait("the mesh", lambda: all(re.search(r"^relay_mesh_peers 2$", meshed(i), re.M) for i in range(3)))

        # Two clustered edges on their own loopback addresses, one public port.
        public = free_port(ip="127.0.0.2")
        eaddrs = []
        for i, ip in enumerate(["127.0.0.2", "127.0.0.3"]):
            tunnel, admin = free_port(socket.SOCK_DGRAM, ip), free_port(ip=ip)
            cfg = os.path.join(edir, f"edge{i}.toml")
            with open(cfg, "w") as f:
                f.write(f'funnel_domain = "funnel.test"\npublic_listen = ["{ip}:{public}"]\ntunnel_listen = "{ip}:{tunnel}"\n'
                        f'state_dir = "{edir}"\n[tls]\nmode = "dev"\n[admin]\nlisten = "{ip}:{admin}"\n'
                        f'[shutdown]\ngrace_period = "3s"\n'
                        f'[cluster]\nredis_url = "redis://127.0.0.1:{rport}/"\nadvertise = "{ip}:{tunnel}"\nroute_ttl = "15s"\n'
                        f'[[tokens]]\ntoken = "{TOKEN}"\nnames = ["*"]\n')
            ready = (lambda ip=ip, admin=admin: http_get(f"http://{ip}:{admin}/readyz")[0] == 200)
            p = Proc(f"edge{i}", [b("warren-edge"), "--config", cfg], env, os.path.join(tmp, f"edge{i}.log"), ready)
            p.start()
            procs[p.name] = p
            eaddrs.append((ip, tunnel))

        # The origin and the node publishing it through both edges.
        oport = free_port()
        origin = subprocess.Popen([b("warren-loadtest"), "origin", "--listen", f"127.0.0.1:{oport}"],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "origin.log"), "wb"))
        fixed["origin"] = origin
        wait("origin", lambda: tcp_open("127.0.0.1", oport))
        regions = {"Regions": {"1": {"RegionID": 1, "RegionCode": "soak", "Nodes": [
            {"Name": f"1{i}", "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": d, "STUNPort": s}
            for i, (d, s, _) in enumerate(rports)]}}}
        with open(os.path.join(tmp, "map.json"), "w") as f:
            json.dump(regions, f)
        sock = os.path.join(tmp, "node.sock")
        edges = ", ".join(f'"{ip}:{t}"' for ip, t in eaddrs)
        with open(os.path.join(tmp, "node.toml"), "w") as f:
            f.write(f'region_map = "{tmp}/map.json"\nca_file = "{rdir}/dev-ca.pem"\nkey_file = "{tmp}/node.key"\n'
                    f'control = "{sock}"\nudp = "127.0.0.1:0"\n[funnel]\nedges = [{edges}]\nedge_name = "localhost"\n'
                    f'edge_ca = "{edir}/dev-ca.pem"\ntoken = "{TOKEN}"\nname = "soak"\ntransport = "quic"\n'
                    f'dead_after = "2s"\n[[service]]\nport = {public}\ntarget = "http://127.0.0.1:{oport}"\n')
        node = subprocess.Popen([b("warren"), "up", "--config", os.path.join(tmp, "node.toml")],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "node.log"), "wb"), env=env)
        fixed["node"] = node
        url = f"https://soak.funnel.test:{public}/bytes/4096"

        def funnel_up(ip):
            r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                                f"{edir}/dev-ca.pem", "--resolve", f"soak.funnel.test:{public}:{ip}", url],
                               capture_output=True, text=True, timeout=5)
            return r.stdout == "200"
        wait("the funnel on both edges", lambda: funnel_up("127.0.0.2") and funnel_up("127.0.0.3"), 60)

        # The clients.
        seconds = a.minutes * 60
        cmd = [b("warren-loadtest"), "soak", "--ca", f"{rdir}/dev-ca.pem", "--pairs", str(a.pairs),
               "--rate", str(a.rate), "--churn", str(a.churn), "--url", url, "--edge-ca", f"{edir}/dev-ca.pem",
               "--visit-rate", str(a.visit_rate), "--duration", f"{int(seconds)}s", "--interval", a.interval]
        for d, _, _ in rports:
            cmd += ["--relay", f"https://localhost:{d}"]
        for ip, _ in eaddrs:
            cmd += ["--edge", f"{ip}:{public}"]
        t0 = time.time()
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "loadtest.log"), "wb"),
                                text=True)
        fixed["loadtest"] = load
        ticks, total = [], {}

        def read():
            for line in load.stdout:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if "total" in j:
                    total.update(j["total"])
                else:
                    j["wall"] = time.time() - t0
                    ticks.append(j)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        events, samples = [], []
        next_kill = t0 + a.kill_every
        next_sample = t0
        while load.poll() is None:
            now = time.time()
            if now >= next_sample:
                next_sample += a.sample_every
                s = {"t": now - t0, "procs": {}, "drops": {}}
                for name, p in procs.items():
                    if p.pid and (x := proc_sample(p.pid)):
                        s["procs"][name] = {"rss_kib": x[0], "fds": x[1], "incarnation": p.incarnation}
                    if name.startswith("relay") and p.pid and name in s["procs"]:
                        s["drops"][name], s["procs"][name]["clients"] = relay_metrics(rports[int(name[5:])][2])
                for name, p in fixed.items():
                    if p.poll() is None and (x := proc_sample(p.pid)):
                        s["procs"][name] = {"rss_kib": x[0], "fds": x[1], "incarnation": 1}
                try:
                    s["redis_keys"], s["redis_by_prefix"] = redis_keys(rport)
                except OSError:
                    s["redis_keys"] = None
                samples.append(s)
            if now >= next_kill and now - t0 < seconds - 20:
                next_kill += a.kill_every
                # A relay its clients have all left (they stay where they moved) would die
                # unnoticed: relays with clients, and the edges, are the candidates.
                last = samples[-1]["procs"] if samples else {}
                names = [n for n in sorted(procs) if not n.startswith("relay") or last.get(n, {}).get("clients")]
                name = rng.choice(names or sorted(procs))
                how = rng.choice(["SIGKILL", "SIGTERM"])
                p = procs[name]
                e = {"t": now - t0, "target": name, "signal": how}
                p.stop(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
                e["stopped"] = time.time() - t0
                time.sleep(a.down_for)
                p.start()
                e["restarted"] = time.time() - t0
                events.append(e)
                print(f"soak: {e['t']:.0f} s {how} {name}, back after {e['restarted'] - e['t']:.1f} s", flush=True)
            time.sleep(0.2)
        reader.join(timeout=10)
        report = build_report(a, ticks, total, events, samples)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        plot(a.png, ticks, samples, events)
        print_summary(report)
        if report["failed"]:
            keep = True
            print(f"soak: FAILED (logs kept in {tmp})", file=sys.stderr)
            return 1
        return 0
    finally:
        for p in procs.values():
            p.stop(signal.SIGTERM, grace=10)
        for p in fixed.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not keep:
            subprocess.run(["rm", "-rf", tmp])


# The harness keeps a ledger entry per packet it sent: its growth is by design, not judged.
NOT_JUDGED = {"loadtest"}


def growth(samples, warmup, seconds):
    """Per process incarnation that lived past warm-up and another quarter of the run: RSS and
    fds from a reference sample to its last one, and the growth in percent. A relay's memory and
    files follow its logged-in clients, which move when siblings die: its reference is the first
    sample after warm-up with the same number of clients as at the end (within 5 %), and a
    relay whose count never came back is not judged."""
    lives = {}
    for s in samples:
        for name, x in s["procs"].items():
            lives.setdefault((name, x["incarnation"]), []).append((s["t"], x["rss_kib"], x["fds"], x.get("clients")))
    out = []
    span = max(60.0, seconds / 4)
    for (name, inc), pts in sorted(lives.items()):
        if name in NOT_JUDGED:
            continue
        born, last = pts[0][0], pts[-1]
        same = lambda c: last[3] is None or c is not None and abs(c - last[3]) <= max(2, 0.05 * last[3])
        ref = next((p for p in pts if p[0] >= born + warmup and last[0] - p[0] >= span and same(p[3])), None)
        if ref is None:
            continue
        (_, r0, f0, c0), (_, r1, f1, c1) = ref, last
        out.append({"process": name, "incarnation": inc, "from_s": ref[0], "to_s": last[0], "clients": [c0, c1],
                    "rss_kib": [r0, r1], "rss_growth_pct": round(100.0 * (r1 - r0) / max(r0, 1), 2),
                    "fds": [f0, f1], "fd_growth_pct": round(100.0 * (f1 - f0) / max(f0, 1), 2)})
    return out


def build_report(a, ticks, total, events, samples):
    seconds = a.minutes * 60
    minutes = []
    for m in range(int(seconds // 60) + 1):
        ts = [t for t in ticks if m * 60 <= t["t"] < (m + 1) * 60]
        ss = [s for s in samples if m * 60 <= s["t"] < (m + 1) * 60]
        if not ts and not ss:
            continue
        row = {"minute": m}
        for k in ["sent", "delivered", "lost", "switch_delivered", "switch_lost", "duplicates", "switches",
                  "churn_logins", "churn_failed", "churn_sent", "churn_received", "visits_ok", "websockets_ok",
                  "visits_failover"]:
            row[k] = sum(t.get(k, 0) for t in ts)
        row["visits_failed"] = sum(len(t.get("visit_failures", [])) for t in ts)
        row["p99_us_max"] = max((t["latency"]["p99_us"] for t in ts if t["latency"]["count"]), default=None)
        row["rss_kib"] = {n: max(s["procs"][n]["rss_kib"] for s in ss if n in s["procs"])
                          for n in sorted({n for s in ss for n in s["procs"]})}
        row["fds"] = {n: max(s["procs"][n]["fds"] for s in ss if n in s["procs"])
                      for n in sorted({n for s in ss for n in s["procs"]})}
        row["redis_keys_max"] = max((s["redis_keys"] for s in ss if s.get("redis_keys") is not None), default=None)
        minutes.append(row)
    # Visitor failures: each must be in flight on an edge SIGKILLed just before.
    failures = [f for t in ticks for f in t.get("visit_failures", [])]
    unexplained = []
    for f in failures:
        m = re.match(r"edge (\d+) at ([0-9.]+) s", f)
        edge, at = (f"edge{m.group(1)}", float(m.group(2))) if m else (None, None)
        if not any(e["target"] == edge and e["signal"] == "SIGKILL" and e["t"] - 1 <= at <= e["stopped"] + 11
                   for e in events):
            unexplained.append(f)
    keys = [s["redis_keys"] for s in samples if s.get("redis_keys") is not None]
    warm_keys = [s["redis_keys"] for s in samples if s.get("redis_keys") is not None and s["t"] >= a.warmup]
    grow = growth(samples, a.warmup, seconds)
    checks = {
        "no packet lost outside switch windows": total.get("lost", 0) == 0,
        "packets were judged": total.get("delivered", 0) > 0,
        "visitor failures only in flight on a SIGKILLed edge": not unexplained,
        "visitors were answered": total.get("visits_ok", 0) > 0,
        "WebSocket sessions echoed": total.get("websockets_ok", 0) > 0,
        "redis keys bounded": not warm_keys or max(warm_keys) <= 2 * min(warm_keys) + 20,
    }
    growth_ok = all(g["rss_growth_pct"] < a.max_growth and g["fd_growth_pct"] < a.max_growth for g in grow)
    if a.judge_growth:
        checks["RSS and fds flat after warm-up"] = growth_ok and bool(grow)
    report = {"minutes_run": a.minutes, "settings": vars(a), "total": total, "events": events,
              "per_minute": minutes, "growth": grow, "growth_within_limit": growth_ok,
              "redis_keys": {"min": min(keys, default=None), "max": max(keys, default=None)},
              "relay_drops_last": samples[-1]["drops"] if samples else {},
              "visit_failures": failures, "unexplained_visit_failures": unexplained,
              "lost_samples": [x for t in ticks for x in t.get("lost_samples", [])][:50], "ticks": ticks,
              "samples": samples,
              "checks": checks}
    report["failed"] = [k for k, v in checks.items() if not v]
    return report


def plot(path, ticks, samples, events):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib missing, no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    names = sorted({n for s in samples for n in s["procs"]})
    for n in names:
        pts = [(s["t"] / 60, s["procs"][n]["rss_kib"] / 1024) for s in samples if n in s["procs"]]
        ax[0].plot(*zip(*pts), label=n)
        pts = [(s["t"] / 60, s["procs"][n]["fds"]) for s in samples if n in s["procs"]]
        ax[1].plot(*zip(*pts), label=n)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(fontsize=7, ncol=5)
    ax[1].set_ylabel("open fds")
    tt = [t["t"] / 60 for t in ticks]
    ax[2].plot(tt, [t["lost"] for t in ticks], "r-", label="lost (outside switches)")
    ax[2].plot(tt, [t["switch_lost"] for t in ticks], "y-", label="lost in a switch window")
    ax[2].plot(tt, [len(t.get("visit_failures", [])) for t in ticks], "m-", label="visits failed")
    ax[2].set_ylabel("per interval")
    ax[2].legend(fontsize=7)
    ax[3].plot(tt, [t["latency"]["p99_us"] / 1e3 for t in ticks], label="p99")
    ax[3].plot(tt, [t["latency"]["p50_us"] / 1e3 for t in ticks], label="p50")
    ax[3].set_ylabel("packet latency (ms)")
    ax[3].set_xlabel("minutes")
    ax[3].legend(fontsize=7)
    for e in events:
        for x in ax:
            x.axvline(e["t"] / 60, color="k" if e["signal"] == "SIGKILL" else "g", alpha=0.3, lw=1)
    ax[0].set_title("soak: black lines SIGKILL, green SIGTERM (drain)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_summary(r):
    t = r["total"]
    print(f"soak: {r['minutes_run']} min, {len(r['events'])} kills/drains; packets delivered {t.get('delivered')}, "
          f"lost {t.get('lost')}, in switch windows {t.get('switch_delivered')} delivered / {t.get('switch_lost')} lost; "
          f"churn logins {t.get('churn_logins')} (failed {t.get('churn_failed')}); visits ok {t.get('visits_ok')}, "
          f"WebSocket sessions ok {t.get('websockets_ok')}, "
          f"failed {len(r['visit_failures'])} ({len(r['unexplained_visit_failures'])} unexplained)")
    for g in r["growth"]:
        print(f"  {g['process']}#{g['incarnation']} ({g['from_s']:.0f}-{g['to_s']:.0f} s): RSS {g['rss_kib'][0]} -> "
              f"{g['rss_kib'][1]} KiB ({g['rss_growth_pct']:+.1f} %), fds {g['fds'][0]} -> {g['fds'][1]}"
              + (f", clients {g['clients'][0]} -> {g['clients'][1]}" if g["clients"][1] is not None else ""))
    for k, v in r["checks"].items():
        print(f"  [{'ok' if v else 'FAIL'}] {k}")


if __name__ == "__main__":
    sys.exit(main())
