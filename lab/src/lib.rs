//! kd-lab: a virtual cluster of QEMU nodes that PXE-boot inside a network namespace.
//!
//! [`Lab::up`] creates the namespace `kdlab-<id>` with a bridge and one tap per node, starts
//! dnsmasq (DHCP + TFTP) and a static HTTP server in it, starts the QEMU nodes (iPXE → HTTP
//! → per-node profile `nodes/<mac-hexhyp>.ipxe`), and writes `lab.json` (every PID and
//! resource) and `cluster.yaml` (the cluster configuration for kd-coord) in the state
//! directory. [`Lab::power`] is the nodes' virtual BMC (QMP). [`Lab::down`], `Drop` and
//! [`teardown`] remove everything, also after a crash.
//!
//! Nodes run SeaBIOS by default; with [`Firmware::Uefi`] (`kd-lab up --firmware uefi`) they run
//! OVMF (read-only code + a per-node variable store that survives power cycles), UEFI PXE
//! clients get iPXE's EFI binary by TFTP (which chains the same `boot.ipxe`), and the disk
//! layout in `cluster.yaml` gains a vfat ESP (see [`plan::lab_disk`]).
//!
//! Everything on the lab network lives in the namespace: run the coordinator there with
//! [`Lab::command`] / `kd-lab exec -- CMD...`; it listens on the gateway address `.1`.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod cli;
pub mod http;
pub mod plan;
pub mod qmp;
#[allow(unsafe_code)] // the crate's only unsafe: see ARCHITECTURE.md
mod sys;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use plan::{Accel, ClusterConfig, Firmware, NodeFiles, Subnet};
pub use sys::{alive, kvm_usable, netns_exists};

/// Errors of the lab library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration or argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A lab already uses this namespace or state directory.
    #[error("{0}")]
    Exists(String),
    /// An external command failed.
    #[error("command failed: {0}")]
    Command(String),
    /// A QMP exchange failed.
    #[error("qmp: {0}")]
    Qmp(String),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// No node of this name in the lab.
    #[error("unknown node {0}")]
    UnknownNode(String),
    /// The node is powered off (reset needs it on).
    #[error("node {0} is off")]
    NodeOff(String),
    /// A service did not start or stop in time.
    #[error("{0}")]
    Failed(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of nodes (1..=200).
    pub nodes: usize,
    /// The lab's /24; also gives its id and namespace name.
    pub subnet: Subnet,
    /// State directory; default `/var/lib/kd-lab/<id>`.
    pub state_dir: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mb: u32,
    /// Size of each raw virtual disk in GiB (sparse).
    pub disk_gb: u32,
    /// Files copied into `<http_root>/boot/` (e.g. the deploy initrd's vmlinuz and initramfs.img).
    pub boot_files: Option<PathBuf>,
    /// HTTP port on the gateway address.
    pub http_port: u16,
    /// Accelerator choice.
    pub accel: Accel,
    /// The nodes' firmware (BIOS, or UEFI with OVMF; see [`Firmware`]).
    pub firmware: Firmware,
    /// Nodes per rack label in cluster.yaml.
    pub rack_size: usize,
    /// The kd-lab binary (HTTP server, command templates); found automatically when `None`.
    pub kd_lab_bin: Option<PathBuf>,
    /// Power the nodes on at the end of `up` (else they stay off until [`Lab::power`]).
    pub start_nodes: bool,
    /// Keep the state directory (logs, disks) when the lab is torn down.
    pub keep_state: bool,
    /// Tear down a lab already using this subnet's namespace or this state directory
    /// (left by a crashed run) instead of failing with [`Error::Exists`].
    pub replace_existing: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 2,
            subnet: Subnet::DEFAULT,
            state_dir: None,
            mem_mb: 512,
            disk_gb: 4,
            boot_files: None,
            http_port: 8080,
            accel: Accel::Auto,
            firmware: Firmware::Bios,
            rack_size: 2,
            kd_lab_bin: None,
            start_nodes: true,
            keep_state: false,
            replace_existing: false,
        }
    }
}

/// Default state directory of a subnet's lab.
pub fn default_state_dir(subnet: &Subnet) -> PathBuf {
    PathBuf::from("/var/lib/kd-lab").join(subnet.id())
}

