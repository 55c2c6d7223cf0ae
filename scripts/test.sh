#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first.
# This is the command README.md names and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# The handshake vector and the interop client are checked against PyNaCl (libsodium); the
# deploy manifests are parsed with PyYAML; gRPC through the funnel is called with grpcio.
if ! python3 -c 'import nacl.public, yaml, grpc' 2>/dev/null; then
    echo "==> installing PyNaCl, PyYAML and grpcio"
    python3 -m pip install --quiet --disable-pip-version-check pynacl pyyaml grpcio
fi
# The NAT lab (node-client/tests/natlab.rs) builds network namespaces with iproute2 and iptables;
# the ACME tests (edge/server/tests/acme.rs) run Debian's pebble test CA; the edge cluster tests
# (edge/server/tests/cluster.rs) start their own Debian redis-server on a free loopback port;
# the publishing tests (node-client/tests/publish.rs) visit the funnel with curl; the tunnel
# and relay go through a real forward proxy, tinyproxy (edge/server/tests/transports.rs,
# node-client/tests/proxylab.rs); the relay runs behind HAProxy's PROXY protocol
# (relay/server/tests/load_balancer.rs).
if [ "$(id -u)" = 0 ] && { ! command -v iptables >/dev/null || ! command -v ip >/dev/null \
    || ! command -v pebble >/dev/null || ! command -v redis-server >/dev/null || ! command -v curl >/dev/null \
    || ! command -v tinyproxy >/dev/null || ! command -v haproxy >/dev/null; }; then
    echo "==> installing iproute2, iptables, pebble, redis-server, curl, tinyproxy and haproxy"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables pebble redis-server curl tinyproxy haproxy >/dev/null
fi
# The Prometheus files (deploy/prometheus) are checked with Debian's promtool: the package is
# unpacked, not installed, so no Prometheus service starts and its web assets are not needed.
PROMTOOL_DIR=/opt/warren-promtool
if [ "$(id -u)" = 0 ] && ! command -v promtool >/dev/null && [ ! -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    echo "==> unpacking promtool from Debian's prometheus package"
    tmp=$(mktemp -d)
    (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    dpkg-deb -x "$tmp"/prometheus_*.deb "$PROMTOOL_DIR"
    rm -rf "$tmp"
fi
if [ -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    export PROMTOOL="$PROMTOOL_DIR/usr/bin/promtool"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

echo "==> layout: the sans-IO wire crates have no tokio; the relay compiles no QUIC and no tunnel"
for proto in warren-relay-proto warren-tunnel-proto; do
    if cargo tree -p "$proto" -e normal --prefix none | grep -q '^tokio '; then
        echo "$proto depends on tokio" >&2
        exit 1
    fi
done
if cargo tree -p warren-relay -e normal --prefix none | grep -Eq '^(quinn|warren-tunnel|warren-tunnel-proto) '; then
    echo "warren-relay depends on QUIC or the tunnel protocol" >&2
    exit 1
fi

echo "==> layout: the sans-IO cores read no clock, spawn nothing and touch no socket"
python3 scripts/check-sans-io.py
echo "==> no import circles in the server crates; nobody imports the assembler"
python3 scripts/check-layout.py

echo "==> formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> tests"
export WARREN_REQUIRE_PYNACL=1 WARREN_REQUIRE_GRPC=1
# As root (CI), the NAT lab must run; elsewhere it skips with a message.
if [ "$(id -u)" = 0 ]; then
    export WARREN_REQUIRE_NETNS=1 WARREN_REQUIRE_PEBBLE=1 WARREN_REQUIRE_REDIS=1 WARREN_REQUIRE_PROXY=1
    export WARREN_REQUIRE_PROMTOOL=1
fi
# The NAT lab runs the relay and node binaries in namespaces.
cargo build --workspace --bins --locked
cargo test --workspace --locked --doc --quiet
cargo nextest run --workspace --locked --no-fail-fast

# The short soak (scripts/soak.sh --short, about 2 minutes): three meshed relays and two
# clustered edges under churn, one of them killed or drained every 30 s, on the debug binaries
# just built. Its report lands in target/soak/.
if command -v redis-server >/dev/null; then
    echo "==> short soak"
    mkdir -p target/soak
    scripts/soak.sh --short --bin "$PWD/target/debug" --out-dir "$PWD/target/soak"
else
    echo "==> short soak skipped: redis-server is not installed"
fi
