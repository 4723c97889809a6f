#!/usr/bin/env bash
# kd's whole job on a virtual cluster: QEMU nodes (powered off at first) PXE-boot kd's deploy
# initrd, `kd-coord deploy` (a client of `kd-coord serve`, the daemon, which runs in the lab's
# network namespace) writes the test environment (Debian 12 + sshd) to their disks with an
# SSH key, they boot it, and every node must answer `ssh -i KEY root@NODE true`. The lab is torn
# down on every exit.
#
#   scripts/lab-deploy.sh [--nodes N] [--subnet 10.77.0.0/24] [--arity auto|chain|star|K]
#                         [--env ENV.yaml] [--fail-one] [--fail-node NODE] [--fail-after S]
#                         [--limit S] [--firmware bios|uefi] [--boot reboot|kexec]
#                         [--probe S] [--kexec-fail]
#
#   --env        environment description to deploy (default: envs/build-debian12.sh's, cached)
#   --fail-one   then deploy again and power NODE (default node2, the middle of the chain) off
#                S seconds (default 5) after the broadcast started: expects exit 1, NODE KO with
#                a reason, the other nodes deployed and answering ssh
#   --limit      bound of each kd-coord deploy run in seconds (default 1800)
#   --firmware   uefi: OVMF nodes (kd-lab up --firmware uefi, a disk layout with an ESP); each
#                node must then also have booted by UEFI with GRUB in the ESP's removable path
#   --boot       kexec: the cluster's `boot: kexec` (BootNewEnv kexecs the deployed kernel from
#                the deploy initrd); each node must then have said `kexec ok` and (BIOS) booted
#                its firmware once only (one SeaBIOS banner on its console)
#   --kexec-fail --boot kexec on deploy kernels that refuse kexec_load (their command line gets
#                sysctl.kernel.kexec_load_disabled=1): each agent must say why its kexec failed
#                and reboot instead (two SeaBIOS banners), the nodes deploy all the same
#   --probe      the cluster's probe_delay and probe_interval (default kd-lab's 20 and 5 s):
#                1 measures BootNewEnv to the second
#
# Needs: kd-coord and kd-lab in $KD_BIN_DIR (default target/debug), the deploy initrd in
# $KD_INITRD_DIR (default build/initrd): `./dev.sh build` makes them; openssh-client.
# Exit code: 0 when every phase went as expected, 1 otherwise, 2 on a usage or set-up error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NODES=3
SUBNET=10.77.0.0/24
ARITY=auto
ENV_YAML=
FAIL_ONE=
FAIL_NODE=node2
FAIL_AFTER=5
LIMIT=1800
FIRMWARE=
BOOT_METHOD=reboot
PROBE=
KEXEC_FAIL=
while [ $# -gt 0 ]; do
	case "$1" in
	--nodes) NODES=$2; shift 2 ;;
	--subnet) SUBNET=$2; shift 2 ;;
	--arity) ARITY=$2; shift 2 ;;
	--env) ENV_YAML=$2; shift 2 ;;
	--fail-one) FAIL_ONE=1; shift ;;
	--fail-node) FAIL_NODE=$2; shift 2 ;;
	--fail-after) FAIL_AFTER=$2; shift 2 ;;
	--limit) LIMIT=$2; shift 2 ;;
	--firmware) FIRMWARE=$2; shift 2 ;;
	--boot) BOOT_METHOD=$2; shift 2 ;;
	--probe) PROBE=$2; shift 2 ;;
	--kexec-fail) KEXEC_FAIL=1; BOOT_METHOD=kexec; shift ;;
	-h | --help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "lab-deploy: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
BIN=${KD_BIN_DIR:-$PWD/target/debug}
BOOT=${KD_INITRD_DIR:-$PWD/build/initrd}
for b in kd-coord kd-lab; do
	[ -x "$BIN/$b" ] || { echo "lab-deploy: no $BIN/$b: run ./dev.sh build" >&2; exit 2; }
