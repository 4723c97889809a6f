#!/usr/bin/env bash
# Boot kd's test environment in QEMU (TCG) without kd: the check that the image itself works.
#
#   envs/test-boot.sh [--env ENV_DIR/debian12-min.tar.zst] [--timeout S]
#
# Unpacks the tar.zst into a temp dir, makes an ext4 disk image from it (mkfs.ext4 -d, no mount,
# no loop device), adds a fresh SSH key to /root/.ssh/authorized_keys (as kd would), boots the
# image's /vmlinuz and /initrd.img directly (root=/dev/vda rw + the YAML's console settings) with
# a virtio NIC on a tap in a network namespace where dnsmasq serves DHCP, then checks that the
# console shows KD-DEPLOYED-OK, that port 22 answers and that `ssh root@NODE true` works with the
# key. Prints the time from QEMU start to each milestone. Cleans up on every exit.
# Needs root, qemu-system-x86, dnsmasq-base, e2fsprogs, zstd, openssh-client.
set -euo pipefail

ENV_TAR=./envs-out/debian12-min.tar.zst
TIMEOUT=400
while [ $# -gt 0 ]; do
	case "$1" in
	--env) ENV_TAR=$2; shift 2 ;;
	--timeout) TIMEOUT=$2; shift 2 ;;
	-h | --help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1" >&2; exit 2 ;;
	esac
done
[ -f "$ENV_TAR" ] || { echo "no $ENV_TAR (envs/build-debian12.sh --out DIR)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }

WORK=$(mktemp -d /tmp/kd-env-test.XXXXXX)
NS=kdenv$$
QEMU_PID=
DNSMASQ_PID=
cleanup() {
	set +e
	[ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
	[ -n "$DNSMASQ_PID" ] && kill "$DNSMASQ_PID" 2>/dev/null && wait "$DNSMASQ_PID" 2>/dev/null
	ip netns del "$NS" 2>/dev/null
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

echo "test-env: unpacking $ENV_TAR"
mkdir "$WORK/root"
zstd -dc "$ENV_TAR" | tar -x --numeric-owner -C "$WORK/root"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/key"
install -m 0600 "$WORK/key.pub" "$WORK/root/root/.ssh/authorized_keys"
cp -L "$WORK/root/vmlinuz" "$WORK/vmlinuz"
cp -L "$WORK/root/initrd.img" "$WORK/initrd.img"
truncate -s 1G "$WORK/disk.img"
mkfs.ext4 -q -F -d "$WORK/root" "$WORK/disk.img"
rm -rf --one-file-system "$WORK/root"

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$NS" addr add 10.214.0.1/24 dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" tuntap add dev tap0 mode tap
ip -n "$NS" link set tap0 master br0
ip -n "$NS" link set tap0 up
ip netns exec "$NS" dnsmasq -k --port=0 --interface=br0 --bind-interfaces --no-resolv \
	--dhcp-range=10.214.0.50,10.214.0.99,255.255.255.0,1h \
	--dhcp-host=52:54:00:4b:45:01,10.214.0.51,kdenv1 \
	--dhcp-leasefile="$WORK/leases" --log-facility=- >"$WORK/dnsmasq.log" 2>&1 &
DNSMASQ_PID=$!

: >"$WORK/console.log"
T0=$(date +%s.%N)
since() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.1f", a - b }'; }
ip netns exec "$NS" qemu-system-x86_64 -name kd-env-test -accel tcg,tb-size=256 -m 512 -smp 1 \
	-display none -vga none -monitor none -serial "file:$WORK/console.log" -no-reboot \
	-kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
	-append "root=/dev/vda console=tty0 console=ttyS0,115200n8 rw" \
	-drive "file=$WORK/disk.img,if=none,id=d0,format=raw,cache=unsafe" -device virtio-blk-pci,drive=d0 \
	-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:4b:45:01 &
QEMU_PID=$!

fail=1
deadline=$(($(date +%s) + TIMEOUT))
seen_kernel= seen_systemd= seen_ok=
while [ "$(date +%s)" -lt "$deadline" ]; do
	[ -z "$seen_kernel" ] && grep -qa 'Linux version' "$WORK/console.log" && seen_kernel=1 && echo "test-env: +$(since) s kernel"
	[ -z "$seen_systemd" ] && grep -qa 'systemd\[1\]\|Welcome to' "$WORK/console.log" && seen_systemd=1 && echo "test-env: +$(since) s systemd"
	if grep -qa 'KD-DEPLOYED-OK' "$WORK/console.log"; then
		seen_ok=1
		echo "test-env: +$(since) s console: $(grep -a 'KD-DEPLOYED-OK' "$WORK/console.log" | head -n1 | tr -d '\r')"
		break
	fi
	kill -0 "$QEMU_PID" 2>/dev/null || { echo "test-env: QEMU exited" >&2; break; }
	sleep 1
done
if [ -n "$seen_ok" ]; then
	if ip netns exec "$NS" timeout 10 bash -c 'echo >/dev/tcp/10.214.0.51/22' 2>/dev/null; then
		echo "test-env: +$(since) s port 22 answers on 10.214.0.51"
		if ip netns exec "$NS" timeout 60 ssh -i "$WORK/key" -o StrictHostKeyChecking=no \
			-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=30 -o LogLevel=ERROR \
			root@10.214.0.51 'echo "ssh ok: $(uname -r) $(hostname)"; df -h /; free -m | head -n2'; then
			echo "test-env: +$(since) s ssh with the key works"
			fail=0
		else
			echo "test-env: ssh login failed" >&2
		fi
	else
		echo "test-env: port 22 does not answer" >&2
	fi
else
	echo "test-env: no KD-DEPLOYED-OK within $TIMEOUT s" >&2
fi
if [ "$fail" = 0 ]; then
	echo "test-env: PASS"
else
	echo "test-env: FAIL; console tail:" >&2
	tail -n 40 "$WORK/console.log" | tr -d '\r' >&2
	tail -n 5 "$WORK/dnsmasq.log" >&2
fi
exit "$fail"
