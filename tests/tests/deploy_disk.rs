//! The broadcast engine feeding the disk pipeline: agents on loopback deploy a root-file-system
//! tar onto loop devices (partition, mkfs, extract, SSH key, fstab, GRUB), as they do on nodes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kd_disk::loopdev::LoopDevice;
use kd_tests::*;

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Start and size (bytes) of partition `n` of a disk, from sfdisk's JSON.
fn partition(disk: &Path, n: usize) -> (u64, u64) {
    let j: serde_json::Value =
        serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(disk))).unwrap();
    let p = &j["partitiontable"]["partitions"][n - 1];
    (
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
    )
}

#[test]
fn agents_deploy_a_tar_image_onto_their_disks() {
    if kd_disk::testenv::skip_without_loop_devices() {
        return;
    }
    let _g = heavy();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for d in ["etc", "boot", "root", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/motd"), "deployed by kd\n").unwrap();
    std::fs::write(root.join("boot/vmlinuz-test"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink("boot/vmlinuz-test", root.join("vmlinuz")).unwrap();
    let tool: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.join("usr/bin/tool"), &tool).unwrap();
    let key = tmp.path().join("id.pub");
    std::fs::write(&key, "ssh-ed25519 AAAATESTKEY kd@test\n").unwrap();

    let c = Cluster::new(&root, 2, "1M").unwrap();
    let mut disks = Vec::new();
    for n in &c.nodes {
        let f = tmp.path().join(format!("{n}.disk"));
        std::fs::File::create(&f)
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        disks.push((f.clone(), LoopDevice::attach(&f, None, false).unwrap()));
    }
    let layout = tmp.path().join("layout.yaml");
    std::fs::write(
        &layout,
        "device: /dev/null-replaced-per-agent\nlabel: gpt\npartitions:\n\
         - { number: 1, size: 1MiB, role: bios_grub }\n\
         - { number: 2, size: 16MiB, role: swap, fs: swap }\n\
         - { number: 3, size: 120MiB, role: deploy, fs: ext4 }\n\
         - { number: 4, size: rest, role: tmp, fs: ext4 }\n",
    )
    .unwrap();
    let key_s = key.to_string_lossy().to_string();
    let layout_s = layout.to_string_lossy().to_string();
    let mut coord = c
        .start_coordinator(
            "chain",
            &[
                "--layout",
                &layout_s,
                "-k",
                &key_s,
                "--kernel",
                "/vmlinuz",
                "--kernel-params",
                "console=ttyS0",
            ],
        )
        .unwrap();
    let mut agents = Reaper::default();
    for (i, n) in c.nodes.iter().enumerate() {
        let work = tmp.path().join(format!("work-{n}"));
        let dev = disks[i].1.path().to_string_lossy().to_string();
        let work_s = work.to_string_lossy().to_string();
        agents.0.push(
            c.start_agent(
                n,
                &format!("tok-{n}"),
                "null",
                &["--disk", &dev, "--work-dir", &work_s],
            )
            .unwrap(),
        );
    }
    let co = wait_child(&mut coord, Duration::from_secs(300)).unwrap();
    let err = String::from_utf8_lossy(&co.stderr).to_string();
    let v = outcome(&co.stdout).unwrap_or_else(|e| panic!("{e}\n{err}"));
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["ok"], true, "{n}\n{err}");
    }
    assert!(err.contains("grub-install"), "{err}");
    for (i, (file, dev)) in disks.into_iter().enumerate() {
        // GPT header, GRUB boot code in the MBR.
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[512..520], b"EFI PART", "node{} has no GPT", i + 1);
        assert!(
            bytes[..440].iter().any(|&b| b != 0),
            "node{}: no boot code in the MBR",
            i + 1
        );
        let (start, size) = partition(dev.path(), 3);
        let part = LoopDevice::attach(&file, Some((start, size)), false).unwrap();
        let p = part.path().to_path_buf();
        let cat = |f: &str| {
            sh(Command::new("debugfs")
                .args(["-R", &format!("cat {f}")])
                .arg(&p))
        };
        assert_eq!(cat("/etc/motd"), "deployed by kd\n");
        assert!(cat("/root/.ssh/authorized_keys").contains("AAAATESTKEY"));
        assert!(cat("/etc/fstab").contains("UUID="), "{}", cat("/etc/fstab"));
        assert!(cat("/boot/grub/grub.cfg").contains("console=ttyS0"));
        let st = sh(Command::new("debugfs")
            .args(["-R", "stat /root/.ssh/authorized_keys"])
            .arg(&p));
        assert!(st.contains("Mode:  0600"), "{st}");
        let st = sh(Command::new("debugfs")
            .args(["-R", "stat /usr/bin/tool"])
            .arg(&p));
        assert!(st.contains(&format!("Size: {}", tool.len())), "{st}");
        part.detach().unwrap();
        dev.detach().unwrap();
    }
}