done
[ -f "$BOOT/vmlinuz" ] && [ -f "$BOOT/initramfs.img" ] || { echo "lab-deploy: no deploy initrd in $BOOT: run ./dev.sh build" >&2; exit 2; }
command -v ssh-keygen >/dev/null && command -v ssh >/dev/null || { echo "lab-deploy: needs openssh-client" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "lab-deploy: must run as root (namespaces, QEMU taps)" >&2; exit 2; }
case "$FIRMWARE" in "" | bios | uefi) ;; *) echo "lab-deploy: --firmware bios|uefi" >&2; exit 2 ;; esac
[ "$FIRMWARE" = bios ] && FIRMWARE=
case "$BOOT_METHOD" in reboot | kexec) ;; *) echo "lab-deploy: --boot reboot|kexec" >&2; exit 2 ;; esac
case "$PROBE" in "" | [1-9] | [1-9][0-9]) ;; *) echo "lab-deploy: --probe 1..99 (seconds)" >&2; exit 2 ;; esac
if [ -n "$FAIL_ONE" ] && [ "$NODES" -lt 2 ]; then echo "lab-deploy: --fail-one needs 2 nodes or more" >&2; exit 2; fi

NET=${SUBNET%.0/24}
ID=$(echo "$NET" | cut -d. -f2)
STATE=/var/lib/kd-lab/$ID
WORK=$(mktemp -d /tmp/kd-lab-deploy.XXXXXX)
COORD_PID=
DAEMON_PID=
FAILED=
cleanup() {
	set +e
	[ -n "$COORD_PID" ] && kill "$COORD_PID" 2>/dev/null && wait "$COORD_PID" 2>/dev/null
	# SIGTERM: the daemon cancels what still runs, then exits (bounded: it gives up after 60 s).
	[ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && timeout 90 tail --pid="$DAEMON_PID" -f /dev/null
	[ -n "$DAEMON_PID" ] && kill -KILL "$DAEMON_PID" 2>/dev/null
	if [ -n "$FAILED" ] && [ -f "$WORK/daemon.log" ]; then
		echo "--- kd-coord serve (last lines)"
		tail -n 40 "$WORK/daemon.log"
	fi
	if [ -n "$FAILED" ] && [ -d "$STATE" ]; then
		for i in $(seq 1 "$NODES"); do
			echo "--- node$i console (last lines)"
			tail -n 25 "$STATE/node$i.log" 2>/dev/null | tr -d '\r' | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
		done
	fi
	"$BIN/kd-lab" down --state "$STATE" >/dev/null 2>&1
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'FAILED=1; exit 130' INT TERM

t0=$(date +%s.%N)
now() { echo "$(date +%s.%N) - $t0" | bc; }
say() { printf '[%6.1f s] %s\n' "$(now)" "$*"; }
fail() { FAILED=1; say "FAILED: $*"; exit 1; }

# --- the environment and the key -------------------------------------------------------------
if [ -z "$ENV_YAML" ]; then
	say "test environment: envs/build-debian12.sh (cached by input hash)"
	envs/build-debian12.sh --out "$WORK/env" | sed 's/^/  /'
	ENV_YAML=$WORK/env/debian12-min.yaml
fi
[ -f "$ENV_YAML" ] || { echo "lab-deploy: no environment $ENV_YAML" >&2; exit 2; }
ssh-keygen -q -t ed25519 -N '' -C kd-lab-deploy -f "$WORK/key"
say "deploy initrd: $(du -h "$BOOT/initramfs.img" | cut -f1) initramfs + $(du -h "$BOOT/vmlinuz" | cut -f1) kernel"

# --- the lab ----------------------------------------------------------------------------------
say "bringing up a lab of $NODES ${FIRMWARE:+$FIRMWARE }nodes on $SUBNET (powered off: kd-coord powers them on)"
"$BIN/kd-lab" up --nodes "$NODES" --subnet "$SUBNET" --state "$STATE" --boot-files "$BOOT" --no-start --replace ${FIRMWARE:+--firmware "$FIRMWARE"} | sed 's/^/  /'
ALL="node[1-$NODES]"
ip_of() { echo "$NET.$((10 + ${1#node}))"; }

# --- the daemon -------------------------------------------------------------------------------
# kd-coord serve runs in the lab's network namespace (its QUIC endpoint listens on the lab's
# bridge, its power commands reach the lab's BMCs); its API is the Unix socket $WORK/coord/kd.sock,
# which the CLI below reaches from outside the namespace.
CLUSTER_YAML=$STATE/cluster.yaml
if [ "$BOOT_METHOD" = kexec ] || [ -n "$PROBE" ]; then
	# kd-lab's cluster.yaml with the cluster's boot method (a top-level key kd-lab does not write)
	# and probe timing (its workflow's two keys).
	grep -q '^boot:' "$CLUSTER_YAML" && { echo "lab-deploy: $CLUSTER_YAML already has a boot: key" >&2; exit 2; }
	{
		if [ -n "$PROBE" ]; then
			sed -e "s/^  probe_delay: .*/  probe_delay: $PROBE/" -e "s/^  probe_interval: .*/  probe_interval: $PROBE/" "$CLUSTER_YAML"
		else
			cat "$CLUSTER_YAML"
		fi
		[ "$BOOT_METHOD" = reboot ] || echo "boot: $BOOT_METHOD"
		if [ -n "$KEXEC_FAIL" ]; then
			# kd-lab writes no deploy_kernel: the defaults, plus the sysctl that refuses kexec_load.
			grep -q '^deploy_kernel:' "$CLUSTER_YAML" && { echo "lab-deploy: $CLUSTER_YAML already has deploy_kernel:" >&2; exit 2; }
			printf 'deploy_kernel:\n  vmlinuz: boot/vmlinuz\n  initrd: boot/initramfs.img\n  params: console=ttyS0 sysctl.kernel.kexec_load_disabled=1\n'
		fi
	} >"$WORK/cluster.yaml"
	if [ -n "$PROBE" ]; then
		[ "$(grep -cE "^  probe_(delay|interval): $PROBE\$" "$WORK/cluster.yaml")" = 2 ] ||
			{ echo "lab-deploy: no workflow.probe_delay/probe_interval in $CLUSTER_YAML to set" >&2; exit 2; }
	fi
	CLUSTER_YAML=$WORK/cluster.yaml
fi
say "kd-coord serve (state $WORK/coord), cluster add $CLUSTER_YAML (boot: $BOOT_METHOD)"
"$BIN/kd-lab" exec --state "$STATE" -- "$BIN/kd-coord" --state "$WORK/coord" serve 2>"$WORK/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 1 100); do
	[ -S "$WORK/coord/kd.sock" ] && "$BIN/kd-coord" --state "$WORK/coord" nodes >/dev/null 2>&1 && break
	kill -0 "$DAEMON_PID" 2>/dev/null || fail "kd-coord serve exited: $(tail -n 5 "$WORK/daemon.log")"
	sleep 0.1
done
"$BIN/kd-coord" --state "$WORK/coord" cluster add "$CLUSTER_YAML" | sed 's/^/  /'

# deploy PHASE: runs kd-coord deploy through the daemon (bounded by LIMIT), progress on stderr;
# sets RC.
# With FAIL_ONE set for this phase, powers FAIL_NODE off FAIL_AFTER s after the broadcast starts.
deploy() {
	local phase=$1 kill_node=${2:-}
	local out=$WORK/$phase.out err=$WORK/$phase.err
	: >"$err"
	rm -f "$WORK/$phase.ok" "$WORK/$phase.ko"
	local start
	start=$(now)
	set +e
	timeout --signal=TERM --kill-after=30 "$LIMIT" \
		"$BIN/kd-coord" --state "$WORK/coord" deploy \
		-e "$ENV_YAML" -m "$ALL" -k "$WORK/key.pub" --arity "$ARITY" \
		-o "$WORK/$phase.ok" -n "$WORK/$phase.ko" \
		>"$out" 2> >(tee -a "$err" >&2) &
	COORD_PID=$!
	if [ -n "$kill_node" ]; then
		# Bounded by the deploy itself: stop watching when kd-coord ends.
		while kill -0 "$COORD_PID" 2>/dev/null && ! grep -q 'broadcast round 1 started:' "$err"; do
			sleep 1
		done
		if grep -q 'broadcast round 1 started:' "$err"; then
			say "$phase: broadcast started ($(grep -m1 -o 'broadcast round 1 started:.*' "$err")); powering $kill_node off in $FAIL_AFTER s"
			sleep "$FAIL_AFTER"
			say "$phase: $kill_node power off: $("$BIN/kd-lab" power --state "$STATE" "$kill_node" off 2>&1)"
			KILLED_AT=$(now)
		fi
	fi
	wait "$COORD_PID"
	RC=$?
	COORD_PID=
	set -e
	sleep 0.2 # let tee flush
	ELAPSED=$(echo "$(now) - $start" | bc)
	say "$phase: kd-coord deploy exited $RC after $(printf '%.1f' "$ELAPSED") s; its report:"
	sed 's/^/  | /' "$out"
}

# check_ssh NODE...: port 22 and `ssh -i key root@IP true` from inside the lab namespace.
check_ssh() {
	local n ip
	for n in "$@"; do
		ip=$(ip_of "$n")
		"$BIN/kd-lab" exec --state "$STATE" -- timeout 10 bash -c "exec 3<>/dev/tcp/$ip/22" 2>/dev/null ||
			fail "$n ($ip): port 22 closed"
		local host
		host=$("$BIN/kd-lab" exec --state "$STATE" -- timeout 60 ssh -i "$WORK/key" -o BatchMode=yes \
			-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 \
			-o LogLevel=ERROR "root@$ip" 'true && . /etc/os-release && echo "$PRETTY_NAME, kernel $(uname -r), / on $(findmnt -no SOURCE /)"') ||
			fail "$n ($ip): ssh -i key root@$ip true failed"
		say "  $n ($ip): port 22 open, ssh with the key ok: $host"
		[ -z "$FIRMWARE" ] || check_efi "$n" "$ip"
	done
}

# check_efi NODE IP: the deployed system runs under UEFI and its ESP (vfat, mounted by fstab on
# /boot/efi) holds GRUB at the removable path the firmware boots.
check_efi() {
	local efi
	efi=$("$BIN/kd-lab" exec --state "$STATE" -- timeout 60 ssh -i "$WORK/key" -o BatchMode=yes \
		-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 \
		-o LogLevel=ERROR "root@$2" 'test -d /sys/firmware/efi && test "$(findmnt -no FSTYPE /boot/efi)" = vfat &&
			test -s /boot/efi/EFI/BOOT/BOOTX64.EFI && test -f /boot/grub/x86_64-efi/normal.mod &&
			echo "UEFI $(cat /sys/firmware/efi/fw_platform_size)-bit, ESP $(findmnt -no SOURCE /boot/efi) vfat: $(cd /boot/efi && find EFI -type f | sort | tr "\n" " ")"') ||
		fail "$1 ($2): not booted by UEFI from GRUB on a vfat ESP (/sys/firmware/efi, /boot/efi/EFI/BOOT/BOOTX64.EFI)"
	say "  $1 ($2): $efi"
}

sorted() { sort "$@" 2>/dev/null | tr '\n' ' ' | sed 's/ $//'; }

# --- phase 1: every node -----------------------------------------------------------------------
say "phase 1: kd-coord deploy -e $(basename "$ENV_YAML") -m $ALL --arity $ARITY -k key.pub (TCG: 5-15 min)"
deploy phase1
P1_TIME=$ELAPSED
[ "$RC" = 0 ] || fail "phase 1: kd-coord deploy exited $RC (expected 0)"
grep -q "^$NODES/$NODES nodes deployed" "$WORK/phase1.out" || fail "phase 1: no '$NODES/$NODES nodes deployed' line"
[ "$(wc -l <"$WORK/phase1.ok")" = "$NODES" ] || fail "phase 1: ok file: $(sorted "$WORK/phase1.ok")"
say "phase 1: $NODES/$NODES deployed in $(printf '%.0f' "$P1_TIME") s; checking ssh"
# The deploy initrd sent through fq_codel (its /init makes it the default qdisc; see initrd/README.md).
# Kernel messages can land in the middle of a line /init writes to the console: they are cut out
# (with their line end) before the line is looked for.
for i in $(seq 1 "$NODES"); do
	# grep -c, not -q: -q stops reading at the first match and, under pipefail, the writer's
	# SIGPIPE then failed the check although the line was there.
	perl -0777 -pe 's/\r//g; s/\[ *\d+\.\d+\][^\n]*\n//g' "$STATE/node$i.log" | grep -ac "eth0: up, qdisc fq_codel" >/dev/null ||
		fail "node$i: the deploy initrd's console has no 'eth0: up, qdisc fq_codel'; its lines about eth0: $(tr -d '\r' <"$STATE/node$i.log" | grep -a 'eth0' | head -5 | tr '\n' '|')"
done
mapfile -t OK1 <"$WORK/phase1.ok"
if [ "$BOOT_METHOD" = kexec ]; then
	# Each node said its kexec was loaded, and (BIOS) its firmware ran once only: for the deploy
	# initrd, not again for the deployed system.
	for n in "${OK1[@]}"; do
		# (progress lines: "kd-coord: [  T s] NODE:   kexec ok (MS ms): KERNEL with INITRD, command line: ...")
		line=$(grep -a -m1 " $n:   kexec " "$WORK/phase1.err" || true)
		want=1
		case "$line" in
		*"kexec ok"*) [ -z "$KEXEC_FAIL" ] || fail "$n: kexec worked although kexec_load is disabled: $line"
			say "  $n: ${line#*"$n":   }" ;;
		*"kexec FAILED"*) [ -n "$KEXEC_FAIL" ] || fail "$n: ${line#*"$n":   }"
			# The agent's own fallback: a firmware reboot into the deployed system.
			say "  $n (falls back): ${line#*"$n":   }"; want=2 ;;
		*) fail "$n: no 'kexec ok' or 'kexec FAILED' from its agent: ${line:-nothing about kexec}" ;;
		esac
		if [ -z "$FIRMWARE" ]; then
			banners=$(tr -d '\r' <"$STATE/${n}.log" | grep -ac 'SeaBIOS (version' || true)
			[ "$banners" = "$want" ] || fail "$n: $banners SeaBIOS banners on the console ($want expected: the deploy boot's$([ "$want" = 2 ] && echo ", the fallback reboot's"))"
		fi
	done
