//! The `kd-lab` command line, as a library function so that another crate can ship the same
//! binary (a two-line `src/bin/kd-lab.rs` calling [`main`]) and get `CARGO_BIN_EXE_kd-lab`
//! in its own integration tests.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use crate as kd_lab;
use crate::{Accel, Action, Firmware, Lab, LabConfig, LabState, Subnet};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// `println!` that ignores a closed stdout (`kd-lab up | head` must not panic).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "kd-lab",
    version,
    about = "Virtual cluster of PXE-booting QEMU nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where a lab lives: its state directory, or the default one of its subnet.
#[derive(clap::Args, Clone)]
struct Where {
    /// State directory (default /var/lib/kd-lab/<id>).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Subnet of the lab (gives the default state directory and namespace).
    #[arg(long, default_value = "10.77.0.0/24")]
    subnet: Subnet,
}

impl Where {
    fn dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(|| kd_lab::default_state_dir(&self.subnet))
    }
    fn load(&self) -> Result<LabState> {
        let d = self.dir();
        LabState::load(&d).with_context(|| format!("no lab in {} (kd-lab up?)", d.display()))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the namespace, bridge, taps, dnsmasq, HTTP server and QEMU nodes.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[command(flatten)]
        at: Where,
        /// Guest RAM (MiB).
        #[arg(long, default_value_t = 512)]
        mem: u32,
        /// Virtual disk size (GiB, sparse).
        #[arg(long, default_value_t = 4)]
        disk_gb: u32,
        /// Directory whose files are served at <http_base_url>/boot/.
        #[arg(long)]
        boot_files: Option<PathBuf>,
        /// HTTP port on the gateway address.
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// auto (KVM only when really usable), kvm or tcg.
        #[arg(long, default_value = "auto")]
        accel: Accel,
        /// Node firmware: bios (SeaBIOS) or uefi (OVMF; the disk layout gets an ESP).
        #[arg(long, default_value = "bios")]
        firmware: Firmware,
        /// Nodes per rack label in cluster.yaml.
        #[arg(long, default_value_t = 2)]
        rack_size: usize,
        /// Leave the nodes powered off.
        #[arg(long)]
        no_start: bool,
        /// First tear down a lab left on this subnet / state directory.
        #[arg(long)]
        replace: bool,
    },
    /// Stop everything recorded (by PID), delete the namespace, remove the state directory.
    Down {
        #[command(flatten)]
        at: Where,
        /// Keep the state directory (logs, disks).
        #[arg(long)]
        keep_state: bool,
    },
    /// Nodes, power states and PIDs.
    Status {
        #[command(flatten)]
        at: Where,
    },
    /// Virtual BMC: on, off, reset, cycle or status of one node.
    Power {
        #[command(flatten)]
        at: Where,
        /// Node name.
        node: String,
        /// on | off | reset | cycle | status
        action: Action,
    },
    /// Follow a node's serial console log.
    Console {
        #[command(flatten)]
        at: Where,
        /// Node name.
        node: String,
        /// Print the log and exit instead of following it.
        #[arg(long)]
        no_follow: bool,
    },
    /// Run a command inside the lab's network namespace (e.g. kd-coord).
    Exec {
        #[command(flatten)]
        at: Where,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Static HTTP server (run inside the namespace by `up`).
    Http {
        /// Directory to serve.
        #[arg(long)]
        root: PathBuf,
        /// Address to listen on.
        #[arg(long)]
        listen: String,
        /// File created once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

/// Parse the process arguments and run `kd-lab`.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kd-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up {
            nodes,
            at,
            mem,
            disk_gb,
            boot_files,
            http_port,
            accel,
            firmware,
            rack_size,
            no_start,
            replace,
        } => {
            let cfg = LabConfig {
                nodes,
                subnet: at.subnet,
                state_dir: Some(at.dir()),
                mem_mb: mem,
                disk_gb,
                boot_files,
                http_port,
                accel,
                firmware,
                rack_size,
                kd_lab_bin: None,
                start_nodes: !no_start,
                keep_state: false,
                replace_existing: replace,
            };
            let start = std::time::Instant::now();
            let lab = Lab::up(cfg).context("kd-lab up")?;
            let cluster = lab.cluster_yaml();
            let st = lab.detach();
            outln!(
                "lab {} up in {:.1}s: namespace {}, bridge {} {}, accel {}{}",
                st.id,
                start.elapsed().as_secs_f64(),
                st.netns,
                st.bridge,
                st.gateway,
                st.accel,
                match st.firmware {
                    Firmware::Bios => String::new(),
                    f => format!(", firmware {} (OVMF)", f.name()),
                }
            );
            outln!("  state    {}", st.state_dir.display());
            outln!(
                "  http     {} -> {}/http",
                st.http_base_url,
                st.state_dir.display()
            );
            outln!("  tftp     {}/tftp", st.state_dir.display());
            outln!("  cluster  {}", cluster.display());
            outln!(
                "  dnsmasq  pid {}   http pid {}",
                st.dnsmasq_pid.unwrap_or(0),
                st.http_pid.unwrap_or(0)
            );
            for n in &st.nodes {
                outln!(
                    "  {:<7} {:<13} {}  {}  pid {}",
                    n.name,
                    n.ip,
                    n.mac,
                    n.files.log,
                    kd_lab::node_pid(n).map_or("-".into(), |p| p.to_string())
                );
            }
            outln!(
                "run the coordinator in the lab: kd-lab exec --state {} -- kd-coord --state DIR serve; then kd-coord --state DIR cluster add {}",
                st.state_dir.display(),
                st.state_dir.join("cluster.yaml").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { at, keep_state } => {
            let dir = at.dir();
            let ns = LabState::load(&dir)
                .map(|s| s.netns)
                .unwrap_or_else(|_| at.subnet.netns());
            let r = kd_lab::teardown(&dir, Some(&ns), keep_state)?;
            outln!(
                "down: stopped {:?}, namespace {} {}, state {}",
                r.stopped,
                ns,
                if r.netns_deleted { "deleted" } else { "absent" },
                if r.state_removed {
                    "removed"
                } else {
                    "kept/absent"
                }
            );
            if !r.left_running.is_empty() {
                eprintln!(
                    "kd-lab: processes not started by kd-lab still run in {ns}: {:?}",
                    r.left_running
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { at } => {
            let st = at.load()?;
            let up = |p: Option<u32>| match p {
                Some(p) if kd_lab::alive(p) => format!("{p} alive"),
                Some(p) => format!("{p} dead"),
                None => "-".into(),
            };
            outln!(
                "lab {} ({}), namespace {} {}, accel {}",
                st.id,
                st.subnet,
                st.netns,
                if kd_lab::netns_exists(&st.netns) {
                    "present"
                } else {
                    "MISSING"
                },
                st.accel
            );
            outln!("dnsmasq {}   http {}", up(st.dnsmasq_pid), up(st.http_pid));
            for n in kd_lab::status(&st) {
                outln!(
                    "{:<7} {:<13} {}  {:<8} pid {}",
                    n.name,
                    n.ip,
                    n.mac,
                    n.power.to_string(),
                    n.pid.map_or("-".into(), |p| p.to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Power { at, node, action } => {
            let st = at.load()?;
            let s = kd_lab::power(&st, &node, action)?;
            outln!("{s}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Console {
            at,
            node,
            no_follow,
        } => {
            let st = at.load()?;
            let n = st
                .nodes
                .iter()
                .find(|n| n.name == node)
                .with_context(|| format!("unknown node {node}"))?;
            let mut c = Command::new("tail");
            if no_follow {
                c.args(["-n", "+1", &n.files.log]);
            } else {
                c.args(["-n", "200", "-F", &n.files.log]);
            }
            let e = c.exec();
            bail!("tail: {e}")
        }
        Cmd::Exec { at, cmd } => {
            let st = at.load()?;
            let e = Command::new("ip")
                .args(["netns", "exec", &st.netns])
                .args(&cmd)
                .exec();
            bail!("ip netns exec: {e}")
        }
        Cmd::Http {
            root,
            listen,
            ready_file,
        } => {
            let l = TcpListener::bind(&listen).with_context(|| format!("bind {listen}"))?;
            if let Some(r) = ready_file {
                std::fs::write(&r, listen.as_bytes())
                    .with_context(|| format!("write {}", r.display()))?;
            }
            eprintln!("kd-lab http: serving {} on {listen}", root.display());
            kd_lab::http::serve(root, l, Box::new(std::io::stderr()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
