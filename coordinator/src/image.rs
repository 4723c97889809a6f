//! kd image files (`.kdi`): independent zstd frames of a fixed uncompressed size, plus the
//! manifest. The coordinator serves chunks straight from this file.
//!
//! Layout: `KDIMG\0\0\x01` magic, one codec frame holding the [`Manifest`], then the
//! compressed chunks back to back (offsets in the manifest are relative to that data section).
//!
//! Bounds: [`pack`] writes only images [`ImageFile::open`] accepts (one manifest limit,
//! `kd_proto::manifest::MAX_MANIFEST_BYTES`), with bounded memory ([`pack_memory`]) and input
//! ([`DEFAULT_MAX_SIZE`]); [`parse_kdi`] and [`verify_kdi`] read any `Read + Seek` and allocate
//! nothing a header field has not been checked for.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::ops::RangeInclusive;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use kd_proto::manifest::{
    self, ImageKind, Manifest, ManifestBuilder, MAX_CHUNKS, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES,
    MIN_CHUNK_SIZE,
};
use tempfile::NamedTempFile;

/// Magic bytes at the start of every `.kdi` file.
pub const MAGIC: &[u8; 8] = b"KDIMG\0\0\x01";
/// Bytes before the manifest payload: the magic and the manifest's length.
pub const HEADER_LEN: u64 = 12;
/// Default uncompressed chunk size: each relay holds a chunk before forwarding it, so a chain
/// adds (N-1) chunk times; 1 MiB measured 1.29 x S/B at N=16 where 4 MiB gave 1.61.
pub const DEFAULT_CHUNK: u32 = 1024 * 1024;
/// Largest chunk size accepted (in a pack request and in a manifest): the manifest's.
pub const MAX_CHUNK: u32 = MAX_CHUNK_SIZE;
/// Most compression threads.
pub const MAX_THREADS: usize = 64;
/// Most memory pack's buffers may take: threads x (chunk + its compressed bound + zstd's
/// context), see [`pack_memory`].
pub const MAX_PACK_MEMORY: u64 = 1 << 30;
/// Input bytes packed at most without `--max-size`: an input that never ends (`/dev/zero`, a
/// pipe) stops there.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;
/// zstd levels accepted (the ultra levels 20-22 take hundreds of MiB per thread).
pub const LEVELS: RangeInclusive<i32> = 1..=19;

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Uncompressed bytes per chunk ([`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`]).
    pub chunk_size: u32,
    /// zstd level ([`LEVELS`]).
    pub level: i32,
    /// Compression threads (chunks compressed in parallel), 1 to [`MAX_THREADS`].
    pub threads: usize,
    /// Force the kind; detected from the input otherwise.
    pub kind: Option<ImageKind>,
    /// Most uncompressed input bytes; [`DEFAULT_MAX_SIZE`] if `None`.
    pub max_size: Option<u64>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK,
            level: 3,
            threads: 2,
            kind: None,
            max_size: None,
        }
    }
}

/// `n` bytes for a human: `16 MiB`, `4 KiB`, `1.5 GiB`, `3 bytes`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let s = format!("{v:.1}");
    format!("{} {}", s.strip_suffix(".0").unwrap_or(&s), UNITS[u])
}

/// Parses a byte count: digits with an optional binary suffix `K`, `M`, `G` or `T` (`KiB`,
/// `MB`... accepted alike).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (n, unit) = t.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("bad size {s:?} (a number, with K, M, G or T)")),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("bad size {s:?} (a number, with K, M, G or T)"))
}

