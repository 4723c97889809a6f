//! `kd-fakebmc`: a fake BMC whose nodes are processes (see `kd_tests::fakebmc`), for the
//! command templates of a loopback test cluster:
//!
//! ```text
//! kd-fakebmc --dir D soft|reset|cycle|on|off|status|kill NODE
//! ```
//! `soft` is an in-band reboot (fails unless the node runs the deploy agent or its deployed
//! system), `reset`/`cycle` restart the node, `on` starts it if it is off, `off` stops it,
//! `kill` marks it dead for good (every later command exits 0 and does nothing).
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kd_tests::fakebmc::{self, BmcConfig, BmcNode, Profile};

/// A machine never lives longer than this (a test that dies without cleaning up leaves no
/// process behind for long).
const MACHINE_LIFETIME: Duration = Duration::from_secs(1800);
/// At most this many boots per machine process.
const MAX_BOOTS: u32 = 50;

#[derive(Parser)]
#[command(name = "kd-fakebmc", about = "fake BMC over process nodes (kd tests)")]
struct Cli {
    /// The fake cluster's directory (bmc.json, nodes/, events.log).
    #[arg(long)]
    dir: std::path::PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// In-band reboot: works only when the node's agent or deployed system runs.
    Soft { node: String },
    /// Reset: restart the node (power it on if off).
    Reset { node: String },
    /// Power cycle: same as reset.
    Cycle { node: String },
    /// Power on (nothing if already on).
    On { node: String },
    /// Power off.
    Off { node: String },
    /// Print `on` or `off`.
    Status { node: String },
    /// Tests: the node dies for good (commands then do nothing and exit 0).
    Kill { node: String },
    /// The node itself (started by the other commands).
    #[command(hide = true)]
    Machine { node: String },
}

fn main() {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kd-fakebmc: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    let dir = cli.dir.as_path();
    let cfg = BmcConfig::load(dir)?;
    if let Cmd::Machine { node } = &cli.cmd {
        let n = cfg.node(node)?.clone();
        return machine(dir, &cfg, &n).map(|()| 0);
    }
    let (verb, name) = match &cli.cmd {
        Cmd::Soft { node } => ("soft", node),
        Cmd::Reset { node } => ("reset", node),
        Cmd::Cycle { node } => ("cycle", node),
        Cmd::On { node } => ("on", node),
        Cmd::Off { node } => ("off", node),
        Cmd::Status { node } => ("status", node),
        Cmd::Kill { node } => ("kill", node),
        Cmd::Machine { .. } => unreachable!("handled above"),
    };
    cfg.node(name)?;
    let nd = fakebmc::node_dir(dir, name);
    std::fs::create_dir_all(&nd)?;
    // One command per node at a time.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(nd.join("lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("lock the node")?;
    let dead = nd.join("dead").exists();
    let running = fakebmc::machine_pid(dir, name).is_some();
    let state = std::fs::read_to_string(nd.join("state")).unwrap_or_default();
    let code = match verb {
        "status" => {
            println!("{}", if running { "on" } else { "off" });
            0
        }
        "kill" => {
            std::fs::write(nd.join("dead"), "")?;
            fakebmc::kill_machine(dir, name);
            fakebmc::event(dir, name, "kill: dead for good");
            0
        }
        // Like ssh: a node that runs nothing that answers (off, halted, dead) fails at once.
        "soft" if !running || !(state.starts_with("deploy") || state.starts_with("up")) => {
            fakebmc::event(
                dir,
                name,
                &format!("soft: no answer (state {:?})", state.trim()),
            );
            eprintln!("{name}: no answer");
            1
        }
        _ if dead => {
            fakebmc::event(dir, name, &format!("{verb}: dead node, nothing happens"));
            0
        }
        "off" => {
            fakebmc::kill_machine(dir, name);
            fakebmc::event(dir, name, "off");
            0
        }
        "on" if running => {
            fakebmc::event(dir, name, "on: already on");
            0
        }
        _ => {
            fakebmc::event(dir, name, verb);
            start_machine(dir, name)?;
            0
        }
    };
    Ok(code)
}

/// (Re)starts a node's machine process, detached in its own process group.
fn start_machine(dir: &Path, name: &str) -> Result<()> {
    let nd = fakebmc::node_dir(dir, name);
    if fakebmc::kill_machine(dir, name) {
        // A reset loses what the killed agent had mounted and attached (partitions of the
        // node's disk), as a real machine's reset does.
        if let Some(n) = BmcConfig::load(dir)?.nodes.iter().find(|n| n.name == name) {
            fakebmc::release_under(&nd.join("work"), std::slice::from_ref(&n.disk));
        }
    }
    let _ = std::fs::write(nd.join("state"), "booting\n");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("machine.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--dir")
        .arg(dir)
        .arg("machine")
        .arg(name)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start the machine")?;
    let line = fakebmc::pidfile_line(child.id()).context("the machine vanished")?;
    let tmp = nd.join("pid.tmp");
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::rename(&tmp, nd.join("pid"))?;
    Ok(())
}

