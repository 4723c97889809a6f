//! Framed messages on QUIC streams: every read has a size limit and a timeout.

use std::time::Duration;

use kd_proto::codec::{self, CodecError, HEADER_LEN};
use serde::{de::DeserializeOwned, Serialize};

/// A message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Nothing arrived in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The stream ended cleanly where a message was expected.
    #[error("the peer closed the stream")]
    Closed,
    /// Reading failed (connection lost, reset).
    #[error("read failed: {0}")]
    Read(String),
    /// Writing failed.
    #[error("write failed: {0}")]
    Write(String),
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Sends one message as a frame.
pub async fn send<T: Serialize>(s: &mut quinn::SendStream, msg: &T) -> Result<(), WireError> {
    let f = codec::encode(msg)?;
    s.write_all(&f)
        .await
        .map_err(|e| WireError::Write(e.to_string()))
}

/// Reads one frame payload of at most `limit` bytes; `Ok(None)` at a clean end of stream.
pub async fn recv_payload(
    r: &mut quinn::RecvStream,
    limit: u32,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(WireError::Read("stream ended inside a frame header".into()))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(WireError::Read(e.to_string())),
    }
    let len = codec::frame_len(h, limit)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            WireError::Read(format!("stream ended after {n} of {len} frame bytes"))
        }
        quinn::ReadExactError::ReadError(e) => WireError::Read(e.to_string()),
    })?;
    Ok(Some(buf))
}

/// Reads one control message (limit [`codec::MAX_CONTROL_FRAME`]) within `timeout`.
pub async fn recv<T: DeserializeOwned>(
    r: &mut quinn::RecvStream,
    timeout: Duration,
    what: &'static str,
) -> Result<T, WireError> {
    let p = tokio::time::timeout(timeout, recv_payload(r, codec::MAX_CONTROL_FRAME))
        .await
        .map_err(|_| WireError::Timeout(timeout, what))??;
    let p = p.ok_or(WireError::Closed)?;
    Ok(codec::decode(&p)?)
}

/// Like [`recv`] with no timeout, `Ok(None)` at a clean end (long-lived control streams, where
/// liveness is the connection's idle timeout).
pub async fn recv_opt<T: DeserializeOwned>(
    r: &mut quinn::RecvStream,
) -> Result<Option<T>, WireError> {
    match recv_payload(r, codec::MAX_CONTROL_FRAME).await? {
        None => Ok(None),
        Some(p) => Ok(Some(codec::decode(&p)?)),
    }
}
