//! The rate probe before an `auto` broadcast ([`kd_proto::msg::Probe`]): this node serves a
//! few MiB to the peers that fetch from it, fetches as much from its own peer and times it
//! (its link), and times synced writes where the image will go (its disk: the better of two
//! halves, each synced). The coordinator plans the tree from every node's answer
//! ([`kd_proto::auto`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kd_net::tls::AllowedPeers;
use kd_net::wire;
use kd_proto::msg::{DataRequest, PeerInfo, Probe, Probed};

/// Largest probe served or fetched (the coordinator asks for a few MiB).
const MAX_PROBE: u32 = 64 << 20;
/// Longest a probe fetch may take, connection included.
const FETCH_LIMIT: Duration = Duration::from_secs(8);
/// How long a probe fetch tries to connect to its peer (which may not serve its probe yet).
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// Where the disk probe writes: a file beside (or in) the target, or the target device itself
/// (which the image overwrites next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DiskProbe {
    /// Nowhere: a null sink.
    Nowhere,
    /// A scratch file, removed after.
    File(PathBuf),
    /// The start of a block device.
    Device(PathBuf),
}

impl DiskProbe {
    /// For a raw sink's path: the device itself, or a scratch file beside a regular file.
    pub(crate) fn for_raw(path: &Path) -> Self {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => DiskProbe::Device(path.to_path_buf()),
            _ => {
                let mut name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                name.push(".kd-probe");
                DiskProbe::File(path.with_file_name(name))
            }
        }
    }

    /// For a directory the image is extracted into.
    pub(crate) fn for_dir(dir: &Path) -> Self {
        DiskProbe::File(dir.join(".kd-probe"))
    }
}

/// The server half of a probe: stops (its accept loop ends) when dropped.
pub(crate) struct ProbeServer(tokio::task::JoinHandle<()>);

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a probe: serves it to `p.serve` on `serve_ep` (the endpoint children reach, at the
/// Hello's data port), fetches from `p.fetch` through `endpoint`, measures the disk at `disk`
/// (through the `write_rate` limit, as the image would be). The server keeps answering (a
/// slower peer may still be fetching) until the returned handle is dropped, at the plan.
pub(crate) async fn run(
    (serve_ep, endpoint): (&quinn::Endpoint, &quinn::Endpoint),
    p: Probe,
    disk: DiskProbe,
    write_rate: Option<u64>,
) -> (Probed, Option<ProbeServer>) {
    let bytes = p.bytes.min(MAX_PROBE);
    let mut errors = Vec::new();
    let allowed = AllowedPeers::default();
    for s in &p.serve {
        allowed.allow(s.cert_sha256, s.node.clone());
    }
    let server = match kd_net::tls::parent_server(
        p.identity.cert_der.clone(),
        p.identity.key_der.clone(),
        allowed,
    ) {
        Ok(cfg) => {
            serve_ep.set_server_config(Some(cfg));
            Some(ProbeServer(tokio::spawn(serve(
                serve_ep.clone(),
                p.deployment,
                MAX_PROBE,
            ))))
        }
        Err(e) => {
            errors.push(format!("cannot serve the probe: {e}"));
            None
        }
    };
    // The disk is timed while the link is: the probe takes the longer of the two.
    let disk_probe = match disk {
        DiskProbe::Nowhere if write_rate.is_none() => None,
        d => {
            let n = u64::from(bytes);
            Some(tokio::task::spawn_blocking(move || {
                write_probe(&d, n, write_rate)
            }))
        }
    };
    let link = match &p.fetch {
        None => None,
        Some(peer) => {
            match tokio::time::timeout(FETCH_LIMIT, fetch(endpoint, &p, peer, bytes)).await {
                Ok(Ok(rate)) => Some(rate),
                Ok(Err(e)) => {
                    errors.push(format!("link probe from {}: {e:#}", peer.node));
                    None
                }
                Err(_) => {
                    errors.push(format!(
                        "link probe from {}: not done within {FETCH_LIMIT:?}",
                        peer.node
                    ));
                    None
                }
            }
        }
    };
    let disk = match disk_probe {
        None => None,
        Some(h) => match h.await {
            Ok(Ok(rate)) => Some(rate),
            Ok(Err(e)) => {
                errors.push(format!("disk probe: {e:#}"));
                None
            }
            Err(e) => {
                errors.push(format!("disk probe: {e}"));
                None
            }
        },
    };
    tracing::info!(?link, ?disk, "probe measured (bytes per second)");
    let error = (!errors.is_empty()).then(|| errors.join("; "));
    (Probed { link, disk, error }, server)
}

/// Answers `DataRequest::Probe` on every connection the server config lets in.
async fn serve(endpoint: quinn::Endpoint, deployment: u64, max: u32) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), incoming).await else {
                return;
            };
            while let Ok((mut s, mut r)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let req = wire::recv::<DataRequest>(
                        &mut r,
                        Duration::from_secs(5),
                        "a probe request",
                    )
                    .await;
                    let Ok(DataRequest::Probe {
                        deployment: d,
                        bytes,
                    }) = req
                    else {
                        return;
                    };
                    if d != deployment {
                        return;
                    }
                    let filler = bytes::Bytes::from(vec![0x5au8; 64 << 10]);
                    let mut left = bytes.min(max) as usize;
                    while left > 0 {
                        let n = left.min(filler.len());
                        if s.write_chunk(filler.slice(..n)).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                    let _ = s.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.stopped()).await;
                });
            }
        });
    }
}

