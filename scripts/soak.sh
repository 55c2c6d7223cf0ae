#!/usr/bin/env bash
# Soak: a region (three meshed relays) and an edge cluster (two edges on Redis) under churn,
# with a random relay or edge SIGKILLed or drained every few minutes (scripts/soak.py).
#
#   scripts/soak.sh                 the full run: 30 minutes, a kill every 3 minutes, release build
#   scripts/soak.sh --short         about 2 minutes, a kill every 30 s (what CI runs)
#   scripts/soak.sh --bin DIR ...   these binaries instead of building; other options go to soak.py
#
# Writes soak-report.json and soak-report.png (in --out-dir, default the current directory).
set -euo pipefail
cd "$(dirname "$0")/.."
short=0
bin=""
outdir=$PWD
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --short) short=1; shift ;;
        --bin) bin="$2"; shift 2 ;;
        --out-dir) outdir="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
# The plot needs matplotlib: Debian's, for Debian's python3 (another python3 may come first).
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
$py -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "soak.sh: missing ${need[*]} (apt-get install ${need[*]})" >&2
    fi
fi
if [ -z "$bin" ]; then
    if [ $short = 1 ]; then
        cargo build --locked -p warren-relay -p warren-edge -p warren -p warren-loadtest
        bin=$PWD/target/debug
    else
        cargo build --release --locked -p warren-relay -p warren-edge -p warren -p warren-loadtest
        bin=$PWD/target/release
    fi
fi
if [ $short = 1 ]; then
    set -- --minutes 2 --kill-every 30 --pairs 10 --churn 10 --visit-rate 5 --warmup 30 --interval 5s --sample-every 5
else
    set -- --minutes 30 --kill-every 180 --judge-growth
fi
exec $py scripts/soak.py --bin "$bin" "$@" ${args[@]+"${args[@]}"} \
    --out "$outdir/soak-report.json" --png "$outdir/soak-report.png"
