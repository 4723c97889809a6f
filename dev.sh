#!/usr/bin/env bash
# kd's developer entry point (run as root on Debian 12; it installs what is missing).
#
#   ./dev.sh setup   install the Debian packages kd's build, tests and lab need
#   ./dev.sh check-setup   run setup in a fresh Debian 12 root (what CI does first)
#   ./dev.sh build   setup + build every binary, the deploy initrd and the test environment
#                    (both cached by input hash)
#   ./dev.sh test    build + run every test (the command CI runs)
#   ./dev.sh demo    build + a 3-node virtual cluster: the nodes PXE-boot kd's deploy initrd,
#                    kd-coord deploy writes Debian 12 to their disks, they boot it, ssh works
#                    (scripts/lab-deploy.sh; args after `demo` go to it, e.g. --nodes 2)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# One line per need. qemu-utils is not named: a newer one may already be installed (lab.md).
PACKAGES=(
	build-essential pkg-config             # cc for the zstd/blake3/ring crates
	iproute2 tar zstd xz-utils gzip bc      # netns, veth, tc; image packing; post-install archives
	e2fsprogs xfsprogs dosfstools fdisk util-linux   # disk pipeline tests (loop devices)
	grub-pc-bin grub-efi-amd64-bin grub2-common      # grub-install i386-pc / x86_64-efi
	mmdebstrap cpio kmod busybox-static     # deploy initrd and test environment builds
	qemu-system-x86 ipxe-qemu dnsmasq-base pxelinux syslinux-common   # the virtual lab
	ovmf                                    # the lab's UEFI nodes (iPXE's EFI binary: see setup)
	openssh-client                          # the lab demo/test logs in to the deployed nodes
)

