#!/usr/bin/env bash
# Build kd's deploy initrd, debirf-style: a minimal Debian 12 root (mmdebstrap --variant=minbase)
# with Debian's kernel and the modules for common hardware, disk tools, GRUB, busybox's udhcpc,
# /init (initrd/init) and kd-agent, packed as a zstd-compressed newc cpio.
#
#   initrd/build.sh --agent PATH/TO/kd-agent --out DIR [--cache-dir DIR] [--mirror URL]
#                   [--deb-cache DIR] [--zstd-level N] [--force]
#
# Writes DIR/vmlinuz and DIR/initramfs.img, prints the input hash, the sizes and the build time.
# The result is cached under CACHE_DIR/<hash>/ (default /var/cache/kd/initrd); the hash covers this
# script, packages.txt, modules.txt, init, udhcpc.script, the agent binary, the mirror and the zstd
# level, so a rebuild happens only when one of them changes (--force rebuilds anyway).
# Needs root and: mmdebstrap cpio zstd kmod (Debian packages).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
CACHE_DIR=/var/cache/kd/initrd
DEB_CACHE=/var/cache/kd/debs
ZSTD_LEVEL=9
AGENT=
OUT=
FORCE=

usage() {
	sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}

die() {
	echo "initrd/build.sh: error: $*" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case "$1" in
	--agent) AGENT=${2:?--agent needs a path}; shift 2 ;;
	--out) OUT=${2:?--out needs a directory}; shift 2 ;;
	--cache-dir) CACHE_DIR=${2:?--cache-dir needs a directory}; shift 2 ;;
	--deb-cache) DEB_CACHE=${2:?--deb-cache needs a directory}; shift 2 ;;
	--mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
	--zstd-level) ZSTD_LEVEL=${2:?--zstd-level needs a number}; shift 2 ;;
	--force) FORCE=1; shift ;;
	-h | --help) usage 0 ;;
	*) echo "unknown argument: $1" >&2; usage 2 ;;
	esac
done
[ -n "$AGENT" ] || die "--agent PATH is required (the kd-agent binary to put in the initrd)"
[ -n "$OUT" ] || die "--out DIR is required"
[ -f "$AGENT" ] || die "agent binary not found: $AGENT"
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, mknod)"
for tool in mmdebstrap cpio zstd depmod sha256sum; do
	command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install mmdebstrap cpio zstd kmod)"
done

INPUTS=("$SCRIPT_DIR/build.sh" "$SCRIPT_DIR/packages.txt" "$SCRIPT_DIR/modules.txt"
	"$SCRIPT_DIR/init" "$SCRIPT_DIR/udhcpc.script" "$AGENT")

# input_hash: sha256 over the inputs' names and contents and the build parameters.
input_hash() {
	{
		for f in "${INPUTS[@]}"; do
			printf '%s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
		done
		printf 'suite=%s mirror=%s zstd=%s\n' "$SUITE" "$MIRROR" "$ZSTD_LEVEL"
	} | sha256sum | cut -c1-16
}

# publish SRC_DIR: copy the artifacts to OUT and print the summary.
publish() {
	local src=$1
	mkdir -p "$OUT"
	cp -f "$src/vmlinuz" "$OUT/vmlinuz.tmp" && mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
	cp -f "$src/initramfs.img" "$OUT/initramfs.img.tmp" && mv -f "$OUT/initramfs.img.tmp" "$OUT/initramfs.img"
	echo "initrd: hash $HASH"
	echo "initrd: $OUT/vmlinuz $(stat -c %s "$OUT/vmlinuz") bytes"
	echo "initrd: $OUT/initramfs.img $(stat -c %s "$OUT/initramfs.img") bytes ($(du -m "$OUT/initramfs.img" | cut -f1) MB)"
	[ -f "$src/info" ] && sed 's/^/initrd: /' "$src/info"
	return 0
}

START=$(date +%s)
HASH=$(input_hash)
CACHE="$CACHE_DIR/$HASH"
if [ -z "$FORCE" ] && [ -f "$CACHE/initramfs.img" ] && [ -f "$CACHE/vmlinuz" ]; then
	echo "initrd: inputs unchanged: reusing $CACHE"
	publish "$CACHE"
	echo "initrd: build time 0 s (cached)"
	exit 0
