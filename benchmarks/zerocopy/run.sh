#!/bin/bash
# Alternating copy/zerocopy UDP GSO sends across a veth between two netns.
# usage: run.sh <rounds> <seconds> <msg_bytes>... (env TOUCH=1, NBUFS=8, PIN=1)
set -euo pipefail
ROUNDS=${1:-5}; SECS=${2:-3}; shift 2 || true
SIZES=("${@:-64400}")
NBUFS=${NBUFS:-8}; TOUCH=${TOUCH:-0}; PIN=${PIN:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
ZC=$HERE/zc
A=zc-$$-a; B=zc-$$-b
VA=zc$$a; VB=zc$$b   # veth names (<=15 chars)
IPA=10.231.$(( $$ % 200 )).1; IPB=10.231.$(( $$ % 200 )).2
RPID=

cleanup() {
	[ -n "$RPID" ] && kill "$RPID" 2>/dev/null || true
	ip netns del "$A" 2>/dev/null || true
	ip netns del "$B" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ip netns add "$A"; ip netns add "$B"
ip link add "$VA" netns "$A" type veth peer name "$VB" netns "$B"
ip -n "$A" addr add "$IPA/30" dev "$VA"; ip -n "$B" addr add "$IPB/30" dev "$VB"
ip -n "$A" link set "$VA" up; ip -n "$B" link set "$VB" up
ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip -n "$A" link set "$VA" mtu 1500; ip -n "$B" link set "$VB" mtu 1500

SPIN=(); RPIN=()
if [ "$PIN" = 1 ]; then SPIN=(taskset -c 0); RPIN=(taskset -c 1); fi

echo "# $(date -u +%FT%TZ) $(uname -r) rounds=$ROUNDS secs=$SECS sizes=${SIZES[*]} nbufs=$NBUFS touch=$TOUCH pin=$PIN"
echo "# veth $A/$VA $IPA <-> $B/$VB $IPB; offloads on $VA:"
ip netns exec "$A" ethtool -k "$VA" 2>/dev/null | grep -E 'scatter-gather:|tx-udp-segmentation|tx-checksumming:' || true
port=9000
one() { # mode len
	port=$((port + 1))
	local rout; rout=$(mktemp)
	ip netns exec "$B" "${RPIN[@]}" "$ZC" recv "$IPB" "$port" $((SECS + 10)) >"$rout" &
	RPID=$!
	for _ in $(seq 50); do grep -q ready "$rout" && break; sleep 0.05; done
	ip netns exec "$A" "${SPIN[@]}" "$ZC" send "$IPB" "$port" "$1" "$2" "$SECS" "$NBUFS" "$TOUCH"
	wait "$RPID"; RPID=
	grep role= "$rout"; rm -f "$rout"
}
for r in $(seq "$ROUNDS"); do
	for len in "${SIZES[@]}"; do
		# alternate which mode goes first, so drift in machine load hits both
		if (( r % 2 )); then order="copy zerocopy"; else order="zerocopy copy"; fi
		for mode in $order; do
			echo "round=$r"; one "$mode" "$len"
		done
	done
done
