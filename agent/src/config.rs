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
    /// Threads for QUIC ([`NetThreads`]): one, two, or as the node's link and cores ask.
    pub net_threads: NetThreads,
    /// The link's speed in Mbit/s when the NIC cannot tell it (benches whose veths tc shapes:
    /// a veth always reports 10000); `None`: the `/sys/class/net/*/speed` of the NIC the
    /// coordinator's address is routed through.
    pub link_mbps: Option<u64>,
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
            net_threads: NetThreads::Auto,
            link_mbps: None,
        }
    }
}

/// Link speed (Mbit/s) above which one core cannot be trusted to relay at line rate. Measured
/// (bench/README.md, "Per-node CPU (session 13)"): a relay's one thread costs 2.8 CPU s per GiB
/// at 1 Gbit/s on this machine's cores, i.e. one core carries about 3 Gbit/s of QUIC at MTU
/// 1500: a 1 or 2.5 GbE node relays on one thread, a 10/25 GbE node on two.
pub const ONE_CORE_MBPS: u64 = 2_500;

/// How many threads the agent gives QUIC: `Fixed(1)` (everything on the session's thread),
/// `Fixed(2)` (the children's endpoint and streams on a relay thread of their own, so a relay
/// uses two cores), or `Auto` ([`NetThreads::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetThreads {
    /// Two where one core cannot carry the link, else one.
    Auto,
    /// This many (1 or 2).
    Fixed(usize),
}

impl NetThreads {
    /// The number of threads for a node whose deployment link is `link_mbps` (`None`: unknown,
    /// e.g. virtio without a speed) with `cpus` cores. A second thread costs wake-ups on both
    /// threads for every piece (measured: 10–15 % more CPU per GiB at 100 Mbit/s) and buys
    /// throughput only past what one core carries, so `Auto` takes it only for a link faster
    /// than [`ONE_CORE_MBPS`], or one of unknown speed (it may be fast: the deployment's speed
    /// comes first), and only with two cores or more.
    pub fn resolve(self, link_mbps: Option<u64>, cpus: usize) -> usize {
        match self {
            NetThreads::Fixed(n) => n.clamp(1, 2),
            NetThreads::Auto if cpus < 2 => 1,
            NetThreads::Auto => match link_mbps {
                Some(m) if m <= ONE_CORE_MBPS => 1,
                _ => 2,
            },
        }
    }
}

impl FromStr for NetThreads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(NetThreads::Auto),
            "1" => Ok(NetThreads::Fixed(1)),
            "2" => Ok(NetThreads::Fixed(2)),
            _ => Err(format!("bad --net-threads {s:?}: expected auto, 1 or 2")),
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
    /// `kd.net_threads=auto|1|2` (a cluster's `deploy_kernel.params` may set it for nodes whose
    /// NIC reports no speed, or the wrong one)
    pub net_threads: Option<String>,
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
            "kd.net_threads" => c.net_threads = v,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_threads_follow_the_link_and_the_cores() {
        let auto = NetThreads::Auto;
        // A 1 GbE or 2.5 GbE node relays on one thread; 10 and 25 GbE on two.
        assert_eq!(auto.resolve(Some(100), 8), 1);
        assert_eq!(auto.resolve(Some(1_000), 8), 1);
        assert_eq!(auto.resolve(Some(2_500), 8), 1);
        assert_eq!(auto.resolve(Some(10_000), 8), 2);
        assert_eq!(auto.resolve(Some(25_000), 2), 2);
        // Unknown speed: two (it may be fast), unless there is one core.
        assert_eq!(auto.resolve(None, 4), 2);
        assert_eq!(auto.resolve(None, 1), 1);
        assert_eq!(auto.resolve(Some(10_000), 1), 1);
        // Fixed is fixed.
        assert_eq!(NetThreads::Fixed(2).resolve(Some(100), 1), 2);
        assert_eq!(NetThreads::Fixed(1).resolve(None, 64), 1);
        assert_eq!("auto".parse(), Ok(NetThreads::Auto));
        assert_eq!("2".parse(), Ok(NetThreads::Fixed(2)));
        assert!("3".parse::<NetThreads>().is_err());
    }

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
        assert_eq!(c.net_threads, None);
        let c = parse_cmdline("console=ttyS0 kd.node=n1 kd.net_threads=2");
        assert_eq!(c.net_threads.as_deref(), Some("2"));
    }
}
