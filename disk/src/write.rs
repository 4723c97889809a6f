//! Streaming image writers: the uncompressed image arrives chunk by chunk through an
//! [`ImageSink`]; a worker thread behind a bounded channel writes it (raw at offsets, or tar
//! extraction), so that disk I/O overlaps with the network and decompression of the caller.
use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use nix::sys::stat::{
    fchmodat, makedev, mknod, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;

use crate::error::{DiskError, IoContext};

/// Size of the messages between the caller and the worker thread.
const CHUNK: usize = 4 << 20;
/// Messages in flight at most (so 16 MiB buffered; 4 MiB writes measured faster than 1 MiB).
const QUEUE: usize = 4;
/// The region written last by the raw writer (coreos-installer's order).
pub const HELD_BACK: u64 = 1 << 20;

/// Receives the uncompressed image bytes in order, from offset 0, chunk by chunk.
///
/// Dropping a sink without calling [`ImageSink::finish`] aborts it: the worker stops, the raw
/// writer never writes the held-back first MiB (the target stays unbootable).
pub trait ImageSink: Send {
    /// Queue `data` (the next bytes of the image) for writing. Fails with the worker's error
    /// once the worker has failed (overflow, unsafe tar entry, I/O error...).
    fn write_all(&mut self, data: &[u8]) -> Result<(), DiskError>;
    /// Everything was written: flush, fsync, write the held-back first MiB (raw), join threads.
    fn finish(self: Box<Self>) -> Result<WriteSummary, DiskError>;
}

/// What a finished sink wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteSummary {
    /// Image bytes received.
    pub bytes: u64,
    /// Tar entries extracted (0 for raw images).
    pub files: u64,
}

enum Msg {
    Data(Vec<u8>),
    End,
}

type Worker = JoinHandle<Result<WriteSummary, DiskError>>;

/// The worker's side of the channel: data in, emptied buffers back (so that the feeder reuses
/// them instead of allocating and faulting in a fresh MiB per message).
struct Inbox {
    rx: Receiver<Msg>,
    free: SyncSender<Vec<u8>>,
}

impl Inbox {
    fn recv(&self) -> Result<Msg, std::sync::mpsc::RecvError> {
        self.rx.recv()
    }
    fn recycle(&self, mut v: Vec<u8>) {
        if v.capacity() == CHUNK {
            v.clear();
            let _ = self.free.try_send(v);
        }
    }
}

/// The caller's side: coalesces writes into `CHUNK`-sized messages for the worker.
struct Feeder {
    tx: Option<SyncSender<Msg>>,
    free: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    bytes: u64,
    worker: Option<Worker>,
}

impl Feeder {
    fn new(tx: SyncSender<Msg>, free: Receiver<Vec<u8>>, worker: Worker) -> Self {
        Feeder {
            free,
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
            bytes: 0,
            worker: Some(worker),
        }
    }

    fn send(&mut self, msg: Msg) -> Result<(), DiskError> {
        let Some(tx) = &self.tx else {
            return Err(DiskError::Internal(
                "image sink used after it failed".into(),
            ));
        };
        if tx.send(msg).is_ok() {
            return Ok(());
        }
        // The worker hung up: it failed. Return its error.
        self.tx = None;
        match self.join()? {
            Ok(_) => Err(DiskError::Internal("image writer stopped early".into())),
            Err(e) => Err(e),
        }
    }

