//! `kd-coord`: the operator's command line (and, later, the daemon).
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kd_coord::broadcast::{self, BroadcastConfig, Event};
use kd_coord::image::{self, ImageFile, PackOptions};
use kd_coord::pki::CoordIdentity;
use kd_proto::manifest::ImageKind;
use kd_proto::tree::Arity;

mod remote;

#[derive(Parser)]
#[command(name = "kd-coord", version, about = "kd coordinator: reimage clusters")]
struct Cli {
    /// State directory (certificate, database).
    #[arg(long, global = true, env = "KD_STATE", default_value = "/var/lib/kd")]
    state: PathBuf,
    /// Talk to a remote daemon's HTTPS API (https://HOST:PORT, its `serve --listen`) instead
    /// of STATE/kd.sock; the token comes from KD_TOKEN or the file KD_TOKEN_FILE.
    #[arg(long, global = true, env = "KD_API")]
    api: Option<String>,
    /// The remote daemon's certificate pin (what `kd-coord pin` prints on its host).
    #[arg(long, global = true, env = "KD_API_PIN", requires = "api")]
    api_pin: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `kd-coord serve`'s flags.
#[derive(clap::Args)]
struct ServeCli {
    /// Also serve the API over TLS on this address (e.g. 0.0.0.0:8443) for remote users,
    /// who prove a token (`kd-coord token add`) and pin the certificate (`kd-coord pin`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Users who administer the daemon besides root and the daemon's user (comma-separated
    /// or repeated): clusters, rights, every deployment, public environments.
    #[arg(long, value_delimiter = ',')]
    almighty: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, check and describe kd images (.kdi).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Print the SHA-256 of the coordinator's certificate (what agents pin), creating it once.
    Pin,
    /// Send an image to agents that connect (no PXE, no disks: see `deploy` for the whole flow).
    Broadcast(BroadcastArgs),
    /// Deploy an environment on nodes: PXE, reboot, prepare, broadcast, finish, boot, check
    /// (through the daemon; --standalone runs it in this process).
    Deploy(DeployCli),
    /// Reboot nodes through the cluster's commands (soft, then hard, then very_hard), then wait
    /// until they answer on the check port (through the daemon).
    Reboot(RebootCli),
    /// Power nodes on or off through the cluster's commands, or print their power status
    /// (through the daemon).
    #[command(subcommand)]
    Power(PowerCli),
    /// Run the daemon: database, API on STATE/kd.sock (and over TLS with --listen), every
    /// deployment.
    Serve(ServeCli),
    /// List the nodes and their state.
    Nodes {
        #[command(flatten)]
        targets: SomeTargets,
        /// Only nodes in this state (deployed, deploy_failed, deploying, ...).
        #[arg(long)]
        status: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List, show, follow and cancel deployments.
    #[command(subcommand)]
    Deployments(remote::DeploymentsCmd),
    /// Register, list, show and remove environments.
    #[command(subcommand)]
    Env(remote::EnvCmd),
    /// Add and list clusters (administrators).
    #[command(subcommand)]
    Cluster(remote::ClusterCmd),
    /// Grant, list and remove deployment rights.
    #[command(subcommand)]
    Rights(remote::RightsCmd),
    /// Make, list and revoke tokens for the HTTPS API.
    #[command(subcommand)]
    Token(remote::TokenCmd),
    /// Deployment statistics: totals; per node (`--failure-rate`: the nodes that fail most
    /// first) and per step (`--per-step`), over all deployments or those since a date.
    Stats {
        #[command(flatten)]
        targets: SomeTargets,
        /// Only deployments since: YYYY-MM-DD (UTC), seconds since the epoch, or an age
        /// (30m, 12h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Per node: deployments, ok, ko, failure rate, mean time, last failure.
        #[arg(long)]
        failure_rate: bool,
        /// Per step: entered, failed, retries, mean and longest time.
        #[arg(long)]
        per_step: bool,
        /// Print the tables as CSV.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a node's console through the daemon (the cluster's console command, run by
    /// the daemon; needs a right on the node). On a terminal, `~.` at the start of a line
    /// disconnects.
    Console {
        /// Node name.
        node: String,
    },
    /// Print a shell completion script (e.g. `kd-coord completions bash >
    /// /etc/bash_completion.d/kd-coord`).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (kd-coord.1 and one per subcommand) into DIR.
    Man {
        /// Output directory (created if needed).
        dir: PathBuf,
    },
}

/// Nodes named by `-m SET` or `-f FILE`.
#[derive(clap::Args)]
struct Targets {
    /// Nodes, in node-set syntax (node[1-8,10]).
    #[arg(
        short = 'm',
        long = "machines",
        required_unless_present = "node_file",
        conflicts_with = "node_file"
    )]
    nodes: Option<String>,
    /// Nodes from a file, one per line (or node sets; `-` for stdin): an OAR/Slurm node file,
    /// duplicates and all.
    #[arg(short = 'f', long = "file")]
    node_file: Option<PathBuf>,
}

impl Targets {
    /// The node set named (a file's nodes folded into one).
    fn resolve(&self) -> Result<String> {
        target_nodes(self.nodes.as_deref(), self.node_file.as_deref())
    }
}

/// Nodes named by `-m SET` or `-f FILE`, or none (every node).
#[derive(clap::Args)]
struct SomeTargets {
    /// Only these nodes (node set).
    #[arg(short = 'm', long = "machines", conflicts_with = "node_file")]
    nodes: Option<String>,
    /// Only the nodes of this file, one per line (`-` for stdin).
    #[arg(short = 'f', long = "file")]
    node_file: Option<PathBuf>,
}

impl SomeTargets {
    /// The node set named, if any.
    fn resolve(&self) -> Result<Option<String>> {
        match (&self.nodes, &self.node_file) {
            (None, None) => Ok(None),
            (m, f) => target_nodes(m.as_deref(), f.as_deref()).map(Some),
        }
    }
}

#[derive(clap::Args)]
struct RebootCli {
    #[command(flatten)]
    targets: Targets,
    /// simple: reboot them as they are; recorded_env: boot the environment on their disk
    /// (their PXE profile boots the local disk first).
    #[arg(short = 'r', long = "reboot-kind", default_value = "simple", value_parser = ["simple", "recorded_env", "deploy_env"])]
    kind: String,
    /// Lowest level tried (then the next ones on failure or timeout).
    #[arg(short = 'l', long = "level", default_value = "soft", value_parser = ["soft", "hard", "very_hard"])]
    level: String,
    /// Write the nodes that answered here (one per line).
    #[arg(short = 'o', long = "output-ok-nodes")]
    ok_file: Option<PathBuf>,
    /// Write the nodes that did not here (one per line).
    #[arg(short = 'n', long = "output-ko-nodes")]
    ko_file: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum PowerCli {
    /// Power nodes on (the cluster's power_on commands, soft then up).
    On(PowerArgs),
    /// Power nodes off (the cluster's power_off commands, soft then up).
    Off(PowerArgs),
    /// Print each node's power status (the cluster's power_status command).
    Status {
        #[command(flatten)]
        targets: Targets,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct PowerArgs {
    #[command(flatten)]
    targets: Targets,
    /// Lowest level tried.
    #[arg(short = 'l', long = "level", default_value = "soft", value_parser = ["soft", "hard", "very_hard"])]
    level: String,
    /// Write the nodes done here (one per line).
    #[arg(short = 'o', long = "output-ok-nodes")]
    ok_file: Option<PathBuf>,
    /// Write the nodes that failed here (one per line).
    #[arg(short = 'n', long = "output-ko-nodes")]
    ko_file: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DeployCli {
    /// Environment: a description file (YAML), or a registered NAME[@VERSION] (kd-coord env
    /// list; with --standalone: STATE/envs/NAME.yaml).
    #[arg(short = 'e', long = "env")]
    env: String,
    /// Owner of the registered environment (default: yours, then public, then shared ones).
    #[arg(short = 'u', long = "env-user")]
    env_user: Option<String>,
    #[command(flatten)]
    targets: Targets,
    /// Cluster configuration.
    #[arg(
        short = 'c',
        long,
        env = "KD_CLUSTER",
        default_value = "/etc/kd/cluster.yaml"
    )]
    cluster: PathBuf,
    /// Public SSH key file to put in root's authorized_keys on the deployed system.
    #[arg(short = 'k', long = "key")]
    ssh_key: Option<PathBuf>,
    /// Tree: auto (from the nodes' measured link and disk rates), chain, star, or a fan-out k.
    #[arg(long, default_value = "auto")]
    arity: Arity,
    /// Deploy on partition N of the cluster's layout instead of its deploy partition (which
    /// is kept); the disk must already carry the layout's partition table.
    #[arg(short = 'p', long = "partition")]
    partition: Option<u32>,
    /// Write the deployed nodes' names here (one per line).
    #[arg(short = 'o', long = "output-ok-nodes")]
    ok_file: Option<PathBuf>,
    /// Write the failed nodes' names here (one per line).
    #[arg(short = 'n', long = "output-ko-nodes")]
    ko_file: Option<PathBuf>,
    /// UDP address to listen on (default: the cluster's coordinator address and port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Run the deployment in this process instead of the daemon (no database: the cluster
    /// file and node lock files are used directly).
    #[arg(long)]
    standalone: bool,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Pack a tar, a .tar.zst, a directory or a raw disk file into a kd image.
    Pack {
        /// Input file or directory.
        input: PathBuf,
        /// Output .kdi file.
        #[arg(short, long)]
        output: PathBuf,
        /// Uncompressed chunk size (bytes, or with K/M suffix; 4K to 16M).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_size: u32,
        /// zstd level (1 to 19).
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// Compression threads (1 to 64; their buffers are bounded to 1 GiB in all).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Most uncompressed input bytes (K/M/G/T suffix); 64G by default, which stops an input
        /// that never ends.
        #[arg(long, value_parser = image::parse_bytes)]
        max_size: Option<u64>,
        /// Force the kind (detected otherwise).
        #[arg(long, value_parser = ["tar", "raw"])]
        kind: Option<String>,
    },
    /// Check every chunk and the content hash.
    Verify {
        /// The .kdi file.
        image: PathBuf,
    },
    /// Describe an image.
    Info {
        /// The .kdi file.
        image: PathBuf,
    },
}

#[derive(clap::Args)]
struct BroadcastArgs {
    /// The .kdi image.
    image: PathBuf,
    /// Nodes, in node-set syntax (node[1-8,10]).
    #[arg(short = 'm', long)]
    nodes: String,
    /// Tree: auto (from the nodes' measured link and disk rates), chain, star, or a fan-out k.
    #[arg(long, default_value = "auto")]
    arity: Arity,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
    listen: SocketAddr,
    /// File of `node token` lines; created with fresh tokens if absent.
    #[arg(long)]
    tokens: PathBuf,
    /// Seconds to wait for every agent (1 to 86400).
    #[arg(long, default_value_t = 120, value_parser = kd_proto::bounds::parse_timeout_secs)]
    hello_timeout: u64,
    /// Seconds the transfer may take (1 to 86400).
    #[arg(long, default_value_t = 3600, value_parser = kd_proto::bounds::parse_timeout_secs)]
    timeout: u64,
    /// Seconds without a packet from an agent before it counts as lost (its children move at
    /// once; 5 to 86400: keep-alives come every 2 s; TCG guests want more).
    #[arg(long, default_value_t = 6, value_parser = parse_agent_silence)]
    agent_silence: u64,
    /// Seconds an agent always waits on a silent upstream (sent in the plans; default: the
    /// agents' own --stall-floor).
    #[arg(long, value_parser = kd_proto::bounds::parse_timeout_secs)]
    stall_floor: Option<u64>,
    /// Seconds an agent waits at most on a silent upstream (sent in the plans, with
    /// --stall-floor; default 30).
    #[arg(long, value_parser = kd_proto::bounds::parse_timeout_secs)]
    stall_timeout: Option<u64>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Deploy onto the nodes' disks with this layout (kd-disk YAML) instead of the agents' sinks.
    #[arg(long)]
    layout: Option<PathBuf>,
    /// Deploy partition number (`-p`), if not the layout's.
    #[arg(short = 'p', long)]
    deploy_partition: Option<u32>,
    /// Public key to append to root's authorized_keys (`-k`).
    #[arg(short = 'k', long)]
    ssh_key: Option<PathBuf>,
    /// Kernel path in the image (enables GRUB).
    #[arg(long)]
    kernel: Option<String>,
    /// Initrd path in the image.
    #[arg(long)]
    initrd: Option<String>,
    /// Kernel parameters of the deployed system.
    #[arg(long, default_value = "")]
    kernel_params: String,
    /// Write a raw image to the whole disk instead of the deploy partition.
    #[arg(long)]
    whole_disk: bool,
    /// The nodes of a rack or switch, as RACK=NODESET (repeated): the tree enters each rack
    /// once (a chain visits a rack's nodes together; a k-ary tree keeps a rack in one subtree).
    #[arg(long = "rack", value_name = "RACK=NODESET")]
    racks: Vec<String>,
}

/// A chunk size; its bounds are checked by `image::pack`, before it reads anything.
fn parse_size(s: &str) -> Result<u32, String> {
    let n = image::parse_bytes(s)?;
    u32::try_from(n).map_err(|_| format!("bad chunk size {s:?} (at most {})", image::MAX_CHUNK))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kd-coord: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    // The daemon's client, for the commands that are its clients.
    let daemon = || client(&cli.state, cli.api.as_deref(), cli.api_pin.as_deref());
    match cli.cmd {
        Cmd::Image(ImageCmd::Pack {
            input,
            output,
            chunk_size,
            level,
            threads,
            kind,
            max_size,
        }) => {
            let opts = PackOptions {
                chunk_size,
                level,
                threads,
                max_size,
                kind: kind.map(|k| {
                    if k == "tar" {
                        ImageKind::Tar
                    } else {
                        ImageKind::Raw
                    }
                }),
            };
            let t = Instant::now();
            image::pack(&input, &output, &opts)?;
            let img = ImageFile::open(&output)?;
            println!(
                "{}\npacked in:    {:.1} s",
                img.info(),
                t.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Cmd::Image(ImageCmd::Verify { image }) => {
            let img = ImageFile::open(&image)?;
            img.verify()
                .with_context(|| format!("{} is corrupt", image.display()))?;
            println!(
                "{}: ok ({} chunks verified)",
                image.display(),
                img.manifest.chunks.len()
            );
            Ok(0)
        }
        Cmd::Image(ImageCmd::Info { image }) => {
            println!("{}", ImageFile::open(&image)?.info());
            Ok(0)
        }
        Cmd::Pin => {
            let id = CoordIdentity::load_or_create(&cli.state)?;
            println!("{}", kd_proto::manifest::hex(&id.pin()));
            Ok(0)
        }
        Cmd::Broadcast(a) => broadcast_cmd(&cli.state, a),
        Cmd::Deploy(a) if a.standalone => deploy_cmd(&cli.state, a),
        Cmd::Deploy(a) => {
            let c = daemon()?;
            let opts = remote::DeployOpts {
                env: a.env,
                env_user: a.env_user,
                nodes: a.targets.resolve()?,
                ssh_key: a.ssh_key,
                arity: a.arity.to_string(),
                partition: a.partition,
                ok_file: a.ok_file,
                ko_file: a.ko_file,
                json: a.json,
            };
            remote::run_client(async { remote::deploy(&c, opts).await })
        }
        Cmd::Reboot(a) => {
            let c = daemon()?;
            let opts = remote::OpOpts {
                op: "reboot",
                kind: Some(a.kind),
                level: a.level,
                nodes: a.targets.resolve()?,
                ok_file: a.ok_file,
                ko_file: a.ko_file,
                json: a.json,
            };
            remote::run_client(async { remote::operate(&c, opts).await })
        }
        Cmd::Power(cmd) => {
            let c = daemon()?;
            match cmd {
                PowerCli::Status { targets, json } => {
                    let nodes = targets.resolve()?;
                    remote::run_client(async { remote::power_status(&c, &nodes, json).await })
                }
                PowerCli::On(a) => power_op(&c, "power_on", a),
                PowerCli::Off(a) => power_op(&c, "power_off", a),
            }
        }
        Cmd::Serve(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let opts = kd_coord::service::ServeOptions {
                listen: a.listen,
                almighty: a.almighty.into_iter().filter(|u| !u.is_empty()).collect(),
            };
            rt.block_on(kd_coord::service::serve(&cli.state, &opts))?;
            Ok(0)
        }
        Cmd::Nodes {
            targets,
            status,
            json,
        } => {
            let nodes = targets.resolve()?;
            let c = daemon()?;
            remote::run_client(async {
                remote::nodes(&c, nodes.as_deref(), status.as_deref(), json).await
            })
        }
        Cmd::Stats {
            targets,
            since,
            failure_rate,
            per_step,
            csv,
            json,
        } => {
            let since = match since.as_deref().map(remote::parse_since) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    eprintln!("kd-coord: error: {e:#}");
                    return Ok(2);
                }
            };
            let nodes = targets.resolve()?;
            let c = daemon()?;
            let o = remote::StatsOpts {
                nodes,
                since,
                failure_rate,
                per_step,
                csv,
                json,
            };
            remote::run_client(async { remote::stats(&c, o).await })
        }
        Cmd::Deployments(cmd) => {
            let c = daemon()?;
            remote::run_client(async { remote::deployments(&c, cmd).await })
        }
        Cmd::Env(cmd) => {
            let c = daemon()?;
            remote::run_client(async { remote::env(&c, cmd).await })
        }
        Cmd::Cluster(cmd) => {
            let c = daemon()?;
            remote::run_client(async { remote::cluster(&c, cmd).await })
        }
        Cmd::Rights(cmd) => {
            let c = daemon()?;
            remote::run_client(async { remote::rights(&c, cmd).await })
        }
        Cmd::Token(cmd) => {
            let c = daemon()?;
            remote::run_client(async { remote::token(&c, cmd).await })
        }
        Cmd::Console { node } => {
            let c = daemon()?;
            remote::run_client(async { remote::console(&c, &node).await })
        }
        Cmd::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            completions(shell, &mut out);
            out.flush()?;
            Ok(0)
        }
        Cmd::Man { dir } => {
            let pages = man_pages(&dir)?;
            println!("{} manual pages written in {}", pages.len(), dir.display());
            Ok(0)
        }
    }
}

/// The completion script of `shell`.
fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "kd-coord", out);
}

