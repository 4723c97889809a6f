//! The fuzz targets. Each takes any bytes and either accepts or rejects them; a panic (or an
//! invariant checked here failing, which panics) is a finding.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use kd_proto::codec;
use kd_proto::manifest::{ChunkInfo, ImageKind, Manifest};
use kd_proto::msg::{DataRequest, ToAgent, ToCoord, WireError};
use serde::{de::DeserializeOwned, Serialize};

use crate::seeds;

/// What a target did with an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Parsed (and everything done with it afterwards worked).
    Accepted,
    /// Refused with an error.
    Rejected,
}

/// A fuzz target.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name on the command line and under `fuzz/regressions/`.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]) -> Outcome,
    /// The valid inputs mutations start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Builds an input from random bytes.
    pub arbitrary: fn(&mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>>,
    /// Tokens inserted by the mutator.
    pub dict: &'static [&'static [u8]],
    /// Called once in the process that runs inputs, before the first one (sandboxes).
    pub setup: fn() -> anyhow::Result<()>,
}

/// Every target, in the order `all` runs them.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "frame",
            run: frame,
            seeds: seeds::frames,
            arbitrary: arbitrary_frame,
            dict: BINARY_DICT,
            setup: no_setup,
        },
        Target {
            name: "manifest",
            run: manifest,
            seeds: kdi_seeds,
            arbitrary: arbitrary_kdi,
            dict: BINARY_DICT,
            setup: no_setup,
        },
        Target {
            name: "tokens",
            run: tokens,
            seeds: token_seeds,
            arbitrary: arbitrary_text,
            dict: TOKENS_DICT,
            setup: no_setup,
        },
        Target {
            name: "cluster-yaml",
            run: cluster_yaml,
            seeds: seeds::cluster_yamls,
            arbitrary: arbitrary_cluster,
            dict: YAML_DICT,
            setup: no_setup,
        },
        Target {
            name: "env-yaml",
            run: env_yaml,
            seeds: seeds::env_yamls,
            arbitrary: arbitrary_env,
            dict: YAML_DICT,
            setup: no_setup,
        },
        Target {
            name: "tar",
            run: tar,
            seeds: seeds::tar_seeds,
            arbitrary: arbitrary_tar,
            dict: TAR_DICT,
            setup: tar_setup,
        },
    ]
}

/// The target called `name` (also `selftest`, which is not in [`all`]).
pub fn by_name(name: &str) -> Option<Target> {
    all()
        .into_iter()
        .chain([selftest_target()])
        .find(|t| t.name == name)
}