/// Fetches `bytes` from `peer`; bytes per second from the request to the last byte. The peer
/// may get its own probe order a moment after this node: connecting is retried for
/// [`CONNECT_PATIENCE`].
async fn fetch(endpoint: &quinn::Endpoint, p: &Probe, peer: &PeerInfo, bytes: u32) -> Result<u64> {
    let conn = crate::peer::connect_peer(endpoint, &p.identity, peer, CONNECT_PATIENCE).await?;
    let fetched = async {
        let (mut s, mut r) = conn.open_bi().await?;
        let t = Instant::now();
        let deployment = p.deployment;
        wire::send(&mut s, &DataRequest::Probe { deployment, bytes }).await?;
        let _ = s.finish();
        let mut got = 0u64;
        while let Some(c) = r.read_chunk(1 << 20, true).await? {
            got += c.bytes.len() as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        if got != u64::from(bytes) {
            bail!("got {got} of {bytes} bytes");
        }
        anyhow::Ok((got as f64 / secs.max(1e-6)) as u64)
    }
    .await;
    conn.close(kd_net::close::DONE.into(), b"probed");
    fetched
}

/// Segments of the disk probe, each written, synced and timed on its own ([`write_probe`]).
/// Two: one can stall while the other shows the disk's pace, and each sync's fixed cost
/// (a journal commit) weighs little more than in one synced write of the whole (with four
/// 512 KiB segments, a fast disk's probe would be as much sync as writing).
const DISK_SEGMENTS: u64 = 2;

/// Writes `bytes` at `d` (through the write-rate limit) in [`DISK_SEGMENTS`] segments, each
/// synced and timed, and returns the disk's rate in bytes per second ([`disk_rate`]): one sync
/// that waits on other files' dirty pages (writeback after a big build) does not make a
/// normal disk look slow. A scratch file is removed after.
fn write_probe(d: &DiskProbe, bytes: u64, write_rate: Option<u64>) -> Result<u64> {
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut file = match d {
        DiskProbe::Nowhere => None,
        DiskProbe::File(p) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .with_context(|| format!("cannot create {}", p.display()))?,
        ),
        DiskProbe::Device(p) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))?,
        ),
    };
    let mut segments = Vec::new();
    let result = (|| {
        for i in 0..DISK_SEGMENTS {
            // `bytes` in all, the first segments one byte longer when it does not divide.
            let size = bytes / DISK_SEGMENTS + u64::from(i < bytes % DISK_SEGMENTS);
            if size > 0 {
                let took = write_segment(file.as_mut(), &block, size, write_rate)?;
                segments.push((size, took));
            }
        }
        std::io::Result::Ok(())
    })();
    drop(file);
    if let DiskProbe::File(p) = d {
        let _ = std::fs::remove_file(p);
    }
    result.context("write")?;
    Ok(disk_rate(&segments))
}

