#!/bin/sh
# Put this container behind a link of RATE each way, on its own NIC (LINK in
# docker-compose.yml and deploy/stack.yml; the entrypoint runs it, as root, before downpour):
#
#   downpour-shape-link RATE [DEVICE]        DEVICE defaults to eth0
#
#   upload:   tbf RATE as DEVICE's root qdisc
#   download: DEVICE's ingress qdisc hands every packet (a u32 filter that matches all,
#             action mirred) to ifb0, whose root qdisc is tbf RATE
#
# RATE is in tc's syntax and read by downpour's own parser (100mbit, 1gbit; bps units are
# bytes per second); the bucket and the queue are those of the local runs' emulated links
# (downpour/netem.py): 4 ms of the rate and at least 16 KiB (tbf needs >= rate / HZ), and a
# packet that would wait more than 50 ms is dropped. Bandwidth is emulated, latency is not
# (the kernels this was made on have no netem). u32 + mirred is used because matchall and
# police may be missing from the kernel; tbf, ingress, u32, mirred and ifb must be there
# (built in, or modules the host loads: `modprobe ifb` on the host as root if it does not).
#
# Needs CAP_NET_ADMIN (compose: cap_add: [NET_ADMIN]) and iproute2 (in the image). Run
# again, it replaces the shaping it made. Exit status 0 when DEVICE is shaped both ways;
# otherwise 1, with one line on stderr saying what was wrong and what to do.
set -eu
ME=downpour-shape-link
CAP_NET_ADMIN=12                             # the bit in /proc/PID/status CapEff
IFB=ifb0

fail() { echo "$ME: $*" >&2; exit 1; }
[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: $ME RATE [DEVICE], e.g. $ME 100mbit eth0"
rate=$1
device=${2:-eth0}

# rate_bits burst_bytes latency, or the parser's one-line complaint (exit 1).
shape=$(python - "$rate" <<'EOF'
import sys
from downpour.common.config import ConfigError, parse_rate
from downpour.netem import TBF_BURST_MIN_BYTES, TBF_BURST_S, TBF_LATENCY
try:
    bits = parse_rate(sys.argv[1], "LINK")
except ConfigError as e:
    sys.exit(f"downpour-shape-link: {e}")
print(bits, max(TBF_BURST_MIN_BYTES, int(bits / 8 * TBF_BURST_S)), TBF_LATENCY)
EOF
) || exit 1
set -- $shape
bits=$1 burst=$2 latency=$3

command -v ip >/dev/null && command -v tc >/dev/null \
    || fail "LINK=$rate: shaping needs ip and tc (iproute2), which this image lacks: build it from deploy/Dockerfile"
capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
[ $(( 0x$capeff >> CAP_NET_ADMIN & 1 )) = 1 ] \
    || fail "LINK=$rate: shaping $device needs the NET_ADMIN capability, which this container lacks: add cap_add: [NET_ADMIN] to its service (docker run --cap-add NET_ADMIN), or unset LINK"
ip link show dev "$device" >/dev/null 2>&1 \
    || fail "LINK=$rate: this container has no network device $device to shape (network_mode: none?): give it a network, or unset LINK"

run() {                                      # run "$@"; on failure, say which and why
    if ! out=$("$@" 2>&1); then
        fail "LINK=$rate: \`$*\` failed: $(echo "$out" | tr '\n' ' ')"
    fi
}

# What an earlier run left (a restarted container may keep its network namespace).
tc qdisc del dev "$device" root >/dev/null 2>&1 || true
tc qdisc del dev "$device" ingress >/dev/null 2>&1 || true
ip link del "$IFB" >/dev/null 2>&1 || true

run tc qdisc add dev "$device" root tbf rate "${bits}bit" burst "$burst" latency "$latency"
if ! out=$(ip link add "$IFB" type ifb 2>&1); then
    fail "LINK=$rate: the kernel made no ifb device for the download side ($(echo "$out" | tr '\n' ' ')): on the host, as root, \`modprobe ifb\`, then start again"
fi
run ip link set dev "$IFB" up
run tc qdisc add dev "$IFB" root tbf rate "${bits}bit" burst "$burst" latency "$latency"
run tc qdisc add dev "$device" handle ffff: ingress
run tc filter add dev "$device" parent ffff: protocol all u32 match u32 0 0 \
    action mirred egress redirect dev "$IFB"
echo "$ME: $device shaped to $rate ($bits bit/s) each way: tbf, burst $burst bytes, latency $latency; download through $IFB" >&2
