#!/usr/bin/env bash
# Bulk transfer through the funnel against Caddy reverse-proxying the same origin, in one run,
# all on 127.0.0.1 (release build). curl is the visitor; the origin is `warren-loadtest origin`
# (GET /bytes/N, PUT bodies drained), fast enough that the proxy in front is what is measured.
#   - download and upload of --size bytes (default 1 GiB), HTTP/1.1 and HTTP/2, through Caddy,
#     the funnel's QUIC tunnel and its TCP tunnel, --runs times each (median printed);
#   - the edge's and the node's RSS growth during each funnel transfer;
#   - fairness: --streams concurrent downloads sharing one tunnel, each one's rate.
# Usage: scripts/bench-bulk.sh [--size BYTES] [--runs N] [--streams N] [--bin DIR] [--profile DIR]
#   --profile DIR  record the edge and the node with perf during the first funnel (QUIC)
#                  transfer of each kind and write flat profiles (per process) to DIR
#   (needs caddy and curl; installs them as root)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=$((1 << 30))
RUNS=3
STREAMS=4
BIN=""
PROFILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE="$2"; shift ;;
        --runs) RUNS="$2"; shift ;;
        --streams) STREAMS="$2"; shift ;;
        --bin) BIN="$(cd "$2" && pwd)"; shift ;;
        --profile) PROFILE="$2"; shift ;;
        *) echo "unknown option $1" >&2; exit 64 ;;
    esac
    shift
done
TOOLS=(caddy:caddy curl:curl)
source scripts/bench-common.sh

$bin/warren-loadtest origin --listen 127.0.0.1:18782 & pids+=($!)
$bin/warren-relay --dev --state-dir "$state/relay" --listen 127.0.0.1:18443 --stun-listen 127.0.0.1:13478 \
    --admin-listen 127.0.0.1:19090 2>"$state/relay.log" & pids+=($!)
$bin/warren-edge --dev --state-dir "$state/edge" --public-listen 127.0.0.1:10443 --tunnel-listen 127.0.0.1:17443 \
    --admin-listen 127.0.0.1:19190 2>"$state/edge.log" & pids+=($!)
edge_pid=$!
cat > "$state/Caddyfile" <<EOF
{
	admin off
	skip_install_trust
	auto_https disable_redirects
}
https://caddy.localhost:19443 {
	tls internal
	reverse_proxy 127.0.0.1:18782
}
EOF
XDG_DATA_HOME="$state/caddy" XDG_CONFIG_HOME="$state/caddy" caddy run --config "$state/Caddyfile" --adapter caddyfile \
    >"$state/caddy.log" 2>&1 & pids+=($!)
