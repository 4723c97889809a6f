//! Loopback broadcasts with the real binaries: 8 agents, every tree shape, failures injected.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use kd_tests::*;

const LIMIT: Duration = Duration::from_secs(240);

/// Each node and its agent's output.
type AgentOutputs = Vec<(String, Output)>;

/// Runs one broadcast of `input` to 8 agents writing raw files (the coordinator with
/// `coord_extra` too); returns the JSON outcome, the agents' outputs and how long the
/// coordinator ran (Hellos, transfer, failures found).
/// Where the agents' raw copies go: tmpfs when there is one. These tests are about the
/// network; on the host's disk an `fsync` can take a second while other work writes back
/// (seen in CI right after the build), and `auto`'s disk probe then takes a node for a slow disk.
fn copies_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// A broadcast's JSON outcome, the agents' copies and outputs, its cluster and how long the
/// coordinator ran.
type Run = (
    serde_json::Value,
    tempfile::TempDir,
    AgentOutputs,
    Cluster,
    Duration,
);

fn broadcast_raw(input: &Path, arity: &str, coord_extra: &[&str], faults: &[(&str, &str)]) -> Run {
    broadcast_logged(input, arity, coord_extra, faults).0
}

/// [`broadcast_raw`], with the coordinator's stderr (its notes: "X now reads from Y").
fn broadcast_logged(
    input: &Path,
    arity: &str,
    coord_extra: &[&str],
    faults: &[(&str, &str)],
) -> (Run, String) {
    let c = Cluster::new(input, 8, "256K").unwrap();
    let out = copies_dir();
    let mut reaper = Reaper::default();
    let t = std::time::Instant::now();
    let mut coord = c.start_coordinator(arity, coord_extra).unwrap();
    // The coordinator's own log (progress, re-parenting) is what explains a hang.
    let mut agents = Vec::new();
    for n in &c.nodes {
        let sink = format!("raw:{}", out.path().join(format!("{n}.raw")).display());
        let mut extra = Vec::new();
        for (node, f) in faults {
            if node == n {
                // `--flag=value` goes as it is; anything else is a `--fault`.
                if !f.starts_with("--") {
                    extra.push("--fault");
                }
                extra.push(*f);
            }
        }
        agents.push(
            c.start_agent(n, &format!("tok-{n}"), &sink, &extra)
                .unwrap(),
        );
    }
    let co = wait_child(&mut coord, LIMIT).unwrap();
    let ran = t.elapsed();
    let mut outs = Vec::new();
    for (n, mut a) in c.nodes.iter().zip(agents) {
        outs.push((
            n.clone(),
            wait_child(&mut a, Duration::from_secs(60)).unwrap(),
        ));
    }
    reaper.0.clear();
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    ((v, out, outs, c, ran), stderr)
}

/// Every agent exited 0 and every node reported a copy identical to `input`, but the nodes
/// in `lost` (failed on purpose: neither their agent's exit nor their copy is checked).
fn assert_identical_copies(
    v: &serde_json::Value,
    input: &Path,
    out: &Path,
    outs: &[(String, Output)],
    what: &str,
    lost: &[&str],
) {
    for (n, o) in outs {
        if lost.contains(&n.as_str()) {
            continue;
        }
        assert!(
            o.status.success(),
            "{what} agent of {n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for n in v["nodes"].as_array().unwrap() {
        let name = n["node"].as_str().unwrap();
        if lost.contains(&name) {
            continue;
        }
        assert_eq!(n["ok"], true, "{what}: {n}");
        assert!(
            same_file(input, &out.join(format!("{name}.raw"))),
            "{what}: {name} differs"
        );
    }
}

fn node<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == name)
        .unwrap()
}

