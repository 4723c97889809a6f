//! The codec: the only module that knows bincode.
//!
//! A frame is a little-endian `u32` payload length followed by the payload, the bincode 1.3
//! encoding (fixed-width integers, little endian, size limit [`MAX_FRAME`]) of one message.
//! Changing the codec touches this file only.

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

use crate::msg::DataFrame;

/// Largest payload accepted in one frame (a 4 MiB chunk that zstd could not shrink fits easily).
pub const MAX_FRAME: u32 = 20 * 1024 * 1024;
/// Largest control message (everything but chunk frames) accepted.
pub const MAX_CONTROL_FRAME: u32 = 16 * 1024 * 1024;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// A frame that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame announces more bytes than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Limit in force.
        limit: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn options(limit: u32) -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(u64::from(limit))
        .reject_trailing_bytes()
}

/// Encodes `msg` as a whole frame (header + payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let opts = options(MAX_FRAME);
    let len = opts.serialized_size(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => CodecError::TooLarge {
            len: u64::MAX,
            limit: MAX_FRAME,
        },
        other => CodecError::Malformed(other.to_string()),
    })?;
    let len32 =
        u32::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or(CodecError::TooLarge {
                len,
                limit: MAX_FRAME,
            })?;
    let mut out = Vec::with_capacity(HEADER_LEN + len32 as usize);
    out.extend_from_slice(&len32.to_le_bytes());
    opts.serialize_into(&mut out, msg)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok(out)
}

/// Reads the payload length from a frame header and checks it against `limit`.
pub fn frame_len(header: [u8; HEADER_LEN], limit: u32) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes(header);
    if len > limit {
        return Err(CodecError::TooLarge {
            len: u64::from(len),
            limit,
        });
    }
    Ok(len as usize)
}

/// Decodes one payload (without its header).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let limit = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .min(MAX_FRAME);
    options(limit)
        .deserialize(payload)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Bytes of a chunk frame before its data: frame length, variant tag, index, data length.
pub const CHUNK_HEADER_LEN: usize = HEADER_LEN + 4 + 4 + 8;

/// The header that, followed by `data_len` bytes of data, is exactly the frame of
/// `DataFrame::Chunk { index, data }`. Lets a relay send a chunk without copying it.
pub fn chunk_frame_header(
    index: u32,
    data_len: usize,
) -> Result<[u8; CHUNK_HEADER_LEN], CodecError> {
    let payload = (CHUNK_HEADER_LEN - HEADER_LEN) as u64 + data_len as u64;
    let len = u32::try_from(payload)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(CodecError::TooLarge {
            len: payload,
            limit: MAX_FRAME,
        })?;
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&0u32.to_le_bytes()); // variant 0: Chunk
    h[8..12].copy_from_slice(&index.to_le_bytes());
    h[12..20].copy_from_slice(&(data_len as u64).to_le_bytes());
    Ok(h)
}

/// Bytes of a chunk frame's payload before its data: variant tag, index, data length.
pub const CHUNK_PREFIX_LEN: usize = CHUNK_HEADER_LEN - HEADER_LEN;

/// Reads the start of a data-stream payload of `payload_len` bytes: `Ok(Some((index,
/// data_len)))` if it is a `DataFrame::Chunk` whose data length matches the payload, `Ok(None)`
/// if it is another variant (decode the whole payload with [`decode`]). Lets a receiver read the
/// chunk data straight into its final buffer.
pub fn parse_chunk_prefix(
    prefix: &[u8; CHUNK_PREFIX_LEN],
    payload_len: usize,
) -> Result<Option<(u32, usize)>, CodecError> {
    if prefix[0..4] != 0u32.to_le_bytes() {
        return Ok(None);
    }
    let index = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&prefix[8..16]);
    let data_len = u64::from_le_bytes(l);
    let carried = payload_len.saturating_sub(CHUNK_PREFIX_LEN);
    if payload_len < CHUNK_PREFIX_LEN || data_len != carried as u64 {
        return Err(CodecError::Malformed(format!(
            "chunk {index} announces {data_len} bytes but carries {carried}"
        )));
    }
    Ok(Some((index, carried)))
}

