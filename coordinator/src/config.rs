//! Cluster configuration: nodes, PXE, remote-operation command templates, the deploy kernel,
//! the disk and the workflow's timeouts and retries.
//!
//! The file is YAML (read with `serde_norway`). Everything here is pure: parsing, validation,
//! command-template rendering and PXE-profile rendering are plain functions with no I/O except
//! [`ClusterConfig::load`], which only reads the file.
//!
//! ```yaml
//! cluster: lab                       # cluster name
//! nodes:
//!   - name: node1                    # [A-Za-z0-9][A-Za-z0-9._-]*, unique
//!     address: 10.77.0.101           # IP, unique (IPv4 when profile_naming is ip_hex)
//!     mac: "52:54:00:4d:00:65"       # unique, ':' or '-' separated
//!     rack: r1                       # optional: trees enter each rack (or switch) once
//! pxe:
//!   tftp_root: /srv/kd/tftp
//!   http_root: /srv/kd/http          # optional; required with http_base_url
//!   http_base_url: http://10.77.0.1:8080   # optional; iPXE loads kernels over HTTP from it
//!   profile_naming: ip_hex           # ip_hex | mac | hostname
//!   method: ipxe                     # ipxe (default) | pxelinux
//! commands:                          # HOSTNAME HOSTNAME_SHORT HOSTNAME_FQDN IP MAC RACK CLUSTER
//!   reboot:                          # at least one level
//!     soft: ssh -o BatchMode=yes root@HOSTNAME reboot
//!     hard: kd-lab bmc HOSTNAME reset
//!     very_hard: kd-lab bmc HOSTNAME cycle
//!   power_on:  { hard: kd-lab bmc HOSTNAME on }      # optional; a bare string = soft
//!   power_off: { hard: kd-lab bmc HOSTNAME off }     # optional
//!   power_status: kd-lab bmc HOSTNAME status         # optional
//!   console: tail -f /var/lib/kd-lab/HOSTNAME.log    # optional
//! coordinator:
//!   address: 10.77.0.1               # what agents connect to (kd.coord=IP:PORT)
//!   port: 7700                       # optional, default 7700
//! deploy_kernel:                     # optional; relative to the served root (http_root or tftp_root)
//!   vmlinuz: boot/vmlinuz            # default
//!   initrd: boot/initramfs.img       # default
//!   params: console=ttyS0            # optional, default "console=ttyS0"; kd.net_threads=1|2|auto
//!                                    # sets the agents' network threads (auto: by NIC speed)
//! disk:
//!   block_device: /dev/vda
//!   layout: {}                       # opaque here; kd-disk owns its type
//! workflow:                          # optional; every key optional (defaults shown); seconds
//!                                    # at most 86400 (1 day), retries at most 10 (kd_proto::bounds)
//!   reboot_window: 10                # reboot commands in flight at once
//!   command_timeout: 60              # s, a reboot/power command is killed after this
//!   probe_delay: 10                  # s after a final reboot before the first port probe
//!   probe_interval: 5                # s between port probes
//!   broadcast_wait: 120              # s the broadcast barrier waits for late nodes
//!   stall_floor: 1                   # s an agent always waits on a silent upstream; beyond it
//!                                    # a silence of 4 recent chunk intervals counts as lost
//!   stall_timeout: 30                # s it waits at most (and for the first data)
//!   agent_silence: 6                 # s without a packet before an agent counts as lost
//!                                    # (keep-alives every 2 s; TCG labs want more)
//!   set_deployment_env: { timeout: 300, retries: 2 }   # timeout = reboot to agent Hello
//!   prepare:            { timeout: 120, retries: 1 }
//!   broadcast:          { timeout: 900, retries: 1 }
//!   finish:             { timeout: 300, retries: 1 }
//!   boot_new_env:       { timeout: 300, retries: 2 }   # timeout = reboot to port open
//! check_port: 22                     # optional, the deployed OS answers here
//! boot: reboot                       # optional; how nodes leave the deploy initrd for the
//!                                    # deployed system (BootNewEnv): reboot (default: the
//!                                    # firmware boots the disk) or kexec (the agent kexecs the
//!                                    # environment's kernel, Kadeploy's fast path; a failed
//!                                    # kexec falls back to the reboot, a node that does not
//!                                    # answer after it gets the reboot commands, soft first)
//! ```
//!
//! Short forms (what `kd-lab` writes) are accepted too: `name:` for `cluster:`,
//! `coordinator_address: IP` for `coordinator: {address: IP}`, `disk: /dev/vda`.
//!
//! Profiles: iPXE reads `nodes/<id>.ipxe` under the served root (`boot.ipxe`, see
//! [`ClusterConfig::ipxe_chain_script`], chains into it), pxelinux reads
//! `pxelinux.cfg/<id>` under `tftp_root`; see [`profile_file_name`].

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration (or an environment description) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The YAML does not parse or does not have the expected shape (message names the field
    /// and the line).
    #[error("{0}")]
    Syntax(String),
    /// A field has a value that is not allowed.
    #[error("{}", located(.line, .field, .message))]
    Invalid {
        /// Dotted path of the field (`nodes[2].mac`).
        field: String,
        /// 1-based line of the field in the file, when it could be found.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

fn located(line: &Option<usize>, field: &str, message: &str) -> String {
    match line {
        Some(l) => format!("line {l}: {field}: {message}"),
        None => format!("{field}: {message}"),
    }
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `field`, with its line looked up in `text`.
    pub(crate) fn invalid(text: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_string(),
            line: yaml_field_line(text, field),
            message: message.into(),
        }
    }
}

/// The whole cluster configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name.
    pub cluster: String,
    /// The nodes.
    pub nodes: Vec<NodeConfig>,
    /// Where and how PXE profiles are written.
    pub pxe: PxeConfig,
    /// Remote-operation command templates.
    pub commands: Commands,
    /// Where agents reach the coordinator.
    pub coordinator: CoordinatorConfig,
    /// The deploy kernel and initrd.
    pub deploy_kernel: DeployKernel,
    /// The target disk.
    pub disk: DiskConfig,
    /// Timeouts, retries and windows of the deployment workflow.
    #[serde(default)]
    pub workflow: WorkflowConfig,
    /// TCP port on which the deployed OS answers (22 by default).
    #[serde(default = "default_check_port")]
    pub check_port: u16,
    /// How nodes boot the deployed system at the end (BootNewEnv): `reboot` (default) or
    /// `kexec`.
    #[serde(default, skip_serializing_if = "NewEnvBoot::is_reboot")]
    pub boot: NewEnvBoot,
}

fn default_check_port() -> u16 {
    22
}

/// How a deployed node leaves the deploy initrd for the deployed system (`boot:` in the
/// cluster configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewEnvBoot {
    /// The agent reboots the node; the firmware boots the local disk (GRUB).
    #[default]
    Reboot,
    /// The agent kexecs into the environment's kernel (no firmware, no PXE); when that fails
    /// it reboots, and a node that does not answer gets the reboot commands.
    Kexec,
}

impl NewEnvBoot {
    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        match self {
            NewEnvBoot::Reboot => "reboot",
            NewEnvBoot::Kexec => "kexec",
        }
    }

    /// Parses the YAML name.
    pub fn parse(s: &str) -> Option<Self> {
        [NewEnvBoot::Reboot, NewEnvBoot::Kexec]
            .into_iter()
            .find(|b| b.as_str() == s)
    }

    fn is_reboot(&self) -> bool {
        *self == NewEnvBoot::Reboot
    }
}