/// An estimate, from above, of the bytes a zstd compression context takes at `level` for an
/// input of `chunk_size` bytes: its match tables (4-byte entries) and window, plus 2 MiB for
/// sequences, literals and the optimal parser.
fn zstd_context_bytes(level: i32, chunk_size: u32) -> u64 {
    // (windowLog, chainLog, hashLog) of levels 1..=19 for inputs over 256 KiB
    // (zstd's lib/compress/clevels.h); smaller inputs get smaller ones.
    const P: [(u32, u32, u32); 19] = [
        (19, 13, 14),
        (20, 15, 16),
        (21, 16, 17),
        (21, 18, 18),
        (21, 18, 19),
        (21, 18, 19),
        (21, 19, 20),
        (21, 19, 20),
        (22, 20, 21),
        (22, 21, 22),
        (22, 21, 22),
        (22, 22, 23),
        (22, 22, 22),
        (22, 22, 23),
        (22, 23, 23),
        (22, 22, 22),
        (23, 23, 22),
        (23, 23, 22),
        (23, 24, 22),
    ];
    let i = usize::try_from(level.clamp(1, 19) - 1).unwrap_or(0);
    let (w, c, h) = P[i];
    // zstd shrinks the window to the input, and the tables to the window.
    let input_log = 32 - chunk_size.max(2).saturating_sub(1).leading_zeros();
    let w = w.min(input_log.max(10));
    let (c, h) = (c.min(w + 1), h.min(w + 1));
    4 * ((1u64 << c) + (1u64 << h)) + (1u64 << w) + (2 << 20)
}

/// Memory pack's buffers take with these options: per thread, one chunk read, its
/// compressed form (zstd's bound) and a compression context.
pub fn pack_memory(chunk_size: u32, threads: usize, level: i32) -> u64 {
    let chunk = u64::from(chunk_size);
    let bound = zstd::zstd_safe::compress_bound(chunk_size as usize) as u64;
    (threads as u64).saturating_mul(chunk + bound + zstd_context_bytes(level, chunk_size))
}

/// Checks `opts` before anything is read: chunk size, level, threads and their memory.
pub fn check_options(opts: &PackOptions) -> Result<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        bail!(
            "--chunk-size {} is out of bounds: {} to {} (a manifest holds at most {MAX_CHUNKS} \
             chunks, {} bytes, so that every image packed can be opened)",
            human(u64::from(opts.chunk_size)),
            human(u64::from(MIN_CHUNK_SIZE)),
            human(u64::from(MAX_CHUNK_SIZE)),
            MAX_MANIFEST_BYTES
        );
    }
    if !LEVELS.contains(&opts.level) {
        bail!(
            "--level {} is out of bounds: {} to {}",
            opts.level,
            LEVELS.start(),
            LEVELS.end()
        );
    }
    if !(1..=MAX_THREADS).contains(&opts.threads) {
        bail!(
            "--threads {} is out of bounds: 1 to {MAX_THREADS}",
            opts.threads
        );
    }
    let need = pack_memory(opts.chunk_size, opts.threads, opts.level);
    if need > MAX_PACK_MEMORY {
        let most = MAX_PACK_MEMORY / pack_memory(opts.chunk_size, 1, opts.level).max(1);
        bail!(
            "--threads {} x --chunk-size {} at --level {} needs about {} of buffers, over the \
             {} limit: lower --threads (at most {most} at this chunk size and level) or \
             --chunk-size",
            opts.threads,
            human(u64::from(opts.chunk_size)),
            opts.level,
            human(need),
            human(MAX_PACK_MEMORY)
        );
    }
    if opts.max_size == Some(0) {
        bail!("--max-size 0: nothing could be packed");
    }
    Ok(())
}

/// What the input of `image pack` is, and its size when it is a plain file.
fn detect(input: &Path) -> Result<(ImageKind, Box<dyn Read + Send>, Option<u64>)> {
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
        let tar = TarChild {
            child,
            out,
            done: false,
        };
        return Ok((ImageKind::Tar, Box::new(tar), None));
    }
    let f = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let name = input.to_string_lossy();
    let (mut r, len): (Box<dyn Read + Send>, _) =
        if name.ends_with(".zst") || name.ends_with(".tzst") {
            (Box::new(zstd::Decoder::new(f).context("zstd")?), None)
        } else {
            let len = meta.is_file().then_some(meta.len());
            (Box::new(BufReader::new(f)), len)
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
    Ok((kind, Box::new(std::io::Cursor::new(head).chain(r)), len))
}

