//! kd's UEFI path end to end: one QEMU node with OVMF firmware, powered off at first, PXE-boots
//! (OVMF's PXE → iPXE EFI → `boot.ipxe`) kd's deploy initrd; `kd-coord deploy` writes the test
//! environment (Debian 12 + sshd) with an SSH key to a GPT disk with an ESP, and kd-disk installs
//! GRUB x86_64-efi at the ESP's removable path. The node then boots its disk through OVMF and
//! `\EFI\BOOT\BOOTX64.EFI`, accepts `ssh -i KEY root@node1 true`, runs under UEFI
//! (`/sys/firmware/efi`) and has its vfat ESP mounted on /boot/efi with GRUB in it.
//! Runs `scripts/lab-deploy.sh --nodes 1 --firmware uefi` on its own subnet (10.83).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SUBNET: &str = "10.83.0.0/24";
const STATE: &str = "/var/lib/kd-lab/83";
const NETNS: &str = "kdlab-83";

/// Tears the lab down even if the script was killed before its own trap ran.
struct LabGuard(PathBuf);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.0)
            .args(["down", "--state", STATE])
            .output();
    }
}

#[test]
fn deploy_to_a_uefi_node_that_boots_grub_from_its_esp() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let coord = kd_tests::bin("kd-coord");
    let bin_dir = coord.parent().unwrap().to_path_buf();
    let _lab = LabGuard(kd_tests::bin("kd-lab"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = Instant::now();
    let o = kd_tests::run_with_timeout(
        Command::new(root.join("scripts/lab-deploy.sh"))
            .args(["--nodes", "1", "--subnet", SUBNET, "--firmware", "uefi"])
            .args(["--limit", "1200"])
            .env("KD_BIN_DIR", &bin_dir)
            .env("KD_INITRD_DIR", &initrd),
        Duration::from_secs(25 * 60),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    // Per-step times for `cargo test -- --nocapture` (and the failure output).
    eprintln!(
        "lab-deploy.sh --firmware uefi took {:.0} s:\n{out}",
        t.elapsed().as_secs_f64()
    );
    let tail: String = {
        let lines: Vec<&str> = err.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    assert!(
        o.status.success(),
        "lab-deploy.sh failed ({}).\nstdout:\n{out}\nstderr (last lines):\n{tail}",
        o.status
    );
    // The lab ran OVMF nodes.
    assert!(out.contains("firmware uefi (OVMF)"), "{out}");
    // Deployed, and its sshd takes the key.
    assert!(out.contains("\n  | 1/1 nodes deployed"), "{out}");
    assert!(out.contains("phase 1 ok: ssh ok on 1/1 nodes"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("  node1 (") && l.contains("ssh with the key ok")),
        "no ssh check for node1:\n{out}"
    );
    // The EFI path: booted under UEFI, GRUB at the ESP's removable path.
    let efi = out
        .lines()
        .find(|l| l.contains("  node1 (") && l.contains("UEFI 64-bit, ESP "))
        .unwrap_or_else(|| panic!("no UEFI check for node1:\n{out}"));
    assert!(efi.contains("EFI/BOOT/BOOTX64.EFI"), "{efi}");
    assert!(efi.contains("ESP /dev/vda2 vfat"), "{efi}");
    // The lab is gone.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(NETNS),
        "namespace {NETNS} left behind"
    );
    assert!(
        !Path::new(STATE).join("lab.json").exists(),
        "{STATE} left behind"
    );
}
