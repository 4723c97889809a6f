//! Messages on the wire.
//!
//! Three conversations use them:
//! * the **control stream**: one bidirectional QUIC stream that an agent opens to the coordinator
//!   right after connecting; the agent sends [`ToCoord`], the coordinator answers [`ToAgent`];
//! * **data streams**: a child opens a bidirectional stream to its upstream (a parent agent or
//!   the coordinator), sends one [`DataRequest`] and reads [`DataFrame`]s;
//! * nothing else: there is no SSH, no side channel.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use crate::manifest::Manifest;

/// A 32-byte digest (SHA-256 of a certificate, or blake3).
pub type Digest = [u8; 32];

/// Agent → coordinator, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToCoord {
    /// First message of every control stream.
    Hello(Hello),
    /// Periodic transfer progress.
    Progress(Progress),
    /// The upstream stopped answering; the agent wants a new one and will resume at `next_chunk`.
    ParentLost {
        /// The lost upstream (a node name, or `None` for the coordinator).
        parent: Option<String>,
        /// First chunk the agent does not have yet.
        next_chunk: u32,
        /// What the agent saw.
        reason: String,
    },
    /// A child stopped reading (its connection closed or timed out).
    ChildLost {
        /// The child's node name.
        child: String,
        /// What the agent saw.
        reason: String,
    },
    /// One step of the disk pipeline ended (feeds per-step timings).
    Step(StepReport),
    /// The final report of this node for the current plan.
    Report(Report),
    /// A deployment step the coordinator asked for (or that follows the image) ended.
    StepEnd(StepEnd),
    /// What the agent measured for a [`ToAgent::Probe`].
    Probed(Probed),
}

/// Rates an agent measured before an `auto` broadcast (see [`crate::auto`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probed {
    /// Bytes per second fetched from the probe's `fetch` peer; `None`: not measured.
    pub link: Option<u64>,
    /// Bytes per second written and synced where the image goes; `None`: nowhere to write
    /// (a null sink) or not measured.
    pub disk: Option<u64>,
    /// Why a rate is missing, when it failed.
    pub error: Option<String>,
}

/// Measure the node's rates (for automatic arity): serve `bytes` to each of `serve` that asks,
/// fetch `bytes` from `fetch` and time it, time a write of `bytes` where the image will go;
/// answer [`ToCoord::Probed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Deployment identifier.
    pub deployment: u64,
    /// This agent's TLS identity towards its peers for the probe.
    pub identity: PeerIdentity,
    /// The peers that fetch their probe from this node.
    pub serve: Vec<PeerInfo>,
    /// The peer to fetch from; `None`: measure the disk only.
    pub fetch: Option<PeerInfo>,
    /// Bytes of each probe.
    pub bytes: u32,
}

/// The end of an agent-side deployment step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEnd {
    /// Which step.
    pub step: AgentStep,
    /// Wall-clock milliseconds the step took on the node.
    pub millis: u64,
    /// `None` on success, else what failed (with the tool's output when there is one).
    pub error: Option<String>,
}

/// Deployment steps an agent runs outside the image transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStep {
    /// Check, partition, format and mount the disk (answer to [`ToAgent::Prepare`]).
    Prepare,
    /// Post-installs, SSH key, fstab, bootloader, unmount (after a staged deployment's image).
    Finish,
}

/// The agent introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Node name, as in the cluster configuration.
    pub node: String,
    /// One-time token the coordinator gave this node (kernel command line or `--token`).
    pub token: String,
    /// UDP port where the agent accepts its children's QUIC connections.
    pub data_port: u16,
    /// What the node has.
    pub inventory: Inventory,
}