/// What [`ClusterConfig::parse`] reads: the canonical form plus `kd-lab`'s short forms.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterConfig {
    #[serde(alias = "name")]
    cluster: String,
    nodes: Vec<NodeConfig>,
    pxe: PxeConfig,
    commands: Commands,
    #[serde(default)]
    coordinator: Option<CoordinatorConfig>,
    #[serde(default)]
    coordinator_address: Option<IpAddr>,
    #[serde(default)]
    deploy_kernel: Option<DeployKernel>,
    disk: DiskConfig,
    #[serde(default)]
    workflow: WorkflowConfig,
    #[serde(default = "default_check_port")]
    check_port: u16,
    /// Read as text: a bad value gets kd's own message (field, line, the allowed values).
    #[serde(default)]
    boot: Option<serde_norway::Value>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Host name (also used in file names and commands).
    pub name: String,
    /// IP address of its deploy/boot interface.
    pub address: IpAddr,
    /// MAC address of that interface (normalised to lowercase `aa:bb:..` by validation).
    pub mac: String,
    /// Rack or switch label (topology-aware trees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
}

/// How PXE profile files are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileNaming {
    /// The IPv4 address in hex (`0A4D0066`), pxelinux's first lookup.
    IpHex,
    /// `01-` followed by the MAC with dashes (`01-52-54-00-4d-00-65`).
    Mac,
    /// The node name.
    Hostname,
}

/// Which network bootloader reads the profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootMethod {
    /// iPXE scripts (`nodes/<id>.ipxe`), kernels over HTTP when `http_base_url` is set.
    Ipxe,
    /// pxelinux configs (`pxelinux.cfg/<id>`) over TFTP.
    Pxelinux,
}

/// PXE settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeConfig {
    /// Root of the TFTP server.
    pub tftp_root: PathBuf,
    /// Root of the HTTP server that serves `http_base_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_root: Option<PathBuf>,
    /// URL of `http_root` as nodes see it (`http://10.77.0.1:8080`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_base_url: Option<String>,
    /// Profile file naming.
    pub profile_naming: ProfileNaming,
    /// Bootloader (default `ipxe`).
    #[serde(default = "default_method")]
    pub method: BootMethod,
}

fn default_method() -> BootMethod {
    BootMethod::Ipxe
}

/// Escalation level of a remote operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// A clean reboot (ssh, or the agent itself).
    Soft,
    /// A reset through the BMC.
    Hard,
    /// A power cycle.
    VeryHard,
}

impl Level {
    /// All levels, in escalation order.
    pub const ALL: [Level; 3] = [Level::Soft, Level::Hard, Level::VeryHard];

    /// The YAML name of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Soft => "soft",
            Level::Hard => "hard",
            Level::VeryHard => "very_hard",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Command templates for the three levels of one operation (each optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelCommands {
    /// Soft variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<String>,
    /// Hard variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<String>,
    /// Very hard variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub very_hard: Option<String>,
}

impl LevelCommands {
    /// The template of one level.
    pub fn get(&self, level: Level) -> Option<&str> {
        match level {
            Level::Soft => self.soft.as_deref(),
            Level::Hard => self.hard.as_deref(),
            Level::VeryHard => self.very_hard.as_deref(),
        }
    }

    /// The levels that have a template, in escalation order.
    pub fn levels(&self) -> Vec<Level> {
        Level::ALL
            .into_iter()
            .filter(|l| self.get(*l).is_some())
            .collect()
    }
}

/// `op: COMMAND` (one command, used as the soft level) or `op: {soft: .., hard: ..}`.
fn de_levels<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LevelCommands, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = LevelCommands;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a command or a mapping of soft, hard, very_hard commands")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LevelCommands, E> {
            Ok(LevelCommands {
                soft: Some(v.to_string()),
                ..LevelCommands::default()
            })
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            map: A,
        ) -> Result<LevelCommands, A::Error> {
            LevelCommands::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
}

/// Remote operations on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Reboot.
    Reboot,
    /// Power on.
    PowerOn,
    /// Power off.
    PowerOff,
}

impl Operation {
    /// Its key under `commands:` in the cluster configuration.
    pub fn key(self) -> &'static str {
        match self {
            Operation::Reboot => "reboot",
            Operation::PowerOn => "power_on",
            Operation::PowerOff => "power_off",
        }
    }

    /// Its name in messages.
    pub fn words(self) -> &'static str {
        match self {
            Operation::Reboot => "reboot",
            Operation::PowerOn => "power on",
            Operation::PowerOff => "power off",
        }
    }
}

/// Command templates of the cluster's remote operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commands {
    /// Reboot, per level (at least one).
    #[serde(deserialize_with = "de_levels")]
    pub reboot: LevelCommands,
    /// Power on, per level.
    #[serde(default, deserialize_with = "de_levels")]
    pub power_on: LevelCommands,
    /// Power off, per level.
    #[serde(default, deserialize_with = "de_levels")]
    pub power_off: LevelCommands,
    /// Prints the power status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_status: Option<String>,
    /// Attaches to the node's console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

impl Commands {
    /// The templates of one operation.
    pub fn of(&self, op: Operation) -> &LevelCommands {
        match op {
            Operation::Reboot => &self.reboot,
            Operation::PowerOn => &self.power_on,
            Operation::PowerOff => &self.power_off,
        }
    }
}

/// Where agents reach the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address as seen from the nodes.
    pub address: IpAddr,
    /// UDP port of the coordinator's QUIC endpoint.
    #[serde(default = "default_coord_port")]
    pub port: u16,
}

fn default_coord_port() -> u16 {
    7700
}

impl CoordinatorConfig {
    /// `address:port`.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// The deploy kernel and initrd, relative to the served root (`http_root` when iPXE loads
/// over HTTP, `tftp_root` otherwise). Default: `boot/vmlinuz`, `boot/initramfs.img` (where
/// `kd-lab` puts `initrd/build.sh`'s output), `console=ttyS0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployKernel {
    /// Kernel image.
    pub vmlinuz: String,
    /// Initramfs.
    pub initrd: String,
    /// Kernel parameters before the `kd.*` ones.
    #[serde(default = "default_params")]
    pub params: String,
}

fn default_params() -> String {
    "console=ttyS0".to_string()
}

impl Default for DeployKernel {
    fn default() -> Self {
        DeployKernel {
            vmlinuz: "boot/vmlinuz".into(),
            initrd: "boot/initramfs.img".into(),
            params: default_params(),
        }
    }
}

/// The target disk. In YAML either a mapping or just the block device (`disk: /dev/vda`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskConfig {
    /// Block device to deploy to (`/dev/vda`).
    pub block_device: String,
    /// Partition layout, interpreted by `kd-disk` (`null` when not given).
    #[serde(default)]
    pub layout: serde_norway::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskConfigMap {
    block_device: String,
    #[serde(default)]
    layout: serde_norway::Value,
}