#[test]
fn every_arity_delivers_identical_copies() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 6 * 1024 * 1024 + 12345, 7);
    // Both ways an agent runs its network: two threads (a fast link's) for every arity, one
    // (a 1 GbE node's) for a chain and a 2-ary tree. `auto` would pick from this host's NIC.
    let runs = [
        ("chain", "2"),
        ("2", "2"),
        ("3", "2"),
        ("star", "2"),
        ("chain", "1"),
        ("2", "1"),
    ];
    for (arity, threads) in runs {
        let flag = format!("--net-threads={threads}");
        let (v, out, outs, _c, _) = broadcast_raw(&input, arity, &[], &every_node(8, &flag));
        assert_identical_copies(
            &v,
            &input,
            out.path(),
            &outs,
            &format!("arity {arity}, {threads} network threads"),
            &[],
        );
    }
}

/// The same agent argument (or fault) for node1 to node`n`, as `broadcast_raw` takes them.
fn every_node(n: usize, arg: &str) -> Vec<(&'static str, &str)> {
    const NODES: [&str; 8] = [
        "node1", "node2", "node3", "node4", "node5", "node6", "node7", "node8",
    ];
    NODES.iter().take(n).map(|node| (*node, arg)).collect()
}

#[test]
fn auto_arity_measures_the_nodes_and_keeps_a_slow_disk_out_of_the_others_way() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 6 * 1024 * 1024, 5);
    // node5 writes at 2 MB/s (a slow disk): in a chain in name order it would hold node6..8
    // (and, by backpressure, node1..4) to its pace.
    let (v, out, outs, _c, _) = broadcast_raw(&input, "auto", &[], &[("node5", "--write-rate=2M")]);
    assert_identical_copies(&v, &input, out.path(), &outs, "auto", &[]);
    let shape = v["shape"].as_str().unwrap();
    let secs = |n: &str| node(&v, n)["seconds"].as_f64().unwrap();
    eprintln!(
        "{shape}: node5 {:.2} s, node8 {:.2} s, probe {:.2} s",
        secs("node5"),
        secs("node8"),
        v["probe_seconds"].as_f64().unwrap()
    );
    assert!(shape.starts_with("auto: "), "{shape}");
    assert!(
        shape.contains(" of 1 at "),
        "node5 is a class of its own: {shape}"
    );
    // node5 reads from the coordinator and relays to no one.
    let plan = v["plan"].as_array().unwrap();
    let parent = |n: &str| plan.iter().find(|e| e["node"] == n).unwrap()["parent"].clone();
    assert!(parent("node5").is_null(), "{plan:?}");
    assert!(
        plan.iter().all(|e| e["parent"] != "node5"),
        "no node reads from node5: {plan:?}"
    );
}

#[test]
fn a_slow_disk_in_its_own_class_holds_no_one_back() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    // More than a node buffers (its window, writer queue and QUIC receive window: ~21 MiB),
    // so that node2's disk holds its stream back.
    make_raw_input(&input, 40 * 1024 * 1024, 9);
    let c = Cluster::new(&input, 6, "1M").unwrap();
    let mut reaper = Reaper::default();
    let mut coord = c.start_coordinator("auto", &[]).unwrap();
    for n in &c.nodes {
        let extra: &[&str] = if n == "node2" {
            &["--write-rate=6M"]
        } else {
            &[]
        };
        reaper.0.push(
            c.start_agent(n, &format!("tok-{n}"), "null", extra)
                .unwrap(),
        );
    }
    let co = wait_child(&mut coord, LIMIT).unwrap();
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["ok"], true, "{n}");
    }
    let secs = |n: &str| node(&v, n)["seconds"].as_f64().unwrap();
    let shape = v["shape"].as_str().unwrap();
    eprintln!(
        "{shape}: node2 {:.2} s, node6 {:.2} s",
        secs("node2"),
        secs("node6")
    );
    // node2 writes 40 MiB at 6 MB/s (7 s); in a class of its own it slows no one (held back
    // by it, the others would end with it; alone, well before even on a busy machine).
    assert!(secs("node2") > 6.0, "{shape}");
    for n in ["node1", "node3", "node4", "node5", "node6"] {
        assert!(secs(n) < secs("node2") * 0.75, "{n}: {shape}\n{stderr}");
    }
}

