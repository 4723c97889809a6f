//! The chunks the coordinator serves, read from the image file and checked once for all streams.
//!
//! Each root stream of a broadcast (k of them in a k-ary tree, N in a star) and each repair asks
//! for chunks by index. The root streams move in step (`kd_net::pace`), so the same chunk is
//! asked for k times within a few chunk times: [`ChunkCache`] reads it and computes its piece
//! hashes once, and keeps the last few chunks for the others.
//!
//! It also checks what it read: the piece hashes must combine into the manifest's hash of the
//! chunk (nearly free once they are computed). An image file that changed on disk after it was
//! packed (bit rot, a bad copy) is then reported as such, naming the file and the chunk, instead
//! of its bytes going out and being refused by every node as a corrupt transfer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kd_proto::msg::Digest;
use tokio::sync::OnceCell;

use crate::image::ImageFile;

/// Chunks kept: the root streams are at most two chunks apart (`kd_net::pace`); a stream that
/// resumes further back (a re-parented node) or a repair reads its chunk again.
pub const KEPT: usize = 8;

/// One chunk as served: its compressed bytes and its piece hashes.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// The compressed bytes, shared by every stream that sends them.
    pub data: Bytes,
    /// The blake3 chaining values of its pieces (`kd_proto::piece`), checked against the
    /// manifest.
    pub hashes: Vec<Digest>,
}

type Slot = Arc<OnceCell<Result<Chunk, String>>>;

/// Chunks of one image, read and verified once (see the module's documentation).
pub struct ChunkCache {
    image: Arc<ImageFile>,
    slots: Mutex<VecDeque<(u32, Slot)>>,
    reads: std::sync::atomic::AtomicU64,
    failure: Mutex<Option<String>>,
}

impl ChunkCache {
    /// A cache over `image`.
    pub fn new(image: ImageFile) -> Self {
        Self {
            image: Arc::new(image),
            slots: Mutex::new(VecDeque::new()),
            reads: Default::default(),
            failure: Mutex::new(None),
        }
    }

    /// The first chunk that could not be served, if any: no node can complete the image then,
    /// and the coordinator fails the nodes that ask for it with this reason.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The image served.
    pub fn image(&self) -> &ImageFile {
        &self.image
    }

    /// Chunk reads from the image file so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chunk `index`, read and checked on the first request; concurrent requests for the same
    /// chunk wait for that one read. The error names the image file and the chunk.
    pub async fn get(&self, index: u32) -> Result<Chunk, String> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.iter().find(|(i, _)| *i == index) {
                Some((_, s)) => s.clone(),
                None => {
                    let s: Slot = Default::default();
                    slots.push_back((index, s.clone()));
                    if slots.len() > KEPT {
                        slots.pop_front();
                    }
                    s
                }
            }
        };
        slot.get_or_init(|| async {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let image = self.image.clone();
            let r = match tokio::task::spawn_blocking(move || load(&image, index)).await {
                Ok(r) => r,
                Err(e) => Err(format!("reading chunk {index}: {e}")),
            };
            if let Err(e) = &r {
                self.failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.clone());
            }
            r
        })
        .await
        .clone()
    }
}

/// Reads chunk `index` of `image` and checks it against the manifest.
fn load(image: &ImageFile, index: u32) -> Result<Chunk, String> {
    let data = image.read_chunk(index).map_err(|e| format!("{e:#}"))?;
    let hashes = kd_proto::piece::piece_hashes(&data);
    let expected = image
        .manifest
        .chunks
        .get(index as usize)
        .map(|c| c.hash)
        .ok_or_else(|| format!("chunk {index} out of range"))?;
    if kd_proto::piece::check_piece_hashes(data.len(), &hashes, &expected).is_err() {
        return Err(format!(
            "chunk {index} of {} does not match its manifest: the image file changed after it \
             was packed (damaged disk or copy); `kd-coord image verify` checks it all, pack it \
             again from its source",
            image.path.display()
        ));
    }
    Ok(Chunk {
        data: data.into(),
        hashes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{pack, PackOptions};

    fn image(dir: &std::path::Path) -> std::path::PathBuf {
        let input = dir.join("disk.raw");
        let data: Vec<u8> = (0..1_500_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&input, data).unwrap();
        let out = dir.join("disk.kdi");
        let opts = PackOptions {
            chunk_size: 1 << 19,
            ..Default::default()
        };
        pack(&input, &out, &opts).unwrap();
        out
    }

    #[tokio::test]
    async fn each_chunk_is_read_once_for_every_stream() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::new(
            ImageFile::open(&image(dir.path())).unwrap(),
        ));
        let n = cache.image().manifest.chunk_count();
        assert!(n >= 3);
        // Four streams asking for every chunk at the same time.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..n {
                    got.push(cache.get(i).await.unwrap());
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.unwrap());
        }
        assert_eq!(cache.reads(), n as u64);
        for (i, c) in all[0].iter().enumerate() {
            let want = cache.image().read_chunk(i as u32).unwrap();
            assert_eq!(c.data[..], want[..]);
            assert_eq!(c.hashes, kd_proto::piece::piece_hashes(&want));
            for other in &all[1..] {
                assert_eq!(other[i].data, c.data);
            }
        }
        // Out of the kept window: read again.
        assert!(cache.get(0).await.is_ok());
        assert_eq!(cache.reads(), n as u64);
        for i in 0..KEPT as u32 + 1 {
            let _ = cache.get(1000 + i).await;
        }
        assert!(cache.get(0).await.is_ok());
        assert_eq!(cache.reads(), n as u64 + KEPT as u64 + 2);
    }

    #[tokio::test]
    async fn a_chunk_changed_on_disk_is_reported_with_the_file_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let cache = ChunkCache::new(ImageFile::open(&path).unwrap());
        let last = cache.image().manifest.chunk_count() - 1;
        assert!(cache.get(0).await.is_ok());
        assert_eq!(cache.failure(), None);
        let e = cache.get(last).await.err().unwrap();
        assert_eq!(cache.failure().as_ref(), Some(&e));
        assert!(
            e.contains(&format!("chunk {last} of {}", path.display()))
                && e.contains("does not match its manifest"),
            "{e}"
        );
        assert!(cache
            .get(last + 1)
            .await
            .unwrap_err()
            .contains("out of range"));
        // The first failure is the one reported.
        assert_eq!(cache.failure(), Some(e));
    }
}