/// A target that fails on purpose, to test the harness: its seeds are `ok`, `PANIC`, `ALLOC`
/// (8 GiB at once: over the memory limit, the process aborts), `HANG` (sleeps forever) and
/// `SLOW` (1.5 s of CPU).
fn selftest_target() -> Target {
    fn run(d: &[u8]) -> Outcome {
        match d {
            b"PANIC" => panic!("selftest panic"),
            b"ALLOC" => {
                let v: Vec<u8> = Vec::with_capacity(8 << 30);
                std::hint::black_box(&v);
            }
            b"HANG" => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
            b"SLOW" => {
                // 1.5 s of CPU (not of wall time: on a loaded machine that is less CPU).
                let (t, cpu) = (Instant::now(), crate::runner::cpu_time());
                let mut x = 0u64;
                while crate::runner::cpu_time().saturating_sub(cpu) < Duration::from_millis(1500)
                    && t.elapsed() < Duration::from_secs(60)
                {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
            }
            _ => {}
        }
        Outcome::Accepted
    }
    fn seeds() -> Vec<Vec<u8>> {
        ["ok", "PANIC", "ALLOC", "HANG", "SLOW"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    }
    fn arb(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
        u.arbitrary()
    }
    Target {
        name: "selftest",
        run,
        seeds,
        arbitrary: arb,
        dict: &[],
        setup: no_setup,
    }
}

fn no_setup() -> anyhow::Result<()> {
    Ok(())
}

const BINARY_DICT: &[&[u8]] = &[
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[1, 0, 0, 0, 0, 0, 0, 0],
    &[0, 0, 0x40, 1],
    &[0, 0, 0x40, 1, 0, 0, 0, 0],
    b"KDIMG\0\0\x01",
    &[0x28, 0xb5, 0x2f, 0xfd],
];

const YAML_DICT: &[&[u8]] = &[
    b"\n",
    b": ",
    b"- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b", ",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!binary ",
    b"!!str ",
    b"'",
    b"\"",
    b"\t",
    b"  ",
    b"~",
    b"null",
    b"true",
    b"0x",
    b"1e999",
    b".nan",
    b"-.inf",
    b"#",
    b"|\n",
    b">-\n",
    b"? ",
    b"---\n",
    b"...\n",
    b"%YAML 1.2\n",
    b"\\u0000",
    b"\xff",
    b"\xc3\xa9",
    b"HOSTNAME",
    b"HOSTNAME_SHORT",
    b"..",
    b"/",
    b"rest",
    b"MiB",
    b"GiB",
    b"timeout: ",
    b"retries: ",
    b"18446744073709551615",
    b"4294967295",
    b"65535",
    b"65536",
    b"::1",
    b"0.0.0.0",
];

const TOKENS_DICT: &[&[u8]] = &[
    b"\n",
    b" ",
    b"\t",
    b"#",
    b"node1",
    b"node[1-3]",
    b"\r\n",
    b"\xc3\xa9",
    b"-",
    b"_",
    b"\x00",
];

const TAR_DICT: &[&[u8]] = &[
    b"ustar\x0000",
    b"ustar  \x00",
    b"../",
    b"..",
    b"/",
    b"./",
    b"/p/canary",
    b"././@LongLink",
    b"path=",
    b"linkpath=",
    b"SCHILY.xattr.",
    b"GNU.sparse.map=",
    b"0000777",
    b"77777777777",
    b"\x80\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff",
];

// ---------------------------------------------------------------------------------------------
// frame

/// Decodes `p` as a `T`; a decoded message must encode back to the same bytes.
fn check_roundtrip<T: Serialize + DeserializeOwned>(p: &[u8]) -> bool {
    let Ok(m) = codec::decode::<T>(p) else {
        return false;
    };
    match codec::encode(&m) {
        Ok(f) => assert!(
            f.get(codec::HEADER_LEN..) == Some(p),
            "{}: re-encoding a decoded message changed its bytes",
            std::any::type_name::<T>()
        ),
        Err(e) => panic!(
            "{}: a decoded message does not encode: {e}",
            std::any::type_name::<T>()
        ),
    }
    true
}

fn payload(p: &[u8]) -> bool {
    let mut ok = false;
    ok |= check_roundtrip::<ToCoord>(p);
    ok |= check_roundtrip::<ToAgent>(p);
    ok |= check_roundtrip::<DataRequest>(p);
    ok |= check_roundtrip::<WireError>(p);
    ok |= check_roundtrip::<Manifest>(p);
    if let Some(prefix) = p
        .get(..codec::CHUNK_PREFIX_LEN)
        .and_then(|x| <&[u8; codec::CHUNK_PREFIX_LEN]>::try_from(x).ok())
    {
        if let Ok(Some((_, n))) = codec::parse_chunk_prefix(prefix, p.len()) {
            assert_eq!(n, p.len() - codec::CHUNK_PREFIX_LEN, "chunk length");
        }
    }
    if let Ok(f) = codec::decode_data_frame(p.to_vec()) {
        ok = true;
        match codec::encode(&f) {
            Ok(e) => assert!(
                e.get(codec::HEADER_LEN..) == Some(p),
                "DataFrame re-encoding"
            ),
            Err(e) => panic!("a decoded DataFrame does not encode: {e}"),
        }
    }
    ok
}

/// Frames as a stream (cut by the `FrameDecoder`, fed in two pieces) and the whole input as
/// one payload, decoded as every message type.
fn frame(data: &[u8]) -> Outcome {
    let mut ok = false;
    for limit in [codec::MAX_CONTROL_FRAME, codec::MAX_FRAME] {
        let mut dec = codec::FrameDecoder::new(limit);
        let cut = data
            .first()
            .map_or(0, |b| usize::from(*b) % (data.len() + 1));
        for piece in [&data[..cut], &data[cut..]] {
            dec.push(piece);
            for _ in 0..=data.len() {
                match dec.next_payload() {
                    Ok(Some(p)) => ok |= payload(&p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        assert!(
            dec.pending() <= data.len(),
            "decoder holds more than it was given"
        );
    }
    ok |= payload(data);
    if ok {
        Outcome::Accepted
    } else {
        Outcome::Rejected
    }
}

fn arbitrary_frame(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let tag = u32::from(u.int_in_range(0u8..=9)?);
    let body: Vec<u8> = u.arbitrary()?;
    let mut p = tag.to_le_bytes().to_vec();
    p.extend_from_slice(&body);
    let mut f = (p.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&p);
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// manifest / .kdi

/// A directory of this process on tmpfs (removed by the parent when the process ends).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("kd-fuzz-{}", std::process::id()));
        if let Err(e) = fs::create_dir_all(&d) {
            panic!("cannot create {}: {e}", d.display());
        }
        d
    })
}

/// Removes this process's scratch directory (the parent of the child processes and the tests
/// make one for the seeds; a child's is removed by its parent).
pub fn remove_scratch() {
    let _ = fs::remove_dir_all(scratch());
}

fn kdi_seeds() -> Vec<Vec<u8>> {
    let d = scratch().join("seeds");
    let _ = fs::create_dir_all(&d);
    let s = seeds::kdi_files(&d);
    let _ = fs::remove_dir_all(&d);
    s
}

/// The manifest payload decoded on its own (`manifest::decode`), then the whole input as a
/// `.kdi` (`image::parse_kdi`, then `verify_kdi`: every chunk read, hashed, decompressed).
fn manifest(data: &[u8]) -> Outcome {
    use kd_coord::image::{parse_kdi, verify_kdi, MAGIC};
    use kd_proto::manifest;
    if data.len() >= 12 && &data[..8] == MAGIC {
        let len = u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize;
        if let Some(p) = data.get(12..12 + len) {
            if let Ok(m) = manifest::decode(p) {
                assert!(check_roundtrip::<Manifest>(p), "manifest round trip");
                let _ = m.image_hash();
                let sum: u64 = m.chunks.iter().map(|c| u64::from(c.raw_len)).sum();
                assert_eq!(sum, m.total_size, "a valid manifest's sizes add up");
                match manifest::encode(&m) {
                    Ok(f) => assert!(f.get(4..) == Some(p), "manifest::encode changed the bytes"),
                    Err(e) => panic!("a manifest that decodes does not encode: {e}"),
                }
            }
        }
    }
    let mut r = std::io::Cursor::new(data);
    match parse_kdi(&mut r) {
        Ok(h) => {
            let end = h.data_offset + h.manifest.compressed_size();
            assert_eq!(end, data.len() as u64, "the chunks fill the data section");
            if verify_kdi(&mut r, &h).is_ok() {
                Outcome::Accepted
            } else {
                Outcome::Rejected
            }
        }
        Err(e) => {
            let _ = format!("{e:#}");
            Outcome::Rejected
        }
    }
}

/// A manifest built from random fields, encoded the way `pack` does, with a data section.
fn arbitrary_kdi(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let chunk_size = if u.arbitrary()? {
        u.int_in_range(1..=4096)?
    } else {
        u.arbitrary()?
    };
    let n = u.int_in_range(0..=16usize)?;
    let mut chunks = Vec::with_capacity(n);
    let mut offset = 0u64;
    let mut total = 0u64;
    for i in 0..n {
        let comp_len: u32 = if u.arbitrary()? {
            u.int_in_range(1..=512)?
        } else {
            u.arbitrary()?
        };
        let raw_len = if i + 1 < n || u.arbitrary()? {
            chunk_size
        } else {
            u.arbitrary()?
        };
        chunks.push(ChunkInfo {
            offset: if u.arbitrary()? {
                offset
            } else {
                u.arbitrary()?
            },
            comp_len,
            raw_len,
            hash: u.arbitrary()?,
        });
        offset = offset.wrapping_add(u64::from(comp_len));
        total = total.wrapping_add(u64::from(raw_len));
    }
    let m = Manifest {
        kind: if u.arbitrary()? {
            ImageKind::Raw
        } else {
            ImageKind::Tar
        },
        chunk_size,
        total_size: if u.arbitrary()? {
            total
        } else {
            u.arbitrary()?
        },
        content_hash: u.arbitrary()?,
        chunks,
    };
    let mut out = kd_coord::image::MAGIC.to_vec();
    out.extend(codec::encode(&m).map_err(|_| arbitrary::Error::IncorrectFormat)?);
    let data_len = usize::try_from(m.compressed_size().min(1 << 16)).unwrap_or(0);
    let data: Vec<u8> = (0..data_len).map(|i| i as u8).collect();
    out.extend(data);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// tokens

/// The node set of a tokens input: the valid node names (what the coordinator passes: names
/// of the cluster configuration) of its first line, `# nodes a b c` (default `node1 node2`).
fn token_nodes(text: &str) -> Vec<String> {
    match text.lines().next().and_then(|l| l.strip_prefix("# nodes ")) {
        Some(l) => l
            .split_whitespace()
            .filter(|n| kd_coord::config::is_valid_name(n))
            .take(4096)
            .map(str::to_string)
            .collect(),
        None => vec!["node1".into(), "node2".into()],
    }
}

fn token_seeds() -> Vec<Vec<u8>> {
    let names: Vec<String> = (1..=3).map(|i| format!("node{i}")).collect();
    let line = |n: &str, i: usize| {
        format!(
            "{n} {:032x}\n",
            0x1234_5678_9abc_def0_u128 * (i as u128 + 1)
        )
    };
    let mut out = Vec::new();
    // What `tokens::make` writes (with fixed tokens).
    let made: String = names.iter().enumerate().map(|(i, n)| line(n, i)).collect();
    out.push(format!("# nodes node1 node2 node3\n{made}"));
    out.push(format!(
        "# nodes node1 node2\n\n# kd tokens\n  node2\tsecret_token-2  \n{}",
        line("node1", 9)
    ));
    out.push("# nodes gros-1.nancy.grid5000.fr\ngros-1.nancy.grid5000.fr Ab_-09\n".into());
    let many: Vec<String> = (1..=40).map(|i| format!("n{i}")).collect();
    let text: String = many.iter().enumerate().map(|(i, n)| line(n, i)).collect();
    out.push(format!("# nodes {}\n{text}", many.join(" ")));
    out.into_iter().map(String::into_bytes).collect()
}

/// `tokens::parse` over the text with the node set of its first line: a map is exactly one
/// valid token for each node of the set.
fn tokens(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let nodes = token_nodes(&text);
    match kd_coord::tokens::parse(&text, &nodes) {
        Ok(map) => {
            let set: std::collections::HashSet<&String> = nodes.iter().collect();
            assert_eq!(map.len(), set.len(), "one token per node of the set");
            for (n, t) in &map {
                assert!(set.contains(n), "a token for {n}, outside the set");
                assert!(
                    kd_coord::config::is_valid_token(t),
                    "invalid token accepted"
                );
            }
            Outcome::Accepted
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::Rejected
        }
    }
}

fn arbitrary_text(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let lines: Vec<(String, String)> = u.arbitrary()?;
    let mut s = String::from("# nodes node1 node2\n");
    for (a, b) in lines {
        s.push_str(&format!("{a} {b}\n"));
    }
    Ok(s.into_bytes())
}

// ---------------------------------------------------------------------------------------------
// cluster.yaml and environment YAML

/// Every duration a coordinator takes from the configuration can be added to now.
fn durations_fit(what: &str, d: &[Duration]) {
    let now = Instant::now();
    for x in d {
        assert!(
            now.checked_add(*x).is_some(),
            "{what}: a configuration that validates holds a duration of {x:?} that overflows Instant"
        );
    }
}

/// Parse and validate; with a valid configuration, render every profile and command, check
/// its durations, and check that its canonical YAML reads back to the same configuration.
fn cluster_yaml(data: &[u8]) -> Outcome {
    use kd_coord::config::{ClusterConfig, DeployArgs, Level, Operation, ProfileBoot};
    let text = String::from_utf8_lossy(data);
    let c = match ClusterConfig::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return Outcome::Rejected;
        }
    };
    let args = match DeployArgs::new(&"ab".repeat(32), "tok-1") {
        Ok(a) => a,
        Err(e) => panic!("fixed deploy arguments refused: {e}"),
    };
    for n in &c.nodes {
        for op in [Operation::Reboot, Operation::PowerOn, Operation::PowerOff] {
            for l in Level::ALL {
                let _ = c.command(op, l, n);
            }
        }
        let _ = c.render_profile(n, &ProfileBoot::Deploy(&args));
        let _ = c.render_profile(n, &ProfileBoot::LocalDisk);
        let _ = c.deploy_cmdline(n, &args);
    }
    let _ = c.ipxe_chain_script();
    let _ = c.served_root();
    let _ = c.coordinator.socket_addr();
    let w = &c.workflow;
    let secs = Duration::from_secs;
    durations_fit(
        "workflow",
        &[
            secs(w.command_timeout),
            secs(w.probe_delay),
            secs(w.probe_interval),
            secs(w.broadcast_wait),
            w.set_deployment_env.timeout(),
            w.prepare.timeout(),
            w.broadcast.timeout(),
            w.finish.timeout(),
            w.boot_new_env.timeout(),
        ],
    );
    let y = match c.to_yaml() {
        Ok(y) => y,
        Err(e) => panic!("a valid configuration does not serialise: {e}"),
    };
    match ClusterConfig::parse(&y) {
        Ok(again) => assert!(
            again == c,
            "the canonical YAML reads back differently:\n{y}"
        ),
        Err(e) => panic!("the canonical YAML of a valid configuration is refused: {e}\n{y}"),
    }
    Outcome::Accepted
}

/// Parse and validate; a valid environment's canonical YAML reads back to the same one.
fn env_yaml(data: &[u8]) -> Outcome {
    use kd_coord::env::Environment;
    let text = String::from_utf8_lossy(data);
    let e = match Environment::parse(&text) {
        Ok(e) => e,
        Err(err) => {
            let _ = err.to_string();
            return Outcome::Rejected;
        }
    };
    let _ = e.kind_name();
    let y = match e.to_yaml() {
        Ok(y) => y,
        Err(err) => panic!("a valid environment does not serialise: {err}"),
    };
    match Environment::parse(&y) {
        Ok(again) => assert!(
            again == e,
            "the canonical YAML reads back differently:\n{y}"
        ),
        Err(err) => panic!("the canonical YAML of a valid environment is refused: {err}\n{y}"),
    }
    Outcome::Accepted
}

/// A YAML document from random keys (the target's field names) and values.
fn arbitrary_yaml(
    u: &mut Unstructured<'_>,
    keys: &[&str],
    depth: u32,
) -> arbitrary::Result<String> {
    use serde_norway::{Mapping, Value};
    fn value(u: &mut Unstructured<'_>, keys: &[&str], depth: u32) -> arbitrary::Result<Value> {
        Ok(match u.int_in_range(0..=if depth == 0 { 5 } else { 7 })? {
            0 => Value::Null,
            1 => Value::Bool(u.arbitrary()?),
            2 => Value::Number(u.arbitrary::<u64>()?.into()),
            3 => Value::Number(u.arbitrary::<i64>()?.into()),
            4 => Value::String(u.arbitrary()?),
            5 => Value::String((*u.choose(keys)?).to_string()),
            6 => {
                let n = u.int_in_range(0..=4)?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(value(u, keys, depth - 1)?);
                }
                Value::Sequence(v)
            }
            _ => {
                let n = u.int_in_range(0..=6)?;
                let mut m = Mapping::new();
                for _ in 0..n {
                    let k = (*u.choose(keys)?).to_string();
                    m.insert(Value::String(k), value(u, keys, depth - 1)?);
                }
                Value::Mapping(m)
            }
        })
    }
    let mut m = serde_norway::Mapping::new();
    for k in keys.iter().take(12) {
        if u.arbitrary()? {
            m.insert(
                serde_norway::Value::String((*k).to_string()),
                value(u, keys, depth)?,
            );
        }
    }
    serde_norway::to_string(&serde_norway::Value::Mapping(m))
        .map_err(|_| arbitrary::Error::IncorrectFormat)
}

fn arbitrary_cluster(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    const KEYS: &[&str] = &[
        "cluster",
        "nodes",
        "pxe",
        "commands",
        "coordinator",
        "disk",
        "workflow",
        "check_port",
        "deploy_kernel",
        "name",
        "coordinator_address",
        "address",
        "mac",
        "rack",
        "tftp_root",
        "http_root",
        "http_base_url",
        "profile_naming",
        "method",
        "reboot",
        "soft",
        "hard",
        "very_hard",
        "power_on",
        "power_off",
        "power_status",
        "console",
        "port",
        "block_device",
        "layout",
        "table",
        "partitions",
        "size",
        "role",
        "fs",
        "timeout",
        "retries",
        "reboot_window",
        "prepare",
        "broadcast",
        "finish",
        "vmlinuz",
        "initrd",
        "params",
    ];
    Ok(arbitrary_yaml(u, KEYS, 3)?.into_bytes())
}

fn arbitrary_env(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    const KEYS: &[&str] = &[
        "name",
        "version",
        "description",
        "author",
        "visibility",
        "destructive",
        "os",
        "image",
        "boot",
        "filesystem",
        "partition_type",
        "postinstalls",
        "arch",
        "multipart",
        "file",
        "kind",
        "compression",
        "kernel",
        "initrd",
        "kernel_params",
        "archive",
        "script",
    ];
    Ok(arbitrary_yaml(u, KEYS, 3)?.into_bytes())
}

// ---------------------------------------------------------------------------------------------
// tar

/// Prepares the tar sandbox: as root, a private mount namespace, a fresh tmpfs (nodev, nosuid,
/// noexec: device nodes from an archive open nothing) on this process's scratch directory, and
/// a chroot into it, so that an extractor bug cannot reach any file of the machine. The
/// extraction's parent is [`seeds::TAR_PARENT`] inside it.
fn tar_setup() -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    let root = scratch();
    if nix::unistd::geteuid().is_root() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )?;
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("size=256m,mode=0755"),
        )?;
        nix::unistd::chroot(root)?;
        std::env::set_current_dir("/")?;
        TAR_ROOT.set(PathBuf::from("/")).ok();
    } else {
        TAR_ROOT.set(root.to_path_buf()).ok();
    }
    let p = tar_parent();
    fs::create_dir_all(&p)?;
    fs::write(p.join("canary"), CANARY)?;
    Ok(())
}

