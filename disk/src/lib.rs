//! kd-disk: what the agent does to a node's disk. Partition (gptman/mbrman), format (mkfs),
//! stream the image in (raw at offsets in coreos-installer's order, or tar extraction), then
//! post-install, SSH key, fstab and GRUB. All `unsafe` lives in [`sys`].
//!
//! The agent's flow: [`prepare`] → [`Prepared::sink`] (feed the image) → [`Prepared::finish`],
//! with a [`StepLog`] collecting the per-step timings. All calls block: run them on a blocking
//! thread. Dropping a [`Prepared`] (e.g. after an error) unmounts and detaches what it set up.
//!
//! ```no_run
//! use kd_disk::{prepare, FinishConfig, ImageKind, Layout, PrepareConfig, StepLog};
//! # fn main() -> Result<(), kd_disk::DiskError> {
//! let layout = Layout::from_yaml(
//!     "device: /dev/sda\nlabel: gpt\npartitions:\n\
//!      - { number: 1, size: 1MiB, role: bios_grub }\n\
//!      - { number: 2, size: 4GiB, role: swap }\n\
//!      - { number: 3, size: 20GiB, role: deploy, fs: ext4 }\n\
//!      - { number: 4, size: rest, role: tmp }\n",
//! )?;
//! let cfg = PrepareConfig {
//!     layout,
//!     deploy_partition: None,
//!     image: ImageKind::Tar,
//!     work_dir: "/run/kd".into(),
//!     partition: true,
//!     node_wait_ms: 2000,
//! };
//! let mut log = StepLog::default();
//! let prepared = prepare(&cfg, &mut log)?;
//! let mut sink = prepared.sink()?;
//! # let verified_chunks: Vec<Vec<u8>> = Vec::new();
//! for chunk in verified_chunks {
//!     sink.write_all(&chunk)?; // uncompressed image bytes, in order
//! }
//! let written = sink.finish()?;
//! prepared.finish(&FinishConfig { node: "node-1".into(), ..Default::default() }, &mut log)?;
//! # let _ = written;
//! // `log.steps`: name, millis, error, output of each step, for the coordinator.
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod boot;
pub mod cmd;
mod error;
pub mod fs;
pub mod layout;
pub mod loopdev;
pub mod mount;
pub mod partition;
pub mod pipeline;
pub mod post;
pub mod procstat;
pub mod safety;
pub mod steps;
#[allow(unsafe_code)] // the crate's only unsafe: see ARCHITECTURE.md
pub mod sys;
pub mod testenv;
pub mod write;

pub use boot::BootConfig;
pub use error::DiskError;
pub use layout::{FsType, Label, Layout, PartitionSpec, Plan, PlannedPartition, Role, Size};
pub use pipeline::{prepare, FinishConfig, ImageKind, PrepareConfig, Prepared, Target};
pub use post::{PostInstall, ScriptEnv};
pub use steps::{StepLog, StepRecord};
pub use write::{raw_sink, tar_sink, ImageSink, WriteSummary};
