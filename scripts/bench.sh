#!/usr/bin/env bash
# Benchmarks with their baselines in one run, all on 127.0.0.1 (release build):
#   relay: closed loop, a paced sweep up to 0.1 % loss and on to 4x that rate (goodput under
#          overload), p99 at half that load, bulk vs a plain
#          TCP forwarder (socat), idle RSS per client;
#   edge:  funnel vs the origin directly vs Caddy as a TLS reverse proxy (HTTP/1.1 and HTTP/2),
#          and the funnel's TCP tunnel vs its QUIC tunnel.
# Figures are for reading as ratios within one run; the machine is shared and noisy.
# Usage: scripts/bench.sh [--quick] [--idle N] [--bin DIR] [--only relay|edge]
#   --bin DIR   run the binaries in DIR (warren-relay, warren-edge, warren, warren-loadtest)
#               instead of building: two runs with the same harness compare two builds
#   (needs nginx, caddy, socat; installs them as root)
# Bulk transfers through the funnel against Caddy: scripts/bench-bulk.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=5
IDLE=10000
BIN=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) SECONDS_PER=2; IDLE=2000 ;;
        --idle) IDLE="$2"; shift ;;
        --bin) BIN="$(cd "$2" && pwd)"; shift ;;
        --only) ONLY="$2"; shift ;;
        *) echo "unknown option $1" >&2; exit 64 ;;
    esac
    shift
done
TOOLS=(nginx:nginx-light caddy:caddy socat:socat)
source scripts/bench-common.sh
L=$bin/warren-loadtest

echo "=== relay (DERP over TLS, 1200-byte packets unless noted)"
$bin/warren-relay --dev --state-dir "$state/relay" --listen 127.0.0.1:18443 --stun-listen 127.0.0.1:13478 \
    --admin-listen 127.0.0.1:19090 2>"$state/relay.log" & pids+=($!)
relay_pid=$!
wait_port 18443
R=(--relay https://localhost:18443 --ca "$state/relay/dev-ca.pem")
if [ "$ONLY" != edge ]; then
$L relay "${R[@]}" --pairs 4 --window 64 --seconds "$SECONDS_PER" --source-ips 8
echo "--- paced sweep to the loss-free rate, then overload: 2x, 3x and 4x that rate offered"
$L relay "${R[@]}" --pairs 4 --sweep-from 25000 --max-loss 0.1 --overload 4 --probe-rate 1000 --seconds "$SECONDS_PER" --source-ips 8
socat TCP-LISTEN:19998,fork,reuseaddr TCP:127.0.0.1:19999 & pids+=($!)
wait_port 19998
echo "--- latency at 150 000 packets/s (about half the limit): relay vs the harness's own floor"
echo "    (the same paced, timed messages over direct TCP) and through socat"
$L relay "${R[@]}" --pairs 4 --rate 37500 --seconds "$SECONDS_PER" --source-ips 8
$L tcp --via 127.0.0.1:19997 --sink-port 19997 --pairs 4 --rate 37500 --seconds "$SECONDS_PER"
$L tcp --via 127.0.0.1:19998 --sink-port 19999 --pairs 4 --rate 37500 --seconds "$SECONDS_PER"
echo "--- bulk: 64 000-byte packets through the relay vs the same bytes through socat"
$L tcp --via 127.0.0.1:19998 --sink-port 19999 --pairs 4 --seconds "$SECONDS_PER"
$L relay "${R[@]}" --pairs 4 --window 16 --size 64000 --seconds "$SECONDS_PER"
echo "--- idle clients"
$L idle "${R[@]}" --pid "$relay_pid" --clients "$IDLE" --source-ips 16
fi
[ "$ONLY" = relay ] && exit 0

echo "=== edge (funnel) vs origin directly vs Caddy"
mkdir -p "$state/www" "$state/nginx"
chmod 755 "$state" "$state/www"   # nginx workers run unprivileged
head -c 1024 /dev/urandom | base64 -w0 > "$state/www/index.html"
cat > "$state/nginx.conf" <<EOF
worker_processes 1;
pid $state/nginx.pid;
error_log $state/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $state/nginx; proxy_temp_path $state/nginx; fastcgi_temp_path $state/nginx;
  uwsgi_temp_path $state/nginx; scgi_temp_path $state/nginx;
  server { listen 127.0.0.1:18781; root $state/www; }
}
EOF
nginx -c "$state/nginx.conf"
cat > "$state/Caddyfile" <<EOF
{
	admin off
	skip_install_trust
	auto_https disable_redirects
}
https://demo.funnel.localhost:19443 {
	tls internal
	reverse_proxy 127.0.0.1:18781
}
EOF
XDG_DATA_HOME="$state/caddy" XDG_CONFIG_HOME="$state/caddy" caddy run --config "$state/Caddyfile" --adapter caddyfile \
    >"$state/caddy.log" 2>&1 & pids+=($!)