static TAR_ROOT: OnceLock<PathBuf> = OnceLock::new();
const CANARY: &[u8] = b"outside the extraction directory\n";

fn tar_parent() -> PathBuf {
    let root = TAR_ROOT.get().map_or(Path::new("/"), |p| p.as_path());
    root.join(seeds::TAR_PARENT.trim_start_matches('/'))
}

/// Walks `dir` without following symlinks; counts the links of each inode found.
fn walk(dir: &Path, links: &mut HashMap<u64, (u64, u64)>, budget: &mut usize) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            walk(&e.path(), links, budget);
        } else {
            let ent = links.entry(md.ino()).or_insert((md.nlink(), 0));
            ent.1 += 1;
        }
    }
}

/// Extracts the input with kd-disk's tar sink into a fresh directory; afterwards nothing may
/// have been created, changed or linked outside it.
fn tar(data: &[u8]) -> Outcome {
    let parent = tar_parent();
    let x = parent.join("x");
    match fs::remove_dir_all(&x) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot clean {}: {e}", x.display()),
    }
    if let Err(e) = fs::create_dir(&x) {
        panic!("cannot create {}: {e}", x.display());
    }
    let result = kd_disk::tar_sink(&x).and_then(|mut sink| {
        // Two writes, cut where the first byte says: the sink must not care.
        let cut = data
            .first()
            .map_or(0, |b| usize::from(*b) * 7 % (data.len() + 1));
        sink.write_all(&data[..cut])?;
        sink.write_all(&data[cut..])?;
        sink.finish()
    });
    if let Err(kd_disk::DiskError::Internal(m)) = &result {
        if m.contains("panicked") {
            panic!("tar writer thread panicked: {m}");
        }
    }
    // Nothing outside: the parent holds the canary (unchanged, one link) and `x` only.
    let mut names: Vec<String> = match fs::read_dir(&parent) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => panic!("cannot list {}: {e}", parent.display()),
    };
    names.sort();
    assert!(
        names == ["canary", "x"],
        "the extraction created {names:?} next to its directory"
    );
    let canary = parent.join("canary");
    match canary.symlink_metadata() {
        Ok(md) => assert!(
            md.is_file() && md.nlink() == 1 && md.mode() & 0o7777 == 0o644,
            "the canary outside was linked to or changed (mode {:o}, {} links)",
            md.mode(),
            md.nlink()
        ),
        Err(e) => panic!("the canary outside is gone: {e}"),
    }
    assert!(
        fs::read(&canary).ok().as_deref() == Some(CANARY),
        "the canary outside was written"
    );
    // Every hard link of a file inside is inside.
    let mut links = HashMap::new();
    let mut budget = 100_000;
    walk(&x, &mut links, &mut budget);
    if budget > 0 {
        for (ino, (nlink, seen)) in links {
            assert!(
                seen == nlink,
                "inode {ino} inside has {nlink} links but {seen} inside the tree"
            );
        }
    }
    match result {
        Ok(_) => Outcome::Accepted,
        Err(e) => {
            let _ = e.to_string();
            Outcome::Rejected
        }
    }
}