setup() {
	local missing=()
	for p in "${PACKAGES[@]}"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "dev.sh: installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
	fi
	# iPXE's EFI binary for the lab's UEFI PXE clients, unpacked from the `ipxe` package rather
	# than installed: its postinst runs update-grub and would add entries to this host's menu.
	if [ ! -f /var/cache/kd/ipxe/snponly.efi ] || [ ! -f /var/cache/kd/ipxe/ipxe.efi ]; then
		local d
		d=$(mktemp -d)
		(cd "$d" && { apt-get download -qq ipxe 2>/dev/null || { apt-get update -qq && apt-get download -qq ipxe; }; } && dpkg-deb -x ipxe_*.deb root)
		mkdir -p /var/cache/kd/ipxe
		# Some of the package's files are absolute symlinks (/usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi):
		# follow each inside the unpacked root, never on this host.
		local f t
		for f in snponly.efi ipxe.efi; do
			t="usr/lib/ipxe/$f"
			while [ -L "$d/root/$t" ]; do
				local l
				l=$(readlink "$d/root/$t")
				case "$l" in /*) t="${l#/}" ;; *) t="$(dirname "$t")/$l" ;; esac
			done
			[ -f "$d/root/$t" ] || { echo "dev.sh: the ipxe package has no $f (looked for /$t)" >&2; exit 1; }
			cp "$d/root/$t" "/var/cache/kd/ipxe/$f.tmp" && mv "/var/cache/kd/ipxe/$f.tmp" "/var/cache/kd/ipxe/$f"
		done
		rm -rf "$d"
	fi
	verify_installed
	[ -n "${KD_SETUP_NO_RUST:-}" ] || check_rust
}

# What the builds, tests and lab run, checked after installing: a package that no longer ships a
# command or file the code names fails here, with the name, instead of in the middle of a test.
TOOLS=(cc pkg-config strip ip tc tar zstd pzstd xz gzip bc mkfs.ext4 mkfs.xfs mkfs.vfat sfdisk losetup
	blkid wipefs grub-install mmdebstrap cpio depmod qemu-system-x86_64 dnsmasq ssh ssh-keygen)
FILES=(/usr/lib/PXELINUX/pxelinux.0 /usr/lib/syslinux/modules/bios/ldlinux.c32 /bin/busybox
	/usr/lib/grub/i386-pc/boot.img /usr/lib/grub/x86_64-efi/kernel.img
	/usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_VARS_4M.fd
	/usr/lib/ipxe/qemu/efi-virtio.rom /var/cache/kd/ipxe/snponly.efi /var/cache/kd/ipxe/ipxe.efi)

verify_installed() {
	local bad=()
	for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null || bad+=("command $t"); done
	for f in "${FILES[@]}"; do [ -f "$f" ] || bad+=("file $f"); done
	if [ ${#bad[@]} -gt 0 ]; then
		printf 'dev.sh: setup is incomplete, missing: %s\n' "${bad[@]}" >&2
		exit 1
	fi
}

# Rust is the one thing setup does not install (Debian 12's rustc is older than kd needs).
check_rust() {
	local want have
	want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
	command -v cargo >/dev/null || {
		echo "dev.sh: cargo not found: kd needs Rust >= $want (install it with rustup, https://rustup.rs)" >&2
		exit 1
	}
	have=$(rustc --version | cut -d' ' -f2)
	if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
		echo "dev.sh: rustc $have is older than kd's rust-version $want (rustup update)" >&2
		exit 1
	fi
}

# The set-up check CI runs: `setup` in a fresh Debian 12 root (mmdebstrap minbase), so that a
# package or file installed by hand on this machine cannot hide a missing install step. Rust is
# checked on the host (check_rust): it does not come from Debian.
check_setup() {
	setup
	local root log rc=0
	root=$(mktemp -d /tmp/kd-freshroot.XXXXXX)
	log="$root.log"
	echo "dev.sh check-setup: a fresh Debian 12 root in $root, then ./dev.sh setup inside it (log: $log)"
	# The root's /var/cache/kd is its own (mmdebstrap mounts /proc, /sys and /dev for the hooks
	# and unmounts them, even when a hook fails).
	mmdebstrap --variant=minbase --mode=root --format=directory \
		--aptopt='Acquire::Retries "3"' \
		--customize-hook='mkdir -p "$1/opt/kd"' \
		--customize-hook="copy-in dev.sh Cargo.toml /opt/kd/" \
		--customize-hook='chroot "$1" env KD_SETUP_NO_RUST=1 /opt/kd/dev.sh setup' \
		bookworm "$root" http://deb.debian.org/debian >"$log" 2>&1 || rc=$?
	if [ "$rc" != 0 ]; then
		tail -n 30 "$log" >&2
		echo "dev.sh check-setup: FAILED: ./dev.sh setup does not work on a fresh Debian 12 root (log: $log)" >&2
	else
		echo "dev.sh check-setup: ok, setup works on a fresh Debian 12 root"
		rm -f "$log"
	fi
	rm -rf --one-file-system "$root"
	return "$rc"
}

# Cargo's output directory (CARGO_TARGET_DIR is honoured: a clone may share another's target/).
target_dir() { realpath -m "${CARGO_TARGET_DIR:-target}"; }

build() {
	setup
	cargo build --workspace --bins
	mkdir -p build
	# The initrd gets a stripped copy of the agent (the debug build carries ~100 MB of symbols).
	strip --strip-debug -o build/kd-agent "$(target_dir)/debug/kd-agent"
	initrd/build.sh --agent build/kd-agent --out build/initrd
	# The test environment the lab deploys (Debian 12 + sshd, ~3 min the first time).
	envs/build-debian12.sh --out build/env
}

case "${1:-}" in
setup) setup ;;
check-setup) check_setup ;;
build) build ;;
test)
	build
	# Everything, as root: loop devices, namespaces and QEMU nodes are created and removed by the tests.
	KD_INITRD_DIR="$PWD/build/initrd" cargo test --workspace -- --test-threads 2
	;;
demo)
	build
	KD_BIN_DIR="$(target_dir)/debug" exec scripts/lab-deploy.sh --env build/env/debian12-min.yaml "${@:2}"
	;;
*)
	sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
