//! The whole deploy workflow on loopback: `kd-coord deploy` drives "process nodes" through a
//! fake BMC (`kd-fakebmc`, see `kd_tests::fakebmc`). A node's reset starts a machine process
//! that reads the node's iPXE profile: the deploy profile runs the real `kd-agent` on the node's
//! loop-device disk; the local-boot profile checks the disk (GRUB, marker, key) and only then
//! opens the node's check port on its own loopback address (127.0.0.X1..X3).
//!
//! The `daemon_*` tests run the same nodes through `kd-coord serve` (a daemon on the lab's
//! state directory) and its CLI clients, as several Unix users.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kd_disk::loopdev::LoopDevice;
use kd_tests::daemon::{self, text, Daemon};
use kd_tests::fakebmc::{self, BmcConfig, BmcNode};
use kd_tests::*;

/// Per-run limit of one `kd-coord deploy`.
const DEPLOY_LIMIT: Duration = Duration::from_secs(150);
/// Deploy partition of the test layout.
const DEPLOY_PARTITION: u32 = 3;

/// A fake cluster: disks, PXE root, fake BMC, cluster and environment files.
struct Lab {
    tmp: tempfile::TempDir,
    bmc: PathBuf,
    http_root: PathBuf,
    state: PathBuf,
    cluster: PathBuf,
    env: PathBuf,
    key: PathBuf,
    nodes: Vec<String>,
    addrs: Vec<IpAddr>,
    check_port: u16,
    disks: Vec<(PathBuf, LoopDevice)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Machines (and their agents) first, then what killed agents left mounted or attached;
        // the disks' own loop devices are detached when `disks` drops.
        fakebmc::kill_all(&self.bmc);
        let keep: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|(_, d)| d.path().to_path_buf())
            .collect();
        fakebmc::release_under(self.tmp.path(), &keep);
    }
}

