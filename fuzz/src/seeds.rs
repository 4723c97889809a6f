//! The seed corpus: valid inputs made by the real code (codec frames, packed .kdi files, the
//! YAML kd-lab writes and the examples of the coordinator's docs and tests, tar archives made by
//! the `tar` crate). Everything here is deterministic: input `i` of a run is rebuilt from the
//! seed and `i` alone (by a child process, or to save a finding).

use std::net::SocketAddr;
use std::path::Path;

use kd_proto::codec;
use kd_proto::manifest::{ImageKind, ManifestBuilder};
use kd_proto::msg::*;

/// Where the tar target extracts, as seen by the extracting process (a chroot: see
/// `targets::tar`): absolute link targets in the seeds point here.
pub const TAR_PARENT: &str = "/p";

fn manifest(chunks: usize, chunk_size: u32) -> kd_proto::manifest::Manifest {
    let mut b = ManifestBuilder::new(ImageKind::Raw, chunk_size);
    for i in 0..chunks {
        let raw = vec![i as u8; chunk_size as usize];
        let comp = vec![i as u8 ^ 0x5a; 7 + i];
        let _ = b.push(&raw, &comp);
    }
    b.finish()
}

fn peer(i: u8) -> PeerInfo {
    let addr: SocketAddr = if i.is_multiple_of(2) {
        SocketAddr::from(([10, 77, 0, 10 + i], 7701))
    } else {
        SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i)], 7702))
    };
    PeerInfo {
        node: format!("node{i}"),
        addr,
        cert_sha256: [i; 32],
    }
}

fn deploy_job() -> DeployJob {
    DeployJob {
        layout: "table: gpt\npartitions: []\n".into(),
        deploy_partition: Some(3),
        image: DeployImage::Tar,
        partition: true,
        environment: "debian12-min".into(),
        ssh_key: Some("ssh-ed25519 AAAA kd".into()),
        boot: Some(BootSpec {
            kernel: "/vmlinuz".into(),
            initrd: Some("/initrd.img".into()),
            params: "console=ttyS0".into(),
            bios: true,
            efi: false,
        }),
        postinstalls: vec![PostInstallSpec {
            name: "site".into(),
            archive: vec![1, 2, 3, 4],
            script: Some("traitement.ash /rambin".into()),
        }],
        postinstall_timeout_secs: 600,
    }
}