/// Writes kd-coord.1 and one page per subcommand (kd-coord-env-add.1, ...) into `dir`;
/// returns their names, sorted.
fn man_pages(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing manual pages in {}", dir.display()))?;
    let mut pages: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kd-coord") && n.ends_with(".1"))
        .collect();
    pages.sort();
    Ok(pages)
}

/// `--agent-silence`: 5 (two keep-alives and a margin) to 86400 seconds.
fn parse_agent_silence(s: &str) -> Result<u64, String> {
    let v = kd_proto::bounds::parse_timeout_secs(s)?;
    kd_proto::bounds::check_secs(v, 5)
}

fn broadcast_cmd(state: &Path, a: BroadcastArgs) -> Result<i32> {
    let nodes = kd_proto::nodeset::parse(&a.nodes)
        .map_err(|e| anyhow::anyhow!("bad node set {:?}: {e}", a.nodes))?;
    let mut racks = std::collections::BTreeMap::new();
    for r in &a.racks {
        let Some((rack, set)) = r.split_once('=') else {
            bail!("--rack {r:?}: expected RACK=NODESET");
        };
        let members = kd_proto::nodeset::parse(set)
            .map_err(|e| anyhow::anyhow!("--rack {r:?}: bad node set: {e}"))?;
        for m in members {
            if !nodes.contains(&m) {
                bail!("--rack {r:?}: {m} is not one of the nodes (-m)");
            }
            if let Some(other) = racks.insert(m.clone(), rack.to_string()) {
                bail!("--rack: {m} is in two racks ({other} and {rack})");
            }
        }
    }
    let img = ImageFile::open(&a.image)?;
    let identity = CoordIdentity::load_or_create(state)?;
    let tokens = kd_coord::tokens::load_or_make(&a.tokens, &nodes)?;
    let total_chunks = img.manifest.chunk_count();
    let compressed = img.manifest.compressed_size();
    let job = match &a.layout {
        None => kd_proto::msg::Job::LocalSink,
        Some(path) => {
            use kd_proto::msg::{BootSpec, DeployImage, DeployJob, Job};
            let layout = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let ssh_key = match &a.ssh_key {
                Some(k) => Some(
                    std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?,
                ),
                None => None,
            };
            Job::Deploy(Box::new(DeployJob {
                layout,
                deploy_partition: a.deploy_partition,
                image: match (img.manifest.kind, a.whole_disk) {
                    (ImageKind::Tar, _) => DeployImage::Tar,
                    (ImageKind::Raw, false) => DeployImage::RawPartition,
                    (ImageKind::Raw, true) => DeployImage::RawDisk,
                },
                partition: !a.whole_disk,
                environment: a
                    .image
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                ssh_key,
                boot: a.kernel.clone().map(|kernel| BootSpec {
                    kernel,
                    initrd: a.initrd.clone(),
                    params: a.kernel_params.clone(),
                    bios: true,
                    efi: true,
                }),
                postinstalls: Vec::new(),
                postinstall_timeout_secs: 300,
            }))
        }
    };
    let stall = match (a.stall_floor, a.stall_timeout) {
        (None, None) => None,
        (floor, timeout) => {
            let timeout = Duration::from_secs(timeout.unwrap_or(30));
            let floor = Duration::from_secs(floor.unwrap_or(2)).min(timeout);
            let p = kd_proto::upstream::Policy::new(floor, timeout)
                .map_err(|e| anyhow::anyhow!("--stall-floor/--stall-timeout: {e}"))?;
            Some(p.limits())
        }
    };
    let cfg = BroadcastConfig {
        racks,
        liveness: kd_coord::broadcast::Liveness {
            agent_silence: Duration::from_secs(a.agent_silence),
            stall,
        },
        job,
        listen: a.listen,
        nodes: nodes.clone(),
        tokens,
        arity: a.arity,
        hello_timeout: Duration::from_secs(a.hello_timeout),
        run_timeout: Duration::from_secs(a.timeout),
        deployment: getrandom::u64()
            .map_err(|e| anyhow::anyhow!("no random deployment id: {e}"))?,
    };
    eprintln!(
        "kd-coord: broadcasting {} ({:.1} MiB in {} chunks) to {} nodes, arity {}, pin {}",
        a.image.display(),
        compressed as f64 / 1048576.0,
        total_chunks,
        nodes.len(),
        a.arity,
        kd_proto::manifest::hex(&identity.pin())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move { broadcast::run(img, cfg, &identity, tx).await });
        let mut progress: BTreeMap<String, u32> = BTreeMap::new();
        let mut plan: Vec<(String, Option<String>)> = Vec::new();
        let mut shape = String::new();
        let mut done = 0usize;
        let mut t0: Option<Instant> = None;
        let mut last = Instant::now();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Listening(addr) => eprintln!("kd-coord: listening on {addr}, waiting for {} agents", nodes.len()),
                Event::Connected { node, addr } => eprintln!("kd-coord: {node} connected from {addr}"),
                Event::Refused { addr, reason } => eprintln!("kd-coord: refused {addr}: {reason}"),
                Event::Planned { edges, shape: s } => {
                    t0 = Some(Instant::now());
                    let roots = edges.iter().filter(|(_, p)| p.is_none()).count();
                    eprintln!("kd-coord: planned a tree of {} nodes with {roots} root(s) ({s}); sending", edges.len());
                    if plan.is_empty() {
                        plan = edges;
                        shape = s;
                    }
                }
                Event::Step { node, step } => match step.error {
                    None => eprintln!("kd-coord: {node}: {} ok ({} ms)", step.step, step.millis),
                    Some(e) => eprintln!("kd-coord: {node}: {} FAILED ({} ms): {e}", step.step, step.millis),
                },
                Event::Progress { node, progress: p } => {
                    progress.insert(node, p.chunks);
                }
                Event::Reparented { node, parent } => {
                    eprintln!("kd-coord: {node} now reads from {}", parent.as_deref().unwrap_or("the coordinator"))
                }
                Event::Done { node, error } => {
                    done += 1;
                    progress.insert(node.clone(), total_chunks);
                    match error {
                        None => eprintln!("kd-coord: {node} verified the image ({done}/{})", nodes.len()),
                        Some(e) => eprintln!("kd-coord: {node} FAILED: {e} ({done}/{})", nodes.len()),
                    }
                }
            }
            if let Some(t0) = t0 {
                if last.elapsed() >= Duration::from_secs(2) && !progress.is_empty() {
                    last = Instant::now();
                    let min = progress.values().min().copied().unwrap_or(0);
                    let sum: u64 = progress.values().map(|&c| u64::from(c)).sum();
                    let bytes = compressed as f64 * sum as f64 / f64::from(total_chunks.max(1));
                    eprintln!(
                        "kd-coord: [{:6.1} s] slowest {min}/{total_chunks} chunks, {:.1} MiB/s delivered in all",
                        t0.elapsed().as_secs_f64(),
                        bytes / 1048576.0 / t0.elapsed().as_secs_f64().max(0.001)
                    );
                }
            }
        }
        task.await.context("broadcast task")?.map(|o| (o, plan, shape))
    })?;
    let (outcome, plan, shape) = outcome;
    if a.json {
        // The outcome, and the first round's tree as planned (who read from whom at first).
        let mut v = serde_json::to_value(&outcome)?;
        v["plan"] = plan
            .iter()
            .map(|(n, p)| serde_json::json!({ "node": n, "parent": p }))
            .collect();
        v["shape"] = shape.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<16} {:<6} {:>9} {:>8} {:>8} {:>9}  reason",
            "node", "result", "seconds", "cpu s", "corrupt", "refetched"
        );
        for n in &outcome.nodes {
            println!(
                "{:<16} {:<6} {:>9} {:>8} {:>8} {:>9}  {}",
                n.node,
                if n.ok { "ok" } else { "KO" },
                n.seconds
                    .map(|s| format!("{s:.2}"))
                    .unwrap_or_else(|| "-".into()),
                n.cpu_seconds
                    .map(|s| format!("{s:.2}"))
                    .unwrap_or_else(|| "-".into()),
                n.corrupt_chunks,
                n.refetched_chunks,
                n.reason.as_deref().unwrap_or("")
            );
        }
        let ok = outcome.nodes.iter().filter(|n| n.ok).count();
        println!(
            "{ok}/{} nodes verified image {} ({:.1} MiB) in {:.2} s",
            outcome.nodes.len(),
            &outcome.image_hash[..16],
            outcome.compressed_bytes as f64 / 1048576.0,
            outcome.transfer_seconds
        );
    }
    Ok(if outcome.all_ok() { 0 } else { 1 })
}

