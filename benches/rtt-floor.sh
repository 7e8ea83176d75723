#!/usr/bin/env bash
# The round-trip floor of any userspace TUN-over-TCP tunnel on this machine.
#
# Two namespaces on a veth underlay; socat (C, one process per side, poll()
# loop, no framing) relays a TUN device over TCP, then over TLS; ping runs
# across each, idle (0.05 s apart, like `sallyport-lab bench`) and busy
# (0.002 s). A packet's way is the same as through any such VPN: the client
# process wakes for the TUN, the server for the socket, the reply comes back
# the same way. What socat adds is the least a relay adds here: the wake-ups
# and the system calls, without a protocol, a pipeline or an async runtime.
#
# Then Sallyport (release build in target/release, or $SALLYPORT_BIN_DIR)
# over each transport in the same two namespaces, for comparison.
#
# Usage (root): benches/rtt-floor.sh [PINGS [PATHS]]
#   PINGS: per figure, default 40; PATHS: socat, sallyport or all (default)
# Prints one line per path: median RTT and what it adds to the underlay.
set -euo pipefail

PINGS=${1:-40}
PATHS=${2:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SALLYPORT_BIN_DIR:-$ROOT/target/release}
[[ $(id -u) == 0 ]] || { echo "rtt-floor: needs root (network namespaces)" >&2; exit 1; }
command -v socat >/dev/null || { echo "rtt-floor: needs socat (apt install socat)" >&2; exit 1; }

