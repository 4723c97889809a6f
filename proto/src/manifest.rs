//! The image manifest: how an image is cut into independently decodable zstd chunks.
//!
//! Each chunk is one zstd frame holding `chunk_size` uncompressed bytes (the last one may hold
//! fewer). Agents verify the blake3 of the *compressed* bytes before they forward, decompress or
//! write anything, so a relay never needs to decompress. The image hash commits to the kind,
//! the sizes and every chunk hash: two images with the same hash are the same image.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::msg::Digest;

/// Smallest chunk size `kd-coord image pack` accepts (a file system block). With
/// [`MAX_CHUNKS`], bounds the image packed at this size to 4 KiB x 174,761 chunks (716 MB).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size: in a pack request and in every manifest accepted (a .kdi opened, a plan
/// received).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Largest compressed chunk in a manifest: zstd's worst case for [`MAX_CHUNK_SIZE`] bytes is
/// well under it, and a chunk frame carrying it fits in [`codec::MAX_FRAME`].
pub const MAX_COMP_LEN: u32 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 8 + 1024;
/// Largest encoded manifest (the codec payload, without its frame header): the one limit that
/// `image pack` writes under ([`encode`]), that opening a .kdi ([`decode`]) and an agent's
/// [`Manifest::validate`] (through [`MAX_CHUNKS`]) apply. Half of [`codec::MAX_CONTROL_FRAME`]:
/// a `Plan` carries the manifest with the rest of the plan.
pub const MAX_MANIFEST_BYTES: u32 = 8 * 1024 * 1024;
/// Encoded bytes of a manifest without chunks: kind (u32 tag), chunk size, total size,
/// content hash, chunk count (u64).
pub const MANIFEST_BASE_BYTES: u32 = 4 + 4 + 8 + 32 + 8;
/// Encoded bytes of one [`ChunkInfo`]: offset, compressed and raw lengths, hash.
pub const CHUNK_INFO_BYTES: u32 = 8 + 4 + 4 + 32;
/// Most chunks in a manifest: as many as fit in [`MAX_MANIFEST_BYTES`] (174,761).
pub const MAX_CHUNKS: u32 = (MAX_MANIFEST_BYTES - MANIFEST_BASE_BYTES) / CHUNK_INFO_BYTES;

const _: () = assert!(MAX_MANIFEST_BYTES <= codec::MAX_CONTROL_FRAME / 2);
const _: () = assert!(MAX_COMP_LEN as usize + codec::CHUNK_PREFIX_LEN <= codec::MAX_FRAME as usize);
const _: () = assert!(MIN_CHUNK_SIZE <= MAX_CHUNK_SIZE);

/// Encoded bytes of a manifest of `chunks` chunks (the codec's fixed-width encoding).
pub const fn encoded_len(chunks: u64) -> u64 {
    MANIFEST_BASE_BYTES as u64 + chunks * CHUNK_INFO_BYTES as u64
}

/// What the uncompressed stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageKind {
    /// A tar archive (a root file system): extracted onto a file system.
    Tar,
    /// A raw disk or partition image: written at offsets.
    Raw,
}

/// One chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// Offset of the compressed bytes in the image file's data section.
    pub offset: u64,
    /// Compressed length.
    pub comp_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// blake3 of the compressed bytes.
    pub hash: Digest,
}

/// The manifest of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// What the uncompressed stream is.
    pub kind: ImageKind,
    /// Uncompressed bytes per chunk (all but the last).
    pub chunk_size: u32,
    /// Uncompressed size of the whole image.
    pub total_size: u64,
    /// blake3 of the whole uncompressed stream.
    pub content_hash: Digest,
    /// The chunks, in order.
    pub chunks: Vec<ChunkInfo>,
}

/// A manifest that does not hold together, or is over the limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The chunk sizes do not add up or break the rules.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
    /// More chunks than [`MAX_CHUNKS`].
    #[error(
        "{count} chunks: a manifest holds at most {MAX_CHUNKS} ({MAX_MANIFEST_BYTES} bytes); \
         use bigger chunks"
    )]
    TooManyChunks {
        /// Chunks there are (or would be).
        count: u64,
    },
    /// An encoded manifest over [`MAX_MANIFEST_BYTES`].
    #[error("manifest of {len} bytes exceeds the limit of {MAX_MANIFEST_BYTES} bytes")]
    TooLarge {
        /// Its length.
        len: u64,
    },
    /// Bytes that do not decode as a manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
}

/// Builds a manifest chunk by chunk (used by `kd-coord image pack`).
#[derive(Debug)]
pub struct ManifestBuilder {
    kind: ImageKind,
    chunk_size: u32,
    offset: u64,
    total: u64,
    content: blake3::Hasher,
    chunks: Vec<ChunkInfo>,
}

