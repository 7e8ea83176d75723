#!/usr/bin/env bash
# iperf3 through the tunnel next to the bare veth underlay, in one run.
# Usage: sudo bash benches/throughput.sh [SECONDS_PER_RUN] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/deps.sh
cargo build --release --workspace --bins
exec target/release/sallyport-lab bench "${1:-5}" "${2:-3}"