/// The daemon's client: its socket in STATE, or `--api URL` with its pin and a token.
fn client(state: &Path, api: Option<&str>, pin: Option<&str>) -> Result<kd_coord::client::Client> {
    let Some(url) = api else {
        return Ok(kd_coord::client::Client::new(state));
    };
    let Some(pin) = pin else {
        bail!(
            "--api {url} needs the daemon's certificate pin: --api-pin HEX or KD_API_PIN \
             (`kd-coord pin` on the daemon's host prints it)"
        );
    };
    let token = match (std::env::var("KD_TOKEN"), std::env::var_os("KD_TOKEN_FILE")) {
        (Ok(t), _) if !t.trim().is_empty() => Some(t),
        (_, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("KD_TOKEN_FILE {}", Path::new(&f).display()))?,
        ),
        _ => None,
    };
    kd_coord::client::Client::remote(url, pin, token)
}

/// `kd-coord power on|off`.
fn power_op(c: &kd_coord::client::Client, op: &'static str, a: PowerArgs) -> Result<i32> {
    let opts = remote::OpOpts {
        op,
        kind: None,
        level: a.level,
        nodes: a.targets.resolve()?,
        ok_file: a.ok_file,
        ko_file: a.ko_file,
        json: a.json,
    };
    remote::run_client(async { remote::operate(c, opts).await })
}

