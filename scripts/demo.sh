#!/usr/bin/env bash
# Local demo of Warren on embedded defaults, all on 127.0.0.1:
#   a relay (DERP + STUN), an edge (Funnel), and a node that publishes a directory at
#   https://demo.funnel.localhost:10000/ and a text at /hello, which curl then fetches through
#   the edge;
#   plus two fresh nodes exchanging packets through the relay.
# Everything is built first. `scripts/demo.sh --serve` keeps it all running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE=0
[ "${1:-}" = "--serve" ] && SERVE=1

echo "==> building (release)"
cargo build --release --locked -p warren-relay -p warren-edge -p warren
bin=./target/release
state=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -n "${KEEP_STATE:-}" ] || rm -rf "$state"
}
trap cleanup EXIT
wait_log() { # file pattern
    for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1:"; cat "$1"; exit 1
}

echo "==> relay: DERP https://localhost:8443, STUN udp/3478, metrics http://127.0.0.1:9090/metrics"
$bin/warren-relay --dev --state-dir "$state/relay" 2>"$state/relay.log" & pids+=($!)
wait_log "$state/relay.log" "relay listening"
echo "==> edge: public https://*.funnel.localhost:10000, tunnel udp/7443, metrics http://127.0.0.1:9190/metrics"
$bin/warren-edge --dev --state-dir "$state/edge" 2>"$state/edge.log" & pids+=($!)
wait_log "$state/edge.log" "edge listening"

echo "==> a small web page in $state/www"
mkdir -p "$state/www"
echo "<!doctype html><title>Warren demo</title><h1>Hello from a Warren node</h1>" > "$state/www/index.html"

cat > "$state/map.json" <<JSON
{"Regions": {"1": {"RegionID": 1, "RegionCode": "local", "Nodes": [
  {"Name": "1a", "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 8443, "STUNPort": 3478}]}}}
JSON
echo "==> node 'demo': home relay + tunnel to the edge"
$bin/warren up --region-map "$state/map.json" --ca "$state/relay/dev-ca.pem" \
    --edge 127.0.0.1:7443 --edge-name localhost --edge-ca "$state/edge/dev-ca.pem" --funnel-token dev --name demo \
    --key-file "$state/node.key" --control "$state/node.sock" 2>"$state/node.log" & pids+=($!)
wait_log "$state/node.log" "home relay connected"

echo "==> warren funnel --bg --https-port 10000 $state/www"
$bin/warren funnel --bg --https-port 10000 "$state/www" --control "$state/node.sock"
echo "==> warren funnel --bg --https-port 10000 --set-path /hello 'text:Hello through the funnel'"
$bin/warren funnel --bg --https-port 10000 --set-path /hello 'text:Hello through the funnel' --control "$state/node.sock"
echo "==> curl https://demo.funnel.localhost:10000/ and /hello (trusting the edge's dev CA)"
curl -sS --fail --cacert "$state/edge/dev-ca.pem" https://demo.funnel.localhost:10000/
curl -sS --fail --cacert "$state/edge/dev-ca.pem" https://demo.funnel.localhost:10000/hello; echo
echo "==> warren funnel status"
$bin/warren funnel status --control "$state/node.sock"
echo "==> two fresh nodes through the relay"
$bin/warren relay-check --relay https://localhost:8443 --ca "$state/relay/dev-ca.pem" --packets 20000

if [ "$SERVE" = 1 ]; then
    echo
    echo "Running. Open https://demo.funnel.localhost:10000/ (trust $state/edge/dev-ca.pem), Ctrl-C to stop."
    wait "${pids[0]}"
fi
echo "==> stopping everything with SIGTERM (relay and edge drain)"