/// A data-stream frame as a receiver gets it. A chunk's data is not read with its header: the
/// receiver reads it separately (kd-net's `wire::recv_bytes`), all at once or piece by piece,
/// straight from QUIC's receive buffers into shared, reference-counted bytes (handed to the
/// children's senders and the writer without copies).
#[derive(Debug)]
pub enum DataIn {
    /// The start of a `DataFrame::Chunk`: `len` bytes of chunk data follow on the stream.
    ChunkStart {
        /// Chunk index.
        index: u32,
        /// Bytes of compressed chunk data that follow.
        len: usize,
    },
    /// Any other data frame.
    Other(DataFrame),
}

/// A whole data frame: a chunk (index, data of type `T`) or another frame.
#[derive(Debug)]
pub enum Whole<T> {
    /// `DataFrame::Chunk`, its data read whole (not verified yet).
    Chunk(u32, T),
    /// Any other data frame.
    Other(DataFrame),
}

/// Decodes a data-stream payload (a whole frame in memory; streaming receivers use
/// [`parse_chunk_prefix`] instead).
pub fn decode_data_frame(payload: Vec<u8>) -> Result<DataFrame, CodecError> {
    if let Some(prefix) = payload
        .get(..CHUNK_PREFIX_LEN)
        .and_then(|p| <&[u8; CHUNK_PREFIX_LEN]>::try_from(p).ok())
    {
        if let Some((index, _)) = parse_chunk_prefix(prefix, payload.len())? {
            return Ok(DataFrame::Chunk {
                index,
                data: payload[CHUNK_PREFIX_LEN..].to_vec(),
            });
        }
    }
    decode(&payload)
}

/// Accumulates bytes from a stream and cuts them into frame payloads (sans-I/O).
///
/// Taken frames are skipped by an offset and the buffer compacted on `push` once they make up
/// half of it: the work is linear in the bytes received, whatever the frame sizes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already taken.
    start: usize,
    limit: u32,
}

