#!/usr/bin/env bash
# Local demo: a relay in dev mode (TLS from a throwaway local CA) and two nodes that log in,
# ping the relay and exchange packets through it. Builds everything first.
#
# Ports (override with env): DERP/HTTPS 8443, STUN 3478, admin 9090, all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
DERP_PORT=${DERP_PORT:-8443}
STUN_PORT=${STUN_PORT:-3478}
ADMIN_PORT=${ADMIN_PORT:-9090}

echo "==> building (release)"
cargo build --release --locked -p warren-relay -p warren

state=$(mktemp -d)
relay_log="$state/relay.log"
./target/release/warren-relay --dev --state-dir "$state" \
    --listen "127.0.0.1:$DERP_PORT" --stun-listen "127.0.0.1:$STUN_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    2>"$relay_log" &
relay_pid=$!
cleanup() {
    kill -TERM "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    echo "==> relay log"
    sed 's/^/    /' "$relay_log"
    rm -rf "$state"
}
trap cleanup EXIT

for _ in $(seq 50); do
    [ -f "$state/dev-ca.pem" ] && grep -q "relay listening" "$relay_log" && break
    kill -0 "$relay_pid" 2>/dev/null || { echo "relay failed to start"; exit 1; }
    sleep 0.1
done

echo "==> relay up; dev CA at $state/dev-ca.pem"
echo "==> two nodes over the DERP upgrade"
./target/release/warren relay-check --relay "https://localhost:$DERP_PORT" --ca "$state/dev-ca.pem"
echo "==> two nodes over WebSocket"
./target/release/warren relay-check --relay "https://localhost:$DERP_PORT" --ca "$state/dev-ca.pem" --websocket --packets 5000
echo "==> relay metrics (excerpt)"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null | grep -E '^relay_(packets_forwarded|bytes_forwarded|connections)_total' || true
echo "==> stopping the relay with SIGTERM (drain)"