impl ManifestBuilder {
    /// Starts an empty manifest.
    pub fn new(kind: ImageKind, chunk_size: u32) -> Self {
        Self {
            kind,
            chunk_size,
            offset: 0,
            total: 0,
            content: blake3::Hasher::new(),
            chunks: Vec::new(),
        }
    }

    /// Adds the next chunk: its uncompressed bytes and their compressed form. Refuses a chunk
    /// over the chunk size, a compressed chunk over [`MAX_COMP_LEN`], and a chunk past
    /// [`MAX_CHUNKS`]: what this builds always passes [`Manifest::validate`] (unless the chunk
    /// size itself is out of bounds, or a short chunk is not the last one).
    pub fn push(&mut self, raw: &[u8], compressed: &[u8]) -> Result<(), ManifestError> {
        if self.chunks.len() as u64 >= u64::from(MAX_CHUNKS) {
            return Err(ManifestError::TooManyChunks {
                count: self.chunks.len() as u64 + 1,
            });
        }
        let index = self.chunks.len();
        let (Ok(raw_len), Ok(comp_len)) =
            (u32::try_from(raw.len()), u32::try_from(compressed.len()))
        else {
            return Err(ManifestError::Inconsistent(format!(
                "chunk {index} over 4 GiB"
            )));
        };
        if raw_len > self.chunk_size || comp_len == 0 || comp_len > MAX_COMP_LEN {
            return Err(ManifestError::Inconsistent(format!(
                "chunk {index}: {raw_len} bytes compressed to {comp_len}, chunk size {}",
                self.chunk_size
            )));
        }
        self.content.update(raw);
        self.chunks.push(ChunkInfo {
            offset: self.offset,
            comp_len,
            raw_len,
            hash: *blake3::hash(compressed).as_bytes(),
        });
        self.offset += u64::from(comp_len);
        self.total += u64::from(raw_len);
        Ok(())
    }

    /// Chunks pushed so far.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// No chunk pushed yet.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The finished manifest.
    pub fn finish(self) -> Manifest {
        Manifest {
            kind: self.kind,
            chunk_size: self.chunk_size,
            total_size: self.total,
            content_hash: *self.content.finalize().as_bytes(),
            chunks: self.chunks,
        }
    }
}

impl Manifest {
    /// The image hash: blake3 over the kind, the sizes, the content hash and every chunk hash.
    pub fn image_hash(&self) -> Digest {
        image_hash_of(
            self.kind,
            self.chunk_size,
            self.total_size,
            &self.content_hash,
            |f| {
                for c in &self.chunks {
                    f(c.raw_len, &c.hash);
                }
            },
        )
    }

    /// Compressed size of the image.
    pub fn compressed_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.comp_len)).sum()
    }

    /// Number of chunks, as the wire counts them.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Checks the rules: at most [`MAX_CHUNKS`] chunks of at most [`MAX_CHUNK_SIZE`] bytes,
    /// sizes add up, every chunk but the last is full, offsets are contiguous.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Inconsistent(s));
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return bad(format!(
                "chunk size {} not in 1..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.chunks.len() as u64 > u64::from(MAX_CHUNKS) {
            return Err(ManifestError::TooManyChunks {
                count: self.chunks.len() as u64,
            });
        }
        let mut offset = 0u64;
        let mut total = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            let last = i + 1 == self.chunks.len();
            if c.offset != offset {
                return bad(format!(
                    "chunk {i} at offset {} instead of {offset}",
                    c.offset
                ));
            }
            if c.raw_len > self.chunk_size || (!last && c.raw_len != self.chunk_size) {
                return bad(format!(
                    "chunk {i} holds {} bytes, chunk size is {}",
                    c.raw_len, self.chunk_size
                ));
            }
            if c.comp_len == 0 || c.comp_len > MAX_COMP_LEN {
                return bad(format!(
                    "chunk {i} has a compressed length of {}",
                    c.comp_len
                ));
            }
            offset += u64::from(c.comp_len);
            total += u64::from(c.raw_len);
        }
        if total != self.total_size {
            return bad(format!(
                "chunks hold {total} bytes, manifest says {}",
                self.total_size
            ));
        }
        Ok(())
    }
}

/// Encodes `manifest` as a codec frame (header + payload), refusing one that [`decode`] would
/// refuse: over [`MAX_CHUNKS`] chunks or [`MAX_MANIFEST_BYTES`] bytes, or inconsistent.
pub fn encode(manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    manifest.validate()?;
    let frame = codec::encode(manifest).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let len = frame.len().saturating_sub(codec::HEADER_LEN) as u64;
    if len > u64::from(MAX_MANIFEST_BYTES) {
        return Err(ManifestError::TooLarge { len });
    }
    Ok(frame)
}

