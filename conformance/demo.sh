#!/usr/bin/env bash
# The main job: builds Sallyport, makes a throwaway certificate, starts a
# server and two clients in network namespaces on the default config, pings
# client to client and client to server, prints the results and cleans up.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/deps.sh
cargo build --release --workspace --bins
exec target/release/sallyport-lab demo
