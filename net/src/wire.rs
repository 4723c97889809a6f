//! Framed messages on QUIC streams: every read has a size limit and a timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kd_proto::codec::{self, CodecError, CHUNK_PREFIX_LEN, HEADER_LEN};
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

/// A data-stream frame as a receiver gets it (a chunk's header, then its data read with
/// [`recv_bytes`], all at once ([`recv_chunk`]) or piece by piece).
pub use kd_proto::codec::DataIn;

fn read_err(e: quinn::ReadExactError, what: &str) -> WireError {
    match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            WireError::Read(format!("stream ended after {n} bytes inside {what}"))
        }
        quinn::ReadExactError::ReadError(e) => WireError::Read(e.to_string()),
    }
}

/// Reads the next data-stream frame of at most `limit` payload bytes, or a chunk frame's header
/// only; `Ok(None)` at a clean end of stream.
pub async fn recv_data(r: &mut quinn::RecvStream, limit: u32) -> Result<Option<DataIn>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_err(e, "a frame header")),
    }
    let len = codec::frame_len(h, limit)?;
    if len < CHUNK_PREFIX_LEN {
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)
            .await
            .map_err(|e| read_err(e, "a frame"))?;
        return Ok(Some(DataIn::Other(codec::decode(&buf)?)));
    }
    let mut prefix = [0u8; CHUNK_PREFIX_LEN];
    r.read_exact(&mut prefix)
        .await
        .map_err(|e| read_err(e, "a frame"))?;
    let Some((index, data_len)) = codec::parse_chunk_prefix(&prefix, len)? else {
        let mut buf = vec![0u8; len];
        buf[..CHUNK_PREFIX_LEN].copy_from_slice(&prefix);
        r.read_exact(&mut buf[CHUNK_PREFIX_LEN..])
            .await
            .map_err(|e| read_err(e, "a frame"))?;
        return Ok(Some(DataIn::Other(codec::decode(&buf)?)));
    };
    Ok(Some(DataIn::ChunkStart {
        index,
        len: data_len,
    }))
}

/// Reads exactly `n` bytes of chunk data into one buffer of that size (one copy, no zeroing).
pub async fn recv_bytes(r: &mut quinn::RecvStream, n: usize) -> Result<Bytes, WireError> {
    let mut data = BytesMut::with_capacity(n);
    while data.len() < n {
        match r.read_chunk(n - data.len(), true).await {
            Ok(Some(c)) => data.extend_from_slice(&c.bytes),
            Ok(None) => {
                return Err(WireError::Read(format!(
                    "stream ended after {} of {n} bytes of chunk data",
                    data.len()
                )))
            }
            Err(e) => return Err(WireError::Read(e.to_string())),
        }
    }
    Ok(data.freeze())
}

/// A whole data frame: a chunk (index, data) or another frame.
pub type Whole = kd_proto::codec::Whole<Bytes>;

/// Like [`recv_data`], reading a chunk's data whole.
pub async fn recv_chunk(r: &mut quinn::RecvStream, limit: u32) -> Result<Option<Whole>, WireError> {
    Ok(match recv_data(r, limit).await? {
        None => None,
        Some(DataIn::ChunkStart { index, len }) => {
            Some(Whole::Chunk(index, recv_bytes(r, len).await?))
        }
        Some(DataIn::Other(f)) => Some(Whole::Other(f)),
    })
}

/// Writes a chunk frame: the hand-written header, then the shared chunk bytes, which QUIC keeps
/// until they are acknowledged instead of copying them.
pub async fn send_chunk(
    s: &mut quinn::SendStream,
    index: u32,
    data: Bytes,
) -> Result<(), WireError> {
    let h = codec::chunk_frame_header(index, data.len())?;
    let mut parts = [Bytes::copy_from_slice(&h), data];
    s.write_all_chunks(&mut parts)
        .await
        .map_err(|e| WireError::Write(e.to_string()))
}

/// Writes the header of a chunk frame of `len` data bytes; the data follows with [`send_bytes`].
pub async fn send_chunk_header(
    s: &mut quinn::SendStream,
    index: u32,
    len: usize,
) -> Result<(), WireError> {
    let h = codec::chunk_frame_header(index, len)?;
    s.write_all(&h)
        .await
        .map_err(|e| WireError::Write(e.to_string()))
}

/// Writes shared bytes (a piece of a chunk) without copying them.
pub async fn send_bytes(s: &mut quinn::SendStream, data: Bytes) -> Result<(), WireError> {
    s.write_all_chunks(&mut [data])
        .await
        .map_err(|e| WireError::Write(e.to_string()))
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