/// Decodes and validates a manifest payload (without its frame header): refuses more than
/// [`MAX_MANIFEST_BYTES`] bytes before decoding anything, then what [`Manifest::validate`]
/// refuses. Fuzzed by fuzz/src/targets.rs (target `manifest`).
pub fn decode(payload: &[u8]) -> Result<Manifest, ManifestError> {
    if payload.len() as u64 > u64::from(MAX_MANIFEST_BYTES) {
        return Err(ManifestError::TooLarge {
            len: payload.len() as u64,
        });
    }
    let manifest: Manifest =
        codec::decode(payload).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    manifest.validate()?;
    Ok(manifest)
}

/// Recomputes an image hash from its parts, in order (agents do this from what they verified).
pub fn image_hash_of(
    kind: ImageKind,
    chunk_size: u32,
    total_size: u64,
    content_hash: &Digest,
    chunks: impl FnOnce(&mut dyn FnMut(u32, &Digest)),
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"kd-image-v1");
    h.update(&[match kind {
        ImageKind::Tar => 0,
        ImageKind::Raw => 1,
    }]);
    h.update(&chunk_size.to_le_bytes());
    h.update(&total_size.to_le_bytes());
    h.update(content_hash);
    chunks(&mut |raw_len, hash| {
        h.update(&raw_len.to_le_bytes());
        h.update(hash);
    });
    *h.finalize().as_bytes()
}

