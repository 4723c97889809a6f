//! kd-agent: runs on each node (in the deploy initrd), receives the image through the broadcast
//! tree, relays it to its children, and writes its own copy.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod inventory;
pub mod kexec;
mod peer;
mod probe;
mod session;
mod sink;
mod store;

pub use config::{AgentConfig, Fault, SinkSpec};
pub use session::{run, AgentOutcome};
