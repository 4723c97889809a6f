//! kd-proto: everything two kd processes must agree on, with no I/O.
//!
//! * [`msg`]: the messages exchanged between the coordinator and agents, and between agents.
//! * [`codec`]: the one place where bytes become messages (bincode 1.3 with a size limit,
//!   length-prefixed frames).
//! * [`nodeset`]: ClusterShell-style node sets (`node[1-8,10]`).
//! * [`tree`]: the broadcast tree planner (chain, k-ary, star).
//! * [`auto`]: automatic arity: the tree chosen from the nodes' measured link and disk rates.
//! * [`manifest`]: the image manifest (chunk sizes, blake3 per chunk, image hash).
//! * [`bounds`]: the limits of every timeout and retry count an operator sets.
//! * [`piece`]: the pieces a relay verifies and forwards before it has the whole chunk.
//! * [`upstream`]: an agent's judgement of its upstream (how long a silence may last, when to
//!   retry the same parent, when to ask for another), time passed in as values.
//! * [`session`]: the agent session's other decisions (each control message in each phase,
//!   each frame of the upstream's stream, refused pieces, repairs, joining the coordinator).
//!
//! Architecture invariant: no tokio, no sockets, no files in this crate.
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auto;
pub mod bounds;
pub mod codec;
pub mod manifest;
pub mod msg;
pub mod nodeset;
pub mod piece;
pub mod session;
pub mod tree;
pub mod upstream;

/// ALPN protocol identifier of every kd QUIC connection.
pub const ALPN: &[u8] = b"kd/1";
/// Version of the wire protocol carried in `Hello`.
pub const PROTOCOL_VERSION: u32 = 6;