    fn join(&mut self) -> Result<Result<WriteSummary, DiskError>, DiskError> {
        let w = self
            .worker
            .take()
            .ok_or_else(|| DiskError::Internal("image writer already joined".into()))?;
        w.join()
            .map_err(|_| DiskError::Internal("image writer thread panicked".into()))
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), DiskError> {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK {
                let next = self
                    .free
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                let full = std::mem::replace(&mut self.buf, next);
                self.send(Msg::Data(full))?;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<WriteSummary, DiskError> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.send(Msg::Data(rest))?;
        }
        self.send(Msg::End)?;
        self.tx = None;
        let mut summary = self.join()??;
        summary.bytes = self.bytes;
        Ok(summary)
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        // Abort: hang up without `End`, then wait for the worker so that no thread outlives us.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

struct Sink(Feeder);

impl ImageSink for Sink {
    fn write_all(&mut self, data: &[u8]) -> Result<(), DiskError> {
        self.0.write_all(data)
    }
    fn finish(self: Box<Self>) -> Result<WriteSummary, DiskError> {
        self.0.finish()
    }
}

fn spawn(
    name: &str,
    work: impl FnOnce(Inbox) -> Result<WriteSummary, DiskError> + Send + 'static,
) -> Result<Box<dyn ImageSink>, DiskError> {
    let (tx, rx) = sync_channel(QUEUE);
    let (free_tx, free_rx) = sync_channel(QUEUE + 2);
    let inbox = Inbox { rx, free: free_tx };
    let worker = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || work(inbox))
        .ctx(|| format!("starting the {name} thread"))?;
    Ok(Box::new(Sink(Feeder::new(tx, free_rx, worker))))
}

// ---------------------------------------------------------------------------------------------
// Raw images

/// Size of an open file or block device: the device size for block devices, the file length
/// for regular files.
pub fn target_size(f: &mut File) -> io::Result<u64> {
    let md = f.metadata()?;
    if md.file_type().is_block_device() {
        let end = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(0))?;
        Ok(end)
    } else {
        Ok(md.len())
    }
}

/// Raw image to a file or block device, coreos-installer order: the first MiB is held back
/// (zeroed first on the device), the rest written at offsets, fsync, then the first MiB, fsync.
/// `limit`: size of the target (partition/device/file size); an image that overflows fails
/// cleanly with a clear error before writing past it. For a block device the device's own size
/// is always a limit too. A missing `path` is created as a regular file.
pub fn raw_sink(path: &Path, limit: Option<u64>) -> Result<Box<dyn ImageSink>, DiskError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(!path.exists())
        .open(path)
        .ctx(|| format!("opening {} for writing", path.display()))?;
    let is_block = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .file_type()
        .is_block_device();
    let limit = if is_block {
        let dev = target_size(&mut f).ctx(|| format!("size of {}", path.display()))?;
        Some(limit.map_or(dev, |l| l.min(dev)))
    } else {
        limit
    };
    let zero_len = limit.map_or(HELD_BACK, |l| l.min(HELD_BACK));
    let zeros = vec![0u8; usize::try_from(zero_len).unwrap_or(0)];
    f.write_all_at(&zeros, 0)
        .ctx(|| format!("zeroing the first MiB of {}", path.display()))?;
    let target = path.to_path_buf();
    spawn("kd-raw-writer", move |rx| raw_worker(rx, f, target, limit))
}