/// A `kd-coord deploy` running in the background (killed if dropped unfinished).
struct Pending {
    child: std::process::Child,
    t0: Instant,
    nodeset: String,
    ok: PathBuf,
    ko: PathBuf,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The outcome of one `kd-coord deploy`.
struct Run {
    out: Output,
    secs: f64,
    ok: Option<Vec<String>>,
    ko: Option<Vec<String>>,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).to_string()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).to_string()
    }
    fn last_line(&self) -> String {
        self.stdout()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }
    /// The stdout lines that name `node` (its row of the result table).
    fn row(&self, node: &str) -> String {
        self.stdout()
            .lines()
            .filter(|l| {
                l.split(|c: char| c.is_whitespace() || c == '|')
                    .any(|w| w == node)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn lines(p: &Path) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(p).ok()?;
    let mut v: Vec<String> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    Some(v)
}

impl Lab {
    /// `n` nodes `node1..` at 127.0.0.{10*net+i}, each with a 128 MiB loop-device disk.
    fn new(net: u8, n: usize) -> Lab {
        Lab::with_disks(net, &vec![128; n])
    }

    /// One node per disk size (MiB).
    fn with_disks(net: u8, disk_mib: &[u64]) -> Lab {
        let n = disk_mib.len();
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().to_path_buf();
        let bmc = t.join("bmc");
        let http_root = t.join("http");
        let state = t.join("state");
        std::fs::create_dir_all(&bmc).unwrap();
        std::fs::create_dir_all(http_root.join("nodes")).unwrap();
        std::fs::create_dir_all(t.join("tftp")).unwrap();
        // The deploy kernel and initrd the profiles point at (never booted here).
        write(&http_root.join("boot/vmlinuz"), "not a kernel\n");
        write(&http_root.join("boot/initramfs.img"), "not an initrd\n");

        // The environment: a tar of a small root file system.
        let marker = format!("deployed by kd (lab {net})\n");
        let root = t.join("root");
        for d in ["etc", "boot", "root", "usr/bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        write(&root.join("etc/kd-marker"), &marker);
        std::fs::write(root.join("boot/vmlinuz-test"), vec![0u8; 4096]).unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-test", root.join("vmlinuz")).unwrap();
        // 6 MiB that do not compress much: several 1 MiB chunks to broadcast.
        make_raw_input(&root.join("usr/bin/tool"), 6 << 20, 7 + u64::from(net));
        // A shell for the post-install (run in a chroot of the deployed system).
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("/bin/busybox (Debian package busybox-static)");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        let image = t.join("image.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&image)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        // A post-install archive whose script leaves a trace in the deployed system.
        write(
            &t.join("post/post.sh"),
            "echo \"post-installed on $KD_NODE\" > /etc/kd-post\n",
        );
        let post = t.join("post.tgz");
        let st = Command::new("tar")
            .arg("-C")
            .arg(t.join("post"))
            .arg("-czf")
            .arg(&post)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let env = t.join("env.yaml");
        write(
            &env,
            &format!(
                "name: kdtest\nversion: 1\ndescription: loopback deploy test\n\
                 image:\n  file: {}\n  kind: tar\n\
                 boot:\n  kernel: /vmlinuz\n  kernel_params: console=ttyS0\n\
                 filesystem: ext4\n\
                 postinstalls:\n  - archive: {}\n    script: post.sh\n",
                image.display(),
                post.display()
            ),
        );
        let key_text = format!("ssh-ed25519 AAAAC3NzaKDTEST{net} kd@test");
        let key = t.join("id.pub");
        write(&key, &format!("{key_text}\n"));

        let nodes: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
        let addrs: Vec<IpAddr> = (1..=n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, net * 10 + i as u8)))
            .collect();
        let macs: Vec<String> = (1..=n)
            .map(|i| format!("52:54:00:00:{net:02x}:{i:02x}"))
            .collect();
        let mut disks = Vec::new();
        for (node, mib) in nodes.iter().zip(disk_mib) {
            let f = t.join(format!("{node}.disk"));
            std::fs::File::create(&f)
                .unwrap()
                .set_len(mib << 20)
                .unwrap();
            let d = LoopDevice::attach(&f, None, false).unwrap();
            disks.push((f, d));
        }
        let check_port = free_tcp_port();
        let cfg = BmcConfig {
            agent: bin("kd-agent"),
            http_root: http_root.clone(),
            check_port,
            deploy_partition: DEPLOY_PARTITION,
            marker: ("/etc/kd-marker".into(), marker.clone()),
            key: key_text.clone(),
            agent_args: vec!["--stall-timeout".into(), "5".into()],
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, name)| BmcNode {
                    name: name.clone(),
                    mac: macs[i].clone(),
                    address: addrs[i],
                    disk: disks[i].1.path().to_path_buf(),
                })
                .collect(),
        };
        cfg.save(&bmc).unwrap();

        let fb = format!(
            "{} --dir {}",
            env!("CARGO_BIN_EXE_kd-fakebmc"),
            bmc.display()
        );
        let mut y = String::from("cluster: fake\nnodes:\n");
        for i in 0..n {
            y += &format!(
                "  - {{ name: {}, address: {}, mac: \"{}\" }}\n",
                nodes[i], addrs[i], macs[i]
            );
        }
        y += &format!(
            "pxe:\n  tftp_root: {tftp}\n  http_root: {http}\n  http_base_url: http://127.0.0.1:9/\n  \
             profile_naming: mac\n  method: ipxe\n\
             commands:\n  reboot:\n    soft: {fb} soft HOSTNAME\n    hard: {fb} reset HOSTNAME\n    \
             very_hard: {fb} cycle HOSTNAME\n  power_on: {{ hard: {fb} on HOSTNAME }}\n  \
             power_off: {{ hard: {fb} off HOSTNAME }}\n  power_status: {fb} status HOSTNAME\n\
             coordinator: {{ address: 127.0.0.1, port: {port} }}\n\
             disk:\n  block_device: /dev/kd-no-such-disk\n  layout:\n    device: /dev/kd-no-such-disk\n    label: gpt\n    partitions:\n\
             \x20     - {{ number: 1, size: 1MiB, role: bios_grub }}\n\
             \x20     - {{ number: 2, size: 8MiB, role: swap, fs: swap }}\n\
             \x20     - {{ number: 3, size: 80MiB, role: deploy, fs: ext4 }}\n\
             \x20     - {{ number: 4, size: rest, role: tmp, fs: ext4 }}\n\
             workflow:\n  reboot_window: 10\n  command_timeout: 10\n  probe_delay: 1\n  probe_interval: 1\n  \
             broadcast_wait: 5\n  set_deployment_env: {{ timeout: 10, retries: 1 }}\n  \
             prepare: {{ timeout: 60, retries: 0 }}\n  broadcast: {{ timeout: 60, retries: 0 }}\n  \
             finish: {{ timeout: 60, retries: 0 }}\n  boot_new_env: {{ timeout: 30, retries: 1 }}\n\
             check_port: {check_port}\n",
            tftp = t.join("tftp").display(),
            http = http_root.display(),
            port = free_udp_port(),
        );
        // The cluster's block device does not exist: every agent writes the loop device the
        // fake BMC gives it with --disk, never a disk of this machine.
        let cluster = t.join("cluster.yaml");
        write(&cluster, &y);
        Lab {
            tmp,
            bmc,
            http_root,
            state,
            cluster,
            env,
            key,
            nodes,
            addrs,
            check_port,
            disks,
        }
    }

    /// Replaces one `workflow:` entry of the cluster file (`key: value`).
    fn set_workflow(&self, key: &str, value: &str) {
        let y = std::fs::read_to_string(&self.cluster).unwrap();
        let prefix = format!("  {key}:");
        assert!(y.lines().any(|l| l.starts_with(&prefix)), "no {key}");
        let y: String = y
            .lines()
            .map(|l| {
                if l.starts_with(&prefix) {
                    format!("{prefix} {value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        write(&self.cluster, &y);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs `kd-coord deploy -e ENV -m NODESET -c CLUSTER -k KEY -o ok -n ko EXTRA`.
    fn deploy(&self, nodeset: &str, env: &Path, extra: &[&str]) -> Run {
        let p = self.start_deploy("", nodeset, env, extra);
        self.finish_deploy(p)
    }

    /// Starts a deployment in the background (`tag` names its ok/ko files).
    fn start_deploy(&self, tag: &str, nodeset: &str, env: &Path, extra: &[&str]) -> Pending {
        let ok = self.path(&format!("ok{tag}.txt"));
        let ko = self.path(&format!("ko{tag}.txt"));
        let _ = std::fs::remove_file(&ok);
        let _ = std::fs::remove_file(&ko);
        let child = Command::new(bin("kd-coord"))
            .arg("--state")
            .arg(&self.state)
            .arg("deploy")
            .arg("--standalone")
            .arg("-e")
            .arg(env)
            .args(["-m", nodeset])
            .arg("-c")
            .arg(&self.cluster)
            .arg("-k")
            .arg(&self.key)
            .arg("-o")
            .arg(&ok)
            .arg("-n")
            .arg(&ko)
            .args(extra)
            .env("KD_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Pending {
            child,
            t0: Instant::now(),
            nodeset: nodeset.to_string(),
            ok,
            ko,
        }
    }

    /// Waits for a deployment started by [`Lab::start_deploy`].
    fn finish_deploy(&self, mut p: Pending) -> Run {
        let out = wait_child(&mut p.child, DEPLOY_LIMIT)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.dump()));
        let secs = p.t0.elapsed().as_secs_f64();
        eprintln!(
            "kd-coord deploy -m {}: exit {:?} after {secs:.1} s\n{}",
            p.nodeset,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
        if std::env::var_os("KD_TEST_VERBOSE").is_some() {
            eprintln!("{}\n{}", String::from_utf8_lossy(&out.stderr), self.dump());
        }
        Run {
            out,
            secs,
            ok: lines(&p.ok),
            ko: lines(&p.ko),
        }
    }

    /// Everything that explains a failure: the BMC's events, each node's machine and agent
    /// logs (tails).
    fn dump(&self) -> String {
        let tail = |p: &Path, n: usize| {
            let s = std::fs::read_to_string(p).unwrap_or_default();
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(n)..].join("\n")
        };
        let mut s = format!(
            "--- events.log\n{}\n",
            tail(&self.bmc.join("events.log"), 200)
        );
        for n in &self.nodes {
            let d = fakebmc::node_dir(&self.bmc, n);
            s += &format!(
                "--- {n} machine.log\n{}\n--- {n} agent.log\n{}\n",
                tail(&d.join("machine.log"), 20),
                tail(&d.join("agent.log"), 40)
            );
        }
        s
    }

    fn report(&self, r: &Run) -> String {
        format!(
            "exit {:?} after {:.1} s\n--- stdout\n{}\n--- stderr\n{}\n{}",
            r.code(),
            r.secs,
            r.stdout(),
            r.stderr(),
            self.dump()
        )
    }

    fn profile(&self, i: usize) -> String {
        let cfg = BmcConfig::load(&self.bmc).unwrap();
        std::fs::read_to_string(cfg.profile_path(&cfg.nodes[i])).unwrap_or_default()
    }

    /// Nothing was written: no PXE profile, no BMC command, no result files, no packed image.
    fn assert_untouched(&self, r: &Run) {
        let profiles: Vec<_> = std::fs::read_dir(self.http_root.join("nodes"))
            .unwrap()
            .collect();
        assert!(profiles.is_empty(), "profiles written\n{}", self.report(r));
        assert!(
            !self.bmc.join("events.log").exists(),
            "BMC commands ran\n{}",
            self.report(r)
        );
        assert!(r.ok.is_none() && r.ko.is_none(), "{}", self.report(r));
        let images = std::fs::read_dir(self.state.join("images"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(images, 0, "an image was packed\n{}", self.report(r));
    }

    /// The node's deployed system answers on its check port with the fake banner.
    fn answers(&self, i: usize) -> bool {
        use std::io::Read;
        let addr = std::net::SocketAddr::new(self.addrs[i], self.check_port);
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap_or(0);
        b[..n].starts_with(b"SSH-2.0-kd-fakebmc")
    }

    /// Checks one node's deployed disk, as the fake BMC does before "booting" it.
    fn disk_ok(&self, i: usize) -> Result<(), String> {
        let cfg = BmcConfig::load(&self.bmc).unwrap();
        fakebmc::check_disk(&cfg, &cfg.nodes[i]).map_err(|e| format!("{e:#}"))
    }
}

fn skip() -> bool {
    kd_disk::testenv::skip_without_loop_devices()
}

#[test]
fn deploys_three_process_nodes() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(1, 3);
    let r = lab.deploy("node[1-3]", &lab.env, &[]);
    eprintln!("deploy of 3 nodes: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(0), "{rep}");
    assert_eq!(r.last_line(), "3/3 nodes deployed", "{rep}");
    assert_eq!(r.ok.as_deref(), Some(&lab.nodes[..]), "{rep}");
    assert!(r.ko.clone().unwrap_or_default().is_empty(), "{rep}");
    for (i, n) in lab.nodes.iter().enumerate() {
        // The marker, the key (mode 600), GRUB: checked on the disk itself.
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("{n}'s disk: {e}\n{rep}"));
        let cfg = BmcConfig::load(&lab.bmc).unwrap();
        let (off, _) = fakebmc::partition_range(&cfg.nodes[i].disk, DEPLOY_PARTITION).unwrap();
        let post = fakebmc::debugfs(&cfg.nodes[i].disk, off, "cat /etc/kd-post").unwrap();
        assert_eq!(post, format!("post-installed on {n}\n"), "{rep}");
        let p = lab.profile(i);
        assert!(
            p.contains("sanboot") && !p.contains("kd.token"),
            "{n}: not a local-boot profile: {p}\n{rep}"
        );
        // The workflow saw the deployed system: the machine booted it and it answers.
        let ev = fakebmc::events(&lab.bmc, n);
        assert!(
            ev.iter().any(|e| e.contains("deployed system up")),
            "{n}: {ev:?}\n{rep}"
        );
        assert!(lab.answers(i), "{n} does not answer\n{rep}");
    }
    // The tar was packed once into the state directory.
    let images = || {
        std::fs::read_dir(lab.state.join("images"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(images(), 1, "STATE/images\n{rep}");

    // Again, on the deployed systems: the soft reboot works now, the image is not packed again.
    let r = lab.deploy("node[1-3]", &lab.env, &["--json"]);
    eprintln!("second deploy of 3 nodes: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(0), "{rep}");
    let v: serde_json::Value =
        serde_json::from_slice(&r.out.stdout).unwrap_or_else(|e| panic!("{e}: {rep}"));
    assert_eq!(
        v["ok"],
        serde_json::json!(["node1", "node2", "node3"]),
        "{rep}"
    );
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["result"], "ok", "{rep}");
        assert_eq!(n["steps"][0]["step"], "SetDeploymentEnv", "{rep}");
        assert_eq!(
            n["steps"][0]["reboots"],
            serde_json::json!(["soft"]),
            "{rep}"
        );
    }
    assert!(!r.stderr().contains("packing"), "packed again\n{rep}");
    assert_eq!(images(), 1, "STATE/images\n{rep}");
    for (i, n) in lab.nodes.iter().enumerate() {
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("{n}'s disk: {e}\n{rep}"));
        assert!(lab.answers(i), "{n} does not answer\n{rep}");
    }

    // -p 4: node1's image goes to partition 4 (role tmp in the layout); the partition table is
    // not written again and partition 3 keeps the system deployed before.
    let r = lab.deploy("node1", &lab.env, &["-p", "4"]);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(0), "{rep}");
    let cfg = BmcConfig::load(&lab.bmc).unwrap();
    let disk = &cfg.nodes[0].disk;
    for part in [DEPLOY_PARTITION, 4] {
        let (off, _) = fakebmc::partition_range(disk, part).unwrap();
        let post = fakebmc::debugfs(disk, off, "cat /etc/kd-post").unwrap();
        assert_eq!(post, "post-installed on node1\n", "partition {part}\n{rep}");
        let st = fakebmc::debugfs(disk, off, "stat /boot/grub/grub.cfg").unwrap();
        assert!(
            st.contains("Inode:"),
            "partition {part}: no grub.cfg\n{rep}"
        );
    }
    // A partition the layout cannot deploy on: refused before any node reboots.
    let r = lab.deploy("node1", &lab.env, &["-p", "1"]);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(2), "{rep}");
    assert!(
        r.stderr().contains("-p 1") && r.stderr().contains("cannot be the deploy partition"),
        "{rep}"
    );
}

#[test]
fn a_dead_node_times_out_and_the_others_deploy() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(2, 3);
    let o = Command::new(env!("CARGO_BIN_EXE_kd-fakebmc"))
        .arg("--dir")
        .arg(&lab.bmc)
        .args(["kill", "node3"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let pending = lab.start_deploy("", "node[1-3]", &lab.env, &[]);
    // While it runs, another deployment on one of its nodes is refused.
    let t0 = Instant::now();
    // events.log already holds the `kill` above: wait for the first deploy's first reboot
    // command, which comes after it took its nodes' locks.
    let rebooting = || {
        std::fs::read_to_string(lab.bmc.join("events.log"))
            .map(|t| t.lines().any(|l| l.contains(" soft:")))
            .unwrap_or(false)
    };
    while !rebooting() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let busy = lab.start_deploy("-busy", "node3", &lab.env, &[]);
    let b = lab.finish_deploy(busy);
    assert_eq!(b.code(), Some(2), "{}", lab.report(&b));
    assert!(b.stderr().contains("node3"), "{}", lab.report(&b));
    assert!(b.ok.is_none() && b.ko.is_none(), "{}", lab.report(&b));
    let r = lab.finish_deploy(pending);
    eprintln!("deploy of 3 nodes, one dead: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(1), "{rep}");
    assert_eq!(r.last_line(), "2/3 nodes deployed", "{rep}");
    assert_eq!(
        r.ok.as_deref(),
        Some(&["node1".to_string(), "node2".to_string()][..]),
        "{rep}"
    );
    assert_eq!(r.ko.as_deref(), Some(&["node3".to_string()][..]), "{rep}");
    let row = r.row("node3").to_ascii_lowercase();
    assert!(
        row.contains("timeout") || row.contains("timed out") || row.contains("hello"),
        "node3's reason: {row:?}\n{rep}"
    );
    // The reboot escalated soft -> hard -> very_hard on the dead node.
    let ev = fakebmc::events(&lab.bmc, "node3");
    assert!(
        ev.iter().any(|e| e.starts_with("soft:"))
            && ev.iter().any(|e| e.starts_with("reset:"))
            && ev.iter().any(|e| e.starts_with("cycle:")),
        "no escalation on node3: {ev:?}\n{rep}"
    );
    // Two attempts of 10 s each, plus commands: well under the test's limit.
    assert!(r.secs < 75.0, "took {:.1} s\n{rep}", r.secs);
    for i in 0..2 {
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("node{}: {e}\n{rep}", i + 1));
        assert!(lab.answers(i), "node{} does not answer\n{rep}", i + 1);
    }
    assert!(!lab.answers(2));
    // The failed node's profile boots its disk again: no deploy kernel, no token.
    let p = lab.profile(2);
    assert!(
        p.contains("sanboot") && !p.contains("kd.token"),
        "node3's profile after its failure: {p}\n{rep}"
    );
}

#[test]
fn an_agent_dying_mid_broadcast_fails_only_its_node() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(3, 3);
    // node2 is in the middle of the chain: node3 must be re-parented.
    write(
        &fakebmc::node_dir(&lab.bmc, "node2").join("fault"),
        "die-after:2\n",
    );
    let r = lab.deploy("node[1-3]", &lab.env, &["--arity", "chain"]);
    eprintln!("deploy of 3 nodes, one agent killed: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(1), "{rep}");
    assert_eq!(r.last_line(), "2/3 nodes deployed", "{rep}");
    assert_eq!(
        r.ok.as_deref(),
        Some(&["node1".to_string(), "node3".to_string()][..]),
        "{rep}"
    );
    assert_eq!(r.ko.as_deref(), Some(&["node2".to_string()][..]), "{rep}");
    let row = r.row("node2");
    assert!(
        row.to_ascii_lowercase().contains("broadcast") || row.to_ascii_lowercase().contains("lost"),
        "node2's reason: {row:?}\n{rep}"
    );
    let ev = fakebmc::events(&lab.bmc, "node2");
    assert!(
        ev.iter().any(|e| e.starts_with("agent failed")),
        "node2's agent did not die: {ev:?}\n{rep}"
    );
    for i in [0, 2] {
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("node{}: {e}\n{rep}", i + 1));
        assert!(lab.answers(i), "node{} does not answer\n{rep}", i + 1);
    }
    assert!(lab.disk_ok(1).is_err());
    let p = lab.profile(1);
    assert!(
        p.contains("sanboot") && !p.contains("kd.token"),
        "node2's profile after its failure: {p}\n{rep}"
    );
}

#[test]
fn an_agent_dying_mid_broadcast_is_retried_from_a_fresh_boot_and_deploys() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(7, 3);
    // broadcast.retries is honoured: the workflow starts node2 over (a new deploy profile and
    // token, a reboot, a new agent, Prepare) and puts it in a second round.
    lab.set_workflow("broadcast", "{ timeout: 60, retries: 1 }");
    write(
        &fakebmc::node_dir(&lab.bmc, "node2").join("fault-once"),
        "die-after:2\n",
    );
    let r = lab.deploy("node[1-3]", &lab.env, &["--arity", "chain", "--json"]);
    eprintln!(
        "deploy of 3 nodes, one agent killed then retried: {:.1} s",
        r.secs
    );
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(0), "{rep}");
    let json: serde_json::Value =
        serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}\n{rep}"));
    assert_eq!(
        json["ok"],
        serde_json::json!(["node1", "node2", "node3"]),
        "{rep}"
    );
    assert_eq!(json["rounds"], 2, "{rep}");
    let n2 = json["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node"] == "node2"))
        .unwrap_or_else(|| panic!("no node2 in the JSON\n{rep}"));
    let steps: Vec<(String, u64, bool)> = n2["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["step"].as_str().unwrap_or("").to_string(),
                        s["attempts"].as_u64().unwrap_or(0),
                        s["ok"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        steps,
        vec![
            ("SetDeploymentEnv".to_string(), 2, true),
            ("Prepare".to_string(), 2, true),
            ("Broadcast".to_string(), 2, true),
            ("Finish".to_string(), 1, true),
            ("BootNewEnv".to_string(), 1, true),
        ],
        "{rep}"
    );
    let ev = fakebmc::events(&lab.bmc, "node2");
    assert!(
        ev.iter().any(|e| e.starts_with("agent failed")),
        "node2's first agent did not die: {ev:?}\n{rep}"
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.as_str() == "boot: deploy agent")
            .count(),
        2,
        "node2 booted the deploy agent twice: {ev:?}\n{rep}"
    );
    // node3 read from node2 in the chain: it was moved to node1 and completed in round 1.
    let n3 = json["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node"] == "node3"))
        .unwrap_or_else(|| panic!("no node3 in the JSON\n{rep}"));
    assert_eq!(n3["steps"][2]["attempts"], 1, "{rep}");
    for i in 0..3 {
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("node{}: {e}\n{rep}", i + 1));
        assert!(lab.answers(i), "node{} does not answer\n{rep}", i + 1);
    }
}

