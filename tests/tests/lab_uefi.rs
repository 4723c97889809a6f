//! kd's UEFI path end to end: one QEMU node with OVMF firmware, powered off at first, PXE-boots
//! (OVMF's PXE → iPXE EFI → `boot.ipxe`) kd's deploy initrd; `kd-coord deploy` writes the test
//! environment (Debian 12 + sshd) with an SSH key to a GPT disk with an ESP, and kd-disk installs
//! GRUB x86_64-efi at the ESP's removable path. The node then boots its disk through OVMF and
//! `\EFI\BOOT\BOOTX64.EFI`, accepts `ssh -i KEY root@node1 true`, runs under UEFI
//! (`/sys/firmware/efi`) and has its vfat ESP mounted on /boot/efi with GRUB in it.
//! Runs `scripts/lab-deploy.sh --nodes 1 --firmware uefi` on its own subnet (10.83).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

#[test]
fn deploy_to_a_uefi_node_that_boots_grub_from_its_esp() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let r = kd_tests::lab_deploy(
        &initrd,
        "10.83.0.0/24",
        &["--nodes", "1", "--firmware", "uefi", "--limit", "1200"],
        Duration::from_secs(25 * 60),
    );
    let out = &r.out;
    r.assert_ok();
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
    assert!(r.left_behind.is_none(), "{:?}", r.left_behind);
}