/// The output of a `tar --create` child; a failing tar becomes a read error at the end. A pack
/// that stops early kills it.
struct TarChild {
    child: std::process::Child,
    out: std::process::ChildStdout,
    done: bool,
}

impl Read for TarChild {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.done {
            let status = self.child.wait()?;
            self.done = true;
            if !status.success() {
                return Err(std::io::Error::other(format!("tar failed: {status}")));
            }
        }
        Ok(n)
    }
}

impl Drop for TarChild {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> Result<usize> {
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

/// A temporary file beside `output` (tempfile's unique name, the umask's mode as a plain
/// create would give), removed when dropped unless persisted by [`persist`].
fn temp_beside(output: &Path, tag: &str) -> Result<NamedTempFile> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .with_context(|| format!("{}: not a file name", output.display()))?
        .to_string_lossy();
    tempfile::Builder::new()
        .prefix(&format!(".{name}.{tag}."))
        .permissions(PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// Syncs `t` and renames it to `to` (then syncs `to`'s directory).
fn persist(t: NamedTempFile, to: &Path) -> Result<()> {
    t.as_file().sync_all().context("sync image")?;
    let from = t.path().to_path_buf();
    t.persist(to)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    if let Some(dir) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// A chunk on its way through a compression thread; its buffers are reused.
#[derive(Default)]
struct Job {
    raw: Vec<u8>,
    compressed: Vec<u8>,
}

/// Reads `r` chunk by chunk, compresses the chunks on `opts.threads` threads, writes the
/// compressed chunks to `data` in order and adds them to `b`. At most `opts.threads` chunks are
/// in flight (the memory [`pack_memory`] counts). Stops with an error past `max_size` input
/// bytes or [`MAX_CHUNKS`] chunks.
fn compress_all(
    input: &Path,
    r: &mut dyn Read,
    data: &mut File,
    b: &mut ManifestBuilder,
    opts: &PackOptions,
) -> Result<()> {
    let chunk = opts.chunk_size as usize;
    let bound = zstd::zstd_safe::compress_bound(chunk);
    let max_size = opts.max_size.unwrap_or(DEFAULT_MAX_SIZE);
    let level = opts.level;
    std::thread::scope(|s| {
        let mut to = Vec::new();
        let mut from = Vec::new();
        for _ in 0..opts.threads {
            let (tx, rx) = mpsc::sync_channel::<Job>(1);
            let (rtx, rrx) = mpsc::sync_channel::<(Job, std::io::Result<usize>)>(1);
            s.spawn(move || {
                let mut z = zstd::bulk::Compressor::new(level);
                for mut job in rx {
                    job.compressed.clear();
                    job.compressed.reserve(bound);
                    let r = match &mut z {
                        Ok(z) => z.compress_to_buffer(&job.raw, &mut job.compressed),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    };
                    if rtx.send((job, r)).is_err() {
                        break;
                    }
                }
            });
            to.push(tx);
            from.push(rrx);
        }
        let mut spare: Vec<Job> = (0..opts.threads).map(|_| Job::default()).collect();
        let mut total = 0u64;
        let mut count = 0u64;
        let mut end = false;
        while !end {
            let mut sent = 0;
            while sent < opts.threads {
                let mut job = spare.pop().unwrap_or_default();
                job.raw.resize(chunk, 0);
                let n = read_full(r, &mut job.raw)?;
                job.raw.truncate(n);
                if n == 0 {
                    end = true;
                    break;
                }
                total += n as u64;
                if total > max_size {
                    let which = match opts.max_size {
                        Some(_) => "the --max-size limit".to_string(),
                        None => "the default limit, for inputs that never end".to_string(),
                    };
                    bail!(
                        "{} holds more than {} ({which}): pass --max-size SIZE to pack more; \
                         nothing was written",
                        input.display(),
                        human(max_size)
                    );
                }
                count += 1;
                if count > u64::from(MAX_CHUNKS) {
                    bail!(
                        "{}; nothing was written",
                        too_many_chunks(input, opts.chunk_size)
                    );
                }
                to[sent]
                    .send(job)
                    .map_err(|_| anyhow::anyhow!("compression thread ended"))?;
                sent += 1;
                if n < chunk {
                    end = true;
                    break;
                }
            }
            for rx in &from[..sent] {
                let (job, r) = rx
                    .recv()
                    .map_err(|_| anyhow::anyhow!("compression thread ended"))?;
                r.context("zstd compression")?;
                data.write_all(&job.compressed)
                    .context("write image data")?;
                b.push(&job.raw, &job.compressed)
                    .with_context(|| format!("packing {}", input.display()))?;
                spare.push(job);
            }
        }
        Ok(())
    })
}

fn too_many_chunks(input: &Path, chunk_size: u32) -> String {
    format!(
        "{} needs more than {MAX_CHUNKS} chunks of {} ({}): a manifest holds at most \
         {MAX_CHUNKS} chunks ({MAX_MANIFEST_BYTES} bytes); raise --chunk-size (up to {})",
        input.display(),
        human(u64::from(chunk_size)),
        human(u64::from(MAX_CHUNKS) * u64::from(chunk_size)),
        human(u64::from(MAX_CHUNK_SIZE))
    )
}

/// Packs `input` (a tar, a `.tar.zst`, a directory or a raw disk file) into `output`.
///
/// Bounded: [`check_options`] refuses, before reading, a chunk size outside
/// [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`] and threads whose buffers would exceed
/// [`MAX_PACK_MEMORY`]; a plain file over `max_size` or [`MAX_CHUNKS`] chunks is refused before
/// reading, any other input as soon as it passes either. The image is written to a temporary
/// file beside `output` and renamed: nothing half-written is left under `output`, and what is
/// written is a file [`ImageFile::open`] accepts.
pub fn pack(input: &Path, output: &Path, opts: &PackOptions) -> Result<Manifest> {
    check_options(opts)?;
    let max_size = opts.max_size.unwrap_or(DEFAULT_MAX_SIZE);
    let (detected, mut r, len) = detect(input)?;
    if let Some(len) = len {
        if len > max_size {
            bail!(
                "{} holds {} ({len} bytes), over the {} limit (--max-size{}): pass \
                 --max-size SIZE to pack it",
                input.display(),
                human(len),
                human(max_size),
                if opts.max_size.is_none() {
                    ", default"
                } else {
                    ""
                }
            );
        }
        if len.div_ceil(u64::from(opts.chunk_size)) > u64::from(MAX_CHUNKS) {
            bail!("{}", too_many_chunks(input, opts.chunk_size));
        }
    }
    let kind = opts.kind.unwrap_or(detected);
    let mut data = temp_beside(output, "data")?;
    let mut b = ManifestBuilder::new(kind, opts.chunk_size);
    compress_all(input, &mut r, data.as_file_mut(), &mut b, opts)?;
    drop(r);
    if b.is_empty() {
        bail!("{} is empty: nothing to pack", input.display());
    }
    let manifest = b.finish();
    let frame = manifest::encode(&manifest).context("manifest")?;
    // Header + manifest first, then the data written above.
    let mut out = temp_beside(output, "part")?;
    out.write_all(MAGIC).context("write image")?;
    out.write_all(&frame).context("write image")?;
    data.seek(SeekFrom::Start(0)).context("read image data")?;
    std::io::copy(&mut data, &mut out).context("write image")?;
    drop(data);
    persist(out, output)?;
    Ok(manifest)
}

/// Where a .kdi's chunk data starts, and its manifest (checked).
#[derive(Debug, Clone)]
pub struct KdiHeader {
    /// The manifest, validated, its chunks exactly filling the data section.
    pub manifest: Manifest,
    /// Offset of the data section in the file.
    pub data_offset: u64,
}

/// Reads and checks a .kdi's header from `r`: the magic, the manifest (its length checked
/// against [`MAX_MANIFEST_BYTES`] and the stream's length before anything is allocated, then
/// decoded and validated) and a data section holding exactly the manifest's chunks. Touches
/// nothing but `r`; errors do not name a file (the caller does).
/// Fuzzed by fuzz/src/targets.rs (target `manifest`).
pub fn parse_kdi<R: Read + Seek + ?Sized>(r: &mut R) -> Result<KdiHeader> {
    let size = r.seek(SeekFrom::End(0)).context("seek")?;
    if size < HEADER_LEN {
        bail!("too short to be a kd image ({size} bytes)");
    }
    r.seek(SeekFrom::Start(0)).context("seek")?;
    let mut head = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut head).context("read the header")?;
    if &head[..8] != MAGIC {
        bail!("not a kd image (bad magic); make one with `kd-coord image pack`");
    }
    let len = u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]));
    if len > u64::from(MAX_MANIFEST_BYTES) {
        bail!("manifest of {len} bytes exceeds the limit of {MAX_MANIFEST_BYTES} bytes");
    }
    if len > size - HEADER_LEN {
        bail!(
            "truncated manifest: {len} bytes announced, {} in the file",
            size - HEADER_LEN
        );
    }
    let mut m = vec![0u8; len as usize];
    r.read_exact(&mut m).context("truncated manifest")?;
    let manifest = manifest::decode(&m).context("corrupt manifest")?;
    let data_offset = HEADER_LEN + len;
    let data = size - data_offset;
    if data != manifest.compressed_size() {
        bail!(
            "{data} bytes of chunk data, the manifest lists {} (truncated or padded file)",
            manifest.compressed_size()
        );
    }
    Ok(KdiHeader {
        manifest,
        data_offset,
    })
}