impl FrameDecoder {
    /// A decoder refusing frames over `limit` bytes.
    pub fn new(limit: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            limit,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete payload, if any.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, CodecError> {
        let avail = &self.buf[self.start..];
        let Some(h) = avail
            .get(..HEADER_LEN)
            .and_then(|h| <[u8; HEADER_LEN]>::try_from(h).ok())
        else {
            return Ok(None);
        };
        let len = frame_len(h, self.limit)?;
        let Some(payload) = avail.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let frame = payload.to_vec();
        self.start += HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    /// Bytes held that do not form a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;
    use proptest::prelude::*;

    fn hello(node: String, token: String) -> ToCoord {
        ToCoord::Hello(Hello {
            version: crate::PROTOCOL_VERSION,
            node,
            token,
            data_port: 4000,
            inventory: Inventory::default(),
        })
    }

    #[test]
    fn chunk_header_matches_bincode() {
        let data = vec![7u8; 1000];
        let full = encode(&DataFrame::Chunk {
            index: 42,
            data: data.clone(),
        })
        .unwrap();
        let mut manual = chunk_frame_header(42, data.len()).unwrap().to_vec();
        manual.extend_from_slice(&data);
        assert_eq!(full, manual);
        let back = decode_data_frame(full[HEADER_LEN..].to_vec()).unwrap();
        assert_eq!(back, DataFrame::Chunk { index: 42, data });
    }

    #[test]
    fn chunk_prefix_parses_what_the_header_writes() {
        let h = chunk_frame_header(9, 300).unwrap();
        let payload_len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let mut prefix = [0u8; CHUNK_PREFIX_LEN];
        prefix.copy_from_slice(&h[HEADER_LEN..]);
        assert_eq!(
            parse_chunk_prefix(&prefix, payload_len).unwrap(),
            Some((9, 300))
        );
        // A length that does not match the frame is refused, also below the prefix size.
        assert!(parse_chunk_prefix(&prefix, payload_len + 1).is_err());
        assert!(parse_chunk_prefix(&prefix, 3).is_err());
        // Another variant: not a chunk.
        let f = encode(&DataFrame::Unavailable { index: 4 }).unwrap();
        let mut p = [0u8; CHUNK_PREFIX_LEN];
        p[..4].copy_from_slice(&f[HEADER_LEN..HEADER_LEN + 4]);
        assert_eq!(parse_chunk_prefix(&p, f.len() - HEADER_LEN).unwrap(), None);
    }

    /// `Reboot` with and without a kexec survives the codec as it was sent.
    #[test]
    fn reboot_with_kexec_roundtrips() {
        for m in [
            ToAgent::Reboot { kexec: None },
            ToAgent::Reboot {
                kexec: Some(Kexec {
                    kernel: "/vmlinuz".into(),
                    initrd: Some("/initrd.img".into()),
                    params: "console=ttyS0,115200n8 rw".into(),
                }),
            },
            ToAgent::Reboot {
                kexec: Some(Kexec {
                    kernel: "/boot/vmlinuz-6.1.0-18-amd64".into(),
                    initrd: None,
                    params: String::new(),
                }),
            },
        ] {
            let f = encode(&m).unwrap();
            let back: ToAgent = decode(&f[HEADER_LEN..]).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn over_limit_header_is_refused() {
        let err = frame_len((MAX_FRAME + 1).to_le_bytes(), MAX_FRAME).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        let mut d = FrameDecoder::new(1024);
        d.push(&2048u32.to_le_bytes());
        assert!(matches!(
            d.next_payload(),
            Err(CodecError::TooLarge { len: 2048, .. })
        ));
    }

    /// Many small frames in one push come out in linear time: each payload taken used to
    /// copy every byte behind it (`split_off`), 200,000 empty frames took minutes (found by
    /// fuzz/, target `frame`: fuzz/regressions/frame/861bd8ebafe7e417.bin took 9.6 s).
    #[test]
    fn many_small_frames_decode_in_linear_time() {
        let n = 200_000;
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        d.push(&vec![0u8; n * HEADER_LEN]);
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(d.next_payload().unwrap(), Some(Vec::new()));
        }
        assert_eq!(d.next_payload().unwrap(), None);
        assert_eq!(d.pending(), 0);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        // A frame split across pushes after many taken ones still comes out whole.
        let f = encode(&DataFrame::Unavailable { index: 7 }).unwrap();
        d.push(&[0u8; 4 * HEADER_LEN]);
        d.push(&f[..3]);
        for _ in 0..4 {
            assert_eq!(d.next_payload().unwrap(), Some(Vec::new()));
        }
        assert_eq!(d.next_payload().unwrap(), None);
        assert_eq!(d.pending(), 3);
        d.push(&f[3..]);
        assert_eq!(d.next_payload().unwrap().unwrap(), f[HEADER_LEN..].to_vec());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn huge_vec_length_inside_frame_is_refused_without_allocating() {
        // A Chunk whose inner length claims 2^60 bytes must fail, not allocate.
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes()); // ToCoord::Progress? no: variant 1 of DataFrame
        p.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<ToCoord>(&p).is_err());
        assert!(decode_data_frame(p).is_err());
    }

    #[test]
    fn truncated_chunk_is_refused() {
        let full = encode(&DataFrame::Chunk {
            index: 1,
            data: vec![1; 100],
        })
        .unwrap();
        let cut = full[HEADER_LEN..full.len() - 1].to_vec();
        assert!(decode_data_frame(cut).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip_control(node in "[a-z0-9-]{0,40}", token in ".{0,64}") {
            let m = hello(node, token);
            let f = encode(&m).unwrap();
            let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
            // feed byte by byte
            let mut got = None;
            for b in &f {
                d.push(std::slice::from_ref(b));
                if let Some(p) = d.next_payload().unwrap() { got = Some(p); }
            }
            let back: ToCoord = decode(&got.unwrap()).unwrap();
            prop_assert_eq!(back, m);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn roundtrip_data(index in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let m = DataFrame::Chunk { index, data };
            let f = encode(&m).unwrap();
            prop_assert_eq!(decode_data_frame(f[HEADER_LEN..].to_vec()).unwrap(), m);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ToCoord>(&bytes);
            let _ = decode::<ToAgent>(&bytes);
            let _ = decode::<DataRequest>(&bytes);
            let _ = decode_data_frame(bytes.clone());
            let mut d = FrameDecoder::new(256);
            d.push(&bytes);
            while let Ok(Some(p)) = d.next_payload() { let _ = decode::<ToAgent>(&p); }
        }
    }
}