/// Writes `size` bytes of `block` over and over to `file` (none: only through the limit),
/// through a write-rate limit of its own (a slow disk is slow in every segment), syncs, and
/// returns how long it all took.
fn write_segment(
    mut file: Option<&mut std::fs::File>,
    block: &[u8],
    size: u64,
    write_rate: Option<u64>,
) -> std::io::Result<Duration> {
    use std::io::Write;
    let t = Instant::now();
    let mut limit = crate::sink::RateLimit::new(write_rate);
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        if let Some(f) = file.as_mut() {
            f.write_all(&block[..n])?;
        }
        limit.wrote(n as u64);
        left -= n as u64;
    }
    if let Some(f) = file {
        f.sync_data()?;
    }
    Ok(t.elapsed())
}

/// The disk's rate (bytes per second) from the probe's segments (bytes, time each): the best
/// segment's. A slow disk is slow in every segment; a stranger's writeback slows one (its
/// sync waited on other files' dirty pages), and `sync_data` leaves no cache that could make a
/// segment faster than the disk. 0 without segments.
fn disk_rate(segments: &[(u64, Duration)]) -> u64 {
    segments
        .iter()
        .map(|(bytes, t)| (*bytes as f64 / t.as_secs_f64().max(1e-6)) as u64)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_probe_writes_syncs_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("image.raw");
        let d = DiskProbe::for_raw(&target);
        assert_eq!(d, DiskProbe::File(dir.path().join("image.raw.kd-probe")));
        let rate = write_probe(&d, 4 << 20, None).unwrap();
        assert!(rate > 0);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        // Through a 20 MB/s limit, each 2 MiB half of 4 MiB takes about 0.1 s: the slow disk
        // still reads slow (the limit is what tests and benches use for one).
        let rate = write_probe(&DiskProbe::Nowhere, 4 << 20, Some(20_000_000)).unwrap();
        assert!((15_000_000..=21_000_000).contains(&rate), "{rate}");
        // A byte count that does not divide into the segments, written whole all the same.
        let f = DiskProbe::File(dir.path().join("odd.kd-probe"));
        assert!(write_probe(&f, (1 << 20) + 3, None).unwrap() > 0);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        assert_eq!(
            DiskProbe::for_dir(dir.path()),
            DiskProbe::File(dir.path().join(".kd-probe"))
        );
        assert!(write_probe(&DiskProbe::File(dir.path().join("no/such/x")), 1, None).is_err());
    }

    #[test]
    fn a_stalled_segment_does_not_drag_the_disk_rate_down() {
        let mib = 1u64 << 20;
        let ms = Duration::from_millis;
        // 1 MiB in 10 ms each: about 105 MB/s.
        let even = [(mib, ms(10)); 2];
        let pace = disk_rate(&even);
        assert!((100_000_000..=110_000_000).contains(&pace), "{pace}");
        // One sync waited 2 s on other files' writeback: the rate is still the disk's pace
        // (the total's would be about 1 MB/s).
        for stalled in 0..2 {
            let mut s = even;
            s[stalled].1 = ms(2000);
            assert_eq!(disk_rate(&s), pace, "segment {stalled} stalled");
        }
        // A slow disk is slow in both.
        let slow = [(mib, ms(50)), (mib, ms(55))];
        assert!(disk_rate(&slow) < 21_000_000, "{}", disk_rate(&slow));
        // Segments of other sizes count by their rate; none, no rate.
        let mixed = [(2 * mib, ms(20)), (mib / 2, ms(50))];
        assert_eq!(disk_rate(&mixed), pace);
        assert_eq!(disk_rate(&[]), 0);
    }
}
