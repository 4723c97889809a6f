//! The PXE path on a virtual cluster: 3 QEMU nodes boot kd's deploy initrd over iPXE + HTTP,
//! their agents connect back and receive an image through the tree onto /dev/vda.
//! Runs `scripts/lab-broadcast.sh` (the same script as `./dev.sh demo`).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[test]
fn three_pxe_booted_nodes_receive_an_image() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = kd_tests::run_with_timeout(
        Command::new(root.join("scripts/lab-broadcast.sh"))
            .args(["--nodes", "3", "--subnet", "10.81.0.0/24"])
            // The binaries of this build (a target dir of its own is honoured), the initrd it made.
            .env("KD_BIN_DIR", kd_tests::bin("kd-coord").parent().unwrap())
            .env("KD_INITRD_DIR", initrd),
        Duration::from_secs(1500),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("3/3 nodes verified"), "{out}");
    // The lab is gone.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ns.stdout).contains("kdlab-81"));
}
