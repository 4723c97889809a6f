//! Agent settings: from the command line, or from `kd.*` on the kernel command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What the agent does with the image in broadcast mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// Write the uncompressed bytes at offsets into a file or block device.
    Raw(PathBuf),
    /// Extract the tar image into a directory.
    Dir(PathBuf),
    /// Verify and relay only (benchmarks).
    Null,
}

impl FromStr for SinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("raw", p)) if !p.is_empty() => Ok(Self::Raw(p.into())),
            Some(("dir", p)) if !p.is_empty() => Ok(Self::Dir(p.into())),
            None if s == "null" => Ok(Self::Null),
            _ => Err(format!(
                "bad sink {s:?}: expected raw:PATH, dir:PATH or null"
            )),
        }
    }
}

/// Faults the agent injects into itself, for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte of this chunk when it first arrives (as if the network had corrupted it).
    CorruptChunk(u32),
    /// Kill this process (SIGKILL) once this many chunks were received.
    DieAfter(u32),
    /// Freeze this process (SIGSTOP: its connections stay open, nothing answers) once this
    /// many chunks were received.
    StopAfter(u32),
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad fault {s:?}: expected corrupt:N, die-after:N or stop-after:N");
        let (k, v) = s.split_once(':').ok_or_else(bad)?;
        let n: u32 = v.parse().map_err(|_| bad())?;
        match k {
            "corrupt" => Ok(Self::CorruptChunk(n)),
            "die-after" => Ok(Self::DieAfter(n)),
            "stop-after" => Ok(Self::StopAfter(n)),
            _ => Err(bad()),
        }
    }
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator address.
    pub coord: SocketAddr,
    /// SHA-256 of the coordinator's certificate.
    pub pin: [u8; 32],
    /// This node's name.
    pub node: String,
    /// One-time token.
    pub token: String,
    /// Where the image goes.
    pub sink: SinkSpec,
    /// Where to listen for children (port 0: any).
    pub listen: SocketAddr,
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// How long to wait for the plan after the Welcome.
    pub plan_timeout: Duration,
    /// An upstream silent for this long is declared lost, whatever its pace (the ceiling of
    /// the patience, and the wait for the first data; see `kd_proto::upstream`).
    pub stall_timeout: Duration,
    /// An upstream is always given this long (the floor of the patience).
    pub stall_floor: Duration,
    /// Chunks kept in memory for children (bounded memory).
    pub window: usize,
    /// Deploy jobs: write this disk instead of the layout's device.
    pub disk: Option<PathBuf>,
    /// Deploy jobs: where kd makes its mount points.
    pub work_dir: PathBuf,
    /// Reboot the machine once the coordinator says the deployment is over (deploy initrd only).
    pub reboot_on_finish: bool,
    /// Bytes per second the image is written at most (a slow disk, for benches).
    pub write_rate: Option<u64>,
    /// Threads for QUIC: 1 (everything on the session's thread) or 2 (the children's endpoint
    /// and streams on a relay thread of their own).
    pub net_threads: usize,
}

impl AgentConfig {
    /// Defaults for everything but the identity.
    pub fn new(
        coord: SocketAddr,
        pin: [u8; 32],
        node: String,
        token: String,
        sink: SinkSpec,
    ) -> Self {
        Self {
            coord,
            pin,
            node,
            token,
            sink,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            faults: Vec::new(),
            connect_timeout: Duration::from_secs(120),
            plan_timeout: Duration::from_secs(1800),
            stall_timeout: kd_proto::upstream::DEFAULT_CEILING,
            stall_floor: kd_proto::upstream::DEFAULT_FLOOR,
            window: 16,
            disk: None,
            work_dir: PathBuf::from("/run/kd"),
            reboot_on_finish: false,
            write_rate: None,
            net_threads: 2,
        }
    }
}

/// The `kd.*` parameters of a kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `kd.coord=IP:PORT`
    pub coord: Option<String>,
    /// `kd.pin=HEX`
    pub pin: Option<String>,
    /// `kd.node=NAME`
    pub node: Option<String>,
    /// `kd.token=T`
    pub token: Option<String>,
    /// `kd.sink=SPEC` (defaults to the deployment's disk job)
    pub sink: Option<String>,
}

/// Reads `kd.*` from a kernel command line (as in /proc/cmdline).
pub fn parse_cmdline(s: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for w in s.split_whitespace() {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let v = Some(v.to_string());
        match k {
            "kd.coord" => c.coord = v,
            "kd.pin" => c.pin = v,
            "kd.node" => c.node = v,
            "kd.token" => c.token = v,
            "kd.sink" => c.sink = v,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_and_faults() {
        assert_eq!("null".parse::<SinkSpec>(), Ok(SinkSpec::Null));
        assert_eq!(
            "raw:/dev/vda".parse::<SinkSpec>(),
            Ok(SinkSpec::Raw("/dev/vda".into()))
        );
        assert!("raw:".parse::<SinkSpec>().is_err());
        assert!("disk".parse::<SinkSpec>().is_err());
        assert_eq!("corrupt:3".parse::<Fault>(), Ok(Fault::CorruptChunk(3)));
        assert!("corrupt:x".parse::<Fault>().is_err());
        assert_eq!("stop-after:5".parse::<Fault>(), Ok(Fault::StopAfter(5)));
    }

    #[test]
    fn cmdline() {
        let c = parse_cmdline("BOOT_IMAGE=/vmlinuz console=ttyS0 kd.coord=10.0.0.1:7000 kd.node=n1 kd.token=abc kd.pin=00ff quiet");
        assert_eq!(c.coord.as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(c.node.as_deref(), Some("n1"));
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.pin.as_deref(), Some("00ff"));
        assert_eq!(c.sink, None);
    }
}
