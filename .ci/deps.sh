#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need. Idempotent:
# installs only what is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip      || need+=(iproute2)
have ping    || need+=(iputils-ping)
have iperf3  || need+=(iperf3)
have capsh   || need+=(libcap2-bin)
have ss      || need+=(iproute2)
have openssl || need+=(openssl)
have curl    || need+=(curl)

if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
    rustup component add clippy
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then
    rustup component add rustfmt
fi
