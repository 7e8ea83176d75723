#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS_PER_TARGET (default 60),
# then prints one line per target: execs, exec/s, cov, ft, corpus, crashes.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Only stable Rust is installed; cargo-fuzz needs nightly flags (-Z sanitizer),
# which RUSTC_BOOTSTRAP=1 allows on stable. New corpus entries go to
# fuzz/work/<target> (not committed), seeded from fuzz/corpus/<target>;
# crash inputs go to fuzz/artifacts/<target>. Set JOBS=2 to run two targets at
# a time, NICE=19 (default) to stay out of other builds' way, FEATURES=core
# to build only the targets that need no TLS stack (control_json, ip_header,
# lz4_decompress).
set -euo pipefail

cd "$(dirname "$0")"
secs=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1
nice_level=${NICE:-19}
jobs=${JOBS:-1}
feature_args=()
if [ "${FEATURES:-}" = core ]; then
    feature_args=(--no-default-features)
fi

if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz not found: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    if [ "${FEATURES:-}" = core ]; then
        targets=(control_json ip_header lz4_decompress)
    else
        mapfile -t targets < <(cargo fuzz list)
    fi
fi

nice -n "$nice_level" cargo fuzz build -O "${feature_args[@]}"

mkdir -p logs
run_one() {
    local t=$1
    mkdir -p "work/$t" "artifacts/$t"
    # -max_total_time bounds the run; libFuzzer prints its final stats
    # (stat::number_of_executed_units etc.) with -print_final_stats=1.
    nice -n "$nice_level" cargo fuzz run -O "${feature_args[@]}" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
        >"logs/$t.log" 2>&1 || true
}

running=0
for t in "${targets[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

status=0
printf '%-18s %12s %9s %6s %7s %7s %8s\n' target execs exec/s cov ft corpus crashes
for t in "${targets[@]}"; do
    log="logs/$t.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # The last status line, e.g. "#123 DONE cov: 456 ft: 789 corp: 12/3Kb ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    crashes=$(find "artifacts/$t" -type f | wc -l)
    printf '%-18s %12s %9s %6s %7s %7s %8s\n' "$t" "${execs:--}" "${rate:--}" \
        "${cov:--}" "${ft:--}" "${corp:--}" "$crashes"
    if [ "$crashes" -gt 0 ] || ! grep -q 'Done [0-9]* runs' "$log"; then
        echo "  $t: see fuzz/$log and fuzz/artifacts/$t" >&2
        status=1
    fi
done
exit "$status"
