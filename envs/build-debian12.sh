#!/usr/bin/env bash
# Build kd's test environment: a small bootable Debian 12 (bookworm) image as a tar for kd.
#
#   envs/build-debian12.sh [--out ENV_DIR] [--cache-dir DIR] [--mirror URL] [--deb-cache DIR]
#                          [--zstd-level N] [--force]
#
# Writes ENV_DIR/debian12-min.tar.zst (a zstd-compressed tar of the root file system; pack it for
# kd with `kd-coord image pack ENV_DIR/debian12-min.tar.zst -o X.kdi` if needed) and
# ENV_DIR/debian12-min.yaml (the environment description, Kadeploy's fields; image.file is the
# absolute path of the tar.zst). ENV_DIR defaults to ./envs-out.
# The root: mmdebstrap minbase + linux-image-amd64, systemd-sysv, udev, kmod, iproute2,
# openssh-server; docs, man pages, locales and unneeded kernel module trees excluded; DHCP on every
# en*/eth* interface by systemd-networkd; root password locked (log in with the SSH key kd puts in
# /root/.ssh/authorized_keys); an ed25519 SSH host key made on first boot; "KD-DEPLOYED-OK" written
# to ttyS0 once sshd is up; a small initrd (initramfs-tools, MODULES=list of storage drivers).
# No /etc/fstab entry: the root is the kernel's root= (given by kd's boot loader set-up), mounted
# read-write by the "rw" in kernel_params.
# Cached by input hash (this script but its YAML writer, the mirror, the zstd level) under CACHE_DIR/<hash>/
# (default /var/cache/kd/envs). Needs root and: mmdebstrap zstd (Debian packages).
set -euo pipefail

NAME=debian12-min
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
CACHE_DIR=/var/cache/kd/envs
DEB_CACHE=/var/cache/kd/debs
ZSTD_LEVEL=9
OUT=./envs-out
FORCE=

die() {
	echo "envs/build-debian12.sh: error: $*" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case "$1" in
	--out) OUT=${2:?--out needs a directory}; shift 2 ;;
	--cache-dir) CACHE_DIR=${2:?--cache-dir needs a directory}; shift 2 ;;
	--deb-cache) DEB_CACHE=${2:?--deb-cache needs a directory}; shift 2 ;;
	--mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
	--zstd-level) ZSTD_LEVEL=${2:?--zstd-level needs a number}; shift 2 ;;
	--force) FORCE=1; shift ;;
	-h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root)"
for tool in mmdebstrap zstd tar sha256sum; do
	command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install mmdebstrap zstd)"
done

START=$(date +%s)
HASH=$({
	# The image's inputs only: the YAML writer (write_yaml) is left out, its output is not cached.
	sed '/^write_yaml() {$/,/^}$/d' "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1
	printf 'suite=%s mirror=%s zstd=%s\n' "$SUITE" "$MIRROR" "$ZSTD_LEVEL"
} | sha256sum | cut -c1-16)
CACHE="$CACHE_DIR/$HASH"

# write_yaml FILE IMAGE_PATH: the environment description (Kadeploy's fields).
write_yaml() {
	cat >"$1" <<EOF
# kd environment description (Kadeploy 3 fields), made by envs/build-debian12.sh (input hash $HASH)
name: $NAME
version: 1
description: "Debian 12 (bookworm) minimal: systemd, systemd-networkd DHCP on en*/eth*, openssh-server; root login by SSH key only"
author: kd
visibility: public
destructive: false
os: linux
image:
  file: $2
  kind: tar
  compression: zstd
boot:
  kernel: /vmlinuz
  initrd: /initrd.img
  kernel_params: "console=tty0 console=ttyS0,115200n8 rw"
filesystem: ext4
partition_type: 0x83
postinstalls: []
EOF
}

publish() {
	mkdir -p "$OUT"
	local out_abs
	out_abs=$(cd "$OUT" && pwd)
	cp -f "$CACHE/$NAME.tar.zst" "$out_abs/$NAME.tar.zst.tmp"
	mv -f "$out_abs/$NAME.tar.zst.tmp" "$out_abs/$NAME.tar.zst"
	write_yaml "$out_abs/$NAME.yaml" "$out_abs/$NAME.tar.zst"
	echo "env: hash $HASH"
	echo "env: $out_abs/$NAME.tar.zst $(stat -c %s "$out_abs/$NAME.tar.zst") bytes ($(du -m "$out_abs/$NAME.tar.zst" | cut -f1) MB)"
	echo "env: $out_abs/$NAME.yaml"
	sed 's/^/env: /' "$CACHE/info"
}