impl<'de> Deserialize<'de> for DiskConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DiskConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a block device path or a mapping with block_device and layout")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DiskConfig, E> {
                Ok(DiskConfig {
                    block_device: v.to_string(),
                    layout: serde_norway::Value::Null,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DiskConfig, A::Error> {
                let m =
                    DiskConfigMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(DiskConfig {
                    block_device: m.block_device,
                    layout: m.layout,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Timeout and retries of one macro-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepPolicy {
    /// Seconds (for the reboot steps: from a successful reboot command to the answer).
    pub timeout: u64,
    /// Attempts after the first one.
    pub retries: u32,
}

impl StepPolicy {
    /// The timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

/// Timeouts, retries and windows of the deployment workflow (seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkflowConfig {
    /// Reboot/power commands in flight at once, over the whole deployment.
    pub reboot_window: usize,
    /// A reboot/power command that runs longer is killed and counts as failed.
    pub command_timeout: u64,
    /// Delay between a reboot into the deployed OS and the first port probe.
    pub probe_delay: u64,
    /// Delay between two port probes.
    pub probe_interval: u64,
    /// How long the broadcast barrier waits, after the first node is ready, for the others.
    pub broadcast_wait: u64,
    /// Shortest wait of an agent on a silent upstream (beyond it, a silence is judged against
    /// the stream's recent chunk interval: `kd_proto::upstream`).
    pub stall_floor: u64,
    /// Longest wait of an agent on a silent upstream, and its wait for the first data.
    pub stall_timeout: u64,
    /// An agent that sent no packet for this long (its keep-alives come every 2 s) is lost: its
    /// children move at once.
    pub agent_silence: u64,
    /// SetDeploymentEnv: PXE deploy profile, reboot (escalating), agent Hello.
    pub set_deployment_env: StepPolicy,
    /// Prepare: partition, mkfs, mount.
    pub prepare: StepPolicy,
    /// Broadcast: receive and write the image.
    pub broadcast: StepPolicy,
    /// Finish: post-installs, key, bootloader.
    pub finish: StepPolicy,
    /// BootNewEnv: PXE local profile, reboot, the deployed OS answers on `check_port`.
    pub boot_new_env: StepPolicy,
}

impl Default for WorkflowConfig {
    /// Defaults sized for a TCG (no KVM) lab.
    fn default() -> Self {
        WorkflowConfig {
            reboot_window: 10,
            command_timeout: 60,
            probe_delay: 10,
            probe_interval: 5,
            broadcast_wait: 120,
            stall_floor: 1,
            stall_timeout: 30,
            agent_silence: 6,
            set_deployment_env: StepPolicy {
                timeout: 300,
                retries: 2,
            },
            prepare: StepPolicy {
                timeout: 120,
                retries: 1,
            },
            broadcast: StepPolicy {
                timeout: 900,
                retries: 1,
            },
            finish: StepPolicy {
                timeout: 300,
                retries: 1,
            },
            boot_new_env: StepPolicy {
                timeout: 300,
                retries: 2,
            },
        }
    }
}

impl ClusterConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates YAML text. MAC addresses are normalised to lowercase `aa:bb:..`.
    ///
    /// Besides the canonical form (what [`ClusterConfig::to_yaml`] writes), it accepts the
    /// short forms `kd-lab` writes: `name:` for `cluster:`, `coordinator_address: IP` for
    /// `coordinator: {address: IP}`, `disk: /dev/vda`, `power_on: COMMAND` (soft level), and no
    /// `deploy_kernel` (the default one).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawClusterConfig =
            serde_norway::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let coordinator = match (raw.coordinator, raw.coordinator_address) {
            (Some(c), None) => c,
            (None, Some(address)) => CoordinatorConfig {
                address,
                port: default_coord_port(),
            },
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    text,
                    "coordinator_address",
                    "give either coordinator or coordinator_address, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::Invalid {
                    field: "coordinator".into(),
                    line: None,
                    message: "missing: the address agents connect to (coordinator: {address: IP, port: PORT})".into(),
                })
            }
        };
        let boot = match &raw.boot {
            None | Some(serde_norway::Value::Null) => NewEnvBoot::default(),
            Some(v) => v.as_str().and_then(NewEnvBoot::parse).ok_or_else(|| {
                let shown = v
                    .as_str()
                    .map(|s| format!("{s:?}"))
                    .or_else(|| {
                        serde_norway::to_string(v)
                            .ok()
                            .map(|t| t.trim().to_string())
                    })
                    .unwrap_or_default();
                ConfigError::invalid(
                    text,
                    "boot",
                    format!("unknown boot method {shown}: reboot (the default) or kexec"),
                )
            })?,
        };
        let mut cfg = ClusterConfig {
            cluster: raw.cluster,
            nodes: raw.nodes,
            pxe: raw.pxe,
            commands: raw.commands,
            coordinator,
            deploy_kernel: raw.deploy_kernel.unwrap_or_default(),
            disk: raw.disk,
            workflow: raw.workflow,
            check_port: raw.check_port,
            boot,
        };
        cfg.validate(text)?;
        Ok(cfg)
    }

    /// Serialises to YAML (what `kd-lab` writes).
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_norway::to_string(self).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Checks every rule; `text` is only used to find line numbers (may be empty).
    pub fn validate(&mut self, text: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, msg: String| Err(ConfigError::invalid(text, field, msg));
        if !is_valid_name(&self.cluster) {
            return bad(
                "cluster",
                format!("invalid cluster name {:?}", self.cluster),
            );
        }
        if self.nodes.is_empty() {
            return bad("nodes", "the cluster has no nodes".into());
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut macs: HashMap<String, usize> = HashMap::new();
        let mut ips: HashMap<IpAddr, usize> = HashMap::new();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            match normalize_mac(&node.mac) {
                Some(m) => node.mac = m,
                None => {
                    return bad(
                        &format!("nodes[{i}].mac"),
                        format!("invalid MAC address {:?} of {}", node.mac, node.name),
                    )
                }
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if !is_valid_name(&node.name) {
                return bad(
                    &format!("nodes[{i}].name"),
                    format!(
                        "invalid node name {:?} (letters, digits, '.', '_', '-'; starts with a letter or digit)",
                        node.name
                    ),
                );
            }
            if let Some(rack) = &node.rack {
                if !is_valid_name(rack) {
                    return bad(
                        &format!("nodes[{i}].rack"),
                        format!("invalid rack {rack:?}"),
                    );
                }
            }
            if let Some(j) = names.insert(node.name.clone(), i) {
                return bad(
                    &format!("nodes[{i}].name"),
                    format!("duplicate node name {} (also nodes[{j}])", node.name),
                );
            }
            if let Some(j) = macs.insert(node.mac.clone(), i) {
                return bad(
                    &format!("nodes[{i}].mac"),
                    format!(
                        "duplicate MAC {} of {} (also {})",
                        node.mac, node.name, self.nodes[j].name
                    ),
                );
            }
            if let Some(j) = ips.insert(node.address, i) {
                return bad(
                    &format!("nodes[{i}].address"),
                    format!(
                        "duplicate address {} of {} (also {})",
                        node.address, node.name, self.nodes[j].name
                    ),
                );
            }
            if self.pxe.profile_naming == ProfileNaming::IpHex && !node.address.is_ipv4() {
                return bad(
                    &format!("nodes[{i}].address"),
                    format!(
                        "{} has an IPv6 address but profile_naming is ip_hex",
                        node.name
                    ),
                );
            }
        }
        if self.pxe.http_base_url.is_some() && self.pxe.http_root.is_none() {
            return bad(
                "pxe.http_root",
                "missing: http_base_url is set, so kd needs the directory it serves".into(),
            );
        }
        if let Some(url) = &self.pxe.http_base_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(
                    "pxe.http_base_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                );
            }
        }
        for (field, v) in [
            ("deploy_kernel.vmlinuz", &self.deploy_kernel.vmlinuz),
            ("deploy_kernel.initrd", &self.deploy_kernel.initrd),
        ] {
            if !is_served_relpath(v) {
                return bad(
                    field,
                    format!("{v:?} must be a relative path under the served root, without '..' or spaces"),
                );
            }
        }
        if self.deploy_kernel.params.contains('\n') {
            return bad("deploy_kernel.params", "must be on one line".into());
        }
        if self.disk.block_device.is_empty() || !self.disk.block_device.starts_with("/dev/") {
            return bad(
                "disk.block_device",
                format!("{:?} is not a /dev path", self.disk.block_device),
            );
        }
        // kd-disk reads the layout from its YAML text: it must be writable as YAML (no
        // mapping or sequence as a mapping key).
        if let Err(e) = serde_norway::to_string(&self.disk.layout) {
            return bad(
                "disk.layout",
                format!("cannot be written as YAML ({e}): mapping keys must be plain values"),
            );
        }
        if self.commands.reboot.levels().is_empty() {
            return bad(
                "commands.reboot",
                "no reboot command: give at least one of soft, hard, very_hard".into(),
            );
        }
        let mut templates: Vec<(String, &str)> = Vec::new();
        for (opname, op) in [
            ("reboot", &self.commands.reboot),
            ("power_on", &self.commands.power_on),
            ("power_off", &self.commands.power_off),
        ] {
            for level in Level::ALL {
                if let Some(t) = op.get(level) {
                    templates.push((format!("commands.{opname}.{level}"), t));
                }
            }
        }
        if let Some(t) = &self.commands.power_status {
            templates.push(("commands.power_status".into(), t));
        }
        if let Some(t) = &self.commands.console {
            templates.push(("commands.console".into(), t));
        }
        for (field, t) in templates {
            if let Err(msg) = check_template(t) {
                return bad(&field, msg);
            }
        }
        if self.coordinator.port == 0 {
            return bad("coordinator.port", "must not be 0".into());
        }
        if self.check_port == 0 {
            return bad("check_port", "must not be 0".into());
        }
        let w = &self.workflow;
        if w.reboot_window == 0 {
            return bad("workflow.reboot_window", "must be at least 1".into());
        }
        // Every timeout and retry count within kd_proto::bounds (a huge one would overflow the
        // workflow's clock arithmetic).
        let mut secs: Vec<(String, u64, u64)> = vec![
            ("workflow.command_timeout".into(), w.command_timeout, 1),
            ("workflow.probe_delay".into(), w.probe_delay, 0),
            ("workflow.probe_interval".into(), w.probe_interval, 1),
            ("workflow.broadcast_wait".into(), w.broadcast_wait, 0),
            ("workflow.stall_floor".into(), w.stall_floor, 1),
            ("workflow.stall_timeout".into(), w.stall_timeout, 1),
            // Two keep-alives (2 s apart) and a margin at least.
            ("workflow.agent_silence".into(), w.agent_silence, 5),
        ];
        let mut retries = Vec::new();
        for (name, p) in [
            ("set_deployment_env", w.set_deployment_env),
            ("prepare", w.prepare),
            ("broadcast", w.broadcast),
            ("finish", w.finish),
            ("boot_new_env", w.boot_new_env),
        ] {
            secs.push((format!("workflow.{name}.timeout"), p.timeout, 1));
            retries.push((format!("workflow.{name}.retries"), p.retries));
        }
        for (field, value, min) in secs {
            if let Err(m) = kd_proto::bounds::check_secs(value, min) {
                return bad(&field, m);
            }
        }
        if w.stall_floor > w.stall_timeout {
            return bad(
                "workflow.stall_floor",
                format!(
                    "{} s is more than workflow.stall_timeout ({} s)",
                    w.stall_floor, w.stall_timeout
                ),
            );
        }
        for (field, value) in retries {
            if let Err(m) = kd_proto::bounds::check_retries(value) {
                return bad(&field, m);
            }
        }
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The command for `op` at `level` on `node`, rendered; `None` when that level has no
    /// template.
    pub fn command(&self, op: Operation, level: Level, node: &NodeConfig) -> Option<String> {
        self.commands
            .of(op)
            .get(level)
            .map(|t| render_template(t, node, &self.cluster))
    }

    /// The power status command of `node`, rendered; `None` when the cluster has none.
    pub fn power_status_command(&self, node: &NodeConfig) -> Option<String> {
        self.commands
            .power_status
            .as_ref()
            .map(|t| render_template(t, node, &self.cluster))
    }

    /// The directory profiles and boot files are served from: `http_root` when iPXE loads over
    /// HTTP, `tftp_root` otherwise.
    pub fn served_root(&self) -> &Path {
        match (
            &self.pxe.method,
            &self.pxe.http_root,
            &self.pxe.http_base_url,
        ) {
            (BootMethod::Ipxe, Some(root), Some(_)) => root,
            _ => &self.pxe.tftp_root,
        }
    }

    /// The profile of `node`: where it goes and what it says.
    pub fn render_profile(&self, node: &NodeConfig, boot: &ProfileBoot<'_>) -> PxeProfile {
        let rel = profile_file_name(self.pxe.method, self.pxe.profile_naming, node);
        let path = self.served_root().join(&rel);
        let content = match (self.pxe.method, boot) {
            (BootMethod::Ipxe, ProfileBoot::Deploy(args)) => ipxe_deploy_script(
                &node.name,
                &self.boot_url(&self.deploy_kernel.vmlinuz),
                &self.boot_url(&self.deploy_kernel.initrd),
                &self.deploy_cmdline(node, args),
            ),
            (BootMethod::Ipxe, ProfileBoot::LocalDisk) => ipxe_local_script(&node.name),
            (BootMethod::Pxelinux, ProfileBoot::Deploy(args)) => pxelinux_deploy_config(
                &node.name,
                &self.deploy_kernel.vmlinuz,
                &self.deploy_kernel.initrd,
                &self.deploy_cmdline(node, args),
            ),
            (BootMethod::Pxelinux, ProfileBoot::LocalDisk) => pxelinux_local_config(&node.name),
        };
        PxeProfile {
            relative_path: rel,
            path,
            content,
        }
    }

    /// The deploy kernel's command line for `node`:
    /// `PARAMS kd.coord=IP:PORT kd.pin=HEX kd.node=NAME kd.token=T`.
    pub fn deploy_cmdline(&self, node: &NodeConfig, args: &DeployArgs) -> String {
        let kd = format!(
            "kd.coord={} kd.pin={} kd.node={} kd.token={}",
            self.coordinator.socket_addr(),
            args.pin_hex,
            node.name,
            args.token
        );
        let params = self.deploy_kernel.params.trim();
        if params.is_empty() {
            kd
        } else {
            format!("{params} {kd}")
        }
    }

    /// The URL (iPXE) of a file under the served root.
    fn boot_url(&self, rel: &str) -> String {
        match &self.pxe.http_base_url {
            Some(base) => format!("{}/{}", base.trim_end_matches('/'), rel),
            None => format!("/{rel}"),
        }
    }

    /// The iPXE script every node chains into first (served as `boot.ipxe`): it loads the
    /// node's own profile, named after `profile_naming`.
    pub fn ipxe_chain_script(&self) -> String {
        let id = match self.pxe.profile_naming {
            ProfileNaming::IpHex => "${netX/ip:hexraw}",
            ProfileNaming::Mac => "${netX/mac:hexhyp}",
            ProfileNaming::Hostname => "${hostname}",
        };
        let base = match &self.pxe.http_base_url {
            Some(base) => base.trim_end_matches('/').to_string(),
            None => String::new(),
        };
        format!(
            "#!ipxe\n# kd: chain into this node's own profile\nchain {base}/nodes/{id}.ipxe || goto failed\n:failed\necho kd: no profile for this node, booting from disk\nsanboot --no-describe --drive 0x80 || exit\n"
        )
    }
}

/// What the deploy profile needs from the coordinator's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployArgs {
    /// SHA-256 of the coordinator's certificate, 64 lowercase hex digits.
    pub pin_hex: String,
    /// This node's one-time token.
    pub token: String,
}

