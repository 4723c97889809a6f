//! The cluster's `boot: kexec` end to end: one QEMU node (SeaBIOS), powered off at first,
//! PXE-boots kd's deploy initrd; `kd-coord deploy` writes the test environment (Debian 12 +
//! sshd); at BootNewEnv its agent mounts the deploy partition, `kexec -l`s the environment's
//! `/vmlinuz` and `/initrd.img` (symlinks followed inside the deployed tree) with GRUB's
//! `root=UUID=… ro` command line, and `kexec -e`s it: the deployed system comes up without the
//! firmware (one SeaBIOS banner on the console: the deploy boot's), and accepts
//! `ssh -i KEY root@node1 true` on the kexec'd kernel.
//! Runs `scripts/lab-deploy.sh --nodes 1 --boot kexec --probe 1` on its own subnet (10.84),
//! then `--kexec-fail` (the agent's fallback to the reboot).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

#[test]
fn deploy_one_node_that_kexecs_into_the_deployed_kernel() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let r = kd_tests::lab_deploy(
        &initrd,
        "10.84.0.0/24",
        &[
            "--nodes", "1", "--boot", "kexec", "--probe", "1", "--limit", "900",
        ],
        Duration::from_secs(20 * 60),
    );
    let out = &r.out;
    r.assert_ok();
    assert!(out.contains("(boot: kexec)"), "{out}");
    assert!(out.contains("\n  | 1/1 nodes deployed"), "{out}");
    // The agent staged the deployed kernel, by its real name, with the root by UUID and the
    // environment's parameters (the script also checked the single firmware banner).
    let kexec = out
        .lines()
        .find(|l| l.contains("  node1: kexec ok ("))
        .unwrap_or_else(|| panic!("no kexec line for node1:\n{out}"));
    assert!(kexec.contains(": /boot/vmlinuz-"), "{kexec}");
    assert!(kexec.contains(" with /boot/initrd.img-"), "{kexec}");
    assert!(
        kexec.contains("command line: root=UUID=") && kexec.contains(" ro console=tty0 "),
        "{kexec}"
    );
    // BootNewEnv passed, in the deployment's bounds (its seconds, from the report's table).
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("  | node1 "))
        .unwrap_or_else(|| panic!("no row for node1:\n{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[2], "ok", "{row:?}");
    let boot_new_env: f64 = row[7].parse().unwrap();
    assert!(
        boot_new_env > 0.0 && boot_new_env < 480.0,
        "BootNewEnv {boot_new_env} s: {row:?}"
    );
    // The kexec'd system answers ssh with the key, its root the deploy partition.
    let ssh = out
        .lines()
        .find(|l| l.contains("  node1 (") && l.contains("ssh with the key ok"))
        .unwrap_or_else(|| panic!("no ssh check for node1:\n{out}"));
    assert!(ssh.contains("/ on /dev/vda3"), "{ssh}");
    // The lab is gone.
    assert!(r.left_behind.is_none(), "{:?}", r.left_behind);
}

/// The agent's fallback: deploy kernels that refuse `kexec_load`
/// (`sysctl.kernel.kexec_load_disabled=1` on their command line, `lab-deploy.sh --kexec-fail`):
/// the agent tells the coordinator why its kexec failed and reboots the node instead, which then
/// boots its disk through the firmware (two SeaBIOS banners) and answers ssh. (Both tests of
/// this file: 159 s here, one after the other.)
#[test]
fn a_refused_kexec_falls_back_to_the_reboot() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let r = kd_tests::lab_deploy(
        &initrd,
        "10.84.0.0/24",
        &[
            "--nodes",
            "1",
            "--kexec-fail",
            "--probe",
            "1",
            "--limit",
            "900",
        ],
        Duration::from_secs(20 * 60),
    );
    let out = &r.out;
    r.assert_ok();
    assert!(out.contains("\n  | 1/1 nodes deployed"), "{out}");
    let failed = out
        .lines()
        .find(|l| l.contains("  node1 (falls back): kexec FAILED ("))
        .unwrap_or_else(|| panic!("no kexec failure for node1:\n{out}"));
    assert!(
        failed.contains("kexec_load failed: Operation not permitted; rebooting instead"),
        "{failed}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("  node1 (") && l.contains("ssh with the key ok")),
        "no ssh check for node1:\n{out}"
    );
    assert!(r.left_behind.is_none(), "{:?}", r.left_behind);
}
