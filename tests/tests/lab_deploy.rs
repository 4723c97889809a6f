//! kd's whole job on a virtual cluster: 3 QEMU nodes, powered off at first, PXE-boot kd's deploy
//! initrd; `kd-coord deploy` writes the test environment (Debian 12 + sshd) with an SSH key; all 3
//! boot it from their disks and accept `ssh -i KEY root@NODE true`. Then a second deployment loses
//! node2 (powered off during the broadcast): 2 ok, node2 KO with its reason, in bounded time.
//! Runs `scripts/lab-deploy.sh --fail-one` (`./dev.sh demo` runs the first phase).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SUBNET: &str = "10.82.0.0/24";
const STATE: &str = "/var/lib/kd-lab/82";
const NETNS: &str = "kdlab-82";

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
fn deploy_to_three_pxe_nodes_then_lose_one_during_the_broadcast() {
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
            .args(["--nodes", "3", "--subnet", SUBNET, "--fail-one"])
            .args(["--limit", "1200"])
            .env("KD_BIN_DIR", &bin_dir)
            .env("KD_INITRD_DIR", &initrd),
        Duration::from_secs(40 * 60),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    // Per-step times for `cargo test -- --nocapture` (and the failure output).
    eprintln!(
        "lab-deploy.sh took {:.0} s:\n{out}",
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
    // Phase 1: every node deployed, its sshd takes the key.
    assert!(out.contains("\n  | 3/3 nodes deployed"), "{out}");
    assert!(out.contains("phase 1 ok: ssh ok on 3/3 nodes"), "{out}");
    for n in ["node1", "node2", "node3"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("  {n} (")) && l.contains("ssh with the key ok")),
            "no ssh check for {n}:\n{out}"
        );
    }
    // Phase 2: node2 lost during the broadcast; the others deployed anyway.
    assert!(out.contains("\n  | 2/3 nodes deployed"), "{out}");
    assert!(
        out.contains("phase2: kd-coord deploy exited 1 after"),
        "{out}"
    );
    assert!(
        out.contains("phase 2 ok: 2/3 deployed, node2 KO, ssh ok on the others"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 2 && w[0] == "|" && w[1] == "node2" && w[2].eq_ignore_ascii_case("ko")
        })
        .unwrap_or_else(|| panic!("no KO row for node2:\n{out}"));
    // Its reason says what happened: the agent was lost during the broadcast.
    assert!(
        row.contains("Broadcast") && row.to_ascii_lowercase().contains("lost"),
        "KO row without the reason: {row}"
    );
    // Progress went to stderr, with the broadcast start line the script keys on.
    assert!(err.contains("broadcast round 1 started:"), "{tail}");
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