fn set_state(dir: &Path, node: &BmcNode, state: &str) {
    let _ = std::fs::write(
        fakebmc::node_dir(dir, &node.name).join("state"),
        format!("{state}\n"),
    );
}

/// The node: boots from its PXE profile until halted, killed, or out of boots.
fn machine(dir: &Path, cfg: &BmcConfig, node: &BmcNode) -> Result<()> {
    // Agents write this disk: only ever a loop device (never a disk of this machine).
    if !node.disk.to_string_lossy().starts_with("/dev/loop") {
        bail!(
            "{}: disk {} is not a loop device",
            node.name,
            node.disk.display()
        );
    }
    let end = Instant::now() + MACHINE_LIFETIME;
    let nd = fakebmc::node_dir(dir, &node.name);
    for _boot in 0..MAX_BOOTS {
        let profile = match std::fs::read_to_string(cfg.profile_path(node)) {
            Ok(t) => fakebmc::parse_profile(&t)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Profile::Missing,
            Err(e) => return Err(e).context("read the PXE profile"),
        };
        match profile {
            Profile::Deploy(params) => {
                fakebmc::event(dir, &node.name, "boot: deploy agent");
                set_state(dir, node, "deploy");
                std::fs::write(nd.join("cmdline"), format!("{params}\n"))?;
                let log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(nd.join("agent.log"))?;
                let mut faults = std::fs::read_to_string(nd.join("fault")).unwrap_or_default();
                // `fault-once`: for this boot's agent only.
                if let Ok(once) = std::fs::read_to_string(nd.join("fault-once")) {
                    std::fs::remove_file(nd.join("fault-once"))?;
                    faults.push('\n');
                    faults.push_str(&once);
                }
                let mut cmd = Command::new(&cfg.agent);
                cmd.arg("--cmdline")
                    .arg(nd.join("cmdline"))
                    .arg("--disk")
                    .arg(&node.disk)
                    .arg("--work-dir")
                    .arg(nd.join("work"))
                    .arg("--listen")
                    .arg(SocketAddr::new(node.address, 0).to_string())
                    .args(&cfg.agent_args);
                for f in faults.split_whitespace() {
                    cmd.arg("--fault").arg(f);
                }
                let status = cmd
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .env(
                        "KD_LOG",
                        std::env::var("KD_LOG").unwrap_or_else(|_| "info".into()),
                    )
                    .status()
                    .context("run kd-agent")?;
                if status.success() {
                    fakebmc::event(dir, &node.name, "agent exited 0: reboot");
                    continue;
                }
                fakebmc::event(dir, &node.name, &format!("agent failed ({status}): halted"));
                set_state(dir, node, "halted");
                return halt(end);
            }
            Profile::Local | Profile::Missing => {
                let how = if profile == Profile::Local {
                    "local profile"
                } else {
                    "no profile"
                };
                let check = if nd.join("broken-boot").exists() {
                    Err(anyhow::anyhow!(
                        "broken-boot flag: the firmware cannot boot the disk"
                    ))
                } else {
                    fakebmc::check_disk(cfg, node)
                };
                match check {
                    Ok(()) => {
                        let addr = SocketAddr::new(node.address, cfg.check_port);
                        // Told before the port opens: the coordinator's check may succeed,
                        // and a test read the events, the moment it does.
                        fakebmc::event(
                            dir,
                            &node.name,
                            &format!("boot: {how}: deployed system up on {addr}"),
                        );
                        set_state(dir, node, "up");
                        return serve(bind(addr)?, end);
                    }
                    Err(e) => {
                        let why = format!("{e:#}").replace('\n', " ");
                        fakebmc::event(
                            dir,
                            &node.name,
                            &format!("boot: {how}: no bootable system: {why}"),
                        );
                        set_state(dir, node, "halted");
                        return halt(end);
                    }
                }
            }
        }
    }
    fakebmc::event(dir, &node.name, "too many boots: halted");
    set_state(dir, node, "halted");
    halt(end)
}

fn halt(end: Instant) -> Result<()> {
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Binds the check port; the previous instance of this node may still be going away.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!("bind {addr}: {e}"),
        }
    }
}

/// The deployed system's "sshd": a banner to every connection.
fn serve(l: TcpListener, end: Instant) -> Result<()> {
    l.set_nonblocking(true)?;
    while Instant::now() < end {
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.write_all(b"SSH-2.0-kd-fakebmc\r\n");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => bail!("accept: {e}"),
        }
    }
    Ok(())
}