fi
check_ssh "${OK1[@]}"
say "phase 1 ok: ssh ok on $NODES/$NODES nodes"

# --- phase 2: one node lost during the broadcast ---------------------------------------------
if [ -n "$FAIL_ONE" ]; then
	say "phase 2: deploy again, $FAIL_NODE powered off $FAIL_AFTER s into the broadcast"
	KILLED_AT=
	deploy phase2 "$FAIL_NODE"
	[ -n "$KILLED_AT" ] || fail "phase 2: no 'broadcast round 1 started:' line from kd-coord"
	[ "$RC" = 1 ] || fail "phase 2: kd-coord deploy exited $RC (expected 1)"
	grep -q "^$((NODES - 1))/$NODES nodes deployed" "$WORK/phase2.out" || fail "phase 2: no '$((NODES - 1))/$NODES nodes deployed' line"
	[ "$(sorted "$WORK/phase2.ko")" = "$FAIL_NODE" ] || fail "phase 2: ko file: '$(sorted "$WORK/phase2.ko")' (expected $FAIL_NODE)"
	[ "$(wc -l <"$WORK/phase2.ok")" = "$((NODES - 1))" ] || fail "phase 2: ok file: $(sorted "$WORK/phase2.ok")"
	row=$(awk -v n="$FAIL_NODE" '$1 == n && toupper($2) == "KO"' "$WORK/phase2.out" | head -n1)
	[ -n "$row" ] || fail "phase 2: no KO row for $FAIL_NODE in the report"
	say "phase 2: $FAIL_NODE KO: $(echo "$row" | tr -s ' ')"
	say "phase 2: ended $(printf '%.0f' "$(echo "$(now) - $KILLED_AT" | bc)") s after the power-off; checking ssh on the others"
	mapfile -t OK2 <"$WORK/phase2.ok"
	check_ssh "${OK2[@]}"
	say "phase 2 ok: $((NODES - 1))/$NODES deployed, $FAIL_NODE KO, ssh ok on the others"
fi
say "done: phase 1 $(printf '%.0f' "$P1_TIME") s${FAIL_ONE:+, phase 2 $(printf '%.0f' "$ELAPSED") s}; tearing the lab down"