/// Reads every chunk of a .kdi from `r` (its header from [`parse_kdi`]), checks its hash,
/// decompresses it and checks the content hash.
/// Fuzzed by fuzz/src/targets.rs (target `manifest`).
pub fn verify_kdi<R: Read + Seek + ?Sized>(r: &mut R, header: &KdiHeader) -> Result<()> {
    verify_chunks(&header.manifest, |i| {
        let c = header
            .manifest
            .chunks
            .get(i as usize)
            .with_context(|| format!("chunk {i} out of range"))?;
        r.seek(SeekFrom::Start(header.data_offset + c.offset))
            .with_context(|| format!("read chunk {i}"))?;
        // comp_len is bounded (MAX_COMP_LEN) and within the stream (parse_kdi).
        let mut buf = vec![0u8; c.comp_len as usize];
        r.read_exact(&mut buf)
            .with_context(|| format!("read chunk {i}"))?;
        Ok(buf)
    })
}

/// Checks each chunk `read` returns against `m`, decompressed, and the content hash.
fn verify_chunks(m: &Manifest, mut read: impl FnMut(u32) -> Result<Vec<u8>>) -> Result<()> {
    let mut content = blake3::Hasher::new();
    let mut z = zstd::bulk::Decompressor::new().context("zstd")?;
    let mut raw = Vec::new();
    for i in 0..m.chunk_count() {
        let c = read(i)?;
        manifest::verify_chunk(m, i, &c).map_err(anyhow::Error::msg)?;
        // raw_len is at most the chunk size, at most MAX_CHUNK_SIZE (validated).
        let raw_len = m.chunks[i as usize].raw_len as usize;
        raw.clear();
        raw.reserve(raw_len);
        z.decompress_to_buffer(&c, &mut raw)
            .with_context(|| format!("chunk {i}: zstd"))?;
        if raw.len() != raw_len {
            bail!(
                "chunk {i}: {} bytes after decompression, expected {raw_len}",
                raw.len()
            );
        }
        content.update(&raw);
    }
    if content.finalize().as_bytes() != &m.content_hash {
        bail!("content hash mismatch");
    }
    Ok(())
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
    /// Opens and checks the header and manifest ([`parse_kdi`]; not the chunks: see
    /// [`ImageFile::verify`]).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open image {}", path.display()))?;
        let KdiHeader {
            manifest,
            data_offset,
        } = parse_kdi(&mut file).with_context(|| format!("{}", path.display()))?;
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
        verify_chunks(&self.manifest, |i| self.read_chunk(i))
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

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// The largest image at the smallest chunk: MAX_CHUNKS chunks of MIN_CHUNK_SIZE opens and
    /// verifies; one byte more is refused before reading; an input that does not say its size
    /// is stopped at the chunk past the limit, and nothing is left behind.
    #[test]
    fn a_pack_at_the_minimum_chunk_size_with_the_most_chunks_opens() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("zeros.raw");
        let most = u64::from(MAX_CHUNKS) * u64::from(MIN_CHUNK_SIZE);
        File::create(&input).unwrap().set_len(most).unwrap();
        let out = dir.path().join("out").join("max.kdi");
        std::fs::create_dir(out.parent().unwrap()).unwrap();
        let opts = PackOptions {
            chunk_size: MIN_CHUNK_SIZE,
            ..Default::default()
        };
        let m = pack(&input, &out, &opts).unwrap();
        assert_eq!(m.chunk_count(), MAX_CHUNKS);
        let img = ImageFile::open(&out).unwrap();
        assert_eq!(img.manifest, m);
        assert!(img.data_offset - HEADER_LEN <= u64::from(MAX_MANIFEST_BYTES));
        img.verify().unwrap();
        assert_eq!(names_in(out.parent().unwrap()), ["max.kdi"]);

        std::fs::remove_file(&out).unwrap();
        File::options()
            .write(true)
            .open(&input)
            .unwrap()
            .set_len(most + 1)
            .unwrap();
        let e = format!("{:#}", pack(&input, &out, &opts).unwrap_err());
        assert!(
            e.contains("needs more than 174761 chunks of 4 KiB")
                && e.contains("raise --chunk-size"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            pack(Path::new("/dev/zero"), &out, &opts).unwrap_err()
        );
        assert!(e.contains("needs more than 174761 chunks"), "{e}");
        assert!(names_in(out.parent().unwrap()).is_empty());
    }

    #[test]
    fn options_out_of_bounds_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.kdi");
        // A path that does not exist: anything that read it would fail differently.
        let input = dir.path().join("absent");
        let cases: [(PackOptions, &str); 6] = [
            (
                PackOptions {
                    chunk_size: 1,
                    ..Default::default()
                },
                "--chunk-size 1 bytes is out of bounds: 4 KiB to 16 MiB",
            ),
            (
                PackOptions {
                    chunk_size: MAX_CHUNK_SIZE + 1,
                    ..Default::default()
                },
                "is out of bounds: 4 KiB to 16 MiB",
            ),
            (
                PackOptions {
                    threads: 1000,
                    chunk_size: MAX_CHUNK_SIZE,
                    ..Default::default()
                },
                "--threads 1000 is out of bounds: 1 to 64",
            ),
            (
                PackOptions {
                    threads: 0,
                    ..Default::default()
                },
                "--threads 0 is out of bounds",
            ),
            (
                PackOptions {
                    threads: 64,
                    chunk_size: MAX_CHUNK_SIZE,
                    ..Default::default()
                },
                "--threads 64 x --chunk-size 16 MiB at --level 3 needs about",
            ),
            (
                PackOptions {
                    level: 22,
                    ..Default::default()
                },
                "--level 22 is out of bounds: 1 to 19",
            ),
        ];
        for (opts, want) in cases {
            let e = format!("{:#}", pack(&input, &out, &opts).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
        let e = check_options(&PackOptions {
            threads: 64,
            chunk_size: MAX_CHUNK_SIZE,
            level: 19,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("lower --threads (at most 8 at this"), "{e}");
        assert!(names_in(dir.path()).is_empty());
    }

    #[test]
    fn a_plain_file_over_max_size_is_refused_and_an_endless_input_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("x.raw");
        std::fs::write(&input, vec![1u8; 100_000]).unwrap();
        let out = dir.path().join("out").join("x.kdi");
        std::fs::create_dir(out.parent().unwrap()).unwrap();
        let mut opts = PackOptions {
            max_size: Some(99_999),
            chunk_size: 4096,
            ..Default::default()
        };
        let e = format!("{:#}", pack(&input, &out, &opts).unwrap_err());
        assert!(e.contains("over the 97.7 KiB limit (--max-size)"), "{e}");
        opts.max_size = Some(100_000);
        pack(&input, &out, &opts).unwrap();
        ImageFile::open(&out).unwrap().verify().unwrap();
        std::fs::remove_file(&out).unwrap();
        // A directory (tar: no size known) stopped as it passes the limit.
        let e = format!("{:#}", pack(dir.path(), &out, &opts).unwrap_err());
        assert!(
            e.contains("holds more than 97.7 KiB (the --max-size limit)"),
            "{e}"
        );
        assert!(names_in(out.parent().unwrap()).is_empty());
    }

    /// A valid small image's bytes.
    fn small_kdi() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("x.raw");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 13) as u8).collect();
        std::fs::write(&input, data).unwrap();
        let out = dir.path().join("x.kdi");
        let opts = PackOptions {
            chunk_size: 4096,
            ..Default::default()
        };
        pack(&input, &out, &opts).unwrap();
        std::fs::read(&out).unwrap()
    }

    fn parse_err(bytes: &[u8]) -> String {
        format!(
            "{:#}",
            parse_kdi(&mut std::io::Cursor::new(bytes)).unwrap_err()
        )
    }

    /// A .kdi with `m` as its manifest (encoded without the limits) and `data` after it.
    fn kdi_with(m: &Manifest, data: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend(kd_proto::codec::encode(m).unwrap());
        v.extend(data);
        v
    }

    #[test]
    fn hostile_headers_are_refused_with_clear_errors() {
        let good = small_kdi();
        let h = parse_kdi(&mut std::io::Cursor::new(&good)).unwrap();
        verify_kdi(&mut std::io::Cursor::new(&good), &h).unwrap();
        assert_eq!(h.manifest.chunk_count(), 5);

        assert!(parse_err(&good[..5]).contains("too short to be a kd image (5 bytes)"));
        // A manifest length over the limit, or past the end of the file: refused before
        // anything is allocated for it.
        for (len, want) in [
            (
                u32::MAX,
                "manifest of 4294967295 bytes exceeds the limit of 8388608 bytes",
            ),
            (MAX_MANIFEST_BYTES + 1, "exceeds the limit"),
            (
                MAX_MANIFEST_BYTES,
                "truncated manifest: 8388608 bytes announced",
            ),
        ] {
            let mut b = good.clone();
            b[8..12].copy_from_slice(&len.to_le_bytes());
            assert!(parse_err(&b).contains(want), "{}", parse_err(&b));
        }
        let mut b = good.clone();
        b[12] ^= 0xff;
        assert!(
            parse_err(&b).contains("corrupt manifest"),
            "{}",
            parse_err(&b)
        );

        let m = &h.manifest;
        let data = &good[h.data_offset as usize..];
        // Sizes and counts a manifest claims.
        let mut huge = m.clone();
        huge.chunk_size = u32::MAX;
        assert!(parse_err(&kdi_with(&huge, data)).contains("chunk size 4294967295 not in"));
        let mut huge = m.clone();
        huge.total_size = u64::MAX;
        assert!(parse_err(&kdi_with(&huge, data)).contains("manifest says 18446744073709551615"));
        let mut huge = m.clone();
        huge.chunks[4].comp_len = u32::MAX;
        assert!(parse_err(&kdi_with(&huge, data)).contains("compressed length of 4294967295"));
        let mut many = m.clone();
        let last = many.chunks[4].clone();
        many.chunks = vec![last; MAX_CHUNKS as usize + 1];
        assert!(parse_err(&kdi_with(&many, data)).contains("exceeds the limit"));
        // Chunks past the end of the file, or a file longer than its chunks.
        let mut past = m.clone();
        past.chunks[4].offset += 1_000_000;
        assert!(parse_err(&kdi_with(&past, data)).contains("chunk 4 at offset"));
        assert!(parse_err(&kdi_with(m, &data[1..])).contains("truncated or padded"));
        assert!(parse_err(&kdi_with(m, &[data, b"x"].concat())).contains("truncated or padded"));
        // A chunk whose frame decompresses to more than the manifest says.
        let mut lie = m.clone();
        lie.chunks[4].raw_len -= 1;
        lie.total_size -= 1;
        let b = kdi_with(&lie, data);
        let h = parse_kdi(&mut std::io::Cursor::new(&b)).unwrap();
        let e = format!(
            "{:#}",
            verify_kdi(&mut std::io::Cursor::new(&b), &h).unwrap_err()
        );
        assert!(
            e.contains("chunk 4: ") && e.contains("bytes after decompression, expected"),
            "{e}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever parameters pack accepts, what it writes opens and verifies.
        #[test]
        fn what_pack_accepts_open_accepts(
            len in 0usize..120_000,
            chunk_size in MIN_CHUNK_SIZE..3 * MIN_CHUNK_SIZE,
            threads in 1usize..5,
            level in 1i32..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let input = dir.path().join("in.raw");
            let data: Vec<u8> = (0..len).map(|i| (i * i % 251) as u8).collect();
            std::fs::write(&input, &data).unwrap();
            let out = dir.path().join("in.kdi");
            let opts = PackOptions { chunk_size, threads, level, ..Default::default() };
            match pack(&input, &out, &opts) {
                Ok(m) => {
                    let img = ImageFile::open(&out).unwrap();
                    proptest::prop_assert_eq!(&img.manifest, &m);
                    proptest::prop_assert_eq!(m.total_size, len as u64);
                    img.verify().unwrap();
                }
                Err(e) => {
                    proptest::prop_assert!(len == 0, "{e:#}");
                    proptest::prop_assert!(!out.exists());
                }
            }
        }

        /// Damaged bytes of an image never panic the reader.
        #[test]
        fn damaged_images_fail_without_panicking(
            flips in proptest::collection::vec(
                (0usize..30_000, proptest::prelude::any::<u8>()),
                1..8,
            ),
            cut in proptest::option::of(0usize..30_000),
        ) {
            let mut b = small_kdi();
            for (at, x) in flips {
                let n = b.len();
                b[at % n] ^= x | 1;
            }
            if let Some(c) = cut {
                b.truncate(c.min(b.len()));
            }
            let mut r = std::io::Cursor::new(&b);
            if let Ok(h) = parse_kdi(&mut r) {
                let _ = verify_kdi(&mut r, &h);
            }
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("4K"), Ok(4096));
        assert_eq!(parse_bytes("16M"), Ok(16 << 20));
        assert_eq!(parse_bytes("3GiB"), Ok(3 << 30));
        assert_eq!(parse_bytes("10"), Ok(10));
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(human(16 << 20), "16 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(3), "3 bytes");
    }
}
