//! kd image files (`.kdi`): independent zstd frames of a fixed uncompressed size, plus the
//! manifest. The coordinator serves chunks straight from this file.
//!
//! Layout: `KDIMG\0\0\x01` magic, one codec frame holding the [`Manifest`], then the
//! compressed chunks back to back (offsets in the manifest are relative to that data section).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kd_proto::codec;
use kd_proto::manifest::{ImageKind, Manifest, ManifestBuilder};

/// Magic bytes at the start of every `.kdi` file.
pub const MAGIC: &[u8; 8] = b"KDIMG\0\0\x01";
/// Default uncompressed chunk size: each relay holds a chunk before forwarding it, so a chain
/// adds (N-1) chunk times; 1 MiB measured 1.29 x S/B at N=16 where 4 MiB gave 1.61.
pub const DEFAULT_CHUNK: u32 = 1024 * 1024;
/// Largest chunk size accepted (in a pack request and in a manifest).
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Uncompressed bytes per chunk.
    pub chunk_size: u32,
    /// zstd level.
    pub level: i32,
    /// Compression threads (chunks compressed in parallel).
    pub threads: usize,
    /// Force the kind; detected from the input otherwise.
    pub kind: Option<ImageKind>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK,
            level: 3,
            threads: 2,
            kind: None,
        }
    }
}

/// What the input of `image pack` is.
fn detect(input: &Path) -> Result<(ImageKind, Box<dyn Read + Send>)> {
    let meta =
        std::fs::metadata(input).with_context(|| format!("cannot read {}", input.display()))?;
    if meta.is_dir() {
        // GNU tar keeps what a root file system needs and the tar crate's builder does not:
        // hard links, xattrs, ACLs, sparse files, numeric owners.
        let mut child = std::process::Command::new("tar")
            .args([
                "--create",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--sparse",
            ])
            .arg("--directory")
            .arg(input)
            .args(["--file", "-", "."])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run tar to pack a directory")?;
        let out = child.stdout.take().context("tar stdout")?;
        return Ok((ImageKind::Tar, Box::new(TarChild { child, out })));
    }
    let f = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let name = input.to_string_lossy();
    let mut r: Box<dyn Read + Send> = if name.ends_with(".zst") || name.ends_with(".tzst") {
        Box::new(zstd::Decoder::new(f).context("zstd")?)
    } else {
        Box::new(BufReader::new(f))
    };
    // Peek 512 bytes: a tar header has "ustar" at offset 257.
    let mut head = vec![0u8; 512];
    let n = read_full(&mut r, &mut head)?;
    head.truncate(n);
    let kind = if n == 512 && &head[257..262] == b"ustar" {
        ImageKind::Tar
    } else {
        ImageKind::Raw
    };
    Ok((kind, Box::new(std::io::Cursor::new(head).chain(r))))
}

/// The output of a `tar --create` child; a failing tar becomes a read error at the end.
struct TarChild {
    child: std::process::Child,
    out: std::process::ChildStdout,
}

impl Read for TarChild {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.child.wait()?;
            if !status.success() {
                return Err(std::io::Error::other(format!("tar failed: {status}")));
            }
        }
        Ok(n)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read input"),
        }
    }
    Ok(n)
}

/// Packs `input` (a tar, a `.tar.zst`, a directory or a raw disk file) into `output`.
pub fn pack(input: &Path, output: &Path, opts: &PackOptions) -> Result<Manifest> {
    if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK {
        bail!(
            "chunk size must be between 1 byte and {} MiB",
            MAX_CHUNK >> 20
        );
    }
    let (detected, mut r) = detect(input)?;
    let kind = opts.kind.unwrap_or(detected);
    let tmp = output.with_extension("kdi.part");
    let mut data =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut b = ManifestBuilder::new(kind, opts.chunk_size);
    let threads = opts.threads.max(1);
    loop {
        let mut batch = Vec::with_capacity(threads);
        for _ in 0..threads {
            let mut buf = vec![0u8; opts.chunk_size as usize];
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            batch.push(buf);
        }
        if batch.is_empty() {
            break;
        }
        let level = opts.level;
        let compressed: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = batch
                .iter()
                .map(|raw| s.spawn(move || zstd::bulk::compress(raw, level)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("compressor panicked")))
                })
                .collect()
        });
        let last = batch.last().map(|c| c.len()).unwrap_or(0) < opts.chunk_size as usize;
        for (raw, c) in batch.iter().zip(compressed) {
            let c = c.context("zstd compression")?;
            data.write_all(&c).context("write image data")?;
            b.push(raw, &c);
        }
        if last {
            break;
        }
    }
    let manifest = b.finish();
    if manifest.chunks.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        bail!("{} is empty: nothing to pack", input.display());
    }
    // Header + manifest first, then the data written above.
    let mut out =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    out.write_all(MAGIC)?;
    out.write_all(&codec::encode(&manifest).context("manifest too large")?)?;
    let mut data = File::open(&tmp)?;
    std::io::copy(&mut data, &mut out).context("write image")?;
    out.sync_all()?;
    std::fs::remove_file(&tmp)?;
    Ok(manifest)
}

/// An open `.kdi` file.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    data_offset: u64,
    /// The image's manifest.
    pub manifest: Manifest,
    /// Where it was opened from.
    pub path: PathBuf,
}

