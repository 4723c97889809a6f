//! The image manifest: how an image is cut into independently decodable zstd chunks.
//!
//! Each chunk is one zstd frame holding `chunk_size` uncompressed bytes (the last one may hold
//! fewer). Agents verify the blake3 of the *compressed* bytes before they forward, decompress or
//! write anything, so a relay never needs to decompress. The image hash commits to the kind,
//! the sizes and every chunk hash: two images with the same hash are the same image.

use serde::{Deserialize, Serialize};

use crate::msg::Digest;

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

/// A manifest that does not hold together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The chunk sizes do not add up or break the rules.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
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

    /// Adds the next chunk: its uncompressed bytes and their compressed form.
    pub fn push(&mut self, raw: &[u8], compressed: &[u8]) {
        self.content.update(raw);
        self.chunks.push(ChunkInfo {
            offset: self.offset,
            comp_len: compressed.len() as u32,
            raw_len: raw.len() as u32,
            hash: *blake3::hash(compressed).as_bytes(),
        });
        self.offset += compressed.len() as u64;
        self.total += raw.len() as u64;
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

    /// Checks the rules: sizes add up, every chunk but the last is full, offsets are contiguous.
    pub fn validate(&self, max_chunk: u32) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Inconsistent(s));
        if self.chunk_size == 0 || self.chunk_size > max_chunk {
            return bad(format!(
                "chunk size {} not in 1..={max_chunk}",
                self.chunk_size
            ));
        }
        if u32::try_from(self.chunks.len()).is_err() {
            return bad("too many chunks".into());
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
            if c.comp_len == 0 || c.comp_len > max_chunk + max_chunk / 8 + 1024 {
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
        b.push(b"abcd", b"ABCDE");
        b.push(b"ef", b"EF");
        b.finish()
    }

    #[test]
    fn builder_offsets_and_validate() {
        let m = sample();
        assert_eq!(m.chunks[1].offset, 5);
        assert_eq!(m.total_size, 6);
        assert_eq!(m.compressed_size(), 7);
        m.validate(16).unwrap();
        assert_eq!(m.content_hash, *blake3::hash(b"abcdef").as_bytes());
    }

    #[test]
    fn validate_catches_short_middle_chunk() {
        let mut m = sample();
        m.chunks.swap(0, 1);
        assert!(m.validate(16).is_err());
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
}