$bin/warren-edge --dev --state-dir "$state/edge" --public-listen 127.0.0.1:10443 --tunnel-listen 127.0.0.1:17443 \
    --admin-listen 127.0.0.1:19190 2>"$state/edge.log" & pids+=($!)
wait_port 10443
cat > "$state/map.json" <<JSON
{"Regions": {"1": {"RegionID": 1, "RegionCode": "bench", "Nodes": [
  {"Name": "1a", "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 18443, "STUNPort": 13478}]}}}
JSON
$bin/warren up --region-map "$state/map.json" --ca "$state/relay/dev-ca.pem" --edge 127.0.0.1:17443 \
    --edge-name localhost --edge-ca "$state/edge/dev-ca.pem" --funnel-token dev --name demo \
    --key-file "$state/node.key" --control "$state/node.sock" 2>"$state/node.log" & pids+=($!)
for _ in $(seq 100); do [ -S "$state/node.sock" ] && break; sleep 0.1; done
# Builds with `warren funnel --bg` keep the service saved and return; older ones always returned.
bg=$($bin/warren funnel --help | grep -q -- '--bg' && echo --bg || true)
$bin/warren funnel $bg 18781 --https-port 10443 --control "$state/node.sock" >/dev/null
wait_port 19443
caddy_root="$state/caddy/caddy/pki/authorities/local/root.crt"
for _ in $(seq 100); do [ -s "$caddy_root" ] && break; sleep 0.1; done
# One bundle trusting both the edge's dev CA and Caddy's internal CA.
cat "$state/edge/dev-ca.pem" "$caddy_root" > "$state/cas.pem"
E=(--url https://demo.funnel.localhost:10443/index.html --ca "$state/cas.pem"
   --resolve demo.funnel.localhost:10443:127.0.0.1 --resolve demo.funnel.localhost:19443:127.0.0.1
   --baseline https://demo.funnel.localhost:19443/index.html --baseline http://127.0.0.1:18781/index.html
   --seconds "$SECONDS_PER")
echo "--- HTTP/1.1 keep-alive, 16 connections, closed loop"
$L edge "${E[@]}" --connections 16
echo "--- HTTP/2, 4 connections x 8 streams, closed loop"
$L edge "${E[@]}" --connections 4 --http2 --streams 8
echo "--- one connection, one request at a time (added latency)"
$L edge "${E[@]}" --connections 1
# The TCP tunnel (HTTP/2 over TLS on the edge's public port) against the QUIC tunnel: a
# second node publishing the same origin with --transport tcp, its URL first, the QUIC
# node's as the baseline.
if $bin/warren up --help | grep -q -- '--transport'; then
    mkdir -p "$state/tcp"   # its own services.json (it sits beside the key)
    $bin/warren up --region-map "$state/map.json" --ca "$state/relay/dev-ca.pem" --edge 127.0.0.1:17443 \
        --edge-name localhost --edge-ca "$state/edge/dev-ca.pem" --funnel-token dev --name demotcp \
        --transport tcp --edge-tcp-port 10443 \
        --key-file "$state/tcp/node.key" --control "$state/node-tcp.sock" 2>"$state/node-tcp.log" & pids+=($!)
    for _ in $(seq 100); do [ -S "$state/node-tcp.sock" ] && break; sleep 0.1; done
    $bin/warren funnel --bg 18781 --https-port 10443 --control "$state/node-tcp.sock" >/dev/null
    T=(--url https://demotcp.funnel.localhost:10443/index.html --ca "$state/cas.pem"
       --resolve demotcp.funnel.localhost:10443:127.0.0.1 --resolve demo.funnel.localhost:10443:127.0.0.1
       --baseline https://demo.funnel.localhost:10443/index.html --seconds "$SECONDS_PER")
    echo "--- tunnel transports: TCP (url) vs QUIC (baseline), HTTP/1.1, 16 connections"
    $L edge "${T[@]}" --connections 16
    echo "--- tunnel transports: TCP (url) vs QUIC (baseline), one connection"
    $L edge "${T[@]}" --connections 1
    echo "--- tunnel transports: TCP (url) vs QUIC (baseline), HTTP/2, 4 connections x 8 streams"
    $L edge "${T[@]}" --connections 4 --http2 --streams 8
fi
nginx -c "$state/nginx.conf" -s stop 2>/dev/null || true
