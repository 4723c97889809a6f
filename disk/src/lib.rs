//! kd-disk: what the agent does to a node's disk. Partition (gptman/mbrman), format (mkfs),
//! stream the image in (raw at offsets in coreos-installer's order, or tar extraction), then
//! post-install, SSH key, fstab and GRUB. All `unsafe` lives in [`sys`].
//!
//! The agent's flow: [`prepare`] → [`Prepared::sink`] (feed the image) → [`Prepared::finish`],
//! with a [`StepLog`] collecting the per-step timings.
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
pub mod safety;
pub mod steps;
pub mod sys;
pub mod write;

pub use boot::BootConfig;
pub use error::DiskError;
pub use layout::{FsType, Label, Layout, PartitionSpec, Plan, PlannedPartition, Role, Size};
pub use pipeline::{prepare, FinishConfig, ImageKind, PrepareConfig, Prepared, Target};
pub use post::{PostInstall, ScriptEnv};
pub use steps::{StepLog, StepRecord};
pub use write::{raw_sink, tar_sink, ImageSink, WriteSummary};