#[test]
fn bad_inputs_are_refused_before_anything_is_written() {
    if skip() {
        return;
    }
    let lab = Lab::new(4, 3);
    let check = |what: &str, r: Run, needle: &str| {
        let rep = lab.report(&r);
        assert_eq!(r.code(), Some(2), "{what}: {rep}");
        assert!(
            r.stderr().contains(needle),
            "{what}: stderr does not name {needle:?}\n{rep}"
        );
        assert!(r.secs < 20.0, "{what}: took {:.1} s", r.secs);
        lab.assert_untouched(&r);
    };
    check(
        "unknown node",
        lab.deploy("node[1-3],node9", &lab.env, &[]),
        "node9",
    );
    let bad_env = lab.path("bad-env.yaml");
    write(
        &bad_env,
        &std::fs::read_to_string(&lab.env)
            .unwrap()
            .replace("filesystem: ext4", "filesystem: zfs"),
    );
    check(
        "bad environment",
        lab.deploy("node[1-3]", &bad_env, &[]),
        "filesystem",
    );
    let no_env = lab.path("no-such-env.yaml");
    check(
        "missing environment file",
        lab.deploy("node[1-3]", &no_env, &[]),
        "no-such-env.yaml",
    );
    let no_image = lab.path("no-image-env.yaml");
    write(
        &no_image,
        &std::fs::read_to_string(&lab.env)
            .unwrap()
            .replace("image.tar", "missing-image.tar"),
    );
    check(
        "missing image file",
        lab.deploy("node[1-3]", &no_image, &[]),
        "missing-image.tar",
    );
}

