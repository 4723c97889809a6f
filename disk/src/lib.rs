//! kd-disk: what the agent does to a node's disk. Partition (gptman/mbrman), format (mkfs),
//! stream the image in (raw at offsets in coreos-installer's order, or tar extraction), then
//! post-install, SSH key, fstab and GRUB. All `unsafe` lives in [`sys`].
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
pub mod sys;
pub mod write;

pub use error::DiskError;
pub use write::{raw_sink, tar_sink, ImageSink, WriteSummary};
