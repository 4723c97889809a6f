//! Connections to other agents: a parent, a peer that repairs a chunk, a probe's peer.

use std::time::Duration;

use anyhow::{bail, Result};
use kd_proto::msg::{PeerIdentity, PeerInfo};
use tokio::time::Instant;

/// Longest wait for one connection attempt (a dead peer never answers).
const ATTEMPT: Duration = Duration::from_secs(3);
/// Pause between two attempts.
const PAUSE: Duration = Duration::from_millis(250);

/// A connection to `peer` from `endpoint`: the peer's certificate pinned (the fingerprint the
/// coordinator gave), this node's `identity` (issued for the deployment) presented. The peer
/// may learn about this node a moment after this node learns about it (its `Adopt`, its probe
/// order), and refuses it until then: attempts are retried, each bounded, all within
/// `patience`.
pub(crate) async fn connect_peer(
    endpoint: &quinn::Endpoint,
    identity: &PeerIdentity,
    peer: &PeerInfo,
    patience: Duration,
) -> Result<quinn::Connection> {
    let client = kd_net::tls::child_to_parent(
        peer.cert_sha256,
        identity.cert_der.clone(),
        identity.key_der.clone(),
    )?;
    let mut last = None;
    // One clock, tokio's, for the deadline and the timings: the attempts' time limits and the
    // logged durations agree (and follow tokio's time in tests that pause it).
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let attempt = endpoint.connect_with(client.clone(), peer.addr, "kd-peer")?;
        let t = Instant::now();
        let left = deadline.saturating_duration_since(t);
        match tokio::time::timeout(left.min(ATTEMPT), attempt).await {
            Ok(Ok(c)) => {
                tracing::debug!(peer = %peer.node, ms = t.elapsed().as_millis() as u64, "connected to a peer");
                return Ok(c);
            }
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("no answer".into()),
        }
        tracing::debug!(peer = %peer.node, ms = t.elapsed().as_millis() as u64, error = ?last, "connection attempt failed");
        tokio::time::sleep(PAUSE).await;
    }
    bail!(
        "cannot connect to {} at {}: {}",
        peer.node,
        peer.addr,
        last.unwrap_or_default()
    )
}