#[test]
fn a_damaged_image_file_fails_every_node_with_its_name() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(8, 2);
    // The environment's image as a .kdi that changed on disk after it was packed.
    let kdi = lab.path("damaged.kdi");
    let o = run_with_timeout(
        Command::new(bin("kd-coord"))
            .args(["image", "pack"])
            .arg(lab.path("image.tar"))
            .arg("-o")
            .arg(&kdi)
            .args(["--chunk-size", "1M"]),
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut bytes = std::fs::read(&kdi).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&kdi, &bytes).unwrap();
    let env = lab.path("damaged-env.yaml");
    write(
        &env,
        &std::fs::read_to_string(&lab.env).unwrap().replace(
            &lab.path("image.tar").display().to_string(),
            &kdi.display().to_string(),
        ),
    );
    let r = lab.deploy("node[1-2]", &env, &["--arity", "chain"]);
    eprintln!("deploy of 2 nodes from a damaged image: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.last_line(), "0/2 nodes deployed", "{rep}");
    assert_eq!(
        r.ko.as_deref(),
        Some(&["node1".to_string(), "node2".to_string()][..]),
        "{rep}"
    );
    for node in ["node1", "node2"] {
        let row = r.row(node);
        assert!(
            row.contains("does not match its manifest") && row.contains("damaged.kdi"),
            "{node}'s reason: {row:?}\n{rep}"
        );
    }
}

#[test]
fn a_node_whose_system_does_not_boot_fails_in_boot_new_env() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(6, 3);
    lab.set_workflow("boot_new_env", "{ timeout: 6, retries: 2 }");
    // node2's deployed system never comes up (as if its firmware could not boot the disk).
    write(
        &fakebmc::node_dir(&lab.bmc, "node2").join("broken-boot"),
        "",
    );
    let r = lab.deploy("node[1-3]", &lab.env, &[]);
    eprintln!("deploy of 3 nodes, one not booting: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(1), "{rep}");
    assert_eq!(r.last_line(), "2/3 nodes deployed", "{rep}");
    assert_eq!(
        r.ok.as_deref(),
        Some(&["node1".to_string(), "node3".to_string()][..]),
        "{rep}"
    );
    assert_eq!(r.ko.as_deref(), Some(&["node2".to_string()][..]), "{rep}");
    assert!(r.row("node2").contains("BootNewEnv"), "{rep}");
    // The disk itself was deployed; the agent rebooted it, then the BMC escalated.
    lab.disk_ok(1)
        .unwrap_or_else(|e| panic!("node2: {e}\n{rep}"));
    let ev = fakebmc::events(&lab.bmc, "node2");
    let after: Vec<&String> = ev
        .iter()
        .skip_while(|e| !e.starts_with("agent exited 0"))
        .collect();
    assert!(
        after.iter().any(|e| e.starts_with("reset"))
            && after.iter().any(|e| e.starts_with("cycle")),
        "no hard/very_hard reboot after the agent's: {ev:?}\n{rep}"
    );
    assert!(!lab.answers(1));
    for i in [0, 2] {
        assert!(lab.answers(i), "node{} does not answer\n{rep}", i + 1);
    }
}

#[test]
fn a_disk_too_small_for_the_layout_fails_in_prepare() {
    if skip() {
        return;
    }
    let _g = heavy();
    // node3's 32 MiB disk cannot hold the layout's 1 + 8 + 80 MiB.
    let lab = Lab::with_disks(7, &[128, 128, 32]);
    let r = lab.deploy("node[1-3]", &lab.env, &[]);
    eprintln!("deploy of 3 nodes, one disk too small: {:.1} s", r.secs);
    let rep = lab.report(&r);
    assert_eq!(r.code(), Some(1), "{rep}");
    assert_eq!(r.last_line(), "2/3 nodes deployed", "{rep}");
    assert_eq!(r.ko.as_deref(), Some(&["node3".to_string()][..]), "{rep}");
    let row = r.row("node3");
    assert!(row.contains("Prepare"), "node3's reason: {row:?}\n{rep}");
    // The disk was not touched: no partition table.
    let head = std::fs::read(&lab.disks[2].0).unwrap();
    assert!(
        head[..1024].iter().all(|&b| b == 0),
        "node3's disk was written\n{rep}"
    );
    for i in [0, 1] {
        lab.disk_ok(i)
            .unwrap_or_else(|e| panic!("node{}: {e}\n{rep}", i + 1));
    }
}