impl ImageFile {
    /// Opens and checks the header and manifest (not the chunks: see [`ImageFile::verify`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("cannot open image {}", path.display()))?;
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0)
            .with_context(|| format!("{} is too short to be a kd image", path.display()))?;
        if &head[..8] != MAGIC {
            bail!(
                "{} is not a kd image (bad magic); make one with `kd-coord image pack`",
                path.display()
            );
        }
        let len = codec::frame_len(
            [head[8], head[9], head[10], head[11]],
            codec::MAX_CONTROL_FRAME,
        )
        .with_context(|| format!("{}: manifest", path.display()))?;
        let mut m = vec![0u8; len];
        file.read_exact_at(&mut m, 12)
            .with_context(|| format!("{}: truncated manifest", path.display()))?;
        let manifest: Manifest =
            codec::decode(&m).with_context(|| format!("{}: corrupt manifest", path.display()))?;
        manifest
            .validate(MAX_CHUNK)
            .with_context(|| format!("{}", path.display()))?;
        let data_offset = 12 + len as u64;
        let size = file.metadata()?.len();
        if size != data_offset + manifest.compressed_size() {
            bail!(
                "{}: {} bytes of chunk data, the manifest lists {} (truncated or padded file)",
                path.display(),
                size.saturating_sub(data_offset),
                manifest.compressed_size()
            );
        }
        Ok(Self {
            file,
            data_offset,
            manifest,
            path: path.to_path_buf(),
        })
    }

    /// The compressed bytes of chunk `index` (not verified).
    pub fn read_chunk(&self, index: u32) -> Result<Vec<u8>> {
        let c = self
            .manifest
            .chunks
            .get(index as usize)
            .with_context(|| format!("chunk {index} out of range"))?;
        let mut buf = vec![0u8; c.comp_len as usize];
        self.file
            .read_exact_at(&mut buf, self.data_offset + c.offset)
            .with_context(|| format!("read chunk {index} of {}", self.path.display()))?;
        Ok(buf)
    }

    /// Reads every chunk, checks its hash, decompresses it, and checks the content hash.
    pub fn verify(&self) -> Result<()> {
        let mut content = blake3::Hasher::new();
        for i in 0..self.manifest.chunk_count() {
            let c = self.read_chunk(i)?;
            kd_proto::manifest::verify_chunk(&self.manifest, i, &c).map_err(anyhow::Error::msg)?;
            let raw_len = self.manifest.chunks[i as usize].raw_len as usize;
            let raw =
                zstd::bulk::decompress(&c, raw_len).with_context(|| format!("chunk {i}: zstd"))?;
            if raw.len() != raw_len {
                bail!(
                    "chunk {i}: {} bytes after decompression, expected {raw_len}",
                    raw.len()
                );
            }
            content.update(&raw);
        }
        if content.finalize().as_bytes() != &self.manifest.content_hash {
            bail!("content hash mismatch");
        }
        Ok(())
    }

    /// A short human description.
    pub fn info(&self) -> String {
        let m = &self.manifest;
        format!(
            "image:        {}\nkind:         {:?}\nsize:         {} bytes ({:.1} MiB)\ncompressed:   {} bytes ({:.1} MiB, ratio {:.2})\nchunks:       {} of {} KiB\nimage hash:   {}\ncontent hash: {}",
            self.path.display(),
            m.kind,
            m.total_size,
            m.total_size as f64 / 1048576.0,
            m.compressed_size(),
            m.compressed_size() as f64 / 1048576.0,
            m.compressed_size() as f64 / m.total_size.max(1) as f64,
            m.chunks.len(),
            m.chunk_size / 1024,
            kd_proto::manifest::hex(&m.image_hash()),
            kd_proto::manifest::hex(&m.content_hash),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_raw_and_verify_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let out = dir.path().join("disk.kdi");
        let opts = PackOptions {
            chunk_size: 1 << 20,
            ..Default::default()
        };
        let m = pack(&input, &out, &opts).unwrap();
        assert_eq!(m.kind, ImageKind::Raw);
        assert_eq!(m.chunks.len(), 3);
        assert_eq!(m.total_size, 3_000_000);
        let img = ImageFile::open(&out).unwrap();
        img.verify().unwrap();
        let mut back = Vec::new();
        for i in 0..img.manifest.chunk_count() {
            back.extend(zstd::bulk::decompress(&img.read_chunk(i).unwrap(), 1 << 20).unwrap());
        }
        assert_eq!(back, data);
    }

    #[test]
    fn pack_directory_is_tar() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("root");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hostname"), "n1\n").unwrap();
        std::os::unix::fs::symlink("hostname", src.join("etc/link")).unwrap();
        let out = dir.path().join("root.kdi");
        let m = pack(&src, &out, &PackOptions::default()).unwrap();
        assert_eq!(m.kind, ImageKind::Tar);
        ImageFile::open(&out).unwrap().verify().unwrap();
    }

    #[test]
    fn corrupt_and_truncated_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("x.raw");
        std::fs::write(&input, vec![5u8; 100_000]).unwrap();
        let out = dir.path().join("x.kdi");
        pack(&input, &out, &PackOptions::default()).unwrap();
        let mut bytes = std::fs::read(&out).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&out, &bytes).unwrap();
        let err = ImageFile::open(&out).unwrap().verify().unwrap_err();
        assert!(format!("{err:#}").contains("blake3"), "{err:#}");
        std::fs::write(&out, &bytes[..last]).unwrap();
        let err = ImageFile::open(&out).unwrap_err();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
        std::fs::write(&out, b"not an image at all").unwrap();
        assert!(format!("{:#}", ImageFile::open(&out).unwrap_err()).contains("bad magic"));
        std::fs::write(&input, b"").unwrap();
        assert!(pack(&input, &out, &PackOptions::default()).is_err());
    }
}
