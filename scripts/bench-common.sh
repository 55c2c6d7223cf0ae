# Sourced by the bench scripts: the tools they need, the binaries to run, a state directory that
# goes away with the processes started into `pids`, and waits for ports and sockets. Expects BIN
# (empty: build) and TOOLS (command:debian-package pairs, installed as root when missing).
missing=()
for t in "${TOOLS[@]}"; do command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "needed: apt-get install ${missing[*]}" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -n "$BIN" ]; then
    bin=$BIN
else
    cargo build --release --locked -p warren-relay -p warren-edge -p warren -p warren-loadtest
    bin=$PWD/target/release
fi
state=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "$1 never appeared" >&2; exit 1; }