#[test]
fn corrupt_chunk_is_refused_refetched_and_never_written() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 3 * 1024 * 1024, 11);
    // node3 is a relay in a chain: its children must never see the corrupt bytes either.
    let (v, out, outs, _c, _) = broadcast_raw(&input, "chain", &[], &[("node3", "corrupt:4")]);
    let n3 = node(&v, "node3");
    assert_eq!(n3["ok"], true, "{n3}");
    assert_eq!(n3["corrupt_chunks"], 1, "{n3}");
    assert_eq!(n3["refetched_chunks"], 1, "{n3}");
    // Swarm repair: a peer that held chunk 4 (node2, which had just relayed it) served the
    // refetch; the coordinator pointed node3 there and served none of it.
    assert_eq!(n3["refetched_from_peers"], 1, "{n3}");
    assert_eq!(v["repairs_redirected"], 1, "{v}");
    assert_eq!(v["repairs_served"], 0, "{v}");
    assert_identical_copies(&v, &input, out.path(), &outs, "corrupt chunk", &[]);
    for n in v["nodes"].as_array().unwrap() {
        if n["node"] != "node3" {
            assert_eq!(n["corrupt_chunks"], 0, "{n}");
        }
    }
}

/// A relay that dies or freezes is found within seconds: its children's patience (the stall
/// floor, 2 s by default, beyond a few recent chunk intervals) and the coordinator's silence
/// limit (6 s) instead of the 30 s stall timeout and QUIC idle timeout. A broadcast with a
/// dead or frozen relay must end, failure reported, well under that (a behaviour bound, with
/// a wide margin: it takes about 7 s on loopback).
const REPLACED_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn killed_relay_is_reported_and_the_others_complete() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 4 * 1024 * 1024, 13);
    // A 2-ary tree on two network threads; a chain on one (its relays' children and parents
    // on two sockets of one thread: the re-parented child's catch-up must not silence a relay
    // towards its own parent).
    for (arity, threads) in [("chain", "1"), ("2", "2")] {
        let flag = format!("--net-threads={threads}");
        let mut faults = every_node(8, &flag);
        faults.push(("node2", "die-after:3"));
        let (v, out, outs, _c, ran) = broadcast_raw(&input, arity, &[], &faults);
        let dead = node(&v, "node2");
        assert_eq!(dead["ok"], false, "{dead}");
        assert!(
            dead["reason"].as_str().unwrap().contains("connection lost"),
            "{dead}"
        );
        // The coordinator's whole run: the dead node's report is part of it.
        eprintln!("arity {arity}: a killed relay, the coordinator ran {ran:.2?}");
        assert!(
            ran < REPLACED_WITHIN,
            "arity {arity}: {ran:.2?} with a killed relay: {v}"
        );
        let what = format!("arity {arity}");
        assert_identical_copies(&v, &input, out.path(), &outs, &what, &["node2"]);
    }
}

#[test]
fn a_relay_whose_disk_fills_keeps_relaying_and_reports_why() {
    // node3, a relay in a chain of 8, writes its copy to a 2 MiB device: the 4 MiB image
    // overflows it half-way. Its own copy fails, with the reason; its children lose nothing
    // (it goes on verifying and relaying, nobody is moved) and end with identical copies.
    if kd_disk::testenv::skip_without_loop_devices() {
        return;
    }
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 4 * 1024 * 1024, 31);
    let small = tmp.path().join("small.img");
    std::fs::write(&small, vec![0u8; 2 * 1024 * 1024]).unwrap();
    let dev = kd_disk::loopdev::LoopDevice::attach(&small, None, false).unwrap();
    // A flag given twice takes the last value: this `--sink` replaces the helper's file.
    let sink = format!("--sink=raw:{}", dev.path().display());
    let ((v, out, outs, _c, _), stderr) =
        broadcast_logged(&input, "chain", &[], &[("node3", &sink)]);
    let full = node(&v, "node3");
    assert_eq!(full["ok"], false, "{full}");
    let reason = full["reason"].as_str().unwrap();
    assert!(
        reason.contains("image overflows its target")
            && reason.contains(&dev.path().display().to_string()),
        "{full}"
    );
    let agent = &outs.iter().find(|(n, _)| n == "node3").unwrap().1;
    assert!(!agent.status.success(), "node3's agent should fail");
    let what = format!("a full disk (coordinator stderr:\n{stderr})");
    assert_identical_copies(&v, &input, out.path(), &outs, &what, &["node3"]);
    assert!(
        !stderr.contains(" now reads from "),
        "someone moved:\n{stderr}"
    );
    assert_eq!(v["repairs_served"], 0, "{v}");
}