/// Verifies one received chunk against the manifest.
pub fn verify_chunk(manifest: &Manifest, index: u32, data: &[u8]) -> Result<(), String> {
    let Some(info) = manifest.chunks.get(index as usize) else {
        return Err(format!(
            "chunk {index} is not in the manifest ({} chunks)",
            manifest.chunks.len()
        ));
    };
    if data.len() != info.comp_len as usize {
        return Err(format!(
            "chunk {index}: {} bytes, expected {}",
            data.len(),
            info.comp_len
        ));
    }
    if blake3::hash(data).as_bytes() != &info.hash {
        return Err(format!("chunk {index}: blake3 mismatch"));
    }
    Ok(())
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut b = ManifestBuilder::new(ImageKind::Raw, 4);
        b.push(b"abcd", b"ABCDE").unwrap();
        b.push(b"ef", b"EF").unwrap();
        b.finish()
    }

    #[test]
    fn builder_offsets_and_validate() {
        let m = sample();
        assert_eq!(m.chunks[1].offset, 5);
        assert_eq!(m.total_size, 6);
        assert_eq!(m.compressed_size(), 7);
        m.validate().unwrap();
        assert_eq!(m.content_hash, *blake3::hash(b"abcdef").as_bytes());
    }

    #[test]
    fn validate_catches_short_middle_chunk() {
        let mut m = sample();
        m.chunks.swap(0, 1);
        assert!(m.validate().is_err());
    }

    #[test]
    fn verify_chunk_detects_corruption() {
        let m = sample();
        verify_chunk(&m, 0, b"ABCDE").unwrap();
        assert!(verify_chunk(&m, 0, b"ABCDF")
            .unwrap_err()
            .contains("blake3"));
        assert!(verify_chunk(&m, 5, b"x").is_err());
    }

    #[test]
    fn image_hash_depends_on_every_chunk() {
        let a = sample();
        let mut b = sample();
        b.chunks[1].hash[0] ^= 1;
        assert_ne!(a.image_hash(), b.image_hash());
    }

    /// A consistent manifest of `n` chunks of `chunk_size` bytes, every field at its widest.
    fn widest(n: u32, chunk_size: u32) -> Manifest {
        Manifest {
            kind: ImageKind::Raw,
            chunk_size,
            total_size: u64::from(n) * u64::from(chunk_size),
            content_hash: [0xff; 32],
            chunks: (0..u64::from(n))
                .map(|i| ChunkInfo {
                    offset: i * u64::from(MAX_COMP_LEN),
                    comp_len: MAX_COMP_LEN,
                    raw_len: chunk_size,
                    hash: [0xff; 32],
                })
                .collect(),
        }
    }

    #[test]
    fn the_most_chunks_fit_the_limit_and_one_more_is_refused_everywhere() {
        let m = widest(MAX_CHUNKS, MIN_CHUNK_SIZE);
        let frame = encode(&m).unwrap();
        let payload = &frame[codec::HEADER_LEN..];
        assert_eq!(payload.len() as u64, encoded_len(u64::from(MAX_CHUNKS)));
        assert!(payload.len() <= MAX_MANIFEST_BYTES as usize);
        assert!(encoded_len(u64::from(MAX_CHUNKS) + 1) > u64::from(MAX_MANIFEST_BYTES));
        assert_eq!(decode(payload).unwrap(), m);

        let over = widest(MAX_CHUNKS + 1, MIN_CHUNK_SIZE);
        let too_many = ManifestError::TooManyChunks {
            count: u64::from(MAX_CHUNKS) + 1,
        };
        assert_eq!(encode(&over).unwrap_err(), too_many);
        assert_eq!(over.validate().unwrap_err(), too_many);
        // Bytes a careless packer could write: refused by size before being decoded.
        let raw = codec::encode(&over).unwrap();
        assert!(matches!(
            decode(&raw[codec::HEADER_LEN..]),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    /// The largest manifest reaches an agent: a plan carrying it, with 10,000 children (a star
    /// over 10,000 nodes) and 4 KiB certificates, fits one control frame.
    #[test]
    fn a_plan_with_the_largest_manifest_fits_a_control_frame() {
        use crate::msg::{Job, PeerIdentity, PeerInfo, Plan, ToAgent, Upstream};
        let peer = |i: u32| PeerInfo {
            node: format!("node-with-a-long-name-{i:06}.cluster.example.org"),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], 7001)),
            cert_sha256: [9; 32],
        };
        let plan = ToAgent::Plan(Box::new(Plan {
            deployment: u64::MAX,
            identity: PeerIdentity {
                cert_der: vec![1; 4096],
                key_der: vec![2; 4096],
                ca_der: vec![3; 4096],
            },
            upstream: Upstream::Peer(peer(0)),
            children: (1..=10_000).map(peer).collect(),
            manifest: widest(MAX_CHUNKS, MIN_CHUNK_SIZE),
            job: Job::LocalSink,
            stall: None,
        }));
        let frame = codec::encode(&plan).unwrap();
        let mut d = codec::FrameDecoder::new(codec::MAX_CONTROL_FRAME);
        d.push(&frame);
        let payload = d.next_payload().unwrap().unwrap();
        let back: ToAgent = codec::decode(&payload).unwrap();
        let ToAgent::Plan(p) = back else {
            panic!("not a plan")
        };
        p.manifest.validate().unwrap();
    }

    #[test]
    fn the_builder_stops_at_the_most_chunks() {
        let mut b = ManifestBuilder::new(ImageKind::Raw, 1);
        for _ in 0..MAX_CHUNKS {
            b.push(b"a", b"A").unwrap();
        }
        assert_eq!(
            b.push(b"a", b"A").unwrap_err(),
            ManifestError::TooManyChunks {
                count: u64::from(MAX_CHUNKS) + 1
            }
        );
        assert!(b.push(b"ab", b"A").is_err());
        let m = b.finish();
        assert_eq!(m.chunk_count(), MAX_CHUNKS);
        decode(&encode(&m).unwrap()[codec::HEADER_LEN..]).unwrap();
    }

    #[test]
    fn chunks_over_the_bounds_are_refused() {
        let mut b = ManifestBuilder::new(ImageKind::Raw, 4);
        assert!(b.push(b"abcde", b"X").is_err());
        assert!(b.push(b"abcd", b"").is_err());
        assert!(b.is_empty());
        let m = widest(2, MAX_CHUNK_SIZE + 1);
        assert!(m.validate().unwrap_err().to_string().contains("chunk size"));
        let mut m = widest(2, MAX_CHUNK_SIZE);
        m.validate().unwrap();
        m.chunks[0].comp_len = MAX_COMP_LEN + 1;
        assert!(m.validate().is_err());
        // A payload over the limit is refused before decoding.
        let big = vec![0u8; MAX_MANIFEST_BYTES as usize + 1];
        assert_eq!(
            decode(&big).unwrap_err(),
            ManifestError::TooLarge {
                len: u64::from(MAX_MANIFEST_BYTES) + 1
            }
        );
    }

    proptest::proptest! {
        /// The size arithmetic behind MAX_CHUNKS is the codec's: any manifest of n chunks
        /// encodes to exactly encoded_len(n) bytes, so n <= MAX_CHUNKS always fits.
        #[test]
        fn encoded_len_is_the_codec_length(
            chunks in proptest::collection::vec(
                (proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>(),
                 proptest::prelude::any::<u32>(), proptest::prelude::any::<[u8; 32]>()),
                0..64,
            ),
            chunk_size in proptest::prelude::any::<u32>(),
            total_size in proptest::prelude::any::<u64>(),
            tar in proptest::prelude::any::<bool>(),
        ) {
            let m = Manifest {
                kind: if tar { ImageKind::Tar } else { ImageKind::Raw },
                chunk_size,
                total_size,
                content_hash: [7; 32],
                chunks: chunks
                    .into_iter()
                    .map(|(offset, comp_len, raw_len, hash)| ChunkInfo {
                        offset,
                        comp_len,
                        raw_len,
                        hash,
                    })
                    .collect(),
            };
            let frame = codec::encode(&m).unwrap();
            proptest::prop_assert_eq!(
                (frame.len() - codec::HEADER_LEN) as u64,
                encoded_len(m.chunks.len() as u64)
            );
        }
    }
}
