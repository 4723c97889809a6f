//! The writer: a thread that decompresses verified chunks and hands the bytes to the disk
//! crate's image sinks, so that slow disks never stall the relay to children beyond the
//! bounded queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kd_proto::manifest::Manifest;
use kd_proto::msg::Digest;
use tokio::sync::mpsc;

use crate::config::SinkSpec;
use crate::store::Piece;

/// What the writer did.
#[derive(Debug, Default)]
pub(crate) struct WriteResult {
    pub(crate) error: Option<String>,
    pub(crate) content_hash: Option<Digest>,
}

pub(crate) struct Writer {
    pub(crate) tx: mpsc::Sender<(u32, Vec<Piece>)>,
    pub(crate) written: Arc<AtomicU64>,
    pub(crate) handle: std::thread::JoinHandle<WriteResult>,
}

/// Opens the sink named on the command line (`None` for `null`: verify and relay only).
pub(crate) fn open(spec: &SinkSpec) -> Result<Option<Box<dyn kd_disk::ImageSink>>, String> {
    match spec {
        SinkSpec::Null => Ok(None),
        SinkSpec::Raw(p) => kd_disk::raw_sink(p, None)
            .map(Some)
            .map_err(|e| format!("cannot open {}: {e}", p.display())),
        SinkSpec::Dir(p) => kd_disk::tar_sink(p)
            .map(Some)
            .map_err(|e| format!("cannot extract into {}: {e}", p.display())),
    }
}

/// Starts the writer thread feeding `sink` (`None`: discard without decompressing).
/// Queue depth: `depth` chunks.
/// Keeps writes under a rate (bytes per second) by sleeping the writer thread: what a slow
/// disk does to the pipeline (the writer's queue fills, the receive loop waits on it).
pub(crate) struct RateLimit {
    rate: Option<u64>,
    start: std::time::Instant,
    bytes: u64,
}

impl RateLimit {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Self {
            rate,
            start: std::time::Instant::now(),
            bytes: 0,
        }
    }

    /// `n` more bytes were written: sleeps until the average is back under the rate.
    pub(crate) fn wrote(&mut self, n: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        self.bytes += n;
        let due = std::time::Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

pub(crate) fn spawn(
    sink: Option<Box<dyn kd_disk::ImageSink>>,
    manifest: &Manifest,
    depth: usize,
    write_rate: Option<u64>,
) -> std::io::Result<Writer> {
    let (tx, mut rx) = mpsc::channel::<(u32, Vec<Piece>)>(depth.max(1));
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let manifest = manifest.clone();
    let handle = std::thread::Builder::new()
        .name("kd-writer".into())
        .spawn(move || {
            let mut sink = sink;
            let mut limit = RateLimit::new(write_rate);
            let mut error: Option<String> = None;
            let decompress = sink.is_some();
            let mut hasher = blake3::Hasher::new();
            let mut dec = match zstd::bulk::Decompressor::new() {
                Ok(d) => Some(d),
                Err(e) => {
                    error.get_or_insert(format!("zstd: {e}"));
                    None
                }
            };
            let mut buf = Vec::new();
            let mut joined = Vec::new();
            // Keep draining after an error so that the relay to children is never blocked.
            while let Some((i, pieces)) = rx.blocking_recv() {
                if error.is_some() {
                    continue;
                }
                if !decompress {
                    // A null sink under a write rate still takes the time a disk would.
                    let raw = manifest.chunks.get(i as usize).map_or(0, |c| c.raw_len);
                    limit.wrote(u64::from(raw));
                    continue;
                }
                // zstd wants the frame in one buffer: join the pieces (one copy) unless it is one.
                let chunk: &[u8] = match pieces.as_slice() {
                    [one] => one,
                    many => {
                        joined.clear();
                        for p in many {
                            joined.extend_from_slice(p);
                        }
                        &joined
                    }
                };
                let raw_len = manifest
                    .chunks
                    .get(i as usize)
                    .map(|c| c.raw_len as usize)
                    .unwrap_or(0);
                buf.clear();
                buf.reserve(raw_len);
                let Some(d) = dec.as_mut() else { continue };
                match d.decompress_to_buffer(chunk, &mut buf) {
                    Ok(n) if n == raw_len => {}
                    Ok(n) => {
                        error = Some(format!(
                            "chunk {i}: {n} bytes after decompression, expected {raw_len}"
                        ));
                        continue;
                    }
                    Err(e) => {
                        error = Some(format!("chunk {i}: zstd: {e}"));
                        continue;
                    }
                }
                hasher.update(&buf);
                if let Some(s) = sink.as_mut() {
                    if let Err(e) = s.write_all(&buf) {
                        error = Some(format!("write: {e}"));
                        continue;
                    }
                }
                limit.wrote(buf.len() as u64);
                w.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            if error.is_none() {
                if let Some(s) = sink.take() {
                    if let Err(e) = s.finish() {
                        error = Some(format!("finish: {e}"));
                    }
                }
            }
            WriteResult {
                error,
                content_hash: decompress.then(|| *hasher.finalize().as_bytes()),
            }
        })?;
    Ok(Writer {
        tx,
        written,
        handle,
    })
}
