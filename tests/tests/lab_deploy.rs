//! kd's whole job on a virtual cluster: 3 QEMU nodes, powered off at first, PXE-boot kd's deploy
//! initrd; `kd-coord deploy` writes the test environment (Debian 12 + sshd) with an SSH key; all 3
//! boot it from their disks and accept `ssh -i KEY root@NODE true`. Then a second deployment loses
//! node2 (powered off during the broadcast): 2 ok, node2 KO with its reason, in bounded time.
//! Runs `scripts/lab-deploy.sh --fail-one` (`./dev.sh demo` runs the first phase).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

#[test]
fn deploy_to_three_pxe_nodes_then_lose_one_during_the_broadcast() {
    let Some(initrd) = kd_tests::initrd_dir() else {
        return;
    };
    let _g = kd_tests::heavy();
    let r = kd_tests::lab_deploy(
        &initrd,
        "10.82.0.0/24",
        &["--nodes", "3", "--fail-one", "--limit", "1200"],
        Duration::from_secs(40 * 60),
    );
    let (out, err, tail) = (&r.out, &r.err, &r.err_tail);
    r.assert_ok();
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
    assert!(r.left_behind.is_none(), "{:?}", r.left_behind);
}