/// One archive member built from random fields.
#[derive(Debug, Arbitrary)]
struct ArbEntry {
    path: Vec<u8>,
    pick: u8,
    kind: u8,
    link: Vec<u8>,
    data: Vec<u8>,
    mode: u16,
    uid: u16,
    mtime: u32,
    long: bool,
}

/// An archive of random members whose paths mostly come from a small pool (so that members
/// meet: a symlink, then a file through it), written with raw headers.
fn arbitrary_tar(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    const PATHS: &[&[u8]] = &[
        b"a", b"a/b", b"a/b/c", b"./a", b"/a", b"a/../b", b"..", b"../x", b"a/", b"l", b"l/f",
        b"l/l2", b"l/l2/f", b"d", b"d/f",
    ];
    const LINKS: &[&[u8]] = &[
        b"a",
        b"..",
        b"../",
        b"/",
        b"/p",
        b"/p/canary",
        b"../canary",
        b"a/b",
        b"l",
        b".",
        b"/etc",
    ];
    const KINDS: &[u8] = b"0125346L";
    let entries: Vec<ArbEntry> = u.arbitrary()?;
    let mut out = Vec::new();
    for e in entries.into_iter().take(32) {
        let path: Vec<u8> = if e.pick % 4 == 0 {
            e.path.clone()
        } else {
            PATHS[usize::from(e.pick) % PATHS.len()].to_vec()
        };
        let link: Vec<u8> = if e.pick % 3 == 0 {
            e.link.clone()
        } else {
            LINKS[usize::from(e.pick / 3) % LINKS.len()].to_vec()
        };
        let kind = KINDS[usize::from(e.kind) % KINDS.len()];
        if e.long {
            // A GNU long name member carrying the path.
            let mut name = path.clone();
            name.extend(std::iter::repeat_n(b'n', 120));
            let mut h = seeds::raw_header(b"././@LongLink", b'L', b"", name.len() as u64, 0o644);
            h.set_cksum();
            seeds::push_raw(&mut out, &h, &name);
        }
        let data: &[u8] = if kind == b'0' { &e.data } else { &[] };
        let mut h = seeds::raw_header(&path, kind, &link, data.len() as u64, u32::from(e.mode));
        h.set_uid(u64::from(e.uid));
        h.set_mtime(u64::from(e.mtime));
        if kind == b'3' || kind == b'4' {
            let _ = h.set_device_major(u32::from(e.pick));
            let _ = h.set_device_minor(u32::from(e.kind));
        }
        h.set_cksum();
        seeds::push_raw(&mut out, &h, data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    Ok(out)
}