/// The harness itself, driven by hand with `kd-coord broadcast` (no workflow): a deploy profile
/// boots the agent, which deploys the disk; a local-boot profile then boots the deployed system,
/// which answers; `soft` fails on a node that is off; `off` stops it.
#[test]
fn the_fake_bmc_boots_the_agent_then_the_deployed_system() {
    if skip() {
        return;
    }
    let _g = heavy();
    let lab = Lab::new(5, 1);
    let fb = |verb: &str| {
        Command::new(env!("CARGO_BIN_EXE_kd-fakebmc"))
            .arg("--dir")
            .arg(&lab.bmc)
            .args([verb, "node1"])
            .output()
            .unwrap()
    };
    let kd = |args: &[&str]| {
        let o = run_with_timeout(
            Command::new(bin("kd-coord"))
                .arg("--state")
                .arg(&lab.state)
                .args(args),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let kdi = lab.path("image.kdi");
    let tar = lab.path("image.tar");
    kd(&[
        "image",
        "pack",
        tar.to_str().unwrap(),
        "-o",
        kdi.to_str().unwrap(),
    ]);
    let pin = kd(&["pin"]);
    let port = free_udp_port();
    write(&lab.path("tokens"), "node1 tok-node1\n");
    let layout = lab.path("layout.yaml");
    write(
        &layout,
        "device: /dev/kd-no-such-disk\nlabel: gpt\npartitions:\n\
         - { number: 1, size: 1MiB, role: bios_grub }\n\
         - { number: 2, size: 8MiB, role: swap, fs: swap }\n\
         - { number: 3, size: 80MiB, role: deploy, fs: ext4 }\n\
         - { number: 4, size: rest, role: tmp, fs: ext4 }\n",
    );
    let cfg = BmcConfig::load(&lab.bmc).unwrap();
    let profile = cfg.profile_path(&cfg.nodes[0]);
    write(
        &profile,
        &format!(
            "#!ipxe\n# kd: deploy environment for node1\n\
             kernel http://127.0.0.1:9/boot/vmlinuz initrd=initramfs.img console=ttyS0 \
             kd.coord=127.0.0.1:{port} kd.pin={pin} kd.node=node1 kd.token=tok-node1\n\
             initrd http://127.0.0.1:9/boot/initramfs.img\nboot\n"
        ),
    );
    let o = fb("soft");
    assert_eq!(o.status.code(), Some(1), "soft on a node that is off");
    assert_eq!(String::from_utf8_lossy(&fb("status").stdout).trim(), "off");
    let mut coord = Command::new(bin("kd-coord"))
        .arg("--state")
        .arg(&lab.state)
        .arg("broadcast")
        .arg(&kdi)
        .args([
            "-m",
            "node1",
            "--json",
            "--hello-timeout",
            "60",
            "--timeout",
            "120",
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tokens")
        .arg(lab.path("tokens"))
        .arg("--layout")
        .arg(&layout)
        .arg("-k")
        .arg(&lab.key)
        .args(["--kernel", "/vmlinuz", "--kernel-params", "console=ttyS0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(fb("reset").status.success());
    assert_eq!(String::from_utf8_lossy(&fb("status").stdout).trim(), "on");
    let co = wait_child(&mut coord, Duration::from_secs(150)).unwrap();
    let err = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\n{err}\n{}", lab.dump()));
    assert_eq!(v["nodes"][0]["ok"], true, "{v}\n{err}\n{}", lab.dump());
    // Boot the deployed system.
    write(
        &profile,
        "#!ipxe\n# kd: local disk boot for node1\nsanboot --no-describe --drive 0x80 || exit\n",
    );
    assert!(fb("reset").status.success());
    let t0 = Instant::now();
    while !lab.answers(0) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.answers(0),
        "the deployed system is not up\n{}",
        lab.dump()
    );
    let ev = fakebmc::events(&lab.bmc, "node1");
    assert!(ev.iter().any(|e| e == "boot: deploy agent"), "{ev:?}");
    assert!(
        ev.iter().any(|e| e.contains("deployed system up")),
        "{ev:?}"
    );
    assert!(fb("soft").status.success(), "soft on a running system");
    assert!(fb("off").status.success());
    assert_eq!(String::from_utf8_lossy(&fb("status").stdout).trim(), "off");
    assert!(!lab.answers(0));
    // A wiped disk (no boot code in the MBR) does not boot.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(lab.disks[0].1.path())
            .unwrap();
        f.write_all(&[0u8; 512]).unwrap();
        f.sync_all().unwrap();
    }
    assert!(fb("on").status.success());
    let t0 = Instant::now();
    while !ev_has(&lab, "no bootable system") && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ev_has(&lab, "no bootable system"), "{}", lab.dump());
    assert!(!lab.answers(0));
}

fn ev_has(lab: &Lab, what: &str) -> bool {
    fakebmc::events(&lab.bmc, "node1")
        .iter()
        .any(|e| e.contains(what))
}

impl Lab {
    /// Lets other users read the lab's files (the environment, image, key) and write their
    /// result files in `users/`.
    fn open_to_users(&self, uids: &[u32]) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for uid in uids {
            let d = self.path(&format!("users/{uid}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(self.path("users"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(*uid)), None).unwrap();
        }
    }

    /// Starts `kd-coord serve` and waits for its socket to answer.
    fn serve(&self) -> Daemon {
        self.serve_with(&[])
    }

    /// Starts `kd-coord serve ARGS` and waits for its socket to answer.
    fn serve_with(&self, args: &[&str]) -> Daemon {
        daemon::serve(&self.state, &self.path("daemon.log"), args)
    }

    /// Runs a `kd-coord` client command as `uid` (None: root), bounded.
    fn kd(&self, uid: Option<u32>, args: &[&str]) -> Output {
        daemon::kd(&self.state, uid, args, DEPLOY_LIMIT)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.dump()))
    }

    fn kd_cmd(&self, uid: Option<u32>, args: &[&str]) -> Command {
        daemon::kd_cmd(&self.state, uid, args)
    }

    /// Waits (polling every 5 ms, at most `limit`) until the client's stderr log at `log`
    /// holds `needle` (an event line such as ": Prepare").
    fn wait_for_event(&self, log: &Path, needle: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "no {needle:?} within {limit:?}:\n{text}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kd-coord ARGS --json`, parsed.
    fn kd_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.kd(None, &a);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Starts `kd-coord deploy -e ENV` through the daemon as `uid`, results in users/UID/.
    fn start_client_deploy(&self, uid: u32, nodeset: &str, env: &Path) -> Pending {
        let ok = self.path(&format!("users/{uid}/ok.txt"));
        let ko = self.path(&format!("users/{uid}/ko.txt"));
        let env = env.display().to_string();
        let key = self.key.display().to_string();
        let (oks, kos) = (ok.display().to_string(), ko.display().to_string());
        let child = self
            .kd_cmd(
                Some(uid),
                // Chains: the metrics below count what the second node of each relayed.
                &[
                    "deploy", "-e", &env, "-m", nodeset, "-k", &key, "-o", &oks, "-n", &kos,
                    "--arity", "chain",
                ],
            )
            .spawn()
            .unwrap();
        Pending {
            child,
            t0: Instant::now(),
            nodeset: nodeset.to_string(),
            ok,
            ko,
        }
    }
}

fn node<'a>(nodes: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {nodes}"))
}

#[test]
fn daemon_two_users_deploy_at_once_and_overlaps_and_strangers_are_refused() {
    if skip() {
        return;
    }
    let (alice, bob, carol) = (64001u32, 64002u32, 64003u32);
    let lab = Lab::new(9, 4);
    lab.open_to_users(&[alice, bob, carol]);
    let daemon = lab.serve();
    let cluster = lab.cluster.display().to_string();

    // An empty daemon: no nodes yet; deploying says so.
    let o = lab.kd(None, &["nodes"]);
    assert!(text(&o).contains("no nodes configured"), "{}", text(&o));
    let o = lab.kd(None, &["cluster", "add", &cluster]);
    assert!(o.status.success(), "{}", text(&o));
    // Only administrators change clusters and rights.
    let o = lab.kd(Some(alice), &["cluster", "add", &cluster]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("not an administrator"), "{}", text(&o));
    for (uid, set) in [(alice, "node[1-2]"), (bob, "node[3-4]")] {
        let user = format!("uid{uid}");
        let o = lab.kd(None, &["rights", "add", "-u", &user, "-m", set]);
        assert!(o.status.success(), "{}", text(&o));
    }

    // Alice and Bob deploy the same new environment on disjoint nodes at once; Bob's names a
    // copy of the image at another path (the store is content-addressed).
    let copy = lab.path("image-copy.tar");
    std::fs::copy(lab.path("image.tar"), &copy).unwrap();
    let bob_env = lab.path("env-copy.yaml");
    let y = std::fs::read_to_string(&lab.env).unwrap();
    write(
        &bob_env,
        &y.replace(
            &lab.path("image.tar").display().to_string(),
            &copy.display().to_string(),
        ),
    );
    let pa = lab.start_client_deploy(alice, "node[1-2]", &lab.env);
    let pb = lab.start_client_deploy(bob, "node[3-4]", &bob_env);
    // Wait until both hold their nodes, then overlap them and try without rights.
    let t0 = Instant::now();
    loop {
        let v = lab.kd_json(&["nodes"]);
        let deploying = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "deploying")
            .count();
        if deploying == 4 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "both deployments did not start: {v}\n{}",
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let env = lab.env.display().to_string();
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node[2-3]"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("nodes busy: node2 (deployment") && e.contains("by uid64001)"),
        "{e}"
    );
    assert!(
        e.contains("node3 (deployment") && e.contains("by uid64002)"),
        "{e}"
    );
    let o = lab.kd(Some(carol), &["deploy", "-e", &env, "-m", "node1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("uid64003 may not deploy node1"),
        "{}",
        text(&o)
    );
    // Alice may not cancel Bob's deployment.
    let list = lab.kd_json(&["deployments", "list"]);
    let bob_id = list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["user"] == "uid64002")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let o = lab.kd(Some(alice), &["deployments", "cancel", &bob_id.to_string()]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    let ra = lab.finish_deploy(pa);
    let rb = lab.finish_deploy(pb);
    assert_eq!(ra.code(), Some(0), "alice:\n{}", lab.report(&ra));
    assert_eq!(rb.code(), Some(0), "bob:\n{}", lab.report(&rb));
    assert_eq!(
        ra.ok.as_deref(),
        Some(&["node1".to_string(), "node2".to_string()][..])
    );
    assert_eq!(
        rb.ok.as_deref(),
        Some(&["node3".to_string(), "node4".to_string()][..])
    );
    assert!(
        ra.last_line().contains("2/2 nodes deployed"),
        "{}",
        lab.report(&ra)
    );
    for i in 0..4 {
        lab.disk_ok(i).unwrap();
        assert!(lab.answers(i));
    }
    // The environment was packed once for both (two paths, the same bytes).
    let packed: Vec<_> = std::fs::read_dir(lab.state.join("images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "kdi"))
        .collect();
    assert_eq!(packed.len(), 1, "{packed:?}");
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    assert_eq!(log.matches("(once)").count(), 1, "{log}");

    // The API, field by field.
    let nodes = lab.kd_json(&["nodes"]);
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 4);
    let n1 = node(&nodes, "node1");
    assert_eq!(n1["cluster"], "fake");
    assert_eq!(n1["state"], "deployed");
    assert_eq!(n1["environment"], "kdtest:1");
    assert_eq!(n1["user"], "uid64001");
    assert!(n1["updated"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(node(&nodes, "node4")["user"], "uid64002");
    let some = lab.kd_json(&["nodes", "-m", "node[2-3]", "--status", "deployed"]);
    let names: Vec<&str> = some["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node2", "node3"]);
    assert_eq!(node(&nodes, "node4")["deployment"], bob_id);
    let d = lab.kd_json(&["deployments", "show", &bob_id.to_string()]);
    assert_eq!(d["id"], bob_id);
    assert_eq!(d["user"], "uid64002");
    assert_eq!(d["environment"], "kdtest:1");
    assert_eq!(d["nodes"], "node[3-4]");
    assert_eq!(d["node_count"], 2);
    assert_eq!(d["state"], "done");
    assert_eq!(d["reason"], serde_json::Value::Null);
    assert_eq!((d["ok"].as_i64(), d["ko"].as_i64()), (Some(2), Some(0)));
    assert!(d["finished"].as_i64().unwrap() >= d["created"].as_i64().unwrap());
    let r3 = &d["node_results"][0];
    assert_eq!(r3["node"], "node3");
    assert_eq!(r3["result"], "ok");
    assert_eq!(r3["step"], serde_json::Value::Null);
    assert!(r3["total_secs"].as_f64().unwrap() > 0.0);
    let steps: Vec<&str> = r3["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "SetDeploymentEnv",
            "Prepare",
            "Broadcast",
            "Finish",
            "BootNewEnv"
        ]
    );
    assert!(r3["steps"][2]["secs"].as_f64().unwrap() > 0.0);
    assert_eq!(r3["steps"][0]["attempts"], 1);
    let stats = lab.kd_json(&["stats"]);
    assert_eq!(stats["node_deployments_ok"], 4);
    assert_eq!(stats["node_deployments_ko"], 0);
    assert_eq!(stats["nodes_by_state"]["deployed"], 4);
    assert_eq!(stats["deployments_by_state"]["done"], 2);
    let list = lab.kd_json(&["deployments", "list", "--user", "uid64001"]);
    assert_eq!(list["deployments"].as_array().unwrap().len(), 1);
    let rights = lab.kd_json(&["rights", "list"]);
    assert_eq!(rights["rights"][0]["user"], "uid64001");
    assert_eq!(rights["rights"][0]["nodes"], "node[1-2]");
    assert_eq!(rights["rights"][0]["partition"], "*");
    // What the trees carried: 4 copies received, the second node of each chain fed by the
    // first (relayed), each step timed once per node.
    let (_, _, m) = http_get(&lab, "/metrics");
    let received = metric(&m, "kd_image_bytes_received_total");
    let served = metric(&m, "kd_image_bytes_served_total");
    let relayed = metric(&m, "kd_image_bytes_relayed_total");
    assert!(received > 0.0 && served > 0.0 && relayed > 0.0, "{m}");
    assert_eq!(received, served + relayed, "{m}");
    assert!(relayed >= received / 4.0, "{m}");
    assert_eq!(
        metric(&m, "kd_step_seconds_count{step=\"Broadcast\"}"),
        4.0,
        "{m}"
    );
    assert!(
        metric(&m, "kd_step_seconds_sum{step=\"Broadcast\"}") > 0.0,
        "{m}"
    );
}

/// The value of one Prometheus sample (`NAME{LABELS}` as printed).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn daemon_killed_mid_broadcast_fails_its_nodes_on_restart_and_locks_nothing() {
    if skip() {
        return;
    }
    let lab = Lab::new(10, 2);
    let mut daemon = lab.serve();
    let cluster = lab.cluster.display().to_string();
    let o = lab.kd(None, &["cluster", "add", &cluster]);
    assert!(o.status.success(), "{}", text(&o));
    let env = lab.env.display().to_string();
    let key = lab.key.display().to_string();
    let client_log = lab.path("client.log");
    let mut client = lab
        .kd_cmd(None, &["deploy", "-e", &env, "-m", "node[1-2]", "-k", &key])
        .stderr(std::fs::File::create(&client_log).unwrap())
        .spawn()
        .unwrap();
    // Wait for the broadcast round (the client prints the daemon's events), then kill -9
    // the daemon.
    lab.wait_for_event(&client_log, ": Broadcast", Duration::from_secs(90));
    let _ = daemon.child.kill();
    // The client says the daemon went away.
    let out = wait_child(&mut client, Duration::from_secs(20)).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = std::fs::read_to_string(&client_log).unwrap_or_default();
    assert!(said.contains("event stream"), "{said}");
    let _ = daemon.child.wait();
    drop(daemon);
    let daemon = lab.serve();
    let d = lab.kd_json(&["deployments", "show", "1"]);
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["reason"], "coordinator restarted");
    let nodes = lab.kd_json(&["nodes"]);
    for n in ["node1", "node2"] {
        assert_eq!(node(&nodes, n)["state"], "deploy_failed", "{nodes}");
    }
    for r in d["node_results"].as_array().unwrap() {
        assert_eq!(r["result"], "ko", "{d}");
        assert_eq!(r["reason"], "coordinator restarted", "{d}");
    }
    // No profile boots the deploy kernel any more.
    for i in 0..2 {
        let p = lab.profile(i);
        assert!(!p.is_empty() && !p.contains("kd.token"), "{p}");
    }
    // Nothing stays locked: the same nodes deploy at once.
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node[1-2]", "-k", &key]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}\n{}",
        text(&o),
        std::fs::read_to_string(&daemon.log).unwrap_or_default(),
        lab.dump()
    );
}

