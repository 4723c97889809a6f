//! End-to-end lab tests (need root, qemu-system-x86, ipxe-qemu, dnsmasq-base, busybox-static,
//! cpio): two QEMU nodes PXE-boot through iPXE + HTTP into a tiny busybox initramfs that
//! prints a marker on the serial console; then the virtual BMC; then `down` leaves nothing.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kd_lab::{Action, Lab, LabConfig, PowerState, Subnet};

const KERNEL_CACHE: &str = "/var/cache/kd/lab-kernel";

fn sh(script: &str) {
    let st = Command::new("sh").args(["-ec", script]).status().unwrap();
    assert!(st.success(), "failed: {script}");
}

/// A Debian kernel: the deploy initrd's if it was built, else one cached from
/// `apt-get download linux-image-<ver>-amd64` (the host has no /boot kernel).
fn kernel() -> PathBuf {
    for p in [
        "/var/cache/kd/initrd/vmlinuz",
        "/var/cache/kd/lab-kernel/vmlinuz",
    ] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    std::fs::create_dir_all(KERNEL_CACHE).unwrap();
    let dl = tempfile::tempdir_in(KERNEL_CACHE).unwrap();
    let dep = String::from_utf8(
        Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pkg = dep
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .expect("linux-image-amd64 has no linux-image dependency")
        .to_string();
    sh(&format!(
        "cd {d} && apt-get download -q {pkg} >/dev/null 2>&1 && \
         dpkg-deb --fsys-tarfile {pkg}_*.deb | tar -x --wildcards './boot/vmlinuz-*' && \
         cp boot/vmlinuz-* {KERNEL_CACHE}/vmlinuz.tmp && mv {KERNEL_CACHE}/vmlinuz.tmp {KERNEL_CACHE}/vmlinuz",
        d = dl.path().display()
    ));
    PathBuf::from(KERNEL_CACHE).join("vmlinuz")
}

/// Boot files: `vmlinuz` and `initrd.gz`, a busybox initramfs whose /init prints
/// `KD-LAB-MARKER <node>` (node name from the `kdlab_node=` kernel parameter) and sleeps.
fn boot_files(dir: &Path) {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /proc /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev\n\
         echo \"KD-LAB-MARKER $kdlab_node up $(/bin/busybox cut -d' ' -f1 /proc/uptime)\" > /dev/ttyS0\n\
         while true; do /bin/busybox sleep 60; done\n",
    )
    .unwrap();
    let boot = dir.join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    sh(&format!(
        "chmod 755 {r}/init && cd {r} && find . | cpio -o -H newc --quiet | gzip -1 > {b}/initrd.gz",
        r = root.display(),
        b = boot.display()
    ));
    std::fs::copy(kernel(), boot.join("vmlinuz")).unwrap();
}

fn markers(lab: &Lab, node: &str) -> usize {
    let log = std::fs::read(lab.console_log(node).unwrap()).unwrap_or_default();
    String::from_utf8_lossy(&log)
        .matches(&format!("KD-LAB-MARKER {node} up"))
        .count()
}