fn raw_worker(
    rx: Inbox,
    f: File,
    target: PathBuf,
    limit: Option<u64>,
) -> Result<WriteSummary, DiskError> {
    let mut held: Vec<u8> = Vec::new();
    let mut offset: u64 = 0;
    loop {
        let data = match rx.recv() {
            Ok(Msg::Data(d)) => d,
            Ok(Msg::End) => break,
            Err(_) => return Err(DiskError::BadImage("image stream aborted".into())),
        };
        let end = offset + data.len() as u64;
        if let Some(l) = limit {
            if end > l {
                return Err(DiskError::ImageTooLarge {
                    target,
                    limit: l,
                    needed: end,
                });
            }
        }
        let mut d: &[u8] = &data;
        if offset < HELD_BACK {
            let n = usize::try_from(HELD_BACK - offset)
                .unwrap_or(usize::MAX)
                .min(d.len());
            held.extend_from_slice(&d[..n]);
            d = &d[n..];
            offset += n as u64;
        }
        if !d.is_empty() {
            f.write_all_at(d, offset).ctx(|| {
                format!(
                    "writing {} bytes at offset {offset} of {}",
                    d.len(),
                    target.display()
                )
            })?;
            offset += d.len() as u64;
        }
        rx.recycle(data);
    }
    f.sync_all().ctx(|| format!("fsync {}", target.display()))?;
    if !held.is_empty() {
        f.write_all_at(&held, 0)
            .ctx(|| format!("writing the first MiB of {}", target.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", target.display()))?;
    }
    Ok(WriteSummary {
        bytes: offset,
        files: 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Tar images

/// Reads the worker's channel as a byte stream; remembers whether the producer's `End` was seen
/// and how many bytes were read.
struct ChannelReader {
    rx: Inbox,
    cur: Vec<u8>,
    pos: usize,
    eof: Rc<Cell<bool>>,
    read: Rc<Cell<u64>>,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.eof.get() {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(d)) => {
                    let old = std::mem::replace(&mut self.cur, d);
                    self.rx.recycle(old);
                    self.pos = 0;
                }
                Ok(Msg::End) => self.eof.set(true),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "image stream aborted",
                    ))
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// Streaming tar extraction into `dir` (a thread reads from a bounded channel fed by write_all):
/// owners, modes, mtimes, symlinks, hard links, device nodes, fifos, xattrs preserved; any entry
/// whose path or link target escapes `dir` (`..`, absolute hard links outside) is refused with a
/// clear error and nothing is written outside `dir`. Absolute *symlink* targets are kept as
/// symlinks, but a symlink is never followed while extracting: an entry whose path goes through
/// an existing symlink is refused.
pub fn tar_sink(dir: &Path) -> Result<Box<dyn ImageSink>, DiskError> {
    let md = fs::metadata(dir).ctx(|| format!("extraction directory {}", dir.display()))?;
    if !md.is_dir() {
        return Err(DiskError::io(
            format!("extraction directory {}", dir.display()),
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let dir = dir.to_path_buf();
    spawn("kd-tar-writer", move |rx| tar_worker(rx, dir))
}

fn tar_worker(rx: Inbox, dir: PathBuf) -> Result<WriteSummary, DiskError> {
    let eof = Rc::new(Cell::new(false));
    let read = Rc::new(Cell::new(0u64));
    let reader = ChannelReader {
        rx,
        cur: Vec::new(),
        pos: 0,
        eof: eof.clone(),
        read: read.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    archive.set_ignore_zeros(false);
    let mut ex = Extractor {
        dir,
        checked: HashSet::new(),
        dir_times: Vec::new(),
        files: 0,
    };
    let truncated = |what: String| {
        DiskError::BadImage(format!(
            "truncated tar stream: it ended after {} bytes, {what}",
            read.get()
        ))
    };
    let entries = archive
        .entries()
        .map_err(|e| DiskError::BadImage(format!("not a tar: {e}")))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) if eof.get() => return Err(truncated(format!("inside a header ({e})"))),
            Err(e) => return Err(DiskError::BadImage(format!("invalid tar header: {e}"))),
        };
        match ex.entry(&mut entry) {
            Ok(()) => {}
            Err(DiskError::Io { context, .. }) if eof.get() => return Err(truncated(context)),
            Err(e) => return Err(e),
        }
    }
    if eof.get() {
        return Err(truncated("before the end-of-archive marker".into()));
    }
    // Drain the record padding after the end marker (and anything else the producer sends).
    let mut reader = archive.into_inner();
    io::copy(&mut reader, &mut io::sink()).ctx(|| "reading the end of the tar stream".into())?;
    ex.finish()
}

/// Per-extraction state.
struct Extractor {
    dir: PathBuf,
    /// Relative directories known to be real directories (not symlinks) inside `dir`.
    checked: HashSet<PathBuf>,
    /// Directory mtimes, set at the end (extracting into a directory changes its mtime).
    dir_times: Vec<(PathBuf, i64)>,
    files: u64,
}

/// The path of an archive member relative to the extraction directory: leading `/` and `.`
/// components dropped, `..` refused. An empty result stands for the directory itself.
pub fn safe_relative(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("the path contains `..`".into()),
            Component::Prefix(_) => return Err("the path has a prefix".into()),
            Component::Normal(p) => out.push(p),
        }
    }
    Ok(out)
}

fn unsafe_entry(path: &str, reason: impl Into<String>) -> DiskError {
    DiskError::UnsafeEntry {
        path: path.to_string(),
        reason: reason.into(),
    }
}

impl Extractor {
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), DiskError> {
        use tar::EntryType as T;
        let kind = e.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let path = e
            .path()
            .map_err(|err| unsafe_entry(&name, format!("invalid path: {err}")))?;
        let rel = safe_relative(&path).map_err(|r| unsafe_entry(&name, r))?;
        self.files += 1;
        let ctx = || format!("extracting `{name}`");
        if rel.as_os_str().is_empty() {
            if !kind.is_dir() {
                return Err(unsafe_entry(
                    &name,
                    "an entry that is not a directory has an empty path",
                ));
            }
            let dst = self.dir.clone();
            e.unpack(&dst).ctx(ctx)?;
            self.after_dir(e, dst)?;
            return Ok(());
        }
        self.prepare_parents(&name, &rel, true)?;
        let dst = self.dir.join(&rel);
        match kind {
            T::Link => self.hard_link(e, &name, &dst)?,
            T::Char | T::Block | T::Fifo => {
                self.special(e, kind, &dst).map_err(|err| match err {
                    DiskError::Io { context, source } => DiskError::Io {
                        context: format!("extracting `{name}`: {context}"),
                        source,
                    },
                    other => other,
                })?
            }
            T::Directory => {
                e.unpack(&dst).ctx(ctx)?;
                self.checked.insert(rel);
                self.after_dir(e, dst)?;
            }
            _ => {
                e.unpack(&dst).ctx(ctx)?;
            }
        }
        Ok(())
    }

    /// Every ancestor of `rel` must be a real directory inside `dir` (never a symlink);
    /// missing ones are created when `create`.
    fn prepare_parents(&mut self, name: &str, rel: &Path, create: bool) -> Result<(), DiskError> {
        let mut prefix = PathBuf::new();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            prefix.push(c);
            if self.checked.contains(&prefix) {
                continue;
            }
            let p = self.dir.join(&prefix);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(unsafe_entry(
                        name,
                        format!(
                            "`{}` is a symlink: extraction never goes through one",
                            prefix.display()
                        ),
                    ))
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_entry(
                        name,
                        format!("`{}` exists and is not a directory", prefix.display()),
                    ))
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
                }
                Err(err) => return Err(DiskError::io(format!("stat {}", p.display()), err)),
            }
            self.checked.insert(prefix.clone());
        }
        Ok(())
    }

    fn after_dir<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        dst: PathBuf,
    ) -> Result<(), DiskError> {
        apply_xattrs(e, &dst)?;
        if let Ok(m) = e.header().mtime() {
            self.dir_times
                .push((dst, i64::try_from(m).unwrap_or(i64::MAX)));
        }
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        name: &str,
        dst: &Path,
    ) -> Result<(), DiskError> {
        let target = e
            .link_name()
            .map_err(|err| unsafe_entry(name, format!("invalid hard link target: {err}")))?
            .ok_or_else(|| unsafe_entry(name, "hard link without a target"))?
            .into_owned();
        if target.is_absolute() {
            return Err(unsafe_entry(
                name,
                format!("absolute hard link target `{}`", target.display()),
            ));
        }
        let trel = safe_relative(&target).map_err(|r| {
            unsafe_entry(
                name,
                format!("hard link target `{}`: {r}", target.display()),
            )
        })?;
        if trel.as_os_str().is_empty() {
            return Err(unsafe_entry(name, "hard link to the extraction directory"));
        }
        self.prepare_parents(name, &trel, false)?;
        let src = self.dir.join(&trel);
        let md = fs::symlink_metadata(&src)
            .ctx(|| format!("hard link `{name}`: target `{}`", target.display()))?;
        if md.is_dir() {
            return Err(unsafe_entry(name, "hard link to a directory"));
        }
        remove_non_dir(dst)?;
        fs::hard_link(&src, dst).ctx(|| format!("hard linking `{name}` to `{}`", target.display()))
    }

    fn special<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        kind: tar::EntryType,
        dst: &Path,
    ) -> Result<(), DiskError> {
        let h = e.header();
        let bad = |what: &str, err: io::Error| DiskError::io(format!("header {what}"), err);
        let mode = h.mode().map_err(|err| bad("mode", err))? & 0o7777;
        let uid = h.uid().map_err(|err| bad("uid", err))?;
        let gid = h.gid().map_err(|err| bad("gid", err))?;
        let mtime = h.mtime().map_err(|err| bad("mtime", err))?;
        let sflag = match kind {
            tar::EntryType::Char => SFlag::S_IFCHR,
            tar::EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        let (major, minor) = if sflag == SFlag::S_IFIFO {
            (0, 0)
        } else {
            (
                h.device_major()
                    .map_err(|err| bad("device major", err))?
                    .unwrap_or(0),
                h.device_minor()
                    .map_err(|err| bad("device minor", err))?
                    .unwrap_or(0),
            )
        };
        remove_non_dir(dst)?;
        let perm = Mode::from_bits_truncate(mode);
        mknod(dst, sflag, perm, makedev(major.into(), minor.into()))
            .ctx(|| format!("mknod {}", dst.display()))?;
        let uid = u32::try_from(uid).map_err(|_| bad("uid", io::ErrorKind::InvalidData.into()))?;
        let gid = u32::try_from(gid).map_err(|_| bad("gid", io::ErrorKind::InvalidData.into()))?;
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid))
            .ctx(|| format!("chown {}", dst.display()))?;
        fchmodat(None, dst, perm, FchmodatFlags::NoFollowSymlink)
            .or_else(|_| fchmodat(None, dst, perm, FchmodatFlags::FollowSymlink))
            .ctx(|| format!("chmod {}", dst.display()))?;
        let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        utimensat(None, dst, &t, &t, UtimensatFlags::NoFollowSymlink)
            .ctx(|| format!("set mtime of {}", dst.display()))?;
        apply_xattrs(e, dst)
    }

    fn finish(mut self) -> Result<WriteSummary, DiskError> {
        // Deepest first does not matter for mtimes, but later entries win for repeated dirs.
        for (p, m) in self.dir_times.drain(..).rev() {
            let t = TimeSpec::new(m, 0);
            utimensat(None, &p, &t, &t, UtimensatFlags::NoFollowSymlink)
                .ctx(|| format!("set mtime of {}", p.display()))?;
        }
        // Flush the file system holding the tree (syncfs), like the raw writer's fsync.
        let d = File::open(&self.dir).ctx(|| format!("opening {}", self.dir.display()))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d))
            .ctx(|| format!("syncfs {}", self.dir.display()))?;
        Ok(WriteSummary {
            bytes: 0,
            files: self.files,
        })
    }
}