TAG="rf$$"
NS_C="$TAG-c"
NS_S="$TAG-s"
DIR=$(mktemp -d /tmp/rtt-floor.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$NS_C" 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$NS_C"
ip netns add "$NS_S"
ip link add "$TAG-a" netns "$NS_C" type veth peer name "$TAG-b" netns "$NS_S"
ip -n "$NS_C" addr add 198.18.77.2/24 dev "$TAG-a"
ip -n "$NS_S" addr add 198.18.77.1/24 dev "$TAG-b"
for ns in "$NS_C" "$NS_S"; do
    ip -n "$ns" link set lo up
done
ip -n "$NS_C" link set "$TAG-a" up
ip -n "$NS_S" link set "$TAG-b" up

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$DIR/key.pem" -out "$DIR/cert.pem" -days 1 -subj /CN=floor \
    >/dev/null 2>&1

# Median of PINGS round trips, in ms, from the client namespace to $1.
rtt() {
    local dst=$1 interval=$2
    ip netns exec "$NS_C" ping -c 1 -W 2 "$dst" >/dev/null 2>&1 || true
    ip netns exec "$NS_C" ping -n -c "$PINGS" -i "$interval" -W 2 "$dst" \
        | sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | sort -g \
        | awk '{v[NR]=$1} END {if (NR == 0) exit 1; print v[int((NR+1)/2)]}'
}

wait_tun() {
    local ns=$1 dev=$2
    for _ in $(seq 100); do
        ip -n "$ns" link show "$dev" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "rtt-floor: $dev did not appear in $ns" >&2
    return 1
}

# $1: label, $2: server-side socat address, $3: client-side socat address.
tunnel() {
    local label=$1 listen=$2 connect=$3 n=$4
    ip netns exec "$NS_S" socat "$listen" \
        "TUN:10.77.$n.1/24,tun-name=fl$n,tun-type=tun,iff-no-pi,iff-up" 2>"$DIR/s$n.log" &
    PIDS+=($!)
    sleep 0.3
    ip netns exec "$NS_C" socat "$connect" \
        "TUN:10.77.$n.2/24,tun-name=fl$n,tun-type=tun,iff-no-pi,iff-up" 2>"$DIR/c$n.log" &
    PIDS+=($!)
    wait_tun "$NS_C" "fl$n"
    wait_tun "$NS_S" "fl$n"
    local idle busy
    idle=$(rtt "10.77.$n.1" 0.05)
    busy=$(rtt "10.77.$n.1" 0.002)
    report "$label" "$idle" "$busy"
    local k=${#PIDS[@]}
    kill "${PIDS[k-1]}" "${PIDS[k-2]}" 2>/dev/null || true
    wait "${PIDS[k-1]}" "${PIDS[k-2]}" 2>/dev/null || true
}

# $1: label, $2: idle median, $3: busy median.
report() {
    local label=$1 idle=$2 busy=$3
    awk -v l="$label" -v i="$idle" -v b="$busy" -v ui="$UNDER_IDLE" -v ub="$UNDER_BUSY" \
        'BEGIN {printf "%-34s idle %6.3f ms (+%.3f)   busy %6.3f ms (+%.3f)\n", l, i, i - ui, b, b - ub}'
}

UNDER_IDLE=$(rtt 198.18.77.1 0.05)
UNDER_BUSY=$(rtt 198.18.77.1 0.002)
echo "round trips, median of $PINGS pings (idle: 0.05 s apart; busy: 0.002 s); (+x) = added to the underlay"
printf '%-34s idle %6.3f ms           busy %6.3f ms\n' "underlay (veth)" "$UNDER_IDLE" "$UNDER_BUSY"
if [[ $PATHS != sallyport ]]; then
tunnel "socat TUN over TCP (no crypto)" \
    "TCP-LISTEN:443,bind=198.18.77.1,reuseaddr,nodelay" \
    "TCP:198.18.77.1:443,nodelay" 1
tunnel "socat TUN over TLS (OpenSSL)" \
    "OPENSSL-LISTEN:444,bind=198.18.77.1,reuseaddr,nodelay,cert=$DIR/cert.pem,key=$DIR/key.pem,verify=0" \
    "OPENSSL:198.18.77.1:444,nodelay,verify=0" 2
fi

# Sallyport on its defaults but for the addresses, in the same namespaces.
sallyport() {
    local mode=$1 port=$2
    cat >"$DIR/server-$mode.toml" <<EOT
[server]
listen_addr = "198.18.77.1:$port"
tls_cert = "$DIR/cert.pem"
tls_key = "$DIR/key.pem"
[vpn]
interface_name = "sp$port"
lease_file = "$DIR/leases-$mode.json"
[auth]
tokens = ["floor-token"]
EOT
    cat >"$DIR/client-$mode.toml" <<EOT
[server]
url = "wss://198.18.77.1:$port/tunnel"
verify_tls = false
[transport]
mode = "$mode"
state_file = "$DIR/state-$mode"
[auth]
token = "floor-token"
[vpn]
interface_name = "sp$port"
EOT
    ip netns exec "$NS_S" "$BIN/sallyport-server" --config "$DIR/server-$mode.toml" 2>"$DIR/sp-s-$mode.log" &
    PIDS+=($!)
    sleep 0.3
    ip netns exec "$NS_C" "$BIN/sallyport-client" --config "$DIR/client-$mode.toml" 2>"$DIR/sp-c-$mode.log" &
    PIDS+=($!)
    local up=
    for _ in $(seq 100); do
        if ip -n "$NS_C" -4 addr show dev "sp$port" 2>/dev/null | grep -q inet; then up=1; break; fi
        sleep 0.05
    done
    if [[ -z $up ]]; then
        echo "rtt-floor: the Sallyport $mode client got no address" >&2
        tail -5 "$DIR/sp-s-$mode.log" "$DIR/sp-c-$mode.log" >&2
        return 1
    fi
    local idle busy
    idle=$(rtt 10.100.0.1 0.05)
    busy=$(rtt 10.100.0.1 0.002)
    report "sallyport $mode" "$idle" "$busy"
    # One tunnel at a time: stop this one (by PID) before the next.
    local n=${#PIDS[@]}
    kill "${PIDS[n-1]}" "${PIDS[n-2]}" 2>/dev/null || true
    wait "${PIDS[n-1]}" "${PIDS[n-2]}" 2>/dev/null || true
}

if [[ $PATHS == socat ]]; then
    :
elif [[ -x $BIN/sallyport-server && -x $BIN/sallyport-client ]]; then
    sallyport tls 8443
    sallyport h2 8444
    sallyport wss 8445
else
    echo "(no Sallyport binaries in $BIN: cargo build --release, or set SALLYPORT_BIN_DIR)"
fi