/// One frame (header + payload) of every message type and variant, chunk frames written by
/// `chunk_frame_header`, and a stream of three frames.
pub fn frames() -> Vec<Vec<u8>> {
    let hello = Hello {
        version: kd_proto::PROTOCOL_VERSION,
        node: "node1".into(),
        token: "0123456789abcdef".into(),
        data_port: 7701,
        inventory: Inventory {
            disks: vec![DiskInfo {
                name: "vda".into(),
                size_bytes: 8 << 30,
                rotational: false,
                model: "QEMU".into(),
            }],
            ram_bytes: 2 << 30,
            nics: vec![NicInfo {
                name: "eth0".into(),
                mac: "52:54:00:4d:00:0b".into(),
                speed_mbps: 1000,
            }],
            boot_mode: BootMode::Uefi,
            cpus: 2,
            agent_version: "0.1.0".into(),
        },
    };
    let progress = Progress {
        chunks: 3,
        bytes_received: 1 << 20,
        bytes_written: 1 << 19,
        corrupt_chunks: 1,
    };
    let to_coord = vec![
        ToCoord::Hello(hello),
        ToCoord::Progress(progress.clone()),
        ToCoord::ParentLost {
            parent: Some("node2".into()),
            next_chunk: 7,
            reason: "stall".into(),
        },
        ToCoord::ChildLost {
            child: "node3".into(),
            reason: "closed".into(),
        },
        ToCoord::Step(StepReport {
            step: "mkfs".into(),
            millis: 1234,
            error: None,
            output: "done".into(),
        }),
        ToCoord::Report(Report {
            error: None,
            image_hash: Some([7; 32]),
            content_hash: Some([8; 32]),
            progress,
            cpu_seconds: 1.5,
            refetched_chunks: 2,
            refetched_from_peers: 1,
        }),
        ToCoord::StepEnd(StepEnd {
            step: AgentStep::Finish,
            millis: 10,
            error: Some("grub failed".into()),
        }),
    ];
    let plan = |job| Plan {
        deployment: 42,
        identity: PeerIdentity {
            cert_der: vec![0x30, 0x82, 1, 2],
            key_der: vec![0x30, 3],
            ca_der: vec![0x30, 4],
        },
        upstream: Upstream::Peer(peer(1)),
        children: vec![peer(2), peer(3)],
        manifest: manifest(3, 4096),
        job,
        stall: Some(kd_proto::msg::StallLimits {
            floor_ms: 2000,
            timeout_ms: 30_000,
        }),
    };
    let to_agent = vec![
        ToAgent::Welcome(Welcome { deployment: 42 }),
        ToAgent::Plan(Box::new(plan(Job::LocalSink))),
        ToAgent::Plan(Box::new(plan(Job::Deploy(Box::new(deploy_job()))))),
        ToAgent::Reparent(Upstream::Coordinator),
        ToAgent::Reparent(Upstream::Peer(peer(4))),
        ToAgent::Adopt(peer(5)),
        ToAgent::Finish,
        ToAgent::Prepare(Box::new(deploy_job())),
        ToAgent::Reboot { kexec: None },
        ToAgent::Reboot {
            kexec: Some(kd_proto::msg::Kexec {
                kernel: "/vmlinuz".into(),
                initrd: Some("/initrd.img".into()),
                params: "console=ttyS0 rw".into(),
            }),
        },
        ToAgent::Abort {
            reason: "operator".into(),
        },
        ToAgent::Error(WireError::new(ErrorCode::BadToken, "token used")),
    ];
    let requests = [
        DataRequest::Stream {
            deployment: 42,
            from: 0,
        },
        DataRequest::One {
            deployment: 42,
            index: 9,
        },
        DataRequest::Repair {
            deployment: 42,
            index: 3,
            avoid: Some("node1".into()),
        },
    ];
    let data = vec![
        DataFrame::Chunk {
            index: 1,
            data: b"chunk data".to_vec(),
        },
        DataFrame::Unavailable { index: 5 },
        DataFrame::Error(WireError::new(ErrorCode::Internal, "disk")),
        DataFrame::Pieces {
            index: 2,
            hashes: vec![[1; 32], [2; 32]],
        },
        DataFrame::Redirect(PeerInfo {
            node: "node2".into(),
            addr: "10.0.0.2:7001".parse().expect("an address"),
            cert_sha256: [3; 32],
        }),
    ];
    let mut out = Vec::new();
    let mut push = |r: Result<Vec<u8>, codec::CodecError>| {
        if let Ok(f) = r {
            out.push(f);
        }
    };
    for m in &to_coord {
        push(codec::encode(m));
    }
    for m in &to_agent {
        push(codec::encode(m));
    }
    for m in &requests {
        push(codec::encode(m));
    }
    for m in &data {
        push(codec::encode(m));
    }
    push(codec::encode(&WireError::new(ErrorCode::Forbidden, "no")));
    push(codec::encode(&manifest(2, 1024)));
    // A chunk frame as a relay writes it: the header by hand, then the data.
    let payload = vec![0xabu8; 300];
    if let Ok(h) = codec::chunk_frame_header(3, payload.len()) {
        let mut f = h.to_vec();
        f.extend_from_slice(&payload);
        out.push(f);
    }
    // A stream: three frames back to back.
    let stream: Vec<u8> = out.iter().take(3).flatten().copied().collect();
    out.push(stream);
    out
}

/// Deterministic bytes that zstd cannot shrink much.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut r = crate::mutate::Rng::for_input(seed, 0);
    r.bytes(n)
}

/// `.kdi` files made by the real packer (`kd_coord::image::pack`) from small inputs: raw and
/// tar, compressible and not, one chunk and many, a 1-byte chunk size.
pub fn kdi_files(scratch: &Path) -> Vec<Vec<u8>> {
    let mut text = Vec::new();
    for i in 0..400 {
        text.extend_from_slice(format!("line {i} of a compressible raw image\n").as_bytes());
    }
    let min = kd_proto::manifest::MIN_CHUNK_SIZE;
    let inputs: Vec<(&str, Vec<u8>, u32, Option<ImageKind>)> = vec![
        ("text.img", text, min, None),
        ("noise.img", noise(9000, 1), min, None),
        ("one.img", b"kd".to_vec(), min, Some(ImageKind::Raw)),
        ("exact.img", noise(2 * min as usize, 2), min, None),
        ("root.tar", tar_seeds().swap_remove(0), min, None),
        ("big-chunk.img", vec![0u8; 70_000], 65536, None),
    ];
    let mut out = Vec::new();
    for (name, data, chunk_size, kind) in inputs {
        let input = scratch.join(name);
        let output = scratch.join(format!("{name}.kdi"));
        let opts = kd_coord::image::PackOptions {
            chunk_size,
            level: 3,
            threads: 1,
            kind,
            ..Default::default()
        };
        let packed = std::fs::write(&input, &data)
            .map_err(anyhow::Error::from)
            .and_then(|()| kd_coord::image::pack(&input, &output, &opts))
            .and_then(|_| std::fs::read(&output).map_err(anyhow::Error::from));
        match packed {
            Ok(kdi) => out.push(kdi),
            Err(e) => eprintln!("kd-fuzz: seed {name} could not be packed: {e:#}"),
        }
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
    }
    out
}