/// One node as recorded in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// `node<i>`.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// IPv4 address.
    pub ip: String,
    /// Tap device in the namespace.
    pub tap: String,
    /// Rack label.
    pub rack: String,
    /// Files of the node.
    pub files: NodeFiles,
    /// QEMU command line (run with `ip netns exec`).
    pub qemu_argv: Vec<String>,
}

/// Everything `lab.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Lab id (`77`).
    pub id: String,
    /// Cluster name.
    pub name: String,
    /// Network namespace.
    pub netns: String,
    /// Bridge in the namespace.
    pub bridge: String,
    /// Subnet.
    pub subnet: Subnet,
    /// Gateway / coordinator address.
    pub gateway: String,
    /// HTTP port.
    pub http_port: u16,
    /// Base URL of the HTTP root.
    pub http_base_url: String,
    /// Absolute state directory.
    pub state_dir: PathBuf,
    /// kd-lab binary used for the HTTP server and command templates.
    pub kd_lab_bin: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The nodes' firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// dnsmasq PID.
    pub dnsmasq_pid: Option<u32>,
    /// HTTP server PID.
    pub http_pid: Option<u32>,
    /// Nodes; their QEMU PIDs are in their pid files.
    pub nodes: Vec<NodeState>,
}

impl LabState {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("lab.json")
    }

    /// Load `<state_dir>/lab.json`.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let p = Self::path(state_dir);
        let text = fs::read_to_string(&p).map_err(io_err(&p))?;
        serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
    }

    fn save(&self) -> Result<()> {
        let p = Self::path(&self.state_dir);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("lab.json: {e}")))?;
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::UnknownNode(name.to_string()))
    }
}

/// A BMC action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the QEMU process if it is not running.
    On,
    /// Stop the QEMU process (QMP `quit`).
    Off,
    /// Hardware reset (QMP `system_reset`); fails if the node is off.
    Reset,
    /// Off then on (works from any state).
    Cycle,
    /// Only report the power state.
    Status,
}

impl std::str::FromStr for Action {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "on" => Action::On,
            "off" => Action::Off,
            "reset" => Action::Reset,
            "cycle" => Action::Cycle,
            "status" => Action::Status,
            _ => {
                return Err(Error::Invalid(format!(
                    "action {s:?}: expected on|off|reset|cycle|status"
                )))
            }
        })
    }
}

/// A node's power state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerState {
    /// QEMU runs the guest.
    On,
    /// No QEMU process.
    Off,
    /// QEMU runs but the guest is in another run state (`paused`, `shutdown`, ...).
    Other(String),
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PowerState::On => f.write_str("on"),
            PowerState::Off => f.write_str("off"),
            PowerState::Other(s) => f.write_str(s),
        }
    }
}

/// Status of one node.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Address.
    pub ip: String,
    /// MAC.
    pub mac: String,
    /// Power state.
    pub power: PowerState,
    /// Live QEMU PID.
    pub pid: Option<u32>,
}

/// A running lab. Dropping an owned lab tears it down.
pub struct Lab {
    state: LabState,
    children: Vec<Child>,
    owned: bool,
    keep_state: bool,
    torn_down: bool,
}

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

fn find_kd_lab_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KD_LAB_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "kd-lab") {
            candidates.push(exe.clone());
        }
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("kd-lab"));
            // tests run from target/<profile>/deps/
            if let Some(up) = dir.parent() {
                candidates.push(up.join("kd-lab"));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("kd-lab")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(|| {
            Error::Invalid("kd-lab binary not found (build it or set KD_LAB_BIN)".into())
        })
}

fn require_tool(name: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file());
    if found {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{name} not found (apt-get install qemu-system-x86 ipxe-qemu dnsmasq-base iproute2)"
        )))
    }
}

