#!/usr/bin/env bash
# Many idle sessions, then traffic between them, against one real server in a
# network namespace: handshakes/s, sessions lost, the server's RSS per session
# and CPU, from the load generator (conformance/src/load.rs).
# Usage: sudo bash benches/scale.sh [--debug] [SESSIONS...] [--transport tls|h2|wss]
#        [--traffic-secs S] [--pps P] [--concurrency C]
# Default: 1000 and 10000 sessions over raw TLS, release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/deps.sh
profile=release
if [ "${1:-}" = "--debug" ]; then
    profile=debug
    shift
fi
if [ "$profile" = release ]; then
    cargo build --release -p sallyport-server -p sallyport-client -p sallyport-conformance --bins
else
    cargo build -p sallyport-server -p sallyport-client -p sallyport-conformance --bins
fi
echo "build: $profile"
exec "target/$profile/sallyport-lab" scale "$@"
