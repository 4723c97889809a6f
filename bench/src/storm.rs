//! `kd-bench storm`: one coordinator and N real agents started at once on loopback, as a
//! reboot of a whole cluster starts them. A temp directory holds a small random image (packed
//! by `kd-coord image pack`), the state and the tokens; `kd-coord broadcast` listens on
//! 127.0.0.1, then N `kd-agent --sink null` processes (verify and relay, no disk) are started
//! as fast as the machine spawns them. The coordinator's handshake admission, Hello handling,
//! planning and serving are what is measured: when the last agent was in (the `planned` line),
//! the transfer time, every copy verified, handshakes refused (and retried by their agents),
//! and the coordinator's peak memory (VmHWM) and CPU time. Every process is stopped by its PID
//! and the temp directory removed by a guard, also on errors; the run is bounded.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kd_disk::procstat::ProcStat;

use crate::api::{kd_coord_bin, log_tail, sibling_bin, status_field};

/// Options of `kd-bench storm`.
#[derive(clap::Args)]
pub(crate) struct StormArgs {
    /// Agents (processes) started at once.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Size of the random image, MiB.
    #[arg(long, default_value_t = 4)]
    size_mib: u64,
    /// Tree arity (chain, star, k).
    #[arg(long, default_value = "8")]
    arity: String,
    /// UDP port of the coordinator on 127.0.0.1.
    #[arg(long, default_value_t = 7400)]
    port: u16,
    /// Seconds the whole run may take.
    #[arg(long, default_value_t = 600)]
    limit_secs: u64,
    /// Run the coordinator at this nice value (e.g. -10: ahead of the agents, as on a machine
    /// of its own; 0: sharing the cores with the N agents like any of them).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    coord_nice: i32,
    /// Keep the coordinator's log and each agent's (at `warn`, `nodeI.log`) in this directory.
    #[arg(long)]
    keep_logs: Option<std::path::PathBuf>,
}

/// Everything the run started; stopped and removed when dropped.
struct Run {
    dir: tempfile::TempDir,
    coord: Option<Child>,
    agents: Vec<Child>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().chain(self.coord.as_mut()) {
            let _ = c.kill();
        }
        for c in self.agents.iter_mut().chain(self.coord.as_mut()) {
            let _ = c.wait();
        }
    }
}

/// The host's UDP receive-buffer drops (`RcvbufErrors` of /proc/net/snmp: every socket of
/// this network namespace, loopback included).
fn udp_rcvbuf_errors() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = s.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// CPU seconds (user + system) of a live process, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> Option<f64> {
    Some(ProcStat::of(pid)?.cpu_ticks() as f64 / 100.0)
}