/// The node set `-m SET` or `-f FILE` names, folded (`-` reads stdin).
fn target_nodes(set: Option<&str>, file: Option<&Path>) -> Result<String> {
    if let Some(s) = set {
        return Ok(s.to_string());
    }
    let Some(f) = file else {
        bail!("name the nodes: -m NODESET or -f FILE");
    };
    let text = if f == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the node list from stdin")?
    } else {
        std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?
    };
    let nodes = kd_proto::nodeset::from_lines(&text).map_err(|(line, e)| {
        if line == 0 {
            anyhow::anyhow!("{}: no node in it", f.display())
        } else {
            anyhow::anyhow!("{}:{line}: {e}", f.display())
        }
    })?;
    Ok(kd_proto::nodeset::fold(&nodes))
}

fn deploy_cmd(state: &Path, a: DeployCli) -> Result<i32> {
    use kd_coord::config::ClusterConfig;
    use kd_coord::deploy::{self, DeployConfig};
    use kd_coord::env::Environment;
    let t0 = Instant::now();
    let say =
        move |line: String| eprintln!("kd-coord: [{:6.1} s] {line}", t0.elapsed().as_secs_f64());
    let set = a.targets.resolve()?;
    let nodes =
        kd_proto::nodeset::parse(&set).map_err(|e| anyhow::anyhow!("bad node set {set:?}: {e}"))?;
    let cluster = ClusterConfig::load(&a.cluster)
        .with_context(|| format!("cluster configuration {}", a.cluster.display()))?;
    let unknown: Vec<&str> = nodes
        .iter()
        .filter(|n| cluster.node(n).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "unknown node(s) {} (not in {}; known: {})",
            kd_proto::nodeset::fold(&unknown.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            a.cluster.display(),
            kd_proto::nodeset::fold(
                &cluster
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .collect::<Vec<_>>()
            )
        );
    }
    // One deployment per node at a time (also across kd-coord processes): held until exit.
    let _locks = lock_nodes(state, &nodes)?;
    let env_path = {
        let p = PathBuf::from(&a.env);
        if p.exists() {
            p
        } else {
            let named = state.join("envs").join(format!("{}.yaml", a.env));
            if !named.exists() {
                bail!(
                    "no environment {:?}: neither a file nor {}",
                    a.env,
                    named.display()
                );
            }
            named
        }
    };
    let env_text = std::fs::read_to_string(&env_path)
        .with_context(|| format!("read {}", env_path.display()))?;
    let env = Environment::parse(&env_text)
        .with_context(|| format!("environment {}", env_path.display()))?;
    let ssh_key = match &a.ssh_key {
        None => None,
        Some(k) => {
            let text =
                std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?;
            deploy::check_ssh_key(&text).with_context(|| k.display().to_string())?;
            Some(text)
        }
    };
    // Relative paths in the environment are relative to its file's directory.
    let env_dir = std::fs::canonicalize(&env_path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let (img, job) = deploy::prepare(
        state,
        &cluster,
        &deploy::JobInputs {
            env: &env,
            env_dir: &env_dir,
            ssh_key,
            partition: a.partition,
            reader: None,
        },
        &|l| say(l),
    )?;
    let image_path = img.path.clone();
    let identity = CoordIdentity::load_or_create(state)?;
    let deployment =
        getrandom::u64().map_err(|e| anyhow::anyhow!("no random deployment id: {e}"))?;
    let cfg = DeployConfig {
        cluster,
        nodes: nodes.clone(),
        job,
        arity: a.arity,
        deployment,
        listen: a.listen,
    };
    say(format!(
        "deploying {}:{} ({}, {:.1} MiB) on {} node(s) {}, tree {}",
        env.name,
        env.version,
        image_path.display(),
        img.manifest.compressed_size() as f64 / 1048576.0,
        nodes.len(),
        kd_proto::nodeset::fold(&nodes),
        a.arity
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::spawn(async move { deploy::run(img, cfg, &identity, tx).await });
        while let Some(line) = rx.recv().await {
            say(line);
        }
        task.await.context("deployment task")?
    })?;
    let write_list = |path: &Option<PathBuf>, names: Vec<&str>| -> Result<()> {
        if let Some(p) = path {
            let mut text = names.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?;
        }
        Ok(())
    };
    write_list(&a.ok_file, summary.ok.iter().map(String::as_str).collect())?;
    write_list(
        &a.ko_file,
        summary.ko.iter().map(|(n, _, _)| n.as_str()).collect(),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else {
        print!("{}", summary.table());
        println!("{}/{} nodes deployed", summary.ok.len(), nodes.len());
    }
    Ok(if summary.ko.is_empty() { 0 } else { 1 })
}

/// Takes each node's lock file under STATE/locks; fails, naming the busy nodes, when another
/// deployment holds some.
fn lock_nodes(state: &Path, nodes: &[String]) -> Result<Vec<std::fs::File>> {
    kd_coord::state::create_dir(state)?;
    let dir = state.join("locks");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut held = Vec::new();
    let mut busy = Vec::new();
    for n in nodes {
        let path = dir.join(format!("{n}.lock"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {
                f.set_len(0)?;
                writeln!(f, "{}", std::process::id())?;
                held.push(f);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                busy.push(format!("{n} (kd-coord pid {})", owner.trim()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
    if !busy.is_empty() {
        bail!(
            "busy: another deployment is running on {}; nothing was done",
            busy.join(", ")
        );
    }
    Ok(held)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // Catches clashing argument names (a subcommand's --state against the global one)
        // before a user meets the panic.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// Every subcommand, nested ones as `env add`.
    fn subcommands() -> Vec<Vec<String>> {
        fn walk(c: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            for s in c.get_subcommands() {
                path.push(s.get_name().to_string());
                out.push(path.clone());
                walk(s, path, out);
                path.pop();
            }
        }
        let mut out = Vec::new();
        walk(
            &<super::Cli as clap::CommandFactory>::command(),
            &mut Vec::new(),
            &mut out,
        );
        out
    }

    #[test]
    fn completions_name_every_subcommand() {
        let subs = subcommands();
        assert!(subs.iter().any(|s| s == &["console"]), "{subs:?}");
        assert!(subs.iter().any(|s| s == &["env", "update"]), "{subs:?}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            super::completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            for s in &subs {
                let last = s.last().unwrap();
                assert!(
                    text.contains(last.as_str()),
                    "{shell} completions do not mention {}",
                    s.join(" ")
                );
            }
        }
        // Bash completes each subcommand in its own case (kd__coord__subcmd__env__subcmd__add).
        let mut out = Vec::new();
        super::completions(clap_complete::Shell::Bash, &mut out);
        let text = String::from_utf8(out).unwrap();
        for s in &subs {
            let case = format!("kd__coord__subcmd__{}", s.join("__subcmd__"));
            assert!(text.contains(&case), "bash: no {case}");
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let pages = super::man_pages(dir.path()).unwrap();
        assert!(pages.contains(&"kd-coord.1".to_string()), "{pages:?}");
        for s in subcommands() {
            let page = format!("kd-coord-{}.1", s.join("-"));
            assert!(pages.contains(&page), "no {page} in {pages:?}");
            let text = std::fs::read_to_string(dir.path().join(&page)).unwrap();
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{page}: {text}"
            );
        }
        let top = std::fs::read_to_string(dir.path().join("kd-coord.1")).unwrap();
        for name in ["console", "deploy", "env", "completions", "man"] {
            assert!(top.contains(name), "kd-coord.1 does not mention {name}");
        }
    }
}