impl DeployArgs {
    /// Checks the pin (64 hex digits) and the token (1–128 of `[A-Za-z0-9_-]`).
    pub fn new(pin_hex: &str, token: &str) -> Result<Self, ConfigError> {
        if pin_hex.len() != 64 || !pin_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::Invalid {
                field: "kd.pin".into(),
                line: None,
                message: "must be 64 hex digits".into(),
            });
        }
        if !is_valid_token(token) {
            return Err(ConfigError::Invalid {
                field: "kd.token".into(),
                line: None,
                message: "must be 1-128 of [A-Za-z0-9_-]".into(),
            });
        }
        Ok(DeployArgs {
            pin_hex: pin_hex.to_ascii_lowercase(),
            token: token.to_string(),
        })
    }
}

/// Which profile to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileBoot<'a> {
    /// Boot the deploy kernel + initrd with these `kd.*` arguments.
    Deploy(&'a DeployArgs),
    /// Boot from the local disk.
    LocalDisk,
}

/// A rendered profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeProfile {
    /// Path relative to the served root (`pxelinux.cfg/0A4D0066`, `nodes/0a4d0066.ipxe`).
    pub relative_path: String,
    /// Absolute path to write.
    pub path: PathBuf,
    /// File content.
    pub content: String,
}

