#!/usr/bin/env bash
# Installs what the tests, the demo, the benchmarks and the packaging need.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip      || need+=(iproute2)
have ping    || need+=(iputils-ping)
have iperf3  || need+=(iperf3)
have capsh   || need+=(libcap2-bin)
have ss      || need+=(iproute2)
have openssl || need+=(openssl)
have nginx     || need+=(nginx)
have tinyproxy || need+=(tinyproxy)
have curl      || need+=(curl)
# The benchmark's baselines (benches/e2e): OpenVPN 2.6 and SoftEther VPN 5.
have openvpn   || need+=(openvpn)
# The round-trip floor (benches/rtt-floor.sh): a TUN-over-TLS relay in C.
have socat     || need+=(socat)
[ -x /usr/libexec/softether/vpnserver/vpnserver ] || need+=(softether-vpnserver)
[ -x /usr/libexec/softether/vpnclient/vpnclient ] || need+=(softether-vpnclient)
[ -x /usr/libexec/softether/vpncmd/vpncmd ]       || need+=(softether-vpncmd)
# Packaging (packaging/test.sh): the Windows cross build, the MSI, wine, the debs.
have x86_64-w64-mingw32-gcc || need+=(gcc-mingw-w64-x86-64)
have wixl       || need+=(wixl)
have msiinfo    || need+=(msitools)
have wine       || need+=(wine wine64)
have lintian    || need+=(lintian)
have debootstrap || need+=(debootstrap)
have systemd-analyze || need+=(systemd)
have python3    || need+=(python3)

if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Services are not started by the tests' packages: the tests run their own
    # nginx and tinyproxy inside network namespaces.
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${need[@]}" >/dev/null
fi

if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
    rustup component add clippy
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then
    rustup component add rustfmt
fi
if ! rustup target list --installed 2>/dev/null | grep -qx 'x86_64-pc-windows-gnu'; then
    rustup target add x86_64-pc-windows-gnu
fi
# Pinned: packaging/build-deb.sh relies on its --profile handling.
if ! cargo deb --version 2>/dev/null | grep -qx 'cargo-deb 3\.8\.0'; then
    cargo install cargo-deb --version 3.8.0 --locked
fi