/// Remove a file, symlink or node at `p` (not a directory); absent is fine.
fn remove_non_dir(p: &Path) -> Result<(), DiskError> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => Err(DiskError::io(
            format!("replacing {}", p.display()),
            io::Error::new(io::ErrorKind::IsADirectory, "a directory is in the way"),
        )),
        Ok(_) => fs::remove_file(p).ctx(|| format!("removing {}", p.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::io(format!("stat {}", p.display()), e)),
    }
}

/// Set the `SCHILY.xattr.*` PAX records of the entry on `dst` (for entries the tar crate does
/// not handle itself: directories and special files).
fn apply_xattrs<R: Read>(e: &mut tar::Entry<'_, R>, dst: &Path) -> Result<(), DiskError> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(Some(exts)) = e.pax_extensions() else {
        return Ok(());
    };
    for ext in exts.flatten() {
        if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            let key = std::ffi::OsStr::from_bytes(key);
            xattr::set(dst, key, ext.value_bytes())
                .ctx(|| format!("set xattr {} on {}", key.to_string_lossy(), dst.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            safe_relative(Path::new("/usr/bin/x")).unwrap(),
            PathBuf::from("usr/bin/x")
        );
        assert_eq!(
            safe_relative(Path::new("./etc/./x")).unwrap(),
            PathBuf::from("etc/x")
        );
        assert_eq!(safe_relative(Path::new("./")).unwrap(), PathBuf::new());
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert!(safe_relative(Path::new("../b")).is_err());
    }
}