/// The profile file name of `node`, relative to the served root.
///
/// pxelinux: `pxelinux.cfg/0A4D0066`, `pxelinux.cfg/01-52-54-00-4d-00-65`, `pxelinux.cfg/node1`.
/// iPXE: `nodes/0a4d0066.ipxe` (lowercase: iPXE's `:hexraw`), `nodes/52-54-00-4d-00-65.ipxe`
/// (iPXE's `:hexhyp`, as `kd-lab`'s `boot.ipxe` chains), `nodes/node1.ipxe`.
pub fn profile_file_name(method: BootMethod, naming: ProfileNaming, node: &NodeConfig) -> String {
    let mac = node.mac.to_ascii_lowercase().replace(':', "-");
    match (method, naming) {
        (BootMethod::Pxelinux, ProfileNaming::IpHex) => {
            format!("pxelinux.cfg/{}", ip_hex(node.address))
        }
        (BootMethod::Pxelinux, ProfileNaming::Mac) => format!("pxelinux.cfg/01-{mac}"),
        (BootMethod::Pxelinux, ProfileNaming::Hostname) => format!("pxelinux.cfg/{}", node.name),
        (BootMethod::Ipxe, ProfileNaming::IpHex) => {
            format!("nodes/{}.ipxe", ip_hex(node.address).to_ascii_lowercase())
        }
        (BootMethod::Ipxe, ProfileNaming::Mac) => format!("nodes/{mac}.ipxe"),
        (BootMethod::Ipxe, ProfileNaming::Hostname) => format!("nodes/{}.ipxe", node.name),
    }
}

/// An IPv4 address as 8 uppercase hex digits (`10.77.0.102` → `0A4D0066`); IPv6 as 32.
pub fn ip_hex(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|b| format!("{b:02X}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|b| format!("{b:02X}")).collect(),
    }
}

/// iPXE script booting the deploy kernel.
pub fn ipxe_deploy_script(node: &str, kernel_url: &str, initrd_url: &str, cmdline: &str) -> String {
    let initrd_name = initrd_url.rsplit('/').next().unwrap_or(initrd_url);
    format!(
        "#!ipxe\n# kd: deploy environment for {node}\nkernel {kernel_url} initrd={initrd_name} {cmdline}\ninitrd {initrd_url}\nboot\n"
    )
}

/// iPXE script booting the first local disk (falls back to the firmware's next boot device).
pub fn ipxe_local_script(node: &str) -> String {
    format!(
        "#!ipxe\n# kd: local disk boot for {node}\nsanboot --no-describe --drive 0x80 || exit\n"
    )
}

/// pxelinux config booting the deploy kernel.
pub fn pxelinux_deploy_config(node: &str, kernel: &str, initrd: &str, cmdline: &str) -> String {
    format!(
        "# kd: deploy environment for {node}\nDEFAULT kd-deploy\nPROMPT 0\nTIMEOUT 0\nLABEL kd-deploy\n  KERNEL {kernel}\n  APPEND initrd={initrd} {cmdline}\n"
    )
}

/// pxelinux config booting the first local disk.
pub fn pxelinux_local_config(node: &str) -> String {
    format!("# kd: local disk boot for {node}\nDEFAULT kd-local\nPROMPT 0\nTIMEOUT 0\nLABEL kd-local\n  LOCALBOOT 0\n")
}

/// Placeholders a command template may use.
pub const PLACEHOLDERS: [&str; 7] = [
    "HOSTNAME",
    "HOSTNAME_SHORT",
    "HOSTNAME_FQDN",
    "IP",
    "MAC",
    "RACK",
    "CLUSTER",
];

/// Kadeploy placeholders kd does not support (a template using them is refused).
const UNSUPPORTED: [&str; 7] = [
    "DEFAULT_CONNECTOR",
    "NODES",
    "VLAN_ID",
    "WORKFLOW_ID",
    "ENVFILE",
    "NODEFILE",
    "TAKTUK_CONNECTOR",
];

/// Splits a template into words (`[A-Za-z0-9_]+`) and separators.
fn tokens(template: &str) -> Vec<(bool, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_word = false;
    for (i, c) in template.char_indices() {
        let w = c.is_ascii_alphanumeric() || c == '_';
        if i > start && w != in_word {
            out.push((in_word, &template[start..i]));
            start = i;
        }
        in_word = w;
    }
    if start < template.len() {
        out.push((in_word, &template[start..]));
    }
    out
}