/// The blocks of `src` between a line `start` and a line `end` (doc examples: `//! ```yaml`).
fn doc_blocks(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = src.lines();
    while lines.by_ref().any(|l| l == "//! ```yaml") {
        let block: String = lines
            .by_ref()
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
            .collect();
        out.push(block);
    }
    out
}

/// The string constants written `const NAME: &str = "\` ... `";` in `src` (the tests' YAML).
fn const_strings(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = src.lines();
    while lines
        .by_ref()
        .any(|l| l.trim_start().contains("const ") && l.ends_with(": &str = \"\\"))
    {
        let mut s = String::new();
        for l in lines.by_ref() {
            if l == "\";" {
                break;
            }
            s.push_str(&l.replace("\\\"", "\"").replace("\\\\", "\\"));
            s.push('\n');
        }
        out.push(s);
    }
    out
}

/// What kd-lab writes (BIOS and UEFI labs, 1 and 3 nodes), the coordinator's documented
/// example and its tests' configurations, and the canonical form of each.
pub fn cluster_yamls() -> Vec<Vec<u8>> {
    use kd_lab::plan;
    let mut out: Vec<String> = Vec::new();
    let subnet = kd_lab::Subnet::DEFAULT;
    for (count, fw) in [(1, kd_lab::Firmware::Bios), (3, kd_lab::Firmware::Uefi)] {
        if let Ok(nodes) = plan::nodes(&subnet, count, 2) {
            let c = plan::cluster_config(
                "kdlab-77",
                &subnet,
                &nodes,
                Path::new("/var/lib/kd-lab/77"),
                8080,
                Path::new("/usr/local/bin/kd-lab"),
                fw,
            );
            if let Ok(y) = serde_norway::to_string(&c) {
                out.push(y);
            }
        }
    }
    let src = include_str!("../../coordinator/src/config.rs");
    out.extend(doc_blocks(src));
    out.extend(const_strings(src));
    let canonical: Vec<String> = out
        .iter()
        .filter_map(|y| kd_coord::config::ClusterConfig::parse(y).ok())
        .filter_map(|c| c.to_yaml().ok())
        .collect();
    out.extend(canonical);
    out.into_iter().map(String::into_bytes).collect()
}

/// What envs/build-debian12.sh writes, the documented example and the tests' description, and
/// the canonical form of each.
pub fn env_yamls() -> Vec<Vec<u8>> {
    let mut out: Vec<String> = Vec::new();
    let script = include_str!("../../envs/build-debian12.sh");
    if let Some(start) = script.find("cat >\"$1\" <<EOF\n") {
        let body = &script[start + "cat >\"$1\" <<EOF\n".len()..];
        if let Some(end) = body.find("\nEOF\n") {
            out.push(
                body[..end + 1]
                    .replace("$NAME", "debian12-min")
                    .replace("$HASH", "0123abcd")
                    .replace("$2", "/var/lib/kd/envs/debian12-min.tar.zst"),
            );
        }
    }
    let src = include_str!("../../coordinator/src/env.rs");
    out.extend(doc_blocks(src));
    out.extend(const_strings(src));
    let canonical: Vec<String> = out
        .iter()
        .filter_map(|y| kd_coord::env::Environment::parse(y).ok())
        .filter_map(|e| e.to_yaml().ok())
        .collect();
    out.extend(canonical);
    out.into_iter().map(String::into_bytes).collect()
}

/// A raw ustar/GNU header written byte by byte (the `tar` builder refuses `..` and long
/// names in the plain fields, which is what we want to feed the extractor).
pub fn raw_header(name: &[u8], kind: u8, link: &[u8], size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link[..l]);
    }
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    h
}

/// A hand-written member: name, type flag, link name, data.
type RawMember<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

/// Appends a raw header and its data to `out` (padded to 512 bytes).
pub fn push_raw(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h
}