if [ -z "$FORCE" ] && [ -f "$CACHE/$NAME.tar.zst" ] && [ -f "$CACHE/info" ]; then
	echo "env: inputs unchanged: reusing $CACHE"
	publish
	echo "env: build time 0 s (cached)"
	exit 0
fi

mkdir -p "$CACHE_DIR" "$DEB_CACHE"
WORK=$(mktemp -d "$CACHE_DIR/.build-$HASH.XXXXXX")
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
ROOT="$WORK/root"

# Module trees a small server/VM image does not need (they are most of the kernel package).
M=/lib/modules/*/kernel
EXCLUDES=('/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*'
	'/usr/share/lintian/*'
	"$M/sound/*" "$M/drivers/gpu/*" "$M/drivers/media/*" "$M/drivers/net/wireless/*"
	"$M/drivers/infiniband/*" "$M/drivers/staging/*" "$M/drivers/iio/*" "$M/drivers/bluetooth/*"
	"$M/drivers/isdn/*" "$M/drivers/mtd/*" "$M/drivers/comedi/*" "$M/drivers/usb/gadget/*"
	"$M/drivers/input/joystick/*" "$M/drivers/input/touchscreen/*" "$M/drivers/input/tablet/*"
	"$M/drivers/hid/*" "$M/drivers/video/*" "$M/drivers/thunderbolt/*" "$M/drivers/target/*"
	"$M/drivers/nfc/*" "$M/drivers/w1/*" "$M/drivers/mmc/*" "$M/drivers/net/can/*"
	"$M/drivers/net/usb/*" "$M/drivers/net/wwan/*" "$M/drivers/net/ieee802154/*"
	"$M/drivers/net/hamradio/*" "$M/drivers/net/dsa/*" "$M/drivers/scsi/qla2xxx/*"
	"$M/drivers/scsi/lpfc/*" "$M/drivers/scsi/bnx2fc/*" "$M/drivers/scsi/qedf/*"
	"$M/drivers/scsi/qedi/*" "$M/drivers/scsi/fcoe/*"
	"$M/net/wireless/*" "$M/net/mac80211/*" "$M/net/bluetooth/*" "$M/net/netfilter/*"
	"$M/net/ceph/*" "$M/net/sunrpc/*" "$M/net/tipc/*" "$M/net/sctp/*"
	"$M/fs/btrfs/*" "$M/fs/ocfs2/*" "$M/fs/gfs2/*" "$M/fs/smb/*" "$M/fs/nfs/*" "$M/fs/nfsd/*"
	"$M/fs/ceph/*" "$M/fs/afs/*" "$M/fs/f2fs/*" "$M/fs/ubifs/*")
DPKGOPTS=()
for e in "${EXCLUDES[@]}"; do DPKGOPTS+=(--dpkgopt="path-exclude=$e"); done

# initramfs-tools settings, in place before the kernel's postinst builds the initrd: a small
# initrd with the storage drivers listed in the hook (MODULES=list)
mkdir -p "$WORK/files"
printf 'MODULES=list\nCOMPRESS=zstd\n' >"$WORK/files/kd.conf"
cat >"$WORK/files/kd-storage" <<'EOF'
#!/bin/sh
# kd test image: the storage drivers and file systems its initrd carries
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk virtio_scsi nvme ahci ata_piix sd_mod ext4 xfs \
	megaraid_sas mpt3sas hpsa smartpqi aacraid vmw_pvscsi hv_storvsc xen-blkfront; do
	manual_add_modules "$m"
done
EOF
chmod 0755 "$WORK/files/kd-storage"

PKGS=linux-image-amd64,systemd-sysv,udev,kmod,iproute2,openssh-server
echo "env: [1/3] mmdebstrap $SUITE minbase from $MIRROR: $PKGS"
mmdebstrap --variant=minbase --mode=root --format=directory \
	--include="$PKGS" "${DPKGOPTS[@]}" \
	--aptopt='Acquire::Retries "3"' \
	--skip=download/empty --skip=essential/unlink \
	--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
	--setup-hook="sync-in $DEB_CACHE /var/cache/apt/archives/" \
	--essential-hook='mkdir -p "$1"/etc/initramfs-tools/conf.d "$1"/etc/initramfs-tools/hooks' \
	--essential-hook="copy-in $WORK/files/kd.conf /etc/initramfs-tools/conf.d/" \
	--essential-hook="copy-in $WORK/files/kd-storage /etc/initramfs-tools/hooks/" \
	--customize-hook="sync-out /var/cache/apt/archives $DEB_CACHE" \
	"$SUITE" "$ROOT" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 ||
	{
		cp "$WORK/mmdebstrap.log" "$CACHE_DIR/mmdebstrap-failed.log"
		tail -n 40 "$WORK/mmdebstrap.log" >&2
		die "mmdebstrap failed (log: $CACHE_DIR/mmdebstrap-failed.log)"
	}
T_MMDEBSTRAP=$(($(date +%s) - START))

echo "env: [2/3] configuring"
# boot files at the root, as Kadeploy environments name them (/vmlinuz, /initrd.img)
KVER=$(ls "$ROOT/lib/modules")
[ -f "$ROOT/boot/vmlinuz-$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] ||
	die "kernel or initrd missing in /boot ($(ls "$ROOT/boot"))"
ln -sfn "boot/vmlinuz-$KVER" "$ROOT/vmlinuz"
ln -sfn "boot/initrd.img-$KVER" "$ROOT/initrd.img"
rm -f "$ROOT/vmlinuz.old" "$ROOT/initrd.img.old"

# network: DHCP on every ethernet interface; the client id is the MAC (static DHCP per MAC)
mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/80-kd-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes

[DHCPv4]
ClientIdentifier=mac
EOF
chroot "$ROOT" systemctl enable systemd-networkd.service >/dev/null 2>&1
# the node's name comes from DHCP
rm -f "$ROOT/etc/hostname"
: >"$ROOT/etc/resolv.conf"
printf '# kd: the root file system is the kernel'"'"'s root=, mounted rw (kernel_params "rw")\n' >"$ROOT/etc/fstab"

# root: no password (locked); SSH with the key kd installs
chroot "$ROOT" passwd -l root >/dev/null
mkdir -p -m 0700 "$ROOT/root/.ssh"

# sshd: one ed25519 host key per node, made on first boot (fast even under TCG)
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/ssh/sshd_config.d"
printf 'HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n' \
	>"$ROOT/etc/ssh/sshd_config.d/kd.conf"
cat >"$ROOT/etc/systemd/system/kd-ssh-hostkey.service" <<'EOF'
[Unit]
Description=kd: make this node's SSH host key
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
RequiredBy=ssh.service
EOF

# "KD-DEPLOYED-OK" on the serial line once sshd is up (ssh.service is Type=notify)
cat >"$ROOT/usr/local/sbin/kd-deployed-ok" <<'EOF'
#!/bin/sh
# kd test image: tell the serial console that the deployed OS is up with sshd listening.
msg="KD-DEPLOYED-OK $(hostname) $(ip -o -4 addr show scope global | awk '{print $4}' | tr '\n' ' ')"
echo "$msg" >/dev/ttyS0 2>/dev/null || true
echo "$msg" >/dev/kmsg 2>/dev/null || true
EOF
chmod 0755 "$ROOT/usr/local/sbin/kd-deployed-ok"
cat >"$ROOT/etc/systemd/system/kd-deployed-ok.service" <<'EOF'
[Unit]
Description=kd: write KD-DEPLOYED-OK to ttyS0 once sshd is up
After=ssh.service systemd-networkd.service
Requires=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kd-deployed-ok

[Install]
WantedBy=multi-user.target
EOF
chroot "$ROOT" systemctl enable kd-ssh-hostkey.service kd-deployed-ok.service >/dev/null 2>&1
# each node makes its own machine id on first boot
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"

rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/* \
	"$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old
ROOT_MB=$(du -sm "$ROOT" | cut -f1)

echo "env: [3/3] packing ${ROOT_MB} MB as tar | zstd -$ZSTD_LEVEL"
mkdir -p "$WORK/out"
tar --numeric-owner --one-file-system -C "$ROOT" -cf - . |
	zstd -q -T0 "-$ZSTD_LEVEL" -o "$WORK/out/$NAME.tar.zst"
END=$(date +%s)
{
	echo "kernel $KVER, initrd.img $(du -k "$ROOT/boot/initrd.img-$KVER" | cut -f1) KB"
	echo "root ${ROOT_MB} MB unpacked, $(du -m "$WORK/out/$NAME.tar.zst" | cut -f1) MB as tar.zst -$ZSTD_LEVEL"
	echo "built in $((END - START)) s (mmdebstrap ${T_MMDEBSTRAP} s)"
} >"$WORK/out/info"
rm -rf "$CACHE"
mv "$WORK/out" "$CACHE"
publish