/// iPXE's EFI binary on this host, if installed.
fn ipxe_efi_source() -> Option<PathBuf> {
    plan::IPXE_EFI_SOURCES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn tail(path: &str, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Lab {
    /// Build and start a lab. On failure everything already created is removed again
    /// (the state directory is kept for its logs).
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::Invalid(
                "kd-lab needs root (namespaces, taps)".into(),
            ));
        }
        let subnet = cfg.subnet;
        let netns = subnet.netns();
        if sys::netns_exists(&netns) && cfg.replace_existing {
            // A previous lab on this subnet (e.g. of a killed test run): remove it first.
            let old = cfg
                .state_dir
                .clone()
                .unwrap_or_else(|| default_state_dir(&subnet));
            teardown(&old, Some(&netns), false)?;
        }
        if sys::netns_exists(&netns) {
            return Err(Error::Exists(format!(
                "namespace {netns} exists: a lab is up on {subnet} (kd-lab down --subnet {subnet})"
            )));
        }
        let plan = plan::nodes(&subnet, cfg.nodes, cfg.rack_size)?;
        for t in ["ip", "qemu-system-x86_64", "dnsmasq"] {
            require_tool(t)?;
        }
        if cfg.firmware == Firmware::Uefi {
            for f in [plan::OVMF_CODE, plan::OVMF_VARS] {
                if !Path::new(f).is_file() {
                    return Err(Error::Invalid(format!(
                        "UEFI nodes need {f} (apt-get install ovmf)"
                    )));
                }
            }
            if ipxe_efi_source().is_none() {
                return Err(Error::Invalid(format!(
                    "UEFI nodes need iPXE's EFI binary ({}; `./dev.sh setup` unpacks it)",
                    plan::IPXE_EFI_SOURCES.join(" or ")
                )));
            }
        }
        let kd_lab_bin = find_kd_lab_bin(cfg.kd_lab_bin.as_deref())?;
        let state_dir = cfg
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&subnet));
        fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        let state_dir = state_dir.canonicalize().map_err(io_err(&state_dir))?;
        if LabState::path(&state_dir).exists() && cfg.replace_existing {
            teardown(&state_dir, None, false)?;
            fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        }
        if LabState::path(&state_dir).exists() {
            return Err(Error::Exists(format!(
                "{} holds a lab: kd-lab down --state {}",
                state_dir.display(),
                state_dir.display()
            )));
        }
        let kvm = match cfg.accel {
            Accel::Auto => sys::kvm_usable(),
            Accel::Kvm => true,
            Accel::Tcg => false,
        };
        let sercon = state_dir.join("sercon-port.bin");
        let nodes = plan
            .iter()
            .map(|n| {
                let files = NodeFiles::new(&state_dir, &n.name);
                NodeState {
                    qemu_argv: plan::qemu_argv(n, &files, &sercon, cfg.mem_mb, kvm, cfg.firmware),
                    name: n.name.clone(),
                    mac: n.mac.clone(),
                    ip: n.ip.to_string(),
                    tap: n.tap.clone(),
                    rack: n.rack.clone(),
                    files,
                }
            })
            .collect();
        let state = LabState {
            id: subnet.id(),
            name: netns.clone(),
            netns,
            bridge: plan::BRIDGE.into(),
            subnet,
            gateway: subnet.gateway().to_string(),
            http_port: cfg.http_port,
            http_base_url: format!("http://{}:{}", subnet.gateway(), cfg.http_port),
            state_dir,
            kd_lab_bin,
            accel: if kvm { "kvm" } else { "tcg" }.into(),
            firmware: cfg.firmware,
            dnsmasq_pid: None,
            http_pid: None,
            nodes,
        };
        state.save()?;
        let mut lab = Lab {
            state,
            children: Vec::new(),
            owned: true,
            keep_state: cfg.keep_state,
            torn_down: false,
        };
        if let Err(e) = lab.bring_up(&cfg, &plan) {
            lab.torn_down = true;
            let _ = teardown(&lab.state.state_dir, Some(&lab.state.netns), true);
            return Err(e);
        }
        Ok(lab)
    }

    /// Starts `argv` in the namespace `ns`, in a session of its own, its output in `log`;
    /// kept in `children`. Its pid.
    fn spawn_in_netns(&mut self, ns: &str, argv: &[&str], log: &Path) -> Result<u32> {
        let f = File::create(log).map_err(io_err(log))?;
        let f2 = f.try_clone().map_err(io_err(log))?;
        let child = sys::spawn_detached(
            sys::netns_command(ns, argv)
                .stdin(Stdio::null())
                .stdout(f)
                .stderr(f2),
        )?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn bring_up(&mut self, cfg: &LabConfig, plan: &[plan::NodePlan]) -> Result<()> {
        let sd = self.state.state_dir.clone();
        let subnet = self.state.subnet;
        // Files: TFTP root, HTTP root, sercon, disks, logs, dnsmasq configuration.
        let tftp = sd.join("tftp");
        fs::create_dir_all(tftp.join("pxelinux.cfg")).map_err(io_err(&tftp))?;
        let mut syslinux = vec![PathBuf::from("/usr/lib/PXELINUX/pxelinux.0")];
        for m in [
            "ldlinux.c32",
            "libutil.c32",
            "libcom32.c32",
            "chain.c32",
            "menu.c32",
        ] {
            syslinux.push(Path::new("/usr/lib/syslinux/modules/bios").join(m));
        }
        for src in syslinux.iter().filter(|p| p.is_file()) {
            if let Some(name) = src.file_name() {
                let dst = tftp.join(name);
                fs::copy(src, &dst).map_err(io_err(&dst))?;
            }
        }
        let p = tftp.join("pxelinux.cfg/default");
        fs::write(&p, plan::PXELINUX_DEFAULT).map_err(io_err(&p))?;
        if cfg.firmware == Firmware::Uefi {
            if let Some(src) = ipxe_efi_source() {
                let dst = tftp.join(plan::IPXE_EFI);
                fs::copy(&src, &dst).map_err(io_err(&dst))?;
            }
        }
        let http = sd.join("http");
        fs::create_dir_all(http.join("nodes")).map_err(io_err(&http))?;
        let p = http.join("boot.ipxe");
        fs::write(&p, plan::boot_ipxe(&subnet, cfg.http_port, cfg.firmware)).map_err(io_err(&p))?;
        if let Some(dir) = &cfg.boot_files {
            let boot = http.join("boot");
            fs::create_dir_all(&boot).map_err(io_err(&boot))?;
            for e in fs::read_dir(dir).map_err(io_err(dir))? {
                let e = e.map_err(io_err(dir))?;
                let src = e.path();
                if src.is_file() {
                    let dst = boot.join(e.file_name());
                    fs::copy(&src, &dst).map_err(io_err(&dst))?;
                }
            }
        }
        let p = sd.join("sercon-port.bin");
        fs::write(&p, [0xf8u8, 0x03]).map_err(io_err(&p))?;
        for n in &self.state.nodes {
            let disk = Path::new(&n.files.disk);
            let f = File::create(disk).map_err(io_err(disk))?;
            f.set_len(u64::from(cfg.disk_gb) << 30)
                .map_err(io_err(disk))?;
            let log = Path::new(&n.files.log);
            File::create(log).map_err(io_err(log))?;
            if cfg.firmware == Firmware::Uefi {
                // A fresh NVRAM per node, created once: power cycles keep it.
                let vars = Path::new(&n.files.vars);
                fs::copy(plan::OVMF_VARS, vars).map_err(io_err(vars))?;
            }
            let _ = fs::remove_file(&n.files.pidfile);
        }
        let conf = sd.join("dnsmasq.conf");
        fs::write(
            &conf,
            plan::dnsmasq_conf(&subnet, plan, &sd, cfg.http_port, cfg.firmware),
        )
        .map_err(io_err(&conf))?;

        // Network.
        let ns = self.state.netns.clone();
        let br = plan::BRIDGE;
        let ip = |args: &[&str]| sys::run(Command::new("ip").args(args)).map(|_| ());
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            br,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", subnet.gateway()),
            "dev",
            br,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}1/64", subnet.ipv6_prefix()),
            "dev",
            br,
            "nodad",
        ])?;
        ip(&["-n", &ns, "link", "set", br, "up"])?;
        for n in &self.state.nodes {
            ip(&["-n", &ns, "tuntap", "add", "dev", &n.tap, "mode", "tap"])?;
            ip(&["-n", &ns, "link", "set", &n.tap, "master", br])?;
            ip(&["-n", &ns, "link", "set", &n.tap, "up"])?;
        }

        // dnsmasq (never SIGHUP it: it runs in its own session).
        sys::run(
            Command::new("dnsmasq").args(["--test", &format!("--conf-file={}", conf.display())]),
        )?;
        let out = sd.join("dnsmasq.out");
        let pid = self.spawn_in_netns(
            &ns,
            &["dnsmasq", "-k", &format!("--conf-file={}", conf.display())],
            &out,
        )?;
        self.state.dnsmasq_pid = Some(pid);
        self.state.save()?;
        let dlog = sd.join("dnsmasq.log");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !sys::alive(pid) {
                return Err(Error::Failed(format!(
                    "dnsmasq exited: {} {}",
                    tail(&out.display().to_string(), 10),
                    tail(&dlog.display().to_string(), 10)
                )));
            }
            if fs::read_to_string(&dlog).is_ok_and(|t| t.contains("TFTP root")) {
                break;
            }
            if Instant::now() >= deadline {
                break; // running; its log is just slow
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        // HTTP server.
        let ready = sd.join("http.ready");
        let _ = fs::remove_file(&ready);
        let hlog = sd.join("http.log");
        let bin = self.state.kd_lab_bin.display().to_string();
        let pid = self.spawn_in_netns(
            &ns,
            &[
                bin.as_str(),
                "http",
                "--root",
                &http.display().to_string(),
                "--listen",
                &format!("{}:{}", subnet.gateway(), cfg.http_port),
                "--ready-file",
                &ready.display().to_string(),
            ],
            &hlog,
        )?;
        self.state.http_pid = Some(pid);
        self.state.save()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if !sys::alive(pid) || Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "HTTP server did not start: {}",
                    tail(&hlog.display().to_string(), 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        // Cluster configuration for kd-coord.
        let cluster = plan::cluster_config(
            &self.state.name,
            &subnet,
            plan,
            &sd,
            cfg.http_port,
            &self.state.kd_lab_bin,
            cfg.firmware,
        );
        let text = serde_norway::to_string(&cluster)
            .map_err(|e| Error::Invalid(format!("cluster.yaml: {e}")))?;
        let p = self.cluster_yaml();
        fs::write(&p, text).map_err(io_err(&p))?;

        if cfg.start_nodes {
            let names: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
            for n in names {
                self.power(&n, Action::On)?;
            }
        }
        Ok(())
    }

    /// Open an existing lab from its state directory. The returned handle does not tear
    /// the lab down when dropped.
    pub fn attach(state_dir: &Path) -> Result<Lab> {
        Ok(Lab {
            state: LabState::load(state_dir)?,
            children: Vec::new(),
            owned: false,
            keep_state: false,
            torn_down: false,
        })
    }

    /// Stop owning the lab: dropping the handle leaves it running (what `kd-lab up` does).
    pub fn detach(mut self) -> LabState {
        self.owned = false;
        self.children.clear();
        self.state.clone()
    }

    /// Tear the lab down: stop QEMU, dnsmasq and HTTP by PID, delete the namespace, remove
    /// the state directory (unless `keep_state`).
    pub fn down(mut self) -> Result<Teardown> {
        self.torn_down = true;
        let r = teardown(
            &self.state.state_dir,
            Some(&self.state.netns),
            self.keep_state,
        );
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        r
    }

    /// What lab.json records.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state.state_dir
    }

    /// Path of the cluster configuration for kd-coord.
    pub fn cluster_yaml(&self) -> PathBuf {
        self.state.state_dir.join("cluster.yaml")
    }

    /// HTTP root; per-node iPXE profiles go to `<http_root>/nodes/<mac-hexhyp>.ipxe`.
    pub fn http_root(&self) -> PathBuf {
        self.state.state_dir.join("http")
    }

    /// TFTP root.
    pub fn tftp_root(&self) -> PathBuf {
        self.state.state_dir.join("tftp")
    }

    /// URL of the HTTP root as the nodes see it (`http://10.77.0.1:8080`).
    pub fn http_base_url(&self) -> &str {
        &self.state.http_base_url
    }

    /// Network namespace name.
    pub fn netns(&self) -> &str {
        &self.state.netns
    }

    /// Gateway address (where the coordinator listens).
    pub fn gateway(&self) -> &str {
        &self.state.gateway
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeState] {
        &self.state.nodes
    }

    /// One node by name.
    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.state.node(name)
    }

    /// Path of a node's serial console log.
    pub fn console_log(&self, name: &str) -> Result<PathBuf> {
        Ok(PathBuf::from(&self.state.node(name)?.files.log))
    }

    /// Path of the iPXE profile the node boots: `<http_root>/nodes/<mac-hexhyp>.ipxe`.
    pub fn ipxe_profile_path(&self, name: &str) -> Result<PathBuf> {
        let n = self.state.node(name)?;
        Ok(self
            .http_root()
            .join("nodes")
            .join(format!("{}.ipxe", plan::mac_hexhyp(&n.mac))))
    }

    /// A command that runs `program` inside the lab namespace (`ip netns exec NS program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        sys::netns_command(&self.state.netns, &[program])
    }

    /// Run `argv` inside the namespace and collect its output.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let cmd = sys::netns_command(&self.state.netns, argv);
        let desc = sys::describe(&cmd);
        sys::netns_command(&self.state.netns, argv)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Command(format!("{desc}: {e}")))
    }

    /// Run `f` on a thread that entered the lab namespace (sockets it opens live there).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new("/run/netns").join(&self.state.netns);
        let file = File::open(&path).map_err(io_err(&path))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Failed(format!("setns {}: {e}", path.display())))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::Failed("in_netns: thread panicked".into()))?
        })
    }

    /// The virtual BMC: apply `action` to node `name` and return the resulting power state.
    pub fn power(&self, name: &str, action: Action) -> Result<PowerState> {
        power(&self.state, name, action)
    }

    /// Power state and PID of every node.
    pub fn status(&self) -> Vec<NodeStatus> {
        status(&self.state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned && !self.torn_down {
            let _ = teardown(
                &self.state.state_dir,
                Some(&self.state.netns),
                self.keep_state,
            );
        }
        for c in &mut self.children {
            let _ = c.try_wait();
        }
    }
}