/// Hardware inventory reported in `Hello`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Block devices.
    pub disks: Vec<DiskInfo>,
    /// Memory in bytes.
    pub ram_bytes: u64,
    /// Network interfaces.
    pub nics: Vec<NicInfo>,
    /// Firmware boot mode.
    pub boot_mode: BootMode,
    /// Number of CPUs.
    pub cpus: u32,
    /// Agent version string.
    pub agent_version: String,
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Kernel name (`vda`, `nvme0n1`, `loop3`).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Rotational (spinning) disk.
    pub rotational: bool,
    /// Model string, if known.
    pub model: String,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicInfo {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:…`.
    pub mac: String,
    /// Link speed in Mbit/s, 0 if unknown.
    pub speed_mbps: u32,
}

/// Firmware boot mode of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootMode {
    /// Legacy BIOS.
    #[default]
    Bios,
    /// UEFI.
    Uefi,
}

/// Transfer progress of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Chunks received and verified.
    pub chunks: u32,
    /// Compressed bytes received and verified.
    pub bytes_received: u64,
    /// Uncompressed bytes written to the sink.
    pub bytes_written: u64,
    /// Chunks refused because their hash did not match.
    pub corrupt_chunks: u32,
}

/// Result of one disk-pipeline step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Step name (`partition`, `format`, `write`, `postinstall`, `bootloader`, …).
    pub step: String,
    /// Duration in milliseconds.
    pub millis: u64,
    /// `None` on success, the error otherwise.
    pub error: Option<String>,
    /// Output kept for the report (post-install scripts), bounded.
    pub output: String,
}

/// Final report of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `None` when every chunk was verified and written; the reason otherwise.
    pub error: Option<String>,
    /// The image hash the agent recomputed from the chunks it verified.
    pub image_hash: Option<Digest>,
    /// blake3 of the uncompressed bytes, when the sink decompressed them.
    pub content_hash: Option<Digest>,
    /// Final counters.
    pub progress: Progress,
    /// CPU seconds (user + system) the agent process used for this plan.
    pub cpu_seconds: f64,
    /// Chunks fetched again (corrupt, or missing after a change of parent).
    pub refetched_chunks: u32,
    /// Of those, the chunks another node served (swarm repair), not the coordinator.
    pub refetched_from_peers: u32,
}

/// Coordinator → agent, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// The Hello was accepted.
    Welcome(Welcome),
    /// What to do: where to get the image from, whom to serve, what to write.
    Plan(Box<Plan>),
    /// Take the image from this upstream from now on (resume at the first missing chunk).
    Reparent(Upstream),
    /// Accept and serve this additional child.
    Adopt(PeerInfo),
    /// This child of yours is gone (the coordinator lost it): close its connections, so that
    /// your window stops waiting for it.
    ChildGone(String),
    /// Everyone is done: close connections and end (or go on with the deployment).
    Finish,
    /// Prepare the disk for this deployment now, before the plan; answer
    /// [`ToCoord::StepEnd`] with [`AgentStep::Prepare`]. A later `Plan` with `Job::Deploy`
    /// writes into that prepared disk, and the agent then reports the image (`Report`) before
    /// it finishes the disk (`StepEnd` with [`AgentStep::Finish`]).
    Prepare(Box<DeployJob>),
    /// The deployment is over for this node: stop serving and reboot into the deployed system
    /// (an agent outside the deploy initrd just exits). With `kexec`, the agent first tries to
    /// boot the deployed kernel at once (`kexec -l` then `kexec -e`: no firmware, no PXE) and
    /// falls back to the plain reboot when that fails (saying why in a [`ToCoord::Step`]
    /// named `kexec`, when it still can).
    Reboot {
        /// The deployed kernel to kexec into; `None`: a firmware reboot.
        kexec: Option<Kexec>,
    },
    /// Measure this node's link and disk rates now, before the plan (an `auto` broadcast).
    Probe(Box<Probe>),
    /// Stop now, with a reason.
    Abort {
        /// Why.
        reason: String,
    },
    /// The last message was refused.
    Error(WireError),
}

/// Answer to an accepted Hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Identifier of the deployment (or broadcast) this agent joined.
    pub deployment: u64,
}

/// Where an agent gets chunks from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Upstream {
    /// The coordinator itself, over the control connection.
    Coordinator,
    /// Another agent.
    Peer(PeerInfo),
}

/// How to reach and authenticate another agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Node name.
    pub node: String,
    /// Address of its data endpoint.
    pub addr: SocketAddr,
    /// SHA-256 of the certificate the coordinator issued to it for this deployment.
    pub cert_sha256: Digest,
}

/// The certificate and key the coordinator issued to one agent for one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// DER certificate of the node, signed by the deployment CA.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER private key of the node.
    pub key_der: Vec<u8>,
    /// DER certificate of the deployment CA.
    pub ca_der: Vec<u8>,
}

/// An agent's part in a broadcast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Deployment identifier.
    pub deployment: u64,
    /// This agent's TLS identity towards its peers.
    pub identity: PeerIdentity,
    /// Where to read chunks from.
    pub upstream: Upstream,
    /// The only peers allowed to connect to this agent.
    pub children: Vec<PeerInfo>,
    /// The image.
    pub manifest: Manifest,
    /// What to do with the image.
    pub job: Job,
    /// How long to wait on a silent upstream (the cluster's `workflow.stall_floor` and
    /// `stall_timeout`); `None`: the agent's own settings (`--stall-floor`, `--stall-timeout`).
    pub stall: Option<StallLimits>,
}

/// The bounds of an agent's patience with a silent upstream (see [`crate::upstream`]): it
/// waits a few recent chunk intervals, never less than `floor_ms` and never more than
/// `timeout_ms` (also its wait for the first data of the transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallLimits {
    /// Shortest wait, milliseconds.
    pub floor_ms: u64,
    /// Longest wait, milliseconds.
    pub timeout_ms: u64,
}

/// What an agent does with the image it receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Job {
    /// Use the sink given on the agent's command line (`--sink`).
    LocalSink,
    /// Deploy onto the node's disk: prepare it, write the image into it, finish it.
    Deploy(Box<DeployJob>),
}

/// How to deploy an image onto a node's disk (the agent runs kd-disk's pipeline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployJob {
    /// The disk layout, in the cluster configuration's YAML layout syntax (kd-disk parses it).
    pub layout: String,
    /// `-p N`: the deploy partition, if not the layout's.
    pub deploy_partition: Option<u32>,
    /// What the image is.
    pub image: DeployImage,
    /// Write the partition table (false: keep the existing one, which must match).
    pub partition: bool,
    /// Environment name (`KD_ENV`).
    pub environment: String,
    /// `-k`: a public key appended to root's authorized_keys.
    pub ssh_key: Option<String>,
    /// Bootloader settings; `None` skips GRUB.
    pub boot: Option<BootSpec>,
    /// Admin then user post-install archives, in order.
    pub postinstalls: Vec<PostInstallSpec>,
    /// Timeout of each post-install script, seconds.
    pub postinstall_timeout_secs: u64,
}

/// The kind of image of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployImage {
    /// A root file system tar, extracted into the formatted deploy partition.
    Tar,
    /// A raw file system image for the deploy partition.
    RawPartition,
    /// A raw whole-disk image.
    RawDisk,
}

/// GRUB settings for the deployed system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// Kernel path in the deployed tree.
    pub kernel: String,
    /// Initrd path in the deployed tree.
    pub initrd: Option<String>,
    /// Kernel parameters (besides `root=UUID=… ro`).
    pub params: String,
    /// Install GRUB for BIOS.
    pub bios: bool,
    /// Install GRUB for UEFI on the ESP.
    pub efi: bool,
}

/// The deployed system's kernel, for [`ToAgent::Reboot`]'s kexec: paths inside the deployed
/// root file system (symlinks such as Debian's `/vmlinuz` are followed inside that tree). The
/// agent builds the command line as the GRUB entry it wrote: `root=UUID=<deploy partition> ro`
/// then `params`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kexec {
    /// Kernel path in the deployed tree (the environment's `boot.kernel`).
    pub kernel: String,
    /// Initrd path in the deployed tree (the environment's `boot.initrd`).
    pub initrd: Option<String>,
    /// Kernel parameters besides `root=UUID=… ro` (the environment's `boot.kernel_params`).
    pub params: String,
}

/// One post-install archive, carried inline (bounded by the frame size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostInstallSpec {
    /// File name, for messages.
    pub name: String,
    /// The archive (tgz, txz, tar.zst or tar).
    pub archive: Vec<u8>,
    /// Script inside the archive to run in the deployed tree.
    pub script: Option<String>,
}

/// Child → upstream, first message of a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRequest {
    /// Send every chunk from `from` to the end, in order, as they become available.
    Stream {
        /// Deployment the child belongs to.
        deployment: u64,
        /// First chunk wanted.
        from: u32,
    },
    /// Send one chunk (a repair).
    One {
        /// Deployment the child belongs to.
        deployment: u64,
        /// The chunk.
        index: u32,
    },
    /// A repair asked of the coordinator, which may answer [`DataFrame::Redirect`] to a peer
    /// that holds the chunk (swarm repair) instead of the chunk; a peer treats it as `One`.
    Repair {
        /// Deployment the child belongs to.
        deployment: u64,
        /// The chunk.
        index: u32,
        /// A node known not to hold it any more (the upstream that answered `Unavailable`).
        avoid: Option<String>,
    },
    /// Send `bytes` bytes of filler and finish the stream (a link probe, [`Probe`]).
    Probe {
        /// Deployment the prober belongs to.
        deployment: u64,
        /// How many bytes.
        bytes: u32,
    },
}

/// How long the sender of a data stream (a parent agent, the coordinator) waits for the
/// request that opens it.
pub const DATA_REQUEST_WAIT: Duration = Duration::from_secs(10);

/// What a [`DataRequest`] asks of the sender of an image's chunks ([`DataRequest::asked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Deployment the asker belongs to (a sender refuses another one's).
    pub deployment: u64,
    /// The chunks to send, in order: a stream's from its first to the image's end, a repair's
    /// its one chunk; none past the end.
    pub chunks: Range<u32>,
    /// A stream, sent in step with the sender's other streams (each chunk's piece hashes
    /// first); `false` for a repair.
    pub paced: bool,
}

impl DataRequest {
    /// What this request asks of the sender of an image of `count` chunks; `None` for a
    /// [`DataRequest::Probe`], which asks for no chunk. A `Repair` asks what `One` asks (the
    /// coordinator may redirect it to a peer first).
    pub fn asked(&self, count: u32) -> Option<Asked> {
        let (deployment, chunks, paced) = match *self {
            DataRequest::Stream { deployment, from } => (deployment, from..count, true),
            DataRequest::One { deployment, index }
            | DataRequest::Repair {
                deployment, index, ..
            } => (deployment, index..index.saturating_add(1).min(count), false),
            DataRequest::Probe { .. } => return None,
        };
        Some(Asked {
            deployment,
            chunks,
            paced,
        })
    }
}

/// Upstream → child on a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFrame {
    /// A compressed chunk. Keep this variant first: its encoding is built by hand in
    /// [`crate::codec::chunk_frame_header`].
    Chunk {
        /// Chunk index.
        index: u32,
        /// The zstd frame.
        data: Vec<u8>,
    },
    /// The upstream no longer holds this chunk (it left its window): ask the coordinator.
    Unavailable {
        /// Chunk index.
        index: u32,
    },
    /// The request was refused.
    Error(WireError),
    /// Sent on a stream just before chunk `index`: its pieces' hashes
    /// ([`crate::piece::piece_hashes`]), so that the receiver can verify and forward each piece
    /// as it arrives. A chunk without it (a repair) is verified whole.
    Pieces {
        /// Chunk index.
        index: u32,
        /// One hash per piece.
        hashes: Vec<Digest>,
    },
    /// The answer to [`DataRequest::Repair`]: this peer holds the chunk and accepts the asker
    /// now; ask it with [`DataRequest::One`] (and the coordinator again if that fails).
    Redirect(PeerInfo),
}