/// Refuses templates that use an unknown placeholder: a word that starts with `HOSTNAME` or
/// `GROUP_`, or one of Kadeploy's placeholders kd does not have.
pub fn check_template(template: &str) -> Result<(), String> {
    if template.trim().is_empty() {
        return Err("empty command".into());
    }
    for (word, tok) in tokens(template) {
        if !word || PLACEHOLDERS.contains(&tok) {
            continue;
        }
        if tok.starts_with("HOSTNAME") || tok.starts_with("GROUP_") || UNSUPPORTED.contains(&tok) {
            return Err(format!(
                "unknown placeholder {tok} in {template:?} (known: {})",
                PLACEHOLDERS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Renders a command template for `node`: whole words `HOSTNAME`, `HOSTNAME_FQDN` (the node
/// name), `HOSTNAME_SHORT` (up to the first '.'), `IP`, `MAC`, `RACK` (empty if none) and
/// `CLUSTER` are replaced; everything else is kept.
pub fn render_template(template: &str, node: &NodeConfig, cluster: &str) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    for (word, tok) in tokens(template) {
        if !word {
            out.push_str(tok);
            continue;
        }
        match tok {
            "HOSTNAME" | "HOSTNAME_FQDN" => out.push_str(&node.name),
            "HOSTNAME_SHORT" => out.push_str(node.name.split('.').next().unwrap_or(&node.name)),
            "IP" => out.push_str(&node.address.to_string()),
            "MAC" => out.push_str(&node.mac),
            "RACK" => out.push_str(node.rack.as_deref().unwrap_or("")),
            "CLUSTER" => out.push_str(cluster),
            other => out.push_str(other),
        }
    }
    out
}

/// One-time tokens (kernel parameter `kd.token=`, tokens files): 1–128 of `[A-Za-z0-9_-]`.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Node, rack and cluster names: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 253 bytes.
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `52-54-00-AB-00-01` or `52:54:00:ab:00:01` → `52:54:00:ab:00:01`.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.trim().split([':', '-']).collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

fn is_served_relpath(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.split('/').any(|c| c == ".." || c.is_empty())
        && !p.chars().any(|c| c.is_whitespace())
}

/// The 1-based line where the field at `path` (`nodes[2].mac`, `image.file`) is written in
/// YAML `text`, for error messages. Handles block mappings and block sequences of mappings
/// (the shapes of kd's files); `None` when not found.
pub(crate) fn yaml_field_line(text: &str, path: &str) -> Option<usize> {
    // Path segments: ("nodes", Some(2)), ("mac", None).
    let mut segs: Vec<(String, Option<usize>)> = Vec::new();
    for part in path.split('.') {
        match part.split_once('[') {
            Some((key, rest)) => {
                let idx = rest.trim_end_matches(']').parse().ok()?;
                segs.push((key.to_string(), Some(idx)));
            }
            None => segs.push((part.to_string(), None)),
        }
    }
    // Open mapping keys: column of the key, key, index of its current list item.
    struct Open {
        col: usize,
        key: String,
        item: Option<usize>,
    }
    let mut stack: Vec<Open> = Vec::new();
    for (lineno, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or(raw);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            continue;
        }
        let col = line.len() - trimmed.len();
        let (is_item, key_col, rest) = match trimmed.strip_prefix("- ") {
            Some(r) => (
                true,
                col + 2 + (r.len() - r.trim_start().len()),
                r.trim_start(),
            ),
            None if trimmed == "-" => (true, col + 2, ""),
            None => (false, col, trimmed),
        };
        if is_item {
            // The item belongs to the innermost key at or left of the dash.
            while stack.last().is_some_and(|o| o.col > col) {
                stack.pop();
            }
            if let Some(owner) = stack.last_mut() {
                owner.item = Some(owner.item.map_or(0, |i| i + 1));
            }
        } else {
            while stack.last().is_some_and(|o| o.col >= col) {
                stack.pop();
            }
        }
        let key = match rest.split_once(':') {
            Some((k, _)) if !k.is_empty() && !k.contains(' ') => k.to_string(),
            _ => continue,
        };
        stack.push(Open {
            col: key_col,
            key,
            item: None,
        });
        let keys_match = |n: usize| {
            stack
                .iter()
                .zip(&segs)
                .take(n)
                .all(|(o, (k, idx))| o.key == *k && idx.is_none_or(|want| o.item == Some(want)))
        };
        if stack.len() == segs.len() && keys_match(segs.len()) {
            return Some(lineno + 1);
        }
        // A path ending with an index (`nodes[2]`): the first line of that item.
        if let Some((k, Some(want))) = segs.last() {
            let n = segs.len();
            if is_item
                && stack.len() == n + 1
                && keys_match(n - 1)
                && stack[n - 1].key == *k
                && stack[n - 1].item == Some(*want)
            {
                return Some(lineno + 1);
            }
        }
    }
    None
}

/// The `yaml` example of a module's documentation, from its source text (for the tests that
/// parse it).
#[cfg(test)]
pub(crate) fn documented_yaml(src: &str) -> String {
    src.lines()
        .skip_while(|l| *l != "//! ```yaml")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const LAB: &str = "\
cluster: lab
nodes:
  - name: node1
    address: 10.77.0.101
    mac: 52:54:00:4D:00:65
    rack: r1
  - name: node2
    address: 10.77.0.102
    mac: 52-54-00-4d-00-66
pxe:
  tftp_root: /srv/kd/tftp
  http_root: /srv/kd/http
  http_base_url: http://10.77.0.1:8080/
  profile_naming: ip_hex
  method: ipxe
commands:
  reboot:
    soft: ssh -o BatchMode=yes root@HOSTNAME reboot
    hard: kd-lab bmc --node HOSTNAME reset
    very_hard: kd-lab bmc --node HOSTNAME cycle
  power_off:
    hard: kd-lab bmc --node HOSTNAME off
  power_status: kd-lab bmc --node HOSTNAME_SHORT status # comment
  console: tail -f /var/lib/kd-lab/HOSTNAME.log
coordinator:
  address: 10.77.0.1
deploy_kernel:
  vmlinuz: kd/vmlinuz
  initrd: kd/initrd.img
disk:
  block_device: /dev/vda
  layout:
    table: gpt
workflow:
  reboot_window: 2
  prepare: { timeout: 60, retries: 0 }
";

    fn lab() -> ClusterConfig {
        ClusterConfig::parse(LAB).unwrap()
    }

    fn err(text: &str) -> String {
        ClusterConfig::parse(text).unwrap_err().to_string()
    }

    fn args() -> DeployArgs {
        DeployArgs::new(&"ab".repeat(32), "tok-1").unwrap()
    }

    /// The example in the module documentation parses.
    #[test]
    fn documented_example_parses() {
        let yaml = documented_yaml(include_str!("config.rs"));
        assert!(yaml.len() > 100);
        ClusterConfig::parse(&yaml).unwrap();
    }

    #[test]
    fn parses_with_defaults() {
        let c = lab();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[0].mac, "52:54:00:4d:00:65");
        assert_eq!(c.nodes[1].mac, "52:54:00:4d:00:66");
        assert_eq!(c.coordinator.port, 7700);
        assert_eq!(c.check_port, 22);
        assert_eq!(c.deploy_kernel.params, "console=ttyS0");
        assert_eq!(c.workflow.reboot_window, 2);
        assert_eq!(
            c.workflow.prepare,
            StepPolicy {
                timeout: 60,
                retries: 0
            }
        );
        assert_eq!(c.workflow.broadcast, WorkflowConfig::default().broadcast);
        assert_eq!(c.workflow.set_deployment_env.timeout, 300);
        assert_eq!(c.commands.reboot.levels(), Level::ALL.to_vec());
        assert_eq!(c.commands.power_off.levels(), vec![Level::Hard]);
        // Round trip through YAML.
        let again = ClusterConfig::parse(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    /// The exact shape `kd-lab` writes (lab/README.md).
    const KD_LAB: &str = "\
name: kdlab-77
coordinator_address: 10.77.0.1
disk: /dev/vda
nodes:
- name: node1
  address: 10.77.0.11
  mac: 52:54:00:4d:00:0b
  rack: rack1
- name: node2
  address: 10.77.0.12
  mac: 52:54:00:4d:00:0c
  rack: rack1
pxe:
  tftp_root: /var/lib/kd-lab/77/tftp
  http_root: /var/lib/kd-lab/77/http
  http_base_url: http://10.77.0.1:8080
  profile_naming: mac
commands:
  reboot:
    soft: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME reset
    hard: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME reset
    very_hard: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME cycle
  power_on: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME on
  power_off: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME off
  power_status: /path/kd-lab power --state /var/lib/kd-lab/77 HOSTNAME status
  console: /path/kd-lab console --state /var/lib/kd-lab/77 HOSTNAME
";

    #[test]
    fn reads_kd_lab_short_forms() {
        let c = ClusterConfig::parse(KD_LAB).unwrap();
        assert_eq!(c.cluster, "kdlab-77");
        assert_eq!(c.coordinator.socket_addr().to_string(), "10.77.0.1:7700");
        assert_eq!(c.disk.block_device, "/dev/vda");
        assert_eq!(c.disk.layout, serde_norway::Value::Null);
        assert_eq!(c.pxe.method, BootMethod::Ipxe);
        assert_eq!(c.deploy_kernel, DeployKernel::default());
        assert_eq!(
            c.command(Operation::PowerOff, Level::Soft, &c.nodes[1])
                .unwrap(),
            "/path/kd-lab power --state /var/lib/kd-lab/77 node2 off"
        );
        let p = c.render_profile(&c.nodes[0], &ProfileBoot::Deploy(&args()));
        // Where kd-lab's boot.ipxe chains: <http_root>/nodes/<mac with '-'>.ipxe
        assert_eq!(
            p.path,
            PathBuf::from("/var/lib/kd-lab/77/http/nodes/52-54-00-4d-00-0b.ipxe")
        );
        assert!(p.content.contains(
            "kernel http://10.77.0.1:8080/boot/vmlinuz initrd=initramfs.img console=ttyS0 kd.coord=10.77.0.1:7700 "
        ));
        assert!(p
            .content
            .contains("initrd http://10.77.0.1:8080/boot/initramfs.img\n"));
        // The canonical form round-trips.
        assert_eq!(ClusterConfig::parse(&c.to_yaml().unwrap()).unwrap(), c);
        let e = err(&format!("{KD_LAB}coordinator: {{address: 10.77.0.1}}\n"));
        assert_eq!(
            e,
            "line 2: coordinator_address: give either coordinator or coordinator_address, not both"
        );
        let e = err(&KD_LAB.replace("coordinator_address: 10.77.0.1\n", ""));
        assert!(e.starts_with("coordinator: missing"), "{e}");
    }

    /// `boot:` is reboot by default, kexec when asked; anything else is refused with the field,
    /// its line and the allowed values; only a non-default value is written back.
    #[test]
    fn boot_method_kexec_or_reboot() {
        assert_eq!(lab().boot, NewEnvBoot::Reboot);
        assert!(!lab().to_yaml().unwrap().contains("\nboot:"));
        let c = ClusterConfig::parse(&format!("{LAB}boot: kexec\n")).unwrap();
        assert_eq!(c.boot, NewEnvBoot::Kexec);
        let yaml = c.to_yaml().unwrap();
        assert!(yaml.contains("\nboot: kexec\n"), "{yaml}");
        assert_eq!(ClusterConfig::parse(&yaml).unwrap(), c);
        assert_eq!(
            ClusterConfig::parse(&format!("{LAB}boot: reboot\n"))
                .unwrap()
                .boot,
            NewEnvBoot::Reboot
        );
        // kd-lab's short form takes it too.
        let c = ClusterConfig::parse(&format!("{KD_LAB}boot: kexec\n")).unwrap();
        assert_eq!(c.boot, NewEnvBoot::Kexec);
        assert_eq!(
            err(&format!("{LAB}boot: kexek\n")),
            "line 37: boot: unknown boot method \"kexek\": reboot (the default) or kexec"
        );
        assert_eq!(
            err(&format!("{LAB}boot: [kexec]\n")),
            "line 37: boot: unknown boot method - kexec: reboot (the default) or kexec"
        );
        assert_eq!(
            err(&format!("{LAB}boot: 1\n")),
            "line 37: boot: unknown boot method 1: reboot (the default) or kexec"
        );
    }

    #[test]
    fn renders_commands() {
        let c = lab();
        let n = &c.nodes[0];
        assert_eq!(
            c.command(Operation::Reboot, Level::Soft, n).unwrap(),
            "ssh -o BatchMode=yes root@node1 reboot"
        );
        assert_eq!(c.command(Operation::PowerOn, Level::Hard, n), None);
        let node = NodeConfig {
            name: "gros-3.nancy.grid5000.fr".into(),
            address: "172.16.0.3".parse().unwrap(),
            mac: "00:11:22:33:44:55".into(),
            rack: None,
        };
        assert_eq!(
            render_template(
                "ipmitool -H HOSTNAME_SHORT-bmc.CLUSTER power cycle # IP MAC HOSTNAME_FQDN [RACK] HOSTNAMES $IPX",
                &node,
                "gros"
            ),
            "ipmitool -H gros-3-bmc.gros power cycle # 172.16.0.3 00:11:22:33:44:55 gros-3.nancy.grid5000.fr [] HOSTNAMES $IPX"
        );
    }

    #[test]
    fn refuses_unknown_placeholders() {
        assert!(check_template("ssh root@HOSTNAME reboot").is_ok());
        assert!(check_template("echo system_reset | socat - UNIX:/run/HOSTNAME.qmp").is_ok());
        let e = check_template("ssh root@HOSTNAME_LONG reboot").unwrap_err();
        assert!(e.contains("unknown placeholder HOSTNAME_LONG"), "{e}");
        assert!(check_template("pdu GROUP_PDU off").is_err());
        assert!(check_template("DEFAULT_CONNECTOR HOSTNAME reboot").is_err());
        assert!(check_template("  ").is_err());
        let e = err(&LAB.replace("HOSTNAME reset", "HOSTNAMEX reset"));
        assert_eq!(
            e,
            "line 19: commands.reboot.hard: unknown placeholder HOSTNAMEX in \"kd-lab bmc --node HOSTNAMEX reset\" (known: HOSTNAME, HOSTNAME_SHORT, HOSTNAME_FQDN, IP, MAC, RACK, CLUSTER)"
        );
    }

    #[test]
    fn validation_errors_name_field_and_line() {
        assert_eq!(
            err(&LAB.replace("name: node2", "name: node1")),
            "line 7: nodes[1].name: duplicate node name node1 (also nodes[0])"
        );
        assert_eq!(
            err(&LAB.replace("52-54-00-4d-00-66", "52:54:00:4d:00:65")),
            "line 9: nodes[1].mac: duplicate MAC 52:54:00:4d:00:65 of node2 (also node1)"
        );
        assert_eq!(
            err(&LAB.replace("10.77.0.102", "10.77.0.101")),
            "line 8: nodes[1].address: duplicate address 10.77.0.101 of node2 (also node1)"
        );
        assert_eq!(
            err(&LAB.replace("52-54-00-4d-00-66", "52-54-00-4d-00")),
            "line 9: nodes[1].mac: invalid MAC address \"52-54-00-4d-00\" of node2"
        );
        assert_eq!(
            err(&LAB.replace("name: node2", "name: \"node 2\"")),
            "line 7: nodes[1].name: invalid node name \"node 2\" (letters, digits, '.', '_', '-'; starts with a letter or digit)"
        );
        assert_eq!(
            err(&LAB.replace("  http_root: /srv/kd/http\n", "")),
            "pxe.http_root: missing: http_base_url is set, so kd needs the directory it serves"
        );
        assert_eq!(
            err(&LAB.replace("vmlinuz: kd/vmlinuz", "vmlinuz: /srv/kd/vmlinuz")),
            "line 28: deploy_kernel.vmlinuz: \"/srv/kd/vmlinuz\" must be a relative path under the served root, without '..' or spaces"
        );
        assert_eq!(
            err(&format!("{LAB}check_port: 0\n")),
            "line 37: check_port: must not be 0"
        );
        assert_eq!(
            err(&LAB.replace("reboot_window: 2", "reboot_window: 0")),
            "line 35: workflow.reboot_window: must be at least 1"
        );
        let no_reboot = LAB
            .replace("    soft: ssh -o BatchMode=yes root@HOSTNAME reboot\n", "")
            .replace("    hard: kd-lab bmc --node HOSTNAME reset\n", "")
            .replace("    very_hard: kd-lab bmc --node HOSTNAME cycle\n", "");
        assert!(err(&no_reboot).contains("commands.reboot"));
    }

    #[test]
    fn silence_limits_default_to_a_lan_and_are_checked() {
        let c = ClusterConfig::parse(LAB).unwrap();
        assert_eq!(
            (
                c.workflow.stall_floor,
                c.workflow.stall_timeout,
                c.workflow.agent_silence
            ),
            (1, 30, 6)
        );
        let with = |extra: &str| {
            LAB.replace(
                "  reboot_window: 2\n",
                &format!("  reboot_window: 2\n{extra}"),
            )
        };
        let c = ClusterConfig::parse(&with(
            "  stall_floor: 10\n  stall_timeout: 60\n  agent_silence: 30\n",
        ))
        .unwrap();
        assert_eq!(c.workflow.stall_floor, 10);
        assert_eq!(c.workflow.agent_silence, 30);
        let e = err(&with("  stall_floor: 40\n"));
        assert!(
            e.contains("workflow.stall_floor: 40 s is more than workflow.stall_timeout (30 s)"),
            "{e}"
        );
        let e = err(&with("  agent_silence: 4\n"));
        assert!(
            e.contains("workflow.agent_silence") && e.contains("minimum of 5 s"),
            "{e}"
        );
        assert!(err(&with("  stall_floor: 0\n")).contains("workflow.stall_floor"));
    }

    #[test]
    fn huge_timeouts_and_retries_are_refused_with_field_value_and_limit() {
        let huge = u64::MAX;
        for (key, value) in [
            ("command_timeout", huge.to_string()),
            ("probe_delay", huge.to_string()),
            ("probe_interval", "86401".to_string()),
            ("broadcast_wait", huge.to_string()),
            ("stall_floor", huge.to_string()),
            ("stall_timeout", "86401".to_string()),
            ("agent_silence", huge.to_string()),
            (
                "set_deployment_env",
                format!("{{ timeout: {huge}, retries: 1 }}"),
            ),
            ("broadcast", format!("{{ timeout: {huge}, retries: 1 }}")),
            ("finish", "{ timeout: 86401, retries: 1 }".to_string()),
            ("boot_new_env", format!("{{ timeout: {huge}, retries: 1 }}")),
        ] {
            let text = LAB.replace(
                "  reboot_window: 2\n",
                &format!("  reboot_window: 2\n  {key}: {value}\n"),
            );
            let e = err(&text);
            let field = if value.starts_with('{') {
                format!("workflow.{key}.timeout")
            } else {
                format!("workflow.{key}")
            };
            assert!(
                e.contains(&field) && e.contains("limit of 86400 s (1 day)"),
                "{key}: {e}"
            );
            assert!(
                e.contains(&format!(
                    "{} s",
                    value
                        .trim_start_matches("{ timeout: ")
                        .split(',')
                        .next()
                        .unwrap_or("")
                )),
                "{key}: {e}"
            );
        }
        let e = err(&LAB.replace(
            "prepare: { timeout: 60, retries: 0 }",
            &format!("prepare: {{ timeout: 60, retries: {} }}", u32::MAX),
        ));
        assert_eq!(
            e,
            format!(
                "workflow.prepare.retries: {} retries is more than the limit of 10",
                u32::MAX
            )
        );
        // The limits themselves are accepted.
        let ok = LAB.replace(
            "prepare: { timeout: 60, retries: 0 }",
            "prepare: { timeout: 86400, retries: 10 }\n  broadcast_wait: 0\n  probe_delay: 0",
        );
        ClusterConfig::parse(&ok).unwrap();
    }

    /// A layout with a non-scalar mapping key (`? table: gpt`) parsed and validated, but could
    /// not be written back as YAML: `to_yaml` failed, and a deployment failed late with
    /// "layout: expected SCALAR, ..." (found by fuzz/, target cluster-yaml:
    /// fuzz/regressions/cluster-yaml/fd46ef6ecd3620a4.bin).
    #[test]
    fn layout_with_a_complex_key_is_refused() {
        let text = LAB.replace("    table: gpt", "    ? table: gpt");
        assert_ne!(text, LAB);
        let e = err(&text);
        assert!(e.contains("disk.layout"), "{e}");
    }

    #[test]
    fn syntax_errors_name_field_and_line() {
        let e = err(&LAB.replace("method: ipxe", "method: grub"));
        assert!(e.starts_with("pxe.method: unknown variant `grub`"), "{e}");
        assert!(e.contains("line 15"), "{e}");
        let e = err(&LAB.replace("address: 10.77.0.102", "address: 10.77.0.300"));
        assert!(e.contains("nodes[1].address"), "{e}");
        let e = err(&LAB.replace("  layout:", "  layuot:"));
        assert!(e.contains("unknown field `layuot`"), "{e}");
        let e = err(&LAB.replace("deploy_kernel:\n", "deploy_kernel_:\n"));
        assert!(e.contains("unknown field `deploy_kernel_`"), "{e}");
        let e = err("cluster: x\n");
        assert!(e.contains("missing field `nodes`"), "{e}");
    }

    #[test]
    fn ipxe_profiles() {
        let c = lab();
        let p = c.render_profile(&c.nodes[1], &ProfileBoot::Deploy(&args()));
        assert_eq!(p.relative_path, "nodes/0a4d0066.ipxe");
        assert_eq!(p.path, PathBuf::from("/srv/kd/http/nodes/0a4d0066.ipxe"));
        assert_eq!(
            p.content,
            format!(
                "#!ipxe\n# kd: deploy environment for node2\n\
kernel http://10.77.0.1:8080/kd/vmlinuz initrd=initrd.img console=ttyS0 kd.coord=10.77.0.1:7700 kd.pin={} kd.node=node2 kd.token=tok-1\n\
initrd http://10.77.0.1:8080/kd/initrd.img\nboot\n",
                "ab".repeat(32)
            )
        );
        let p = c.render_profile(&c.nodes[1], &ProfileBoot::LocalDisk);
        assert_eq!(p.relative_path, "nodes/0a4d0066.ipxe");
        assert_eq!(
            p.content,
            "#!ipxe\n# kd: local disk boot for node2\nsanboot --no-describe --drive 0x80 || exit\n"
        );
        assert_eq!(
            c.ipxe_chain_script(),
            "#!ipxe\n# kd: chain into this node's own profile\n\
chain http://10.77.0.1:8080/nodes/${netX/ip:hexraw}.ipxe || goto failed\n:failed\n\
echo kd: no profile for this node, booting from disk\n\
sanboot --no-describe --drive 0x80 || exit\n"
        );
    }

    #[test]
    fn ipxe_over_tftp_uses_absolute_paths() {
        let mut c = lab();
        c.pxe.http_base_url = None;
        c.pxe.profile_naming = ProfileNaming::Mac;
        c.deploy_kernel.params = String::new();
        let p = c.render_profile(&c.nodes[0], &ProfileBoot::Deploy(&args()));
        assert_eq!(
            p.path,
            PathBuf::from("/srv/kd/tftp/nodes/52-54-00-4d-00-65.ipxe")
        );
        assert!(p.content.contains(&format!(
            "kernel /kd/vmlinuz initrd=initrd.img kd.coord=10.77.0.1:7700 kd.pin={} kd.node=node1 kd.token=tok-1\ninitrd /kd/initrd.img\n",
            "ab".repeat(32)
        )));
        assert!(c
            .ipxe_chain_script()
            .contains("chain /nodes/${netX/mac:hexhyp}.ipxe"));
    }

    #[test]
    fn pxelinux_profiles() {
        let mut c = lab();
        c.pxe.method = BootMethod::Pxelinux;
        let p = c.render_profile(&c.nodes[1], &ProfileBoot::Deploy(&args()));
        assert_eq!(p.relative_path, "pxelinux.cfg/0A4D0066");
        assert_eq!(p.path, PathBuf::from("/srv/kd/tftp/pxelinux.cfg/0A4D0066"));
        assert_eq!(
            p.content,
            format!(
                "# kd: deploy environment for node2\nDEFAULT kd-deploy\nPROMPT 0\nTIMEOUT 0\nLABEL kd-deploy\n  KERNEL kd/vmlinuz\n  APPEND \
initrd=kd/initrd.img console=ttyS0 kd.coord=10.77.0.1:7700 kd.pin={} kd.node=node2 kd.token=tok-1\n",
                "ab".repeat(32)
            )
        );
        let p = c.render_profile(&c.nodes[1], &ProfileBoot::LocalDisk);
        assert_eq!(
            p.content,
            "# kd: local disk boot for node2\nDEFAULT kd-local\nPROMPT 0\nTIMEOUT 0\nLABEL kd-local\n  LOCALBOOT 0\n"
        );
        c.pxe.profile_naming = ProfileNaming::Mac;
        assert_eq!(
            c.render_profile(&c.nodes[0], &ProfileBoot::LocalDisk)
                .relative_path,
            "pxelinux.cfg/01-52-54-00-4d-00-65"
        );
        c.pxe.profile_naming = ProfileNaming::Hostname;
        assert_eq!(
            c.render_profile(&c.nodes[0], &ProfileBoot::LocalDisk)
                .relative_path,
            "pxelinux.cfg/node1"
        );
    }

    #[test]
    fn ipv6_coordinator_and_ip_hex() {
        let mut c = lab();
        c.coordinator.address = "fd77::1".parse().unwrap();
        assert!(c
            .deploy_cmdline(&c.nodes[0], &args())
            .contains("kd.coord=[fd77::1]:7700 "));
        assert_eq!(ip_hex("10.77.0.102".parse().unwrap()), "0A4D0066");
        assert_eq!(ip_hex("192.168.1.1".parse().unwrap()), "C0A80101");
        let e = err(&LAB.replace("address: 10.77.0.102", "address: fd77::102"));
        assert_eq!(
            e,
            "line 8: nodes[1].address: node2 has an IPv6 address but profile_naming is ip_hex"
        );
    }

    #[test]
    fn deploy_args_are_checked() {
        assert!(DeployArgs::new("ab", "t").is_err());
        assert!(DeployArgs::new(&"AB".repeat(32), "a b").is_err());
        assert!(DeployArgs::new(&"AB".repeat(32), "").is_err());
        assert_eq!(
            DeployArgs::new(&"AB".repeat(32), "x").unwrap().pin_hex,
            "ab".repeat(32)
        );
    }

    #[test]
    fn field_lines() {
        assert_eq!(yaml_field_line(LAB, "cluster"), Some(1));
        assert_eq!(yaml_field_line(LAB, "nodes[0].name"), Some(3));
        assert_eq!(yaml_field_line(LAB, "nodes[1].mac"), Some(9));
        assert_eq!(yaml_field_line(LAB, "nodes[1]"), Some(7));
        assert_eq!(yaml_field_line(LAB, "pxe.method"), Some(15));
        assert_eq!(yaml_field_line(LAB, "commands.power_status"), Some(23));
        assert_eq!(yaml_field_line(LAB, "disk.layout.table"), Some(33));
        assert_eq!(yaml_field_line(LAB, "nodes[2].name"), None);
        assert_eq!(yaml_field_line(LAB, "pxe.nothing"), None);
    }
}