#[test]
fn frozen_relay_is_reported_and_the_others_complete_within_seconds() {
    // node3, a relay in a chain of 8, freezes (SIGSTOP) mid-transfer: its connections stay
    // open and nothing answers on them. Its child notices the silence after the stall floor
    // (the plans carry 2 s .. 30 s: the ceiling is not what ends it), the coordinator hears no
    // packet from it for 6 s and reports it; everyone else ends with an identical copy, and the
    // tree keeps its shape.
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 24 * 1024 * 1024, 29);
    let c = Cluster::new(&input, 8, "256K").unwrap();
    let out = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    // Killed (SIGKILL works on a stopped process) if the test fails before they end.
    let mut procs = Reaper(vec![c
        .start_coordinator(
            "chain",
            &[
                "--stall-floor",
                "2",
                "--stall-timeout",
                "30",
                "--agent-silence",
                "6",
            ],
        )
        .unwrap()]);
    let mut frozen = None;
    for n in &c.nodes {
        let sink = format!("raw:{}", out.path().join(format!("{n}.raw")).display());
        let extra: &[&str] = if n == "node3" {
            &["--fault", "stop-after:12"]
        } else {
            &[]
        };
        let a = c.start_agent(n, &format!("tok-{n}"), &sink, extra).unwrap();
        if n == "node3" {
            frozen = Some(Pid::from_raw(a.id() as i32));
        }
        procs.0.push(a);
    }
    /// Wakes and kills the frozen agent whatever happens below.
    struct Thaw(Option<Pid>);
    impl Drop for Thaw {
        fn drop(&mut self) {
            if let Some(p) = self.0 {
                let _ = kill(p, Signal::SIGCONT);
                let _ = kill(p, Signal::SIGKILL);
            }
        }
    }
    let thaw = Thaw(frozen);
    let co = wait_child(&mut procs.0[0], LIMIT).unwrap();
    let elapsed = t.elapsed();
    drop(thaw);
    let mut outs = Vec::new();
    for (n, a) in c.nodes.iter().zip(&mut procs.0[1..]) {
        outs.push((n.clone(), wait_child(a, Duration::from_secs(60)).unwrap()));
    }
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    eprintln!("a frozen relay in a chain of 8: the coordinator ran {elapsed:.2?}");
    let ice = node(&v, "node3");
    assert_eq!(ice["ok"], false, "{ice}");
    let reason = ice["reason"].as_str().unwrap();
    assert!(
        reason.contains("connection lost") && reason.contains("no packet from the agent"),
        "{ice}"
    );
    let what = format!("a frozen relay (coordinator stderr:\n{stderr})");
    assert_identical_copies(&v, &input, out.path(), &outs, &what, &["node3"]);
    // The coordinator's whole run (the frozen node's failure is its last report).
    assert!(
        elapsed < REPLACED_WITHIN,
        "{elapsed:.2?} with a frozen relay\ncoordinator stderr:\n{stderr}"
    );
    // The chain node1 -> node2 -> ... -> node8, then every move the coordinator announced:
    // no node ends with more children than the fan-out + 1.
    let mut parent: std::collections::HashMap<String, Option<String>> = (1..=8)
        .map(|i| {
            let p = (i > 1).then(|| format!("node{}", i - 1));
            (format!("node{i}"), p)
        })
        .collect();
    let mut moves = 0;
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("kd-coord: ") else {
            continue;
        };
        if let Some((n, p)) = rest.split_once(" now reads from ") {
            let p = (p != "the coordinator").then(|| p.to_string());
            parent.insert(n.to_string(), p);
            moves += 1;
        }
    }
    assert!(moves >= 1, "node4 should have moved:\n{stderr}");
    for n in parent.keys() {
        let kids = parent.values().filter(|p| p.as_deref() == Some(n)).count();
        assert!(kids <= 2, "{n} has {kids} children: {parent:?}\n{stderr}");
    }
    assert_ne!(parent["node4"].as_deref(), Some("node3"), "{parent:?}");
}

