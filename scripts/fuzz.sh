#!/usr/bin/env bash
# Runs cargo-fuzz targets for a set time each, merges what they found into the committed
# corpus, and prints a table: runs, coverage, corpus before and after, crashes.
#
#   scripts/fuzz.sh [--seconds N] [--out FILE] [TARGET...]   (default: every target, 600 s)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`); builds with RUSTC_BOOTSTRAP=1 on the stable
# toolchain, without a sanitizer (the bodies are safe Rust; libFuzzer still finds panics,
# hangs and runaway allocation). A crash leaves its input in fuzz/artifacts/<target>/ and
# makes the script exit non-zero after the other targets have run.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
out=""
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: needs cargo-fuzz (cargo install cargo-fuzz)" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list | grep -vx any)
fi
# One binary serves every body (WARREN_FUZZ_TARGET picks it): one build and one link.
cargo fuzz build --sanitizer none --features libfuzzer any
fuzzer=target/x86_64-unknown-linux-gnu/release/any

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
table="| target | seconds | runs | runs/s | coverage (edges) | features | corpus before → after | result |
| --- | --- | --- | --- | --- | --- | --- | --- |"
failed=0
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" "$work/$t"
    before=$(find "$corpus" -type f | wc -l)
    log="$work/$t.log"
    result=ok
    # New inputs go to a scratch directory first; the committed corpus only gets the ones that
    # add coverage (the merge below).
    mkdir -p "fuzz/artifacts/$t"
    if ! WARREN_FUZZ_TARGET=$t "$fuzzer" "$work/$t" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        result="crash: $(grep -m1 -oE 'artifact_prefix=.*|Test unit written to [^ ]+' "$log" || echo see log)"
        failed=1
        cp "$log" "fuzz/artifacts/$t.log"
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    WARREN_FUZZ_TARGET=$t "$fuzzer" -merge=1 "$corpus" "$work/$t" >/dev/null 2>&1 || true
    after=$(find "$corpus" -type f | wc -l)
    rate=$(( ${runs:-0} / seconds ))
    row="| $t | $seconds | ${runs:-?} | $rate | ${cov:-?} | ${ft:-?} | $before → $after | $result |"
    echo "$row"
    table="$table
$row"
done
echo
echo "$table"
[ -n "$out" ] && echo "$table" >"$out"
exit $failed
