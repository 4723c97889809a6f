#!/usr/bin/env bash
# A virtual cluster on this machine, PXE-booting kd's deploy initrd, receiving an image through
# kd's QUIC tree onto each node's virtual disk (/dev/vda), then torn down.
#
#   scripts/lab-broadcast.sh [--nodes N] [--arity chain|K|star] [--subnet 10.77.0.0/24] [--image F.kdi]
#
# Needs: {kd-coord,kd-agent,kd-lab} in $KD_BIN_DIR (default target/debug) and
# {vmlinuz,initramfs.img} in $KD_INITRD_DIR (default build/initrd)
# (./dev.sh build makes them). Exit code: the broadcast's (0 only if every node verified the image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NODES=3
ARITY=chain
SUBNET=10.77.0.0/24
IMAGE=
while [ $# -gt 0 ]; do
	case "$1" in
	--nodes) NODES=$2; shift 2 ;;
	--arity) ARITY=$2; shift 2 ;;
	--subnet) SUBNET=$2; shift 2 ;;
	--image) IMAGE=$2; shift 2 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
done
BIN=${KD_BIN_DIR:-$PWD/target/debug}
BOOT=${KD_INITRD_DIR:-$PWD/build/initrd}
[ -f "$BOOT/vmlinuz" ] && [ -f "$BOOT/initramfs.img" ] || { echo "no deploy initrd in $BOOT: run ./dev.sh build" >&2; exit 1; }
NET=${SUBNET%.0/24}
GW=$NET.1
ID=$(echo "$NET" | cut -d. -f2)
STATE=/var/lib/kd-lab/$ID
WORK=$(mktemp -d /tmp/kd-lab-broadcast.XXXXXX)
cleanup() {
	"$BIN/kd-lab" down --state "$STATE" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

t0=$(date +%s.%N)
say() { printf '[%6.1f s] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }

if [ -z "$IMAGE" ]; then
	say "making a 48 MiB ext4 file-system image with a few files"
	mkdir -p "$WORK/root/etc"
	echo "deployed by kd" >"$WORK/root/etc/motd"
	head -c 16M /dev/urandom >"$WORK/root/payload"
	truncate -s 48M "$WORK/fs.img"
	mkfs.ext4 -q -F -d "$WORK/root" "$WORK/fs.img"
	IMAGE=$WORK/fs.kdi
	"$BIN/kd-coord" --state "$WORK/coord" image pack "$WORK/fs.img" -o "$IMAGE" --chunk-size 1M >/dev/null
fi

say "bringing up a lab of $NODES nodes (nodes off)"
"$BIN/kd-lab" up --nodes "$NODES" --subnet "$SUBNET" --state "$STATE" --boot-files "$BOOT" --no-start --replace >/dev/null
PIN=$("$BIN/kd-coord" --state "$WORK/coord" pin)
: >"$WORK/tokens"
for i in $(seq 1 "$NODES"); do
	node=node$i
	token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
	echo "$node $token" >>"$WORK/tokens"
	mac=$(printf '52-54-00-%02x-00-%02x' "$ID" $((10 + i)))
	cat >"$STATE/http/nodes/$mac.ipxe" <<IPXE
#!ipxe
kernel http://$GW:8080/boot/vmlinuz initrd=initramfs.img console=ttyS0 kd.coord=$GW:7000 kd.pin=$PIN kd.node=$node kd.token=$token kd.sink=raw:/dev/vda
initrd http://$GW:8080/boot/initramfs.img
boot
IPXE
done
say "powering on; the nodes PXE-boot the deploy initrd (TCG: a minute or two)"
for i in $(seq 1 "$NODES"); do "$BIN/kd-lab" power --state "$STATE" "node$i" on >/dev/null; done
set +e
"$BIN/kd-lab" exec --state "$STATE" -- "$BIN/kd-coord" --state "$WORK/coord" broadcast "$IMAGE" \
	-m "node[1-$NODES]" --arity "$ARITY" --listen "$GW:7000" --tokens "$WORK/tokens" \
	--hello-timeout 600 --timeout 900
rc=$?
set -e
if [ $rc -ne 0 ]; then
	for i in $(seq 1 "$NODES"); do echo "--- node$i console (last lines)"; tail -n 15 "$STATE/node$i.log" 2>/dev/null || true; done
fi
say "done (exit $rc); tearing the lab down"
exit $rc