fn node_lock(n: &NodeState) -> Result<nix::fcntl::Flock<File>> {
    let p = PathBuf::from(format!("{}.lock", n.files.pidfile));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io_err(&p))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Failed(format!("lock {}: {e}", p.display())))
}

/// The live QEMU PID of a node (pid file, checked against the node's QMP path).
pub fn node_pid(n: &NodeState) -> Option<u32> {
    let pid: u32 = fs::read_to_string(&n.files.pidfile)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    sys::ours(pid, &n.files.qmp).then_some(pid)
}

fn power_state(n: &NodeState) -> PowerState {
    if node_pid(n).is_none() {
        return PowerState::Off;
    }
    match qmp::Qmp::connect(Path::new(&n.files.qmp), QMP_TIMEOUT).and_then(|mut q| q.run_state()) {
        Ok(s) if s == "running" => PowerState::On,
        Ok(s) => PowerState::Other(s),
        Err(e) => PowerState::Other(format!("unknown ({e})")),
    }
}

fn start_node(state: &LabState, n: &NodeState) -> Result<()> {
    let err = Path::new(&n.files.qemu_err);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(err)
        .map_err(io_err(err))?;
    let _ = fs::remove_file(&n.files.pidfile);
    // -daemonize: returns once the VM is set up; the VM is reparented to init.
    let out = sys::netns_command(&state.netns, &n.qemu_argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .status()
        .map_err(|e| Error::Command(format!("qemu for {}: {e}", n.name)))?;
    if !out.success() {
        return Err(Error::Failed(format!(
            "qemu for {} failed ({out}): {}",
            n.name,
            tail(&n.files.qemu_err, 5)
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while node_pid(n).is_none() {
        if Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "qemu for {} wrote no live pid",
                n.name
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn stop_node(n: &NodeState) -> Result<()> {
    let Some(pid) = node_pid(n) else {
        return Ok(());
    };
    if let Ok(q) = qmp::Qmp::connect(Path::new(&n.files.qmp), QMP_TIMEOUT) {
        let _ = q.quit();
    }
    if !sys::wait_gone(pid, Duration::from_secs(10)) {
        sys::stop(pid, Some(&n.files.qmp), Duration::from_secs(5));
    }
    if sys::alive(pid) {
        return Err(Error::Failed(format!(
            "{}: qemu {pid} did not stop",
            n.name
        )));
    }
    Ok(())
}

/// The virtual BMC on a lab's recorded state (what `kd-lab power` runs).
pub fn power(state: &LabState, name: &str, action: Action) -> Result<PowerState> {
    let n = state.node(name)?;
    let _lock = node_lock(n)?;
    match action {
        Action::Status => {}
        Action::On => {
            if node_pid(n).is_none() {
                start_node(state, n)?;
            }
        }
        Action::Off => stop_node(n)?,
        Action::Cycle => {
            stop_node(n)?;
            start_node(state, n)?;
        }
        Action::Reset => {
            if node_pid(n).is_none() {
                return Err(Error::NodeOff(name.to_string()));
            }
            qmp::Qmp::connect(Path::new(&n.files.qmp), QMP_TIMEOUT)?.execute("system_reset")?;
        }
    }
    Ok(power_state(n))
}

/// Power state of every node of a lab.
pub fn status(state: &LabState) -> Vec<NodeStatus> {
    state
        .nodes
        .iter()
        .map(|n| NodeStatus {
            name: n.name.clone(),
            ip: n.ip.clone(),
            mac: n.mac.clone(),
            power: power_state(n),
            pid: node_pid(n),
        })
        .collect()
}

/// What [`teardown`] found and removed.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Processes stopped (PIDs).
    pub stopped: Vec<u32>,
    /// Whether a namespace was deleted.
    pub netns_deleted: bool,
    /// Whether the state directory was removed.
    pub state_removed: bool,
    /// Processes found in the namespace that kd-lab did not start (left running).
    pub left_running: Vec<u32>,
}

/// Whether a command line is one kd-lab starts (QEMU node, dnsmasq, HTTP server).
fn started_by_lab(cmdline: &str, state_dir: &str) -> bool {
    (!state_dir.is_empty() && cmdline.contains(state_dir))
        || (cmdline.starts_with("qemu-system-x86_64 -name node") && cmdline.contains(".qmp"))
        || (cmdline.starts_with("dnsmasq -k --conf-file=") && cmdline.contains("dnsmasq.conf"))
        || (cmdline.contains("kd-lab http --root ") && cmdline.contains("--ready-file"))
}

/// Remove a lab, also after a crash: stop its recorded processes (verified by command
/// line), then the lab's processes left in its namespace, delete the namespace, remove the state
/// directory (only if it holds a `lab.json`, unless `keep_state`). Idempotent. Processes in
/// the namespace that kd-lab did not start are left running and reported.
pub fn teardown(state_dir: &Path, netns: Option<&str>, keep_state: bool) -> Result<Teardown> {
    let mut report = Teardown::default();
    let state = LabState::load(state_dir).ok();
    let sd = match &state {
        Some(st) => st.state_dir.display().to_string(),
        None => state_dir
            .canonicalize()
            .unwrap_or_else(|_| state_dir.to_path_buf())
            .display()
            .to_string(),
    };
    let grace = Duration::from_secs(5);
    if let Some(st) = &state {
        for n in &st.nodes {
            if let Some(pid) = node_pid(n) {
                if sys::stop(pid, Some(&n.files.qmp), grace) {
                    report.stopped.push(pid);
                }
            }
        }
        for pid in [st.http_pid, st.dnsmasq_pid].into_iter().flatten() {
            if sys::stop(pid, Some(&sd), grace) {
                report.stopped.push(pid);
            }
        }
    }
    let ns = netns
        .map(str::to_string)
        .or_else(|| state.as_ref().map(|s| s.netns.clone()));
    if let Some(ns) = ns.filter(|n| n.starts_with("kdlab-")) {
        if sys::netns_exists(&ns) {
            // What kd-lab started in its namespace: recognized by command line (the state
            // directory, or the shape of our QEMU / dnsmasq / HTTP command lines). Anything
            // else (a coordinator run with `kd-lab exec`) is left alone and reported.
            for pid in sys::netns_pids(&ns) {
                let cmd = sys::cmdline(pid).unwrap_or_default();
                if started_by_lab(&cmd, &sd) {
                    if sys::stop(pid, Some(&cmd), grace) {
                        report.stopped.push(pid);
                    }
                } else if sys::alive(pid) {
                    report.left_running.push(pid);
                }
            }
            sys::run(Command::new("ip").args(["netns", "del", &ns]))?;
            report.netns_deleted = true;
        }
    }
    if state.is_some() {
        if keep_state {
            let _ = fs::remove_file(LabState::path(state_dir));
        } else {
            fs::remove_dir_all(state_dir).map_err(io_err(state_dir))?;
            report.state_removed = true;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_lab_processes() {
        assert!(started_by_lab(
            "dnsmasq -k --conf-file=/s/dnsmasq.conf",
            "/s"
        ));
        assert!(started_by_lab(
            "qemu-system-x86_64 -name node1 -accel tcg -qmp unix:/x/node1.qmp,server=on",
            "/other"
        ));
        assert!(started_by_lab(
            "/b/kd-lab http --root /x/http --listen 10.77.0.1:8080 --ready-file /x/r",
            "/other"
        ));
        assert!(!started_by_lab("/usr/bin/kd-coord deploy -m node1", "/s"));
        assert!(!started_by_lab("sleep 100", ""));
    }

    #[test]
    fn actions_parse() {
        assert_eq!("cycle".parse::<Action>().unwrap(), Action::Cycle);
        assert!("boom".parse::<Action>().is_err());
        assert_eq!(PowerState::Other("paused".into()).to_string(), "paused");
    }
}