/// One raw HTTP/1.1 GET on the daemon's socket: (status line, content type, body).
fn http_get(lab: &Lab, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(lab.state.join("kd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

#[test]
fn daemon_cancel_follow_metrics_and_errors() {
    if skip() {
        return;
    }
    let lab = Lab::new(11, 2);
    let daemon = lab.serve();
    // The reference page, and an unknown path.
    let (st, ct, body) = http_get(&lab, "/api/v1");
    assert!(st.contains("200"), "{st}");
    assert!(ct.starts_with("text/markdown"), "{ct}");
    assert!(body.contains("# kd API, version 1"), "{body}");
    let (st, _, body) = http_get(&lab, "/api/v2/nodes");
    assert!(
        st.contains("404") && body.contains("GET /api/v1"),
        "{st} {body}"
    );
    // Deploying before any cluster exists says what to do.
    let env = lab.env.display().to_string();
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("kd-coord cluster add"), "{}", text(&o));
    let cluster = lab.cluster.display().to_string();
    assert!(lab.kd(None, &["cluster", "add", &cluster]).status.success());
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node[2-3]"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unknown node(s) node3 (known: node[1-2])"),
        "{}",
        text(&o)
    );
    // A bad environment is refused with its reason, nothing taken.
    let bad = lab.path("bad-env.yaml");
    write(&bad, "name: x\nversion: 1\n");
    let o = lab.kd(
        None,
        &["deploy", "-e", &bad.display().to_string(), "-m", "node1"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bad environment"), "{}", text(&o));

    // Cancel a running deployment: its nodes fail with the reason, boot their disks again.
    let key = lab.key.display().to_string();
    let client_log = lab.path("client.log");
    let mut client = lab
        .kd_cmd(None, &["deploy", "-e", &env, "-m", "node[1-2]", "-k", &key])
        .stderr(std::fs::File::create(&client_log).unwrap())
        .spawn()
        .unwrap();
    lab.wait_for_event(&client_log, ": Prepare", Duration::from_secs(60));
    // A follower that joins late gets what happened so far, then the rest, as ndjson.
    let follower = {
        let sock = lab.state.join("kd.sock");
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            write!(
                s,
                "GET /api/v1/deployments/1/events HTTP/1.1\r\nHost: kd\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let o = lab.kd(None, &["deployments", "cancel", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = wait_child(&mut client, Duration::from_secs(60)).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0/2 nodes deployed (deployment 1 cancelled: cancelled by root)"),
        "{stdout}"
    );
    let d = lab.kd_json(&["deployments", "show", "1"]);
    assert_eq!(d["state"], "cancelled");
    assert_eq!(d["reason"], "cancelled by root");
    for r in d["node_results"].as_array().unwrap() {
        assert_eq!(r["result"], "ko");
        assert!(
            r["reason"].as_str().unwrap().contains("cancelled by root"),
            "{d}"
        );
    }
    for i in 0..2 {
        let p = lab.profile(i);
        assert!(!p.contains("kd.token"), "{p}");
    }
    let stream = follower.join().unwrap();
    assert!(
        stream
            .to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{stream}"
    );
    // Chunked transfer: the JSON lines are the ones that parse.
    let lines: Vec<serde_json::Value> = stream
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l["note"].as_str().is_some_and(
                |n| n.starts_with("deployment 1: kdtest:1 on 2 node(s) node[1-2] for root")
            )),
        "{stream}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["step"] == "Prepare" && l["node"] == "node1"),
        "{stream}"
    );
    let end = lines.last().unwrap();
    assert_eq!(end["end"], "cancelled", "{stream}");
    assert_eq!(end["ko"].as_array().unwrap().len(), 2);
    // Over, its lines are kept: `follow` replays them.
    let (_, _, again) = http_get(&lab, "/api/v1/deployments/1/events");
    let replayed: Vec<serde_json::Value> = again
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .collect();
    assert_eq!(replayed, lines, "{again}");
    // Metrics.
    let (st, ct, m) = http_get(&lab, "/metrics");
    assert!(
        st.contains("200") && ct.starts_with("text/plain"),
        "{st} {ct}"
    );
    for want in [
        "kd_nodes{state=\"deploy_failed\"} 2",
        "kd_deployments{state=\"cancelled\"} 1",
        "kd_deployments_running 0",
        "kd_node_deployments_total{result=\"ko\"} 2",
        "kd_agents_routed 0",
        "# TYPE kd_api_requests_total counter",
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
    drop(daemon);
}

#[test]
fn daemon_environments_by_visibility_and_deploy_by_name() {
    if skip() {
        return;
    }
    let (alice, bob) = (64011u32, 64012u32);
    let lab = Lab::new(12, 1);
    lab.open_to_users(&[alice, bob]);
    let _daemon = lab.serve();
    let cluster = lab.cluster.display().to_string();
    assert!(lab.kd(None, &["cluster", "add", &cluster]).status.success());
    for u in ["uid64011", "uid64012"] {
        assert!(lab
            .kd(None, &["rights", "add", "-u", u, "-m", "node1"])
            .status
            .success());
    }
    // Alice registers the lab's environment as her own (private by default).
    let env = lab.env.display().to_string();
    let o = lab.kd(Some(alice), &["env", "add", &env]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("kdtest@1 added for uid64011 (private)"),
        "{}",
        text(&o)
    );
    // A version is immutable.
    let o = lab.kd(Some(alice), &["env", "add", &env]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("immutable"), "{}", text(&o));
    // Public ones are for administrators.
    let public = lab.path("public.yaml");
    let y = std::fs::read_to_string(&lab.env).unwrap();
    write(&public, &format!("{y}visibility: public\n"));
    let o = lab.kd(Some(bob), &["env", "add", &public.display().to_string()]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let v = lab.kd(Some(bob), &["env", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(list["environments"].as_array().unwrap().len(), 0, "{list}");
    let o = lab.kd(Some(bob), &["env", "show", "kdtest"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no environment kdtest that uid64012 may see"),
        "{}",
        text(&o)
    );
    let o = lab.kd(Some(bob), &["env", "rm", "kdtest", "-u", "uid64011"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let v = lab.kd(Some(alice), &["env", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let e = &list["environments"][0];
    assert_eq!(
        (&e["name"], &e["version"], &e["user"], &e["visibility"]),
        (
            &serde_json::json!("kdtest"),
            &serde_json::json!(1),
            &serde_json::json!("uid64011"),
            &serde_json::json!("private")
        )
    );
    assert_eq!(e["description"], "loopback deploy test");
    // Alice deploys it by name; Bob cannot name it.
    let key = lab.key.display().to_string();
    let o = lab.kd(Some(bob), &["deploy", "-e", "kdtest", "-m", "node1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no environment kdtest that uid64012 may use"),
        "{}",
        text(&o)
    );
    // Her nodes from an OAR-style node file (one line per core).
    let nodefile = lab.path("nodefile");
    write(&nodefile, "node1\nnode1\nnode1\n");
    let nf = nodefile.display().to_string();
    let o = lab.kd(
        Some(alice),
        &["deploy", "-e", "kdtest@1", "-f", &nf, "-k", &key],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    lab.disk_ok(0).unwrap();
    let nodes = lab.kd_json(&["nodes"]);
    assert_eq!(node(&nodes, "node1")["environment"], "kdtest:1");
    assert_eq!(node(&nodes, "node1")["user"], "uid64011");
    let o = lab.kd(Some(alice), &["env", "rm", "kdtest@1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = lab.kd(Some(alice), &["env", "show", "kdtest"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `kd-coord --api https://127.0.0.1:PORT --api-pin PIN ARGS` with `token` in KD_TOKEN, from a
/// state directory that does not exist (nothing local to lean on), bounded.
fn remote(lab: &Lab, port: u16, pin: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(bin("kd-coord"));
    c.arg("--state")
        .arg(lab.path("no-such-state"))
        .arg("--api")
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--api-pin")
        .arg(pin)
        .args(args)
        .env_remove("KD_TOKEN_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    match token {
        Some(t) => c.env("KD_TOKEN", t),
        None => c.env_remove("KD_TOKEN"),
    };
    let mut child = c.spawn().unwrap();
    wait_child(&mut child, DEPLOY_LIMIT).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.dump()))
}

#[test]
fn daemon_remote_user_deploys_over_https_with_a_token() {
    if skip() {
        return;
    }
    let lab = Lab::new(16, 1);
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let _daemon = lab.serve_with(&["--listen", &listen, "--almighty", "ops"]);
    let cluster = lab.cluster.display().to_string();
    assert!(lab.kd(None, &["cluster", "add", &cluster]).status.success());
    let public = lab.env.with_file_name("public.yaml");
    let y = std::fs::read_to_string(&lab.env).unwrap();
    write(&public, &format!("{y}visibility: public\n"));
    let o = lab.kd(None, &["env", "add", &public.display().to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    let pin = String::from_utf8(lab.kd(None, &["pin"]).stdout).unwrap();
    let pin = pin.trim();
    // Root makes carol (no account on this host) a token; it is shown once.
    let made = lab.kd_json(&["token", "add", "-u", "carol", "--name", "ci"]);
    let token = made["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("kdt_"), "{made}");
    assert_eq!(
        (&made["user"], &made["name"]),
        (&serde_json::json!("carol"), &serde_json::json!("ci"))
    );
    let id = made["id"].as_i64().unwrap().to_string();

    // No token, a wrong token, a wrong pin: refused, each saying why.
    let o = remote(&lab, port, pin, None, &["nodes"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("this API needs a token"), "{}", text(&o));
    let o = remote(&lab, port, pin, Some("kdt_0123"), &["nodes"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("unknown or revoked token"),
        "{}",
        text(&o)
    );
    let o = remote(&lab, port, &"0".repeat(64), Some(&token), &["nodes"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("does not match the pinned"),
        "{}",
        text(&o)
    );

    // With its token, carol sees the nodes, but may deploy only where she has a right.
    let o = remote(&lab, port, pin, Some(&token), &["nodes", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(node(&nodes, "node1")["cluster"], "fake");
    let o = remote(
        &lab,
        port,
        pin,
        Some(&token),
        &["deploy", "-e", "kdtest", "-m", "node1"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("carol may not deploy node1"),
        "{}",
        text(&o)
    );
    // ops, an almighty user, grants it from afar; carol could not.
    let ops = lab.kd_json(&["token", "add", "-u", "ops"]);
    let ops = ops["token"].as_str().unwrap().to_string();
    let grant = ["rights", "add", "-u", "carol", "-m", "node1"];
    let o = remote(&lab, port, pin, Some(&token), &grant);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("carol is not an administrator"),
        "{}",
        text(&o)
    );
    let o = remote(&lab, port, pin, Some(&ops), &grant);
    assert!(o.status.success(), "{}", text(&o));
    // The daemon reads no file for a user without an account here; a token makes no token.
    let env = lab.env.display().to_string();
    let o = remote(
        &lab,
        port,
        pin,
        Some(&token),
        &["deploy", "-e", &env, "-m", "node1"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("carol has no account on the daemon's host"),
        "{}",
        text(&o)
    );
    let o = remote(&lab, port, pin, Some(&token), &["token", "add"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("a token cannot make tokens"),
        "{}",
        text(&o)
    );

    // The public environment by name, with her key and ok/ko files on her side.
    let (ok, ko) = (lab.path("carol-ok.txt"), lab.path("carol-ko.txt"));
    let key = lab.key.display().to_string();
    let o = remote(
        &lab,
        port,
        pin,
        Some(&token),
        &[
            "deploy",
            "-e",
            "kdtest",
            "-m",
            "node1",
            "-k",
            &key,
            "-o",
            &ok.display().to_string(),
            "-n",
            &ko.display().to_string(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    assert_eq!(lines(&ok), Some(vec!["node1".to_string()]));
    assert_eq!(lines(&ko), Some(vec![]));
    lab.disk_ok(0).unwrap();
    let nodes = lab.kd_json(&["nodes"]);
    assert_eq!(node(&nodes, "node1")["user"], "carol");
    assert_eq!(node(&nodes, "node1")["environment"], "kdtest:1");
    let deps = lab.kd_json(&["deployments", "list"]);
    assert_eq!(deps["deployments"][0]["user"], "carol", "{deps}");

    // Root lists tokens without their secrets (carol's was used), then revokes it.
    let list = lab.kd_json(&["token", "list"]);
    assert_eq!(list["tokens"].as_array().unwrap().len(), 2, "{list}");
    let t = &list["tokens"][0];
    assert_eq!(
        (&t["user"], &t["name"]),
        (&serde_json::json!("carol"), &serde_json::json!("ci")),
        "{list}"
    );
    assert!(t["last_used"].is_i64(), "{list}");
    assert!(!list.to_string().contains(&token[4..]), "{list}");
    assert!(
        t.get("token").is_none() && t.get("hash").is_none(),
        "{list}"
    );
    let o = lab.kd(None, &["token", "rm", &id]);
    assert!(o.status.success(), "{}", text(&o));
    let o = remote(&lab, port, pin, Some(&token), &["nodes"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("unknown or revoked token"),
        "{}",
        text(&o)
    );
}

#[test]
fn daemon_sigterm_cancels_running_deployments_then_exits() {
    if skip() {
        return;
    }
    let lab = Lab::new(13, 1);
    let mut daemon = lab.serve();
    let cluster = lab.cluster.display().to_string();
    assert!(lab.kd(None, &["cluster", "add", &cluster]).status.success());
    let env = lab.env.display().to_string();
    let client_log = lab.path("client.log");
    let mut client = lab
        .kd_cmd(None, &["deploy", "-e", &env, "-m", "node1"])
        .stderr(std::fs::File::create(&client_log).unwrap())
        .spawn()
        .unwrap();
    lab.wait_for_event(&client_log, ": Prepare", Duration::from_secs(60));
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = daemon.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(70),
            "the daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let out = wait_child(&mut client, Duration::from_secs(30)).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled: the coordinator is stopping"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!lab.state.join("kd.sock").exists());
    // Started again, it finds the deployment cancelled (not to recover) and the node free.
    let _daemon = lab.serve();
    let d = lab.kd_json(&["deployments", "show", "1"]);
    assert_eq!(d["state"], "cancelled");
    assert_eq!(d["reason"], "the coordinator is stopping");
    let nodes = lab.kd_json(&["nodes"]);
    assert_eq!(node(&nodes, "node1")["state"], "deploy_failed");
    assert!(!lab.profile(0).contains("kd.token"));
}

#[test]
fn daemon_reboot_and_power_process_nodes_with_rights_states_and_escalation() {
    if skip() {
        return;
    }
    let alice = 64031u32;
    let lab = Lab::new(15, 2);
    lab.open_to_users(&[alice]);
    let _daemon = lab.serve();
    let cluster = lab.cluster.display().to_string();
    assert!(lab.kd(None, &["cluster", "add", &cluster]).status.success());
    let env = lab.env.display().to_string();
    let key = lab.key.display().to_string();
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node[1-2]", "-k", &key]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    // No right on node1: refused, naming the node.
    let o = lab.kd(Some(alice), &["reboot", "-m", "node1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("uid64031 may not reboot simple node1"),
        "{}",
        text(&o)
    );
    assert!(lab
        .kd(None, &["rights", "add", "-u", "uid64031", "-m", "node1"])
        .status
        .success());
    // Her reboot into the environment on node1's disk: the local profile, the soft command
    // (through the fake BMC: the deployed system answers it), then the port.
    let o = lab.kd(
        Some(alice),
        &["reboot", "-m", "node1", "-r", "recorded_env", "--json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    let end: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n1 = &end["node_results"][0];
    assert_eq!(
        (&n1["node"], &n1["result"]),
        (&serde_json::json!("node1"), &serde_json::json!("ok")),
        "{end}"
    );
    assert_eq!(
        n1["steps"][0]["reboots"],
        serde_json::json!(["soft"]),
        "{end}"
    );
    assert!(lab.answers(0));
    let ev = fakebmc::events(&lab.bmc, "node1");
    assert_eq!(
        ev.iter().filter(|e| e.as_str() == "soft").count(),
        1,
        "{ev:?}"
    );
    assert!(lab.profile(0).contains("sanboot"), "{}", lab.profile(0));
    // The node is still the deployer's, with its environment; its state says it answered.
    let nodes = lab.kd_json(&["nodes"]);
    let n = node(&nodes, "node1");
    assert_eq!(
        (&n["state"], &n["user"]),
        (&serde_json::json!("deployed"), &serde_json::json!("root")),
        "{n}"
    );
    assert_eq!(n["environment"], "kdtest:1", "{n}");
    // The job is in the history with its kind.
    let jobs = lab.kd_json(&["deployments", "list"]);
    let last = &jobs["deployments"][0];
    assert_eq!(
        (&last["kind"], &last["environment"], &last["user"]),
        (
            &serde_json::json!("reboot"),
            &serde_json::json!("reboot:recorded_env"),
            &serde_json::json!("uid64031")
        ),
        "{jobs}"
    );
    // Power: node2 off (the cluster's power_off has a hard level only: that is where it
    // starts), its status, then on again; node1 unaffected.
    let o = lab.kd(None, &["power", "off", "-m", "node2"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1/1 nodes powered off"),
        "{}",
        text(&o)
    );
    assert_eq!(
        node(&lab.kd_json(&["nodes"]), "node2")["state"],
        "powered_off"
    );
    let st = lab.kd_json(&["power", "status", "-m", "node[1-2]"]);
    let status = |name: &str| {
        st["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node"] == name))
            .map(|n| n["status"].clone())
    };
    assert_eq!(status("node1"), Some(serde_json::json!("on")), "{st}");
    assert_eq!(status("node2"), Some(serde_json::json!("off")), "{st}");
    assert!(!lab.answers(1));
    let o = lab.kd(None, &["power", "on", "-m", "node2", "-l", "hard"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), lab.dump());
    assert_eq!(
        node(&lab.kd_json(&["nodes"]), "node2")["state"],
        "powered_on"
    );
    // Stats after a failed deployment of node2 (its BMC does nothing any more): node2 fails
    // half of its deployments and comes first; the reboots and power jobs do not count.
    write(&fakebmc::node_dir(&lab.bmc, "node2").join("dead"), "");
    let o = lab.kd(None, &["deploy", "-e", &env, "-m", "node2", "-k", &key]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", text(&o), lab.dump());
    // `nodes` says how each node's last deployment ended on it, and why.
    let nodes = lab.kd_json(&["nodes"]);
    assert_eq!(node(&nodes, "node1")["result"], "ok", "{nodes}");
    let n2 = node(&nodes, "node2");
    assert_eq!(
        (&n2["state"], &n2["result"]),
        (
            &serde_json::json!("deploy_failed"),
            &serde_json::json!("ko")
        ),
        "{nodes}"
    );
    assert!(
        n2["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("SetDeploymentEnv: "),
        "{nodes}"
    );
    let st = lab.kd_json(&["stats", "--failure-rate"]);
    let per_node = st["per_node"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = per_node.iter().filter_map(|n| n["node"].as_str()).collect();
    assert_eq!(names, vec!["node2", "node1"], "{st}");
    assert_eq!(
        (&per_node[0]["deployments"], &per_node[0]["ko"]),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "{st}"
    );
    assert_eq!(per_node[0]["failure_rate"], 0.5, "{st}");
    assert!(
        per_node[0]["last_failure"]
            .as_str()
            .unwrap_or("")
            .starts_with("SetDeploymentEnv: "),
        "{st}"
    );
    assert_eq!(per_node[1]["failure_rate"], 0.0, "{st}");
    let o = lab.kd(None, &["stats", "--per-step", "--csv", "-m", "node[1-2]"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("step,entered,failed,retries,mean_secs,max_secs"),
        "{out}"
    );
    let set: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    assert_eq!(&set[..3], &["SetDeploymentEnv", "3", "1"], "{out}");
    // Over the last day: all of it; since tomorrow: nothing.
    let st = lab.kd_json(&["stats", "--failure-rate", "--since", "1d"]);
    assert_eq!(st["per_node"].as_array().map(Vec::len), Some(2), "{st}");
    let tomorrow = (std::time::SystemTime::now() + Duration::from_secs(86_400))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let st = lab.kd_json(&["stats", "--failure-rate", "--since", &tomorrow]);
    assert_eq!(st["per_node"].as_array().map(Vec::len), Some(0), "{st}");
    let o = lab.kd(None, &["stats", "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A node that never answers: the simple reboot escalates soft → hard → very_hard, each
    // attempt of boot_new_env (1 retry) in turn, then fails with the reason.
    write(
        &fakebmc::node_dir(&lab.bmc, "node1").join("broken-boot"),
        "",
    );
    let o = lab.kd(None, &["reboot", "-m", "node1", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", text(&o), lab.dump());
    let end: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n1 = &end["node_results"][0];
    assert_eq!(n1["result"], "ko", "{end}");
    assert!(
        n1["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer within 30 s"),
        "{end}"
    );
    assert_eq!(node(&lab.kd_json(&["nodes"]), "node1")["state"], "unknown");
    // What kd's deploy environment cannot do is said so.
    let o = lab.kd(None, &["reboot", "-m", "node1", "-r", "deploy_env"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("runs no shell"), "{}", text(&o));
}