#[test]
fn directory_images_keep_files_modes_and_links() {
    use std::os::unix::fs::PermissionsExt;
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/hostname"), "node\n").unwrap();
    std::fs::write(root.join("etc/ssh/key"), "secret").unwrap();
    std::fs::set_permissions(
        root.join("etc/ssh/key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(root.join("usr/bin/tool"), &big).unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/bin/tool", root.join("usr/bin/alias")).unwrap();
    std::fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.hard")).unwrap();

    let c = Cluster::new(&root, 4, "256K").unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut coord = c.start_coordinator("2", &[]).unwrap();
    let mut agents = Reaper::default();
    for n in &c.nodes {
        let d = out.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        agents.0.push(
            c.start_agent(n, &format!("tok-{n}"), &format!("dir:{}", d.display()), &[])
                .unwrap(),
        );
    }
    let co = wait_child(&mut coord, LIMIT).unwrap();
    let v = outcome(&co.stdout).unwrap();
    for n in &c.nodes {
        assert_eq!(node(&v, n)["ok"], true, "{v}");
        let d = out.path().join(n);
        assert_eq!(std::fs::read(d.join("usr/bin/tool")).unwrap(), big);
        let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("usr/bin/tool"), 0o755);
        assert_eq!(mode("etc/ssh/key"), 0o600);
        assert_eq!(
            std::fs::read_link(d.join("usr/bin/alias")).unwrap(),
            Path::new("/usr/bin/tool")
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(d.join("etc/hostname")).unwrap().ino(),
            std::fs::metadata(d.join("etc/hostname.hard"))
                .unwrap()
                .ino()
        );
    }
}