/// A refusal, with a code a program can act on and a message a person can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// Error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The node is not part of this deployment.
    UnknownNode,
    /// The token is wrong or was already used.
    BadToken,
    /// The message was not expected in this state.
    Unexpected,
    /// The peer is not allowed to ask for this.
    Forbidden,
    /// Anything else.
    Internal,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(deployment: u64, chunks: Range<u32>, paced: bool) -> Option<Asked> {
        Some(Asked {
            deployment,
            chunks,
            paced,
        })
    }

    #[test]
    fn a_stream_asks_from_its_first_chunk_to_the_end_in_step() {
        let r = |from| DataRequest::Stream {
            deployment: 7,
            from,
        };
        assert_eq!(r(0).asked(10), asked(7, 0..10, true));
        assert_eq!(r(4).asked(10), asked(7, 4..10, true));
        // Nothing left to send: an empty range, not an error.
        assert_eq!(r(10).asked(10), asked(7, 10..10, true));
        assert!(r(12).asked(10).is_some_and(|a| a.chunks.is_empty()));
    }

    #[test]
    fn a_repair_asks_for_its_one_chunk_and_none_past_the_end() {
        let one = |index| DataRequest::One {
            deployment: 7,
            index,
        };
        let repair = |index| DataRequest::Repair {
            deployment: 7,
            index,
            avoid: Some("n1".into()),
        };
        for r in [one, repair] {
            assert_eq!(r(0).asked(10), asked(7, 0..1, false));
            assert_eq!(r(9).asked(10), asked(7, 9..10, false));
            assert!(r(10).asked(10).is_some_and(|a| a.chunks.is_empty()));
            // No overflow at the last index.
            assert!(r(u32::MAX).asked(10).is_some_and(|a| a.chunks.is_empty()));
        }
    }

    #[test]
    fn a_probe_asks_for_no_chunk() {
        let p = DataRequest::Probe {
            deployment: 7,
            bytes: 1 << 20,
        };
        assert_eq!(p.asked(10), None);
    }
}