pub(crate) fn run(a: StormArgs) -> Result<()> {
    if a.agents == 0 || a.agents > 2_000 {
        bail!("--agents must be between 1 and 2000");
    }
    if a.size_mib == 0 || a.size_mib > 1024 {
        bail!("--size-mib must be between 1 and 1024");
    }
    let coord_bin = kd_coord_bin()?;
    let agent = sibling_bin("kd-agent")?;
    let limit = Duration::from_secs(a.limit_secs.clamp(30, 3600));
    let mut run = Run {
        dir: tempfile::Builder::new().prefix("kd-storm-").tempdir()?,
        coord: None,
        agents: Vec::new(),
    };
    let dir = run.dir.path().to_path_buf();
    let state = dir.join("state");
    // The image: random bytes (incompressible), packed.
    let raw = dir.join("image.raw");
    let mut bytes = vec![0u8; (a.size_mib << 20) as usize];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
    std::fs::write(&raw, &bytes)?;
    drop(bytes);
    let image = dir.join("image.kdi");
    let kd = |args: &[&str]| -> Result<String> {
        let o = Command::new(&coord_bin)
            .arg("--state")
            .arg(&state)
            .args(args)
            .output()
            .context("kd-coord")?;
        if !o.status.success() {
            bail!(
                "kd-coord {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    kd(&[
        "image",
        "pack",
        &raw.display().to_string(),
        "-o",
        &image.display().to_string(),
    ])?;
    let pin = kd(&["pin"])?;
    let tokens = dir.join("tokens");
    let mut t = String::new();
    for i in 1..=a.agents {
        t += &format!("node{i} storm-{i}\n");
    }
    std::fs::write(&tokens, t)?;
    let addr = format!("127.0.0.1:{}", a.port);
    let coord_log = dir.join("coord.log");
    let coord_out = dir.join("coord.json");
    let t0 = Instant::now();
    if !(-20..=19).contains(&a.coord_nice) {
        bail!("--coord-nice must be between -20 and 19");
    }
    // `nice` execs the coordinator: the child's PID is the coordinator's.
    let mut coord = Command::new("nice");
    coord
        .arg("-n")
        .arg(a.coord_nice.to_string())
        .arg(&coord_bin);
    let coord = coord
        .arg("--state")
        .arg(&state)
        .arg("broadcast")
        .arg(&image)
        .args(["-m", &format!("node[1-{}]", a.agents)])
        .args(["--arity", &a.arity, "--listen", &addr, "--tokens"])
        .arg(&tokens)
        .args(["--json", "--hello-timeout", "300", "--timeout", "300"])
        .env(
            "KD_LOG",
            if a.keep_logs.is_some() {
                "warn,kd_coord::broadcast=debug"
            } else {
                "warn"
            },
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&coord_out)?)
        .stderr(std::fs::File::create(&coord_log)?)
        .spawn()
        .context("start kd-coord broadcast")?;
    let coord_pid = coord.id();
    run.coord = Some(coord);
    // Wait until it listens.
    while !std::fs::read_to_string(&coord_log)
        .unwrap_or_default()
        .contains("listening on")
    {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the coordinator did not listen within 30 s:\n{}",
                log_tail(&coord_log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(d) = &a.keep_logs {
        std::fs::create_dir_all(d).with_context(|| format!("{}", d.display()))?;
    }
    let agent_log = |i: usize| -> Result<Stdio> {
        Ok(match &a.keep_logs {
            Some(d) => std::fs::File::create(d.join(format!("node{i}.log")))?.into(),
            None => Stdio::null(),
        })
    };
    let drops0 = udp_rcvbuf_errors();
    let t_start = Instant::now();
    for i in 1..=a.agents {
        let c = Command::new(&agent)
            .args(["--coord", &addr, "--pin", &pin])
            .args([
                "--node",
                &format!("node{i}"),
                "--token",
                &format!("storm-{i}"),
            ])
            .args(["--sink", "null", "--listen", "127.0.0.1:0"])
            .env(
                "KD_LOG",
                if a.keep_logs.is_some() {
                    "warn"
                } else {
                    "error"
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(agent_log(i)?)
            .spawn()
            .with_context(|| format!("start agent {i} (ulimit -u?)"))?;
        run.agents.push(c);
    }
    let spawned = t_start.elapsed();
    let mut peak_rss = 0u64;
    let mut cpu = 0.0;
    let status = loop {
        if let Some(c) = run.coord.as_mut() {
            if let Some(st) = c.try_wait()? {
                break st;
            }
        }
        if t_start.elapsed() > limit {
            bail!(
                "the broadcast did not end within {limit:?}:\n{}",
                log_tail(&coord_log)
            );
        }
        peak_rss = peak_rss.max(status_field(coord_pid, "VmHWM").unwrap_or(0));
        cpu = cpu_secs(coord_pid).unwrap_or(cpu);
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = t_start.elapsed();
    let drops = udp_rcvbuf_errors()
        .zip(drops0)
        .map_or_else(|| "?".to_string(), |(b, a)| b.saturating_sub(a).to_string());
    eprintln!(
        "kd-bench storm: coordinator CPU {cpu:.1} s, peak RSS {:.1} MiB, UDP receive-buffer drops on the host during the run: {drops}",
        peak_rss as f64 / 1024.0
    );
    if let Some(d) = &a.keep_logs {
        std::fs::copy(&coord_log, d.join("coord.log"))?;
    }
    // When the round was planned (every agent in), from the coordinator's log.
    let log = std::fs::File::open(&coord_log)?;
    let (mut refused, mut connected) = (0usize, 0usize);
    for l in BufReader::new(log).lines().map_while(Result::ok) {
        if l.contains(": refused ") {
            refused += 1;
        } else if l.contains(" connected from ") {
            connected += 1;
        }
    }
    let out: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&coord_out)?)
        .with_context(|| format!("the coordinator's JSON:\n{}", log_tail(&coord_log)))?;
    let nodes = out["nodes"].as_array().cloned().unwrap_or_default();
    let ok = nodes.iter().filter(|n| n["ok"] == true).count();
    let transfer = out["transfer_seconds"].as_f64().unwrap_or(f64::NAN);
    println!("| agents | arity | image MiB | agents spawned s | broadcast wall s | transfer s | verified | handshakes refused (retried) | connections | coordinator peak RSS MiB | coordinator CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {ok}/{} | {refused} | {connected} | {:.1} | {:.1} |",
        a.agents,
        a.arity,
        a.size_mib,
        spawned.as_secs_f64(),
        wall.as_secs_f64(),
        transfer,
        nodes.len(),
        peak_rss as f64 / 1024.0,
        cpu
    );
    println!(
        "broadcast wall: from the first agent's start to the coordinator's exit (every Hello, the \
         plan, the transfer, the reports); transfer: the coordinator's, from the plan to the last report."
    );
    if !status.success() || ok != a.agents {
        bail!(
            "{} of {} agents verified the image (coordinator exit {status}):\n{}",
            ok,
            a.agents,
            log_tail(&coord_log)
        );
    }
    Ok(())
}