/// Wait until every node in `want` shows at least `count` markers; returns seconds per node.
fn wait_markers(lab: &Lab, want: &[&str], count: usize, limit: Duration) -> Vec<f64> {
    let start = Instant::now();
    let mut done: Vec<Option<f64>> = vec![None; want.len()];
    while done.iter().any(Option::is_none) {
        for (i, n) in want.iter().enumerate() {
            if done[i].is_none() && markers(lab, n) >= count {
                done[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        if start.elapsed() > limit {
            let mut msg = String::new();
            for n in want {
                let log = std::fs::read(lab.console_log(n).unwrap()).unwrap_or_default();
                let text = String::from_utf8_lossy(&log);
                let tail: String = text
                    .chars()
                    .rev()
                    .take(1500)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                msg += &format!("\n--- {n} serial log tail ---\n{tail}");
            }
            panic!("no marker #{count} within {limit:?}: {done:?}{msg}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done.into_iter().flatten().collect()
}

fn http_get(lab: &Lab, path: &str) -> String {
    let addr = format!("{}:{}", lab.gateway(), lab.state().http_port);
    let path = path.to_string();
    lab.in_netns(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

#[test]
fn pxe_boot_bmc_and_down() {
    let tmp = tempfile::tempdir().unwrap();
    boot_files(tmp.path());
    let cfg = LabConfig {
        nodes: 2,
        subnet: "10.78.0.0/24".parse::<Subnet>().unwrap(),
        state_dir: Some(tmp.path().join("state")),
        boot_files: Some(tmp.path().join("boot")),
        kd_lab_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_kd-lab"))),
        start_nodes: false,
        replace_existing: true,
        ..LabConfig::default()
    };
    let t0 = Instant::now();
    let lab = Lab::up(cfg).unwrap();
    println!("lab up (nodes off) in {:.2}s", t0.elapsed().as_secs_f64());
    let netns = lab.netns().to_string();
    assert!(kd_lab::netns_exists(&netns));

    // cluster.yaml for kd-coord.
    let y: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(lab.cluster_yaml()).unwrap()).unwrap();
    assert_eq!(y["nodes"].as_sequence().unwrap().len(), 2);
    assert_eq!(y["coordinator_address"].as_str(), Some("10.78.0.1"));
    assert_eq!(y["nodes"][1]["mac"].as_str(), Some("52:54:00:4e:00:0c"));

    // Per-node iPXE profiles, as the coordinator writes them.
    let base = lab.http_base_url().to_string();
    for n in lab.nodes() {
        std::fs::write(
            lab.ipxe_profile_path(&n.name).unwrap(),
            format!(
                "#!ipxe\nkernel {base}/boot/vmlinuz console=ttyS0 quiet kdlab_node={}\n\
                 initrd {base}/boot/initrd.gz\nboot\n",
                n.name
            ),
        )
        .unwrap();
    }
    // HTTP answers inside the namespace.
    let r = http_get(&lab, "/boot.ipxe");
    assert!(r.starts_with("HTTP/1.0 200") && r.contains("#!ipxe"), "{r}");
    assert!(http_get(&lab, "/nodes/none.ipxe").starts_with("HTTP/1.0 404"));
    let out = lab.exec(&["ip", "-br", "link", "show", "kdbr0"]).unwrap();
    assert!(out.status.success());
    // TFTP (the pxelinux path) answers too.
    let got = tmp.path().join("pxelinux.0");
    let out = lab
        .exec(&[
            "busybox",
            "tftp",
            "-g",
            "-r",
            "pxelinux.0",
            "-l",
            got.to_str().unwrap(),
            lab.gateway(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(lab.tftp_root().join("pxelinux.0")).unwrap()
    );

    // Boot both nodes: iPXE -> HTTP -> kernel + initramfs -> marker.
    for n in ["node1", "node2"] {
        assert_eq!(lab.power(n, Action::Status).unwrap(), PowerState::Off);
        assert_eq!(lab.power(n, Action::On).unwrap(), PowerState::On);
    }
    let t = wait_markers(&lab, &["node1", "node2"], 1, Duration::from_secs(150));
    println!(
        "VM start -> initramfs marker: node1 {:.1}s, node2 {:.1}s",
        t[0], t[1]
    );
    let http_log = std::fs::read_to_string(lab.state_dir().join("http.log")).unwrap();
    assert!(
        http_log.contains("GET /nodes/52-54-00-4e-00-0b.ipxe 200"),
        "{http_log}"
    );
    assert!(http_log.contains("GET /boot/initrd.gz 200"), "{http_log}");

    // Virtual BMC: off / status / on (same MAC and disk: boots its profile again), reset.
    let old_pid = kd_lab::node_pid(lab.node("node2").unwrap()).unwrap();
    assert_eq!(lab.power("node2", Action::Off).unwrap(), PowerState::Off);
    assert!(!kd_lab::alive(old_pid));
    assert_eq!(lab.power("node2", Action::Status).unwrap(), PowerState::Off);
    assert!(matches!(
        lab.power("node2", Action::Reset),
        Err(kd_lab::Error::NodeOff(_))
    ));
    assert_eq!(lab.power("node2", Action::On).unwrap(), PowerState::On);
    assert_eq!(lab.power("node1", Action::Reset).unwrap(), PowerState::On);
    let t = wait_markers(&lab, &["node1", "node2"], 2, Duration::from_secs(150));
    println!(
        "reset -> marker: node1 {:.1}s; power on -> marker: node2 {:.1}s",
        t[0], t[1]
    );
    let status = lab.status();
    assert!(status
        .iter()
        .all(|s| s.power == PowerState::On && s.pid.is_some()));

    // The CLI sees the same lab (what the cluster's command templates run).
    let out = Command::new(env!("CARGO_BIN_EXE_kd-lab"))
        .args(["power", "--state"])
        .arg(lab.state_dir())
        .args(["node1", "status"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on");

    // Down: no namespace, no qemu, no dnsmasq, no HTTP server, no tap, no state.
    let st = lab.state().clone();
    let mut pids: Vec<u32> = st.nodes.iter().filter_map(kd_lab::node_pid).collect();
    assert_eq!(pids.len(), 2);
    pids.extend(st.dnsmasq_pid);
    pids.extend(st.http_pid);
    let report = lab.down().unwrap();
    assert!(report.left_running.is_empty(), "{report:?}");
    assert!(!kd_lab::netns_exists(&netns));
    for p in pids {
        assert!(!kd_lab::alive(p), "pid {p} survived down");
    }
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-br", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !links.contains("kdbr0") && !links.lines().any(|l| l.starts_with("tap")),
        "{links}"
    );
    assert!(!st.state_dir.exists());
}

/// A crashed `up` (handle leaked, lab.json gone) is still removed by `teardown`, which
/// finds the namespace by name and stops what runs in it.
#[test]
fn teardown_after_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tmp.path().join("state");
    let cfg = LabConfig {
        nodes: 1,
        subnet: "10.79.0.0/24".parse::<Subnet>().unwrap(),
        state_dir: Some(sd.clone()),
        kd_lab_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_kd-lab"))),
        ..LabConfig::default()
    };
    let lab = Lab::up(cfg.clone()).unwrap();
    // A second lab on the same subnet is refused.
    assert!(matches!(
        Lab::up(cfg.clone()),
        Err(kd_lab::Error::Exists(_))
    ));
    // A process kd-lab did not start, in the namespace: left alone by teardown.
    let mut other = lab.command("sleep").arg("300").spawn().unwrap();
    let cmdline = format!("/proc/{}/cmdline", other.id());
    for _ in 0..100 {
        // wait until `ip netns exec` has entered the namespace and exec'd sleep
        if std::fs::read(&cmdline)
            .unwrap_or_default()
            .starts_with(b"sleep")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = lab.detach();
    let qemu = kd_lab::node_pid(&st.nodes[0]).unwrap();
    std::fs::remove_file(sd.join("lab.json")).unwrap();
    let r = kd_lab::teardown(&sd, Some(&st.netns), false).unwrap();
    assert!(r.netns_deleted);
    assert_eq!(r.left_running, vec![other.id()]);
    other.kill().unwrap();
    other.wait().unwrap();
    assert!(!kd_lab::netns_exists(&st.netns));
    for p in [Some(qemu), st.dnsmasq_pid, st.http_pid]
        .into_iter()
        .flatten()
    {
        assert!(!kd_lab::alive(p), "pid {p} survived");
    }
    // Idempotent.
    let r = kd_lab::teardown(&sd, Some(&st.netns), false).unwrap();
    assert!(!r.netns_deleted && r.stopped.is_empty());

    // A harness killed with its lab up: the next run replaces the stale lab.
    let stale = Lab::up(cfg.clone()).unwrap().detach();
    let stale_qemu = kd_lab::node_pid(&stale.nodes[0]).unwrap();
    let lab = Lab::up(LabConfig {
        replace_existing: true,
        ..cfg
    })
    .unwrap();
    assert!(!kd_lab::alive(stale_qemu));
    assert!(stale.dnsmasq_pid.is_some_and(|p| !kd_lab::alive(p)));
    assert_eq!(lab.status()[0].power, PowerState::On);
    lab.down().unwrap();
    assert!(!kd_lab::netns_exists(&stale.netns));
}