/// Tar archives made by the `tar` crate: files, directories, symlinks (relative, absolute,
/// pointing out of the tree), hard links, long names (GNU and pax), xattrs, fifos, devices;
/// plus hand-written archives with `..` and links out of the tree (which must be refused).
pub fn tar_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let build = |f: &dyn Fn(&mut tar::Builder<Vec<u8>>) -> std::io::Result<()>| {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b)?;
        b.into_inner()
    };
    let root = build(&|b| {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0, 0o755),
            "./",
            &[][..],
        )?;
        b.append_data(
            &mut header(tar::EntryType::Directory, 0, 0o755),
            "etc",
            &[][..],
        )?;
        let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
        b.append_data(
            &mut header(tar::EntryType::Regular, passwd.len() as u64, 0o644),
            "etc/passwd",
            &passwd[..],
        )?;
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            "etc/mtab",
            "../proc/self/mounts",
        )?;
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            "bin",
            "usr/bin",
        )?;
        b.append_data(
            &mut header(tar::EntryType::Directory, 0, 0o755),
            "usr/bin",
            &[][..],
        )?;
        let sh = b"#!/bin/sh\necho hi\n";
        b.append_data(
            &mut header(tar::EntryType::Regular, sh.len() as u64, 0o4755),
            "usr/bin/sh",
            &sh[..],
        )?;
        b.append_link(
            &mut header(tar::EntryType::Link, 0, 0o755),
            "usr/bin/dash",
            "usr/bin/sh",
        )?;
        let long = format!("usr/share/{}/{}", "d".repeat(120), "f".repeat(150));
        b.append_data(
            &mut header(tar::EntryType::Regular, 3, 0o600),
            &long,
            &b"abc"[..],
        )?;
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            format!("usr/{}", "l".repeat(110)),
            format!("../{}", "t".repeat(130)),
        )?;
        b.append_data(
            &mut header(tar::EntryType::Fifo, 0, 0o644),
            "run/initctl",
            &[][..],
        )?;
        let mut null = header(tar::EntryType::Char, 0, 0o666);
        null.set_device_major(1)?;
        null.set_device_minor(3)?;
        b.append_data(&mut null, "dev/null", &[][..])?;
        let mut blk = header(tar::EntryType::Block, 0, 0o660);
        blk.set_device_major(7)?;
        blk.set_device_minor(0)?;
        b.append_data(&mut blk, "dev/loop0", &[][..])?;
        b.append_pax_extensions([
            ("SCHILY.xattr.user.kd", &b"fuzz"[..]),
            (
                "SCHILY.xattr.security.capability",
                &[1u8, 0, 0, 2, 0, 0x20, 0, 0][..],
            ),
        ])?;
        b.append_data(
            &mut header(tar::EntryType::Regular, 1, 0o755),
            "usr/bin/ping",
            &b"x"[..],
        )?;
        b.append_pax_extensions([("path", format!("opt/{}", "p".repeat(200)).as_bytes())])?;
        b.append_data(
            &mut header(tar::EntryType::Regular, 2, 0o644),
            "opt/short",
            &b"pp"[..],
        )?;
        b.finish()
    });
    out.extend(root.ok());
    let escapes = build(&|b| {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0, 0o755),
            "a",
            &[][..],
        )?;
        let abs = format!("{TAR_PARENT}/escape");
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            "a/abs",
            &abs,
        )?;
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            "a/up",
            "../..",
        )?;
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0, 0o777),
            "a/here",
            ".",
        )?;
        b.append_data(
            &mut header(tar::EntryType::Regular, 2, 0o644),
            "a/here/f",
            &b"ok"[..],
        )?;
        b.finish()
    });
    out.extend(escapes.ok());
    // Hand-written, one trick each (the extractor stops at the first refused member): what
    // the builder refuses to write.
    let canary = format!("{TAR_PARENT}/canary");
    let tricks: Vec<Vec<RawMember<'_>>> = vec![
        vec![
            (b"d/up", b'2', b"..", b""),
            (b"d/up/escape", b'0', b"", b"bad"),
        ],
        vec![(b"../escape", b'0', b"", b"bad")],
        vec![(b"d/canary", b'1', b"../canary", b"")],
        vec![(b"d/abs-canary", b'1', canary.as_bytes(), b"")],
        vec![
            (b"/abs/file", b'0', b"", b"a"),
            (b"abs/../../x", b'0', b"", b"b"),
        ],
        vec![
            (b"d/out", b'2', canary.as_bytes(), b""),
            (b"d/out", b'0', b"", b"over"),
        ],
        vec![
            (b"d/f", b'0', b"", b"1"),
            (b"d/f", b'5', b"", b""),
            (b"d/f/g", b'0', b"", b"2"),
        ],
        vec![(b"d/l", b'2', b"/p", b""), (b"d/l/escape", b'5', b"", b"")],
        vec![(b"d/h", b'1', b"d", b""), (b"d/s", b'1', b"/", b"")],
    ];
    for entries in tricks {
        let mut a = Vec::new();
        push_raw(&mut a, &raw_header(b"d/", b'5', b"", 0, 0o755), &[]);
        for (name, kind, link, data) in entries {
            push_raw(
                &mut a,
                &raw_header(name, kind, link, data.len() as u64, 0o644),
                data,
            );
        }
        a.extend(std::iter::repeat_n(0u8, 1024));
        out.push(a);
    }
    out
}