fi

mkdir -p "$CACHE_DIR"
WORK=$(mktemp -d "$CACHE_DIR/.build-$HASH.XXXXXX")
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
ROOT="$WORK/root"
mkdir -p "$WORK/out"

# ---- 1. the Debian root -------------------------------------------------------------------------
PACKAGES=$(grep -v '^[[:space:]]*#' "$SCRIPT_DIR/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
echo "initrd: [1/5] mmdebstrap $SUITE minbase from $MIRROR: $PACKAGES"
EXCLUDES=('/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*'
	'/usr/share/lintian/*'
	'/etc/kernel/postinst.d/initramfs-tools' # no initrd for the initrd's own kernel
	'/lib/modules/*/kernel/drivers/gpu/*' '/lib/modules/*/kernel/drivers/media/*'
	'/lib/modules/*/kernel/sound/*' '/lib/modules/*/kernel/drivers/net/wireless/*'
	'/lib/modules/*/kernel/drivers/infiniband/*' '/lib/modules/*/kernel/drivers/staging/*')
DPKGOPTS=()
for e in "${EXCLUDES[@]}"; do DPKGOPTS+=(--dpkgopt="path-exclude=$e"); done
# downloaded .debs are kept in DEB_CACHE and reused by the next build (mmdebstrap's sync-in/out)
mkdir -p "$DEB_CACHE"
mmdebstrap --variant=minbase --mode=root --format=directory \
	--include="$PACKAGES" "${DPKGOPTS[@]}" \
	--aptopt='Acquire::Retries "3"' \
	--skip=download/empty --skip=essential/unlink \
	--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
	--setup-hook="sync-in $DEB_CACHE /var/cache/apt/archives/" \
	--customize-hook="sync-out /var/cache/apt/archives $DEB_CACHE" \
	"$SUITE" "$ROOT" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 ||
	{ cp "$WORK/mmdebstrap.log" "$CACHE_DIR/mmdebstrap-failed.log"; tail -n 40 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $CACHE_DIR/mmdebstrap-failed.log)"; }
T_DEBOOTSTRAP=$(($(date +%s) - START))

mapfile -t KVERS < <(ls "$ROOT/lib/modules")
[ "${#KVERS[@]}" = 1 ] || die "expected one kernel in the root, found: ${KVERS[*]}"
KVER=${KVERS[0]}
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/out/vmlinuz"

# ---- 2. kernel modules: keep the listed subtrees and their dependencies ------------------------
echo "initrd: [2/5] pruning kernel modules of $KVER (modules.txt)"
MODDIR="$ROOT/lib/modules/$KVER"
depmod -b "$ROOT" "$KVER"
(
	cd "$MODDIR"
	keep=$(mktemp)
	drop_patterns=()
	while read -r line; do
		line=${line%%#*}
		line=${line//[[:space:]]/}
		[ -n "$line" ] || continue
		if [ "${line:0:1}" = '!' ]; then
			drop_patterns+=("kernel/${line:1}")
		elif [ -d "kernel/$line" ]; then
			find "kernel/$line" -name '*.ko*' >>"$keep"
		elif [ -f "kernel/$line" ]; then
			echo "kernel/$line" >>"$keep"
		else
			echo "initrd:   note: modules.txt: $line not in $KVER" >&2
		fi
	done <"$SCRIPT_DIR/modules.txt"
	# drop the '!' paths, then add every dependency (modules.dep lists them transitively)
	wanted=$(mktemp)
	while read -r m; do
		skip=
		for p in "${drop_patterns[@]}"; do
			# shellcheck disable=SC2053 # glob match on purpose
			[[ $m == $p ]] && { skip=1; break; }
		done
		[ -n "$skip" ] || echo "$m"
	done <"$keep" | sort -u >"$wanted"
	awk -F': *' 'NR==FNR { want[$1]=1; next }
		($1 in want) { print $1; n=split($2, d, " "); for (i=1; i<=n; i++) print d[i] }' \
		"$wanted" modules.dep | sort -u >"$keep"
	before=$(du -sm kernel | cut -f1)
	find kernel -name '*.ko*' | sort >"$wanted"
	comm -23 "$wanted" "$keep" | xargs -r rm -f
	find kernel -type d -empty -delete
	echo "initrd:   modules: kept $(grep -c . "$keep") of $(grep -c . "$wanted"), ${before} MB -> $(du -sm kernel | cut -f1) MB"
	rm -f "$keep" "$wanted"
)
depmod -b "$ROOT" "$KVER"
# the modules /init loads by name must resolve (vfat and its code pages: mounting a UEFI node's ESP
# for grub-install x86_64-efi; efivarfs: /sys/firmware/efi/efivars on UEFI)
for m in virtio_pci virtio_net virtio_blk virtio_scsi nvme ahci sd_mod e1000 e1000e igb ixgbe ext4 xfs vfat \
	nls_cp437 nls_iso8859_1 nls_ascii nls_utf8 efivarfs sch_fq_codel; do
	modprobe -d "$ROOT" -S "$KVER" --show-depends "$m" >/dev/null ||
		die "module $m (or a dependency) missing after pruning"
done

# ---- 3. slim the root -------------------------------------------------------------------------------
echo "initrd: [3/5] slimming the root"
# Packages pulled in by dependencies that nothing in the initrd runs: their files are deleted
# (xfsprogs depends on python3 and ICU for xfs_scrub only; usrmerge on perl; the kernel on
# initramfs-tools and udev; apt, gpgv and perl only serve package management, never run here).
# The ldd checks below catch a missing library.
REMOVE_PKGS=(usrmerge libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl perl
	perl-modules-5.36 libperl5.36 perl-base python3 python3-minimal python3.11 python3.11-minimal
	libpython3.11-minimal libpython3.11-stdlib libpython3-stdlib media-types libicu72
	initramfs-tools initramfs-tools-core klibc-utils libklibc udev apt libapt-pkg6.0 tzdata
	gpgv debian-archive-keyring debconf)
rm -f "$ROOT"/usr/sbin/xfs_scrub* "$ROOT"/usr/lib/*/xfs_scrub* "$ROOT"/usr/lib/systemd/system/xfs_scrub*
for pkg in "${REMOVE_PKGS[@]}"; do
	for list in "$ROOT/var/lib/dpkg/info/$pkg.list" "$ROOT/var/lib/dpkg/info/$pkg:amd64.list"; do
		[ -f "$list" ] || continue
		while read -r f; do
			[ -d "$ROOT$f" ] && continue # directories, and symlinks to them (/bin -> usr/bin)
			rm -f "$ROOT$f"
		done <"$list"
	done
done
# GRUB: keep what grub-install needs (grub-install, -mkimage, -probe, -bios-setup, -editenv,
# -mkconfig and the platform modules); drop the image/rescue/font makers and their fonts.
for t in grub-mkrescue grub-fstest grub-mount grub-syslinux2cfg grub-render-label grub-mknetdir \
	grub-mkstandalone grub-macbless grub-mkfont grub-glue-efi grub-mklayout grub-mkpasswd-pbkdf2 \
	grub-menulst2cfg grub-ofpathname grub-sparc64-setup grub-kbdcomp grub-script-check grub-file; do
	rm -f "$ROOT/usr/bin/$t" "$ROOT/usr/sbin/$t"
done
rm -rf "${ROOT:?}/boot"/* "$ROOT"/vmlinuz* "$ROOT"/initrd.img* \
	"$ROOT"/var/cache/apt "$ROOT"/var/lib/apt "$ROOT"/var/cache/debconf \
	"$ROOT"/var/log/* "$ROOT"/usr/share/doc "$ROOT"/usr/share/man "$ROOT"/usr/share/info \
	"$ROOT"/usr/share/locale "$ROOT"/usr/share/lintian "$ROOT"/usr/share/initramfs-tools \
	"$ROOT"/usr/lib/grub/*/*.module "$ROOT"/usr/lib/grub/*/monolithic "$ROOT"/usr/share/grub/*.pf2 \
	"$ROOT"/etc/initramfs-tools "$ROOT"/usr/lib/firmware "$ROOT"/usr/share/bug \
	"$ROOT"/usr/share/zsh "$ROOT"/usr/share/bash-completion "$ROOT"/usr/share/perl* \
	"$ROOT"/usr/lib/x86_64-linux-gnu/perl* "$ROOT"/usr/lib/python3* "$ROOT"/usr/share/python3 \
	"$ROOT"/var/lib/dpkg/info "$ROOT"/usr/bin/pzstd "$ROOT"/usr/share/keyrings
mkdir -p "$ROOT/var/lib/dpkg/info" # dpkg -l still works from the status file
# gconv: keep only what glibc's iconv needs for UTF-8/ASCII (nothing else uses it here)
if [ -d "$ROOT/usr/lib/x86_64-linux-gnu/gconv" ]; then
	find "$ROOT/usr/lib/x86_64-linux-gnu/gconv" -name '*.so' ! -name 'UNICODE.so' ! -name 'UTF-*.so' -delete
fi

# ---- 4. kd's files: /init, the udhcpc script, kd-agent and the libraries it needs --------------
echo "initrd: [4/5] installing /init, udhcpc script and kd-agent ($AGENT)"
install -m 0755 "$SCRIPT_DIR/init" "$ROOT/init"
install -D -m 0755 "$SCRIPT_DIR/udhcpc.script" "$ROOT/usr/share/kd/udhcpc.script"
install -D -m 0755 "$AGENT" "$ROOT/usr/local/bin/kd-agent"
# a debug build carries ~100 MB of debug info: drop it (the symbols stay for backtraces)
if command -v strip >/dev/null && file_size=$(stat -c %s "$AGENT") &&
	strip --strip-debug "$ROOT/usr/local/bin/kd-agent" 2>/dev/null; then
	echo "initrd:   kd-agent: $file_size -> $(stat -c %s "$ROOT/usr/local/bin/kd-agent") bytes (strip --strip-debug)"
fi
# The agent is a dynamically linked glibc binary built on a Debian 12 host: its libraries must
# be in the root; a library the Debian root lacks is copied from the build host.
if ldd "$AGENT" >"$WORK/ldd" 2>&1; then
	while read -r soname _ path _; do
		case "$soname" in linux-vdso* | "") continue ;; esac
		if [ "$soname" = "${soname#/}" ]; then # "libfoo.so.1 => /path (addr)"
			found=$(find "$ROOT/usr/lib/x86_64-linux-gnu" -maxdepth 1 -name "$soname" 2>/dev/null | head -n1)
			if [ -z "$found" ]; then
				[ -f "$path" ] || die "agent library $soname not found on the host either"
				echo "initrd:   agent library $soname not in the Debian root: copying $path"
				cp -L "$path" "$ROOT/usr/lib/x86_64-linux-gnu/$soname"
			fi
		fi
	done <"$WORK/ldd"
	echo "initrd:   agent libraries: $(awk '{print $1}' "$WORK/ldd" | grep -v vdso | tr '\n' ' ')"
else
	echo "initrd:   agent is not a dynamic executable ($(head -n1 "$WORK/ldd" | tr -d '\t')): nothing to add"
fi
echo "$HASH $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$ROOT/etc/kd-initrd-build"
echo kd-deploy >"$ROOT/etc/hostname"
: >"$ROOT/etc/fstab"
rm -f "$ROOT/etc/resolv.conf" && : >"$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/root" "$ROOT/run" "$ROOT/tmp" "$ROOT/mnt"
# the kernel opens /dev/console before it runs /init: the node must be in the cpio
rm -rf "${ROOT:?}/dev" && mkdir -m 0755 "$ROOT/dev"
mknod -m 0600 "$ROOT/dev/console" c 5 1
mknod -m 0666 "$ROOT/dev/null" c 1 3

# Shared libraries: keep those some program here links (ldd is transitive) and those glibc
# loads at run time (NSS, libgcc_s for thread cancellation, iconv, PAM); delete the rest.
LIBDIR=/usr/lib/x86_64-linux-gnu
chroot "$ROOT" /bin/bash -c 'for f in /usr/bin/* /usr/sbin/* /usr/local/bin/* '"$LIBDIR"'/security/*.so '"$LIBDIR"'/libnss_*; do
	[ -f "$f" ] || continue
	ldd "$f" 2>/dev/null | awk "/=> \\// { print \$3 } /^\t\// { print \$1 }"
done | sort -u | xargs -r readlink -f | sort -u' >"$WORK/libs-needed"
find "$ROOT$LIBDIR" -maxdepth 1 -name '*.so*' \( -type f -o -type l \) | while read -r lib; do
	case "${lib##*/}" in
	ld-linux* | libc.so* | libm.so* | libmvec* | libgcc_s* | libnss_* | libresolv* | libpthread* | \
		libdl.so* | librt.so* | libutil.so* | libanl* | libpam* | libBrokenLocale* | libthread_db*) continue ;;
	esac
	real=$(readlink -f "$lib") && real=${real#"$ROOT"}
	grep -qxF "$real" "$WORK/libs-needed" || rm -f "$lib"
done
# dangling library symlinks left by the removals (relative links: checked inside the root)
find "$ROOT$LIBDIR" -maxdepth 1 -type l | while read -r l; do
	[ -e "$ROOT$LIBDIR/$(readlink "$l")" ] || [ -e "$ROOT$(readlink "$l")" ] || rm -f "$l"
done
chroot "$ROOT" /sbin/ldconfig

# every dynamic executable and library must still find its libraries
chroot "$ROOT" /bin/bash -c 'for f in /usr/bin/* /usr/sbin/* /usr/local/bin/* /usr/lib/x86_64-linux-gnu/*.so*; do
	[ -f "$f" ] && [ ! -L "$f" ] || continue
	out=$(ldd "$f" 2>/dev/null) || continue
	case "$out" in *"not found"*) echo "$f: $(echo "$out" | grep "not found" | tr -s " \t\n" " ")" ;; esac
done' >"$WORK/ldd-missing"
if [ -s "$WORK/ldd-missing" ]; then
	sed 's/^/initrd:   missing library: /' "$WORK/ldd-missing" >&2
	die "the slimmed root lacks libraries (see above)"
fi
for tool in sfdisk wipefs blkid blockdev partx mkfs.ext4 mkfs.xfs mkfs.vfat grub-install grub-mkimage \
	grub-probe zstd tar ip modprobe busybox bash mount setsid kexec; do
	chroot "$ROOT" /bin/bash -c "command -v $tool" >/dev/null || die "tool $tool missing from the root"
done
# grub-install's two platforms: BIOS (i386-pc) and UEFI (x86_64-efi, onto the ESP)
for f in i386-pc/boot.img i386-pc/normal.mod i386-pc/part_gpt.mod i386-pc/ext2.mod \
	x86_64-efi/normal.mod x86_64-efi/part_gpt.mod x86_64-efi/fat.mod x86_64-efi/ext2.mod \
	x86_64-efi/modinfo.sh; do
	[ -f "$ROOT/usr/lib/grub/$f" ] || die "GRUB file /usr/lib/grub/$f missing from the root"
done
chroot "$ROOT" /usr/local/bin/kd-agent --version >/dev/null 2>&1 ||
	echo "initrd:   note: 'kd-agent --version' did not succeed in the root (fine for a stand-in agent)"

# ---- 5. pack -------------------------------------------------------------------------------------------
ROOT_MB=$(du -sm "$ROOT" | cut -f1)
echo "initrd: [5/5] packing ${ROOT_MB} MB as a zstd -$ZSTD_LEVEL cpio"
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --quiet --reproducible) |
	zstd -q -T0 "-$ZSTD_LEVEL" -o "$WORK/out/initramfs.img"
END=$(date +%s)
{
	echo "kernel $KVER"
	echo "root ${ROOT_MB} MB unpacked"
	echo "built in $((END - START)) s (mmdebstrap ${T_DEBOOTSTRAP} s)"
} >"$WORK/out/info"

# ---- cache and publish ---------------------------------------------------------------------------------
rm -rf "$CACHE"
mv "$WORK/out" "$CACHE"
publish "$CACHE"
