#!/usr/bin/env bash
# Boot kd's deploy initrd in QEMU (TCG) and check its console, with a stand-in or real agent.
#
#   initrd/test-boot.sh [--dir DIR] [--timeout S] [--no-net] [--append "EXTRA KERNEL PARAMS"]
#                       [--expect REGEX]... [--keep-log FILE]
#
# DIR holds vmlinuz and initramfs.img (initrd/build.sh --out DIR). With the network (default), a
# network namespace gets a bridge 10.213.0.1/24, a tap for the VM and dnsmasq serving DHCP on that
# bridge only; nothing touches the host's network. The kernel command line carries kd.node=,
# kd.coord=, kd.pin=, kd.token= and kd.agent_retries=2 kd.agent_delay=1, so with a failing
# (stand-in) agent the console must show every stage, two agent starts and the final shell.
# Each --expect adds a regex the console must show; the default list fits the stand-in agent.
# Prints the time from QEMU start to the initrd's first message (userspace) and to each stage.
# Needs root, qemu-system-x86, dnsmasq-base, iproute2. Cleans up the VM, dnsmasq and the
# namespace on every exit.
set -euo pipefail

DIR=/tmp/kd-initrd
TIMEOUT=180
NET=1
APPEND_EXTRA=
EXPECT=()
KEEP_LOG=

while [ $# -gt 0 ]; do
	case "$1" in
	--dir) DIR=$2; shift 2 ;;
	--timeout) TIMEOUT=$2; shift 2 ;;
	--no-net) NET=; shift ;;
	--append) APPEND_EXTRA=$2; shift 2 ;;
	--expect) EXPECT+=("$2"); shift 2 ;;
	--keep-log) KEEP_LOG=$2; shift 2 ;;
	-h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1" >&2; exit 2 ;;
	esac
done
[ -f "$DIR/vmlinuz" ] && [ -f "$DIR/initramfs.img" ] || { echo "no vmlinuz/initramfs.img in $DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "must run as root (netns, tap)" >&2; exit 2; }

if [ "${#EXPECT[@]}" = 0 ]; then
	EXPECT=('stage 1/5: mounted' 'kd.node=kdtest1 kd.coord=10.213.0.1:7000 kd.pin=<set> kd.token=<set>'
		'stage 2/5: [0-9]+ modules loaded' 'stage 2/5: default qdisc fq_codel')
	if [ -n "$NET" ]; then
		EXPECT+=('stage 3/5: network: ethernet interfaces: eth0|ens|enp' 'lease: [^ ]+ 10\.213\.0\.[0-9]+/24 router=10\.213\.0\.1'
			'STAND-IN-KD-AGENT: addresses: [^ ]+ 10\.213\.0\.')
	fi
	EXPECT+=('stage 4/5: starting kd-agent \(attempt 1/2\)' 'STAND-IN-KD-AGENT: started with 0 argument'
		'kd-agent exited with code 3 \(attempt 1/2\)' 'stage 4/5: starting kd-agent \(attempt 2/2\)'
		'SHELL: kd-agent failed 2 times \(last exit code 3\)')
fi
DONE_RE=${EXPECT[-1]}

WORK=$(mktemp -d /tmp/kd-initrd-test.XXXXXX)
NS=kdinitrd$$
QEMU_PID=
DNSMASQ_PID=
cleanup() {
	set +e
	[ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
	[ -n "$DNSMASQ_PID" ] && kill "$DNSMASQ_PID" 2>/dev/null && wait "$DNSMASQ_PID" 2>/dev/null
	ip netns del "$NS" 2>/dev/null
	[ -n "$KEEP_LOG" ] && cp "$WORK/console.log" "$KEEP_LOG" 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT

NETARGS=(-nic none)
RUN=()
if [ -n "$NET" ]; then
	ip netns add "$NS"
	ip -n "$NS" link set lo up
	ip -n "$NS" link add br0 type bridge stp_state 0 forward_delay 0
	ip -n "$NS" addr add 10.213.0.1/24 dev br0
	ip -n "$NS" link set br0 up
	ip -n "$NS" tuntap add dev tap0 mode tap
	ip -n "$NS" link set tap0 master br0
	ip -n "$NS" link set tap0 up
	ip netns exec "$NS" dnsmasq -k --port=0 --interface=br0 --bind-interfaces --no-resolv \
		--dhcp-range=10.213.0.50,10.213.0.99,255.255.255.0,1h --dhcp-option=option:router,10.213.0.1 \
		--dhcp-leasefile="$WORK/leases" --pid-file="$WORK/dnsmasq.pid" --log-dhcp --log-facility=- \
		>"$WORK/dnsmasq.log" 2>&1 &
	DNSMASQ_PID=$!
	NETARGS=(-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:4b:44:01)
	RUN=(ip netns exec "$NS")
fi

APPEND="console=ttyS0,115200 panic=10 kd.node=kdtest1 kd.coord=10.213.0.1:7000 kd.pin=0123abcd kd.token=secret-token kd.agent_retries=2 kd.agent_delay=1 $APPEND_EXTRA"
: >"$WORK/console.log"
T0=$(date +%s.%N)
"${RUN[@]}" qemu-system-x86_64 -name kd-initrd-test -accel tcg,tb-size=256 -m 512 -smp 1 \
	-display none -vga none -monitor none -serial "file:$WORK/console.log" -no-reboot \
	-kernel "$DIR/vmlinuz" -initrd "$DIR/initramfs.img" -append "$APPEND" "${NETARGS[@]}" &
QEMU_PID=$!

since() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.1f", a - b }'; }
declare -A SEEN
ok=
deadline=$(($(date +%s) + TIMEOUT))
while [ "$(date +%s)" -lt "$deadline" ]; do
	for re in 'kd-initrd \[' 'stage 2/5' 'stage 3/5: DHCP' 'lease:' 'stage 4/5'; do
		if [ -z "${SEEN[$re]:-}" ] && grep -qE "$re" "$WORK/console.log"; then
			SEEN[$re]=$(since)
			echo "test-boot: +${SEEN[$re]} s: console shows '$re'"
		fi
	done
	if grep -qE "$DONE_RE" "$WORK/console.log"; then ok=1; break; fi
	kill -0 "$QEMU_PID" 2>/dev/null || { echo "test-boot: QEMU exited" >&2; break; }
	sleep 0.5
done
echo "test-boot: ---- console (kd-initrd and agent lines) ----"
grep -aE 'kd-initrd|KD-AGENT|kd-agent|SHELL' "$WORK/console.log" | tr -d '\r' | sed 's/^/  | /'
echo "test-boot: ----"
fail=0
for re in "${EXPECT[@]}"; do
	if grep -qaE "$re" "$WORK/console.log"; then echo "test-boot: ok       /$re/"; else echo "test-boot: MISSING  /$re/"; fail=1; fi
done
[ -n "$ok" ] || { echo "test-boot: timed out after $TIMEOUT s" >&2; fail=1; }
if [ "$fail" = 0 ]; then
	echo "test-boot: PASS (userspace at +${SEEN['kd-initrd \[']:-?} s, total $(since) s)"
else
	echo "test-boot: FAIL" >&2
	[ -n "$NET" ] && { echo "test-boot: dnsmasq log:" >&2; tail -n 20 "$WORK/dnsmasq.log" >&2; }
	tail -n 40 "$WORK/console.log" >&2
fi
exit "$fail"