wait_port 18443; wait_port 10443; wait_port 18782; wait_port 19443
cat > "$state/map.json" <<JSON
{"Regions": {"1": {"RegionID": 1, "RegionCode": "bench", "Nodes": [
  {"Name": "1a", "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 18443, "STUNPort": 13478}]}}}
JSON
# Two nodes publishing the origin: "bulk" over the QUIC tunnel, "bulktcp" over the TCP one.
declare -A node_pid
for n in bulk bulktcp; do
    extra=()
    [ "$n" = bulktcp ] && extra=(--transport tcp --edge-tcp-port 10443)
    mkdir -p "$state/$n"
    $bin/warren up --region-map "$state/map.json" --ca "$state/relay/dev-ca.pem" --edge 127.0.0.1:17443 \
        --edge-name localhost --edge-ca "$state/edge/dev-ca.pem" --funnel-token dev --name "$n" "${extra[@]}" \
        --key-file "$state/$n/node.key" --control "$state/$n/node.sock" 2>"$state/$n/node.log" & pids+=($!)
    node_pid[$n]=$!
    wait_sock "$state/$n/node.sock"
    $bin/warren funnel --bg 18782 --https-port 10443 --control "$state/$n/node.sock" >/dev/null
done
caddy_root="$state/caddy/caddy/pki/authorities/local/root.crt"
for _ in $(seq 100); do [ -s "$caddy_root" ] && break; sleep 0.1; done
cat "$state/edge/dev-ca.pem" "$caddy_root" > "$state/cas.pem"
url() {
    case "$1" in
        caddy) echo "https://caddy.localhost:19443" ;;
        quic) echo "https://bulk.funnel.localhost:10443" ;;
        tcp) echo "https://bulktcp.funnel.localhost:10443" ;;
    esac
}
CURL=(curl -sS --fail -o /dev/null --cacert "$state/cas.pem"
      --resolve caddy.localhost:19443:127.0.0.1 --resolve bulk.funnel.localhost:10443:127.0.0.1
      --resolve bulktcp.funnel.localhost:10443:127.0.0.1)
# Every tunnel must be up before timing anything.
for t in quic tcp; do
    for _ in $(seq 100); do "${CURL[@]}" "$(url $t)/bytes/1" 2>/dev/null && break; sleep 0.1; done
done
head -c "$SIZE" /dev/urandom > "$state/upload.bin"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Peak RSS of a process while a file flag exists, sampled every 100 ms; prints KiB.
peak_rss() {
    local pid=$1 flag=$2 peak=0 r
    while [ -e "$flag" ]; do r=$(rss_kib "$pid"); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.1; done
    echo "$peak"
}
# One transfer: prints MB/s (curl's own average over the whole transfer).
transfer() {
    local dir=$1 proto=$2 target=$3 v=--http1.1
    [ "$proto" = h2 ] && v=--http2
    if [ "$dir" = down ]; then
        "${CURL[@]}" "$v" -w '%{speed_download}' "$(url "$target")/bytes/$SIZE"
    else
        "${CURL[@]}" "$v" -w '%{speed_upload}' -T "$state/upload.bin" "$(url "$target")/upload"
    fi | awk '{printf "%.1f", $1 / 1e6}'
}
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

echo "=== bulk: $((SIZE >> 20)) MiB per transfer, curl over TLS, median of $RUNS runs (MB/s)"
printf '%-10s %-5s %10s %10s %10s %9s %9s\n' transfer http caddy quic tcp quic/caddy tcp/caddy
for dir in down up; do
    for proto in h1 h2; do
        declare -A speeds=()
        growth=""
        for target in caddy quic tcp; do
            runs=()
            for _ in $(seq "$RUNS"); do
                if [ "$target" = caddy ]; then
                    runs+=("$(transfer $dir $proto $target)")
                    continue
                fi
                node=${node_pid[bulk]}
                [ "$target" = tcp ] && node=${node_pid[bulktcp]}
                e0=$(rss_kib "$edge_pid"); n0=$(rss_kib "$node")
                flag="$state/sampling"; touch "$flag"
                peak_rss "$edge_pid" "$flag" > "$state/edge.peak" & ep=$!
                peak_rss "$node" "$flag" > "$state/node.peak" & np=$!
                perf_pids=()
                if [ -n "$PROFILE" ] && [ "$target" = quic ] && [ ${#runs[@]} = 0 ]; then
                    mkdir -p "$PROFILE"
                    for p in edge:$edge_pid node:$node; do
                        perf record -q -F 999 -p "${p#*:}" -o "$PROFILE/$dir-$proto-${p%%:*}.data" 2>/dev/null & perf_pids+=($!)
                    done
                    sleep 0.5
                fi
                runs+=("$(transfer $dir $proto $target)")
                rm -f "$flag"; wait $ep $np
                for p in "${perf_pids[@]}"; do kill -INT "$p"; wait "$p" || true; done
                growth="$growth $target edge +$(( $(cat "$state/edge.peak") - e0 )) node +$(( $(cat "$state/node.peak") - n0 ))"
            done
            speeds[$target]=$(echo "${runs[*]}" | median)
        done
        printf '%-10s %-5s %10s %10s %10s %9s %9s\n' "$dir" "$proto" "${speeds[caddy]}" "${speeds[quic]}" "${speeds[tcp]}" \
            "x$(awk "BEGIN {printf \"%.2f\", ${speeds[quic]} / ${speeds[caddy]}}")" \
            "x$(awk "BEGIN {printf \"%.2f\", ${speeds[tcp]} / ${speeds[caddy]}}")"
        echo "           RSS growth per run (KiB):$growth"
    done
done

if [ -n "$PROFILE" ]; then
    for f in "$PROFILE"/*.data; do
        perf report -i "$f" --stdio --no-children --sort dso,symbol --percent-limit 1 2>/dev/null \
            | grep -v '^#' | grep -v '^$' > "${f%.data}.txt" || true
    done
    echo "profiles: $PROFILE/*.txt"
fi
echo "=== fairness: $STREAMS concurrent downloads of $((SIZE / STREAMS >> 20)) MiB each over one tunnel (MB/s each)"
for target in quic tcp; do
    for proto in h1 h2; do
        v=--http1.1; [ "$proto" = h2 ] && v=--http2
        curls=()
        for i in $(seq "$STREAMS"); do
            "${CURL[@]}" "$v" -w '%{speed_download}\n' "$(url $target)/bytes/$((SIZE / STREAMS))" > "$state/fair.$i" &
            curls+=($!)
        done
        wait "${curls[@]}"
        each=$(cat "$state"/fair.* | awk '{printf "%.1f ", $1 / 1e6}')
        echo "$target $proto: $each(min/max $(cat "$state"/fair.* | awk 'NR == 1 {lo = hi = $1} {if ($1 < lo) lo = $1; if ($1 > hi) hi = $1} END {printf "%.2f", lo / hi}'))"
        rm -f "$state"/fair.*
    done
done