#[test]
fn bad_agents_are_refused_with_clear_errors() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 1024 * 1024, 3);
    let c = Cluster::new(&input, 1, "256K").unwrap();
    let mut coord = c.start_coordinator("chain", &[]).unwrap();
    let run_agent = |node: &str, token: &str, pin: Option<&str>| {
        let mut cmd = Command::new(bin("kd-agent"));
        cmd.args([
            "--coord",
            &format!("127.0.0.1:{}", c.port),
            "--pin",
            pin.unwrap_or(&c.pin),
        ])
        .args([
            "--node",
            node,
            "--token",
            token,
            "--sink",
            "null",
            "--listen",
            "127.0.0.1:0",
        ]);
        let o = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run_agent("node1", "tok-node1", Some(&"ab".repeat(32)));
    assert!(e.contains("not the one pinned"), "{e}");
    let e = run_agent("node1", "wrong", None);
    assert!(e.contains("wrong token for node node1"), "{e}");
    let e = run_agent("node9", "tok-node9", None);
    assert!(e.contains("not part of this deployment"), "{e}");

    // Raw QUIC peers with the right pin but bad bytes: an oversized frame, then garbage.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pin = kd_net::parse_sha256_hex(&c.pin).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    for payload in [(kd_proto::codec::MAX_FRAME + 1).to_le_bytes().to_vec(), {
        let mut g = 64u32.to_le_bytes().to_vec();
        g.extend((0..64u8).map(|i| i.wrapping_mul(37)));
        g
    }] {
        let reason = rt.block_on(async {
            let ep = kd_net::endpoint::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
            let conn = ep
                .connect_with(
                    kd_net::tls::agent_to_coordinator(pin).unwrap(),
                    addr,
                    "kd-coord",
                )
                .unwrap()
                .await
                .unwrap();
            let (mut s, _r) = conn.open_bi().await.unwrap();
            s.write_all(&payload).await.unwrap();
            let e = tokio::time::timeout(Duration::from_secs(20), conn.closed())
                .await
                .unwrap();
            e.to_string()
        });
        assert!(reason.contains("bad Hello"), "{reason}");
    }
    // The good agent still gets its image.
    let ok = c.start_agent("node1", "tok-node1", "null", &[]).unwrap();
    let mut r = Reaper(vec![ok]);
    let co = wait_child(&mut coord, LIMIT).unwrap();
    let v = outcome(&co.stdout).unwrap();
    assert_eq!(node(&v, "node1")["ok"], true, "{v}");
    let err = String::from_utf8_lossy(&co.stderr);
    assert!(err.contains("exceeds the limit"), "{err}");
    assert!(err.contains("malformed"), "{err}");
    let o = wait_child(&mut r.0[0], Duration::from_secs(30)).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn damaged_image_file_stops_the_broadcast_with_a_clear_error() {
    // The image file on the coordinator's disk changed after it was packed (bit rot, a copy cut
    // short and padded): the coordinator checks each chunk it reads against the manifest and
    // refuses to send bytes that do not match, naming the file and the chunk; no node reports
    // success and nothing hangs.
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 2 * 1024 * 1024, 17);
    let c = Cluster::new(&input, 3, "256K").unwrap();
    let mut bytes = std::fs::read(&c.image).unwrap();
    // The chunks are the file's end: this byte is in the last chunk.
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&c.image, &bytes).unwrap();
    // Killed if the test fails before they end.
    let mut procs = Reaper(vec![c.start_coordinator("chain", &[]).unwrap()]);
    for n in &c.nodes {
        let a = c.start_agent(n, &format!("tok-{n}"), "null", &[]).unwrap();
        procs.0.push(a);
    }
    let co = wait_child(&mut procs.0[0], LIMIT).unwrap();
    for a in &mut procs.0[1..] {
        wait_child(a, Duration::from_secs(60)).unwrap();
    }
    assert!(!co.status.success());
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["ok"], false, "{n}");
        let reason = n["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("does not match its manifest") && reason.contains("image.kdi"),
            "{n}\ncoordinator stderr:\n{stderr}"
        );
    }
}

#[test]
fn an_agent_cut_during_its_handshake_tries_again_until_welcomed() {
    // A coordinator under a storm of agents times out handshakes and Hellos: the agents it cuts
    // before their Welcome, with no refusal of their own, connect again within their connect
    // timeout. Here a stand-in coordinator with the real identity (real QUIC, real pin) drops
    // the agent's first connection during the handshake and closes its second once the Hello
    // is in, without a Welcome; then it leaves and the real coordinator takes its port.
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 1024 * 1024, 19);
    let c = Cluster::new(&input, 1, "256K").unwrap();
    let cert = std::fs::read(c.state.join("coord.crt.der")).unwrap();
    let key = std::fs::read(c.state.join("coord.key.der")).unwrap();
    let server = kd_net::tls::coordinator_server(cert, key).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    // Killed if the test fails before they end.
    let mut procs = Reaper::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = rt
        .block_on(async { kd_net::endpoint::bind(addr, Some(server)) })
        .unwrap();
    procs
        .0
        .push(c.start_agent("node1", "tok-node1", "null", &[]).unwrap());
    let hello_len = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            // First: accepted, then dropped before the handshake ends (as a handshake timeout
            // drops it).
            let first = ep.accept().await.unwrap();
            drop(first.accept().unwrap());
            // Second: the handshake completes and the Hello comes in; then the connection is
            // closed with no error message.
            let conn = loop {
                if let Ok(conn) = ep.accept().await.unwrap().await {
                    break conn;
                }
            };
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let mut len = [0u8; 4];
            recv.read_exact(&mut len).await.unwrap();
            conn.close(0u32.into(), b"");
            ep.close(0u32.into(), b"");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
            u32::from_le_bytes(len)
        })
        .await
        .expect("the agent did not connect twice to the stand-in coordinator")
    });
    assert!(hello_len > 0);
    // The stand-in's socket closes with its runtime.
    drop(ep);
    drop(rt);
    procs.0.push(c.start_coordinator("chain", &[]).unwrap());
    let co = wait_child(&mut procs.0[1], LIMIT).unwrap();
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    assert_eq!(node(&v, "node1")["ok"], true, "{v}\n{stderr}");
    let a = wait_child(&mut procs.0[0], Duration::from_secs(60)).unwrap();
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(a.status.success(), "{err}");
    assert!(
        err.matches("retrying").count() >= 2,
        "the agent should say it retried twice:\n{err}"
    );
}

#[test]
fn a_storm_of_agents_started_at_once_all_verify() {
    // A cluster rebooted at once: every agent connects in the same second. The coordinator
    // admits handshakes at the rate it can serve them and refuses none for waiting.
    // 500 agents (1 MiB image, arity 8): all verified in about 8 s on 2 cores (the debug build);
    // before admission, 1,000 such agents had ~20 % refused with "handshake timed out".
    const N: usize = 500;
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 1024 * 1024, 23);
    let c = Cluster::new(&input, N, "256K").unwrap();
    let t = std::time::Instant::now();
    // Killed if the test fails before they end.
    let mut procs = Reaper(vec![c.start_coordinator("8", &[]).unwrap()]);
    for n in &c.nodes {
        procs
            .0
            .push(c.start_agent(n, &format!("tok-{n}"), "null", &[]).unwrap());
    }
    let co = wait_child(&mut procs.0[0], LIMIT).unwrap();
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\ncoordinator stderr:\n{stderr}"));
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), N, "{v}");
    for n in nodes {
        assert_eq!(n["ok"], true, "{n}\ncoordinator stderr:\n{stderr}");
    }
    // Admitted connections keep a 10 s handshake timeout: on a loaded 2-core host a few
    // agents starved of CPU may still miss it (they try again and verify, above and below);
    // connections are never refused for waiting their turn.
    let refused = stderr.matches("refused").count();
    assert!(refused * 20 <= N, "{refused} refused of {N}:\n{stderr}");
    for a in &mut procs.0[1..] {
        let o = wait_child(a, Duration::from_secs(60)).unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!("{N} agents started at once: all verified in {elapsed:?}");
}

#[test]
fn a_rack_aware_chain_visits_each_rack_once_and_delivers() {
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("disk.raw");
    make_raw_input(&input, 2 * 1024 * 1024 + 777, 17);
    // Odd nodes in one rack, even ones in the other, as names often run across racks.
    let racks = ["--rack", "r0=node[1,3,5,7]", "--rack", "r1=node[2,4,6,8]"];
    let (v, out, outs, _c, _) = broadcast_raw(&input, "chain", &racks, &[]);
    // The chain as planned: node1 -> 3 -> 5 -> 7 -> 2 -> 4 -> 6 -> 8.
    let parent = |n: &str| {
        v["plan"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["node"] == n)
            .map(|e| e["parent"].clone())
            .unwrap_or_else(|| panic!("{n} not in the plan: {v}"))
    };
    let order = [
        "node1", "node3", "node5", "node7", "node2", "node4", "node6", "node8",
    ];
    assert_eq!(parent("node1"), serde_json::Value::Null, "{v}");
    for w in order.windows(2) {
        assert_eq!(parent(w[1]), w[0], "{v}");
    }
    assert_identical_copies(&v, &input, out.path(), &outs, "racks", &[]);
    // A rack naming a node that is not deployed is refused before anything starts.
    let o = Command::new(bin("kd-coord"))
        .arg("--state")
        .arg(tmp.path().join("state"))
        .args(["broadcast", "x.kdi", "-m", "node[1-2]", "--tokens", "t"])
        .args(["--rack", "r0=node[1-3]"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("node3 is not one of the nodes"), "{err}");
}
