//! The chunk window an agent keeps for its children: bounded memory, with backpressure.
//!
//! The receiver pushes chunks in order. A chunk leaves the window when it is the oldest, the
//! window is full, and every child has sent it, so the slowest child throttles its parent
//! (and, through the parent's own window, the whole path up to the source). A child that stalls
//! longer than the grace period is overtaken: it will get `Unavailable` and repair from the
//! coordinator instead of holding everyone back.
//!
//! Siblings also move in step ([`Store::pace`], [`kd_net::pace`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kd_net::pace::Pacer;
use kd_proto::msg::Digest;
use kd_proto::piece::{piece_count, piece_range};
use tokio::sync::{watch, Notify};

/// A verified piece of a compressed chunk, shared between the writer and the children's senders.
pub(crate) type Piece = Bytes;

/// A chunk as the window holds it: its length, its pieces' hashes (sent to children before the
/// pieces) and the verified pieces so far, in order.
struct Slot {
    len: usize,
    hashes: Arc<[Digest]>,
    pieces: Vec<Piece>,
}

/// What [`Store::head`] found.
pub(crate) enum Get {
    /// The chunk has begun: its length and piece hashes.
    Ready(usize, Arc<[Digest]>),
    Evicted,
    NotYet,
}

struct Child {
    /// Next chunk this child will be sent.
    pos: u32,
    /// Its id in the pacer, for a stream (a one-chunk request is not paced).
    paced: Option<u64>,
    /// It held the window for a whole grace period and was overtaken: it holds nothing back
    /// until it moves again (a frozen child would otherwise cost a grace period per chunk).
    overtaken: bool,
}

/// How far the receiver got: every chunk before `complete`, and `pieces` pieces of chunk
/// `complete`. Ordered, and it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Frontier {
    complete: u32,
    pieces: u32,
}

struct Inner {
    chunks: VecDeque<Slot>,
    base: u32,
    children: HashMap<u64, Child>,
    next_id: u64,
}

impl Inner {
    /// Chunk `index`, if it has begun and is still in the window.
    fn slot(&self, index: u32) -> Option<&Slot> {
        self.chunks.get(index.checked_sub(self.base)? as usize)
    }

    fn slot_mut(&mut self, index: u32) -> Option<&mut Slot> {
        self.chunks.get_mut(index.checked_sub(self.base)? as usize)
    }
}

pub(crate) struct Store {
    inner: Mutex<Inner>,
    window: usize,
    frontier: watch::Sender<Frontier>,
    advanced: Notify,
    pacer: Pacer,
    /// Streams ever registered (children that asked for the image).
    streams: watch::Sender<usize>,
}

impl Store {
    pub(crate) fn new(window: usize) -> Self {
        let (frontier, _) = watch::channel(Frontier::default());
        Self {
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                base: 0,
                children: HashMap::new(),
                next_id: 0,
            }),
            window: window.max(1),
            frontier,
            advanced: Notify::new(),
            pacer: Pacer::new(),
            streams: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of chunks received whole so far (the next index expected).
    pub(crate) fn available(&self) -> u32 {
        self.frontier.borrow().complete
    }

    /// Starts chunk `index` (must be the next one; nothing happens if it has begun already, as
    /// after a change of upstream): `len` bytes whose pieces have `hashes`. Waits while the
    /// window is full and a child still needs the oldest chunk, at most `grace` in all.
    pub(crate) async fn begin(
        &self,
        index: u32,
        len: usize,
        hashes: Arc<[Digest]>,
        grace: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.advanced.notified();
            {
                let mut g = self.lock();
                let end = g.base + g.chunks.len() as u32;
                if end > index {
                    return;
                }
                debug_assert_eq!(end, index);
                let full = g.chunks.len() >= self.window;
                let base = g.base;
                let needed = g.children.values().any(|c| c.pos <= base && !c.overtaken);
                if !full || !needed || tokio::time::Instant::now() >= deadline {
                    if full {
                        for c in g.children.values_mut() {
                            c.overtaken |= c.pos <= base;
                        }
                        g.chunks.pop_front();
                        g.base += 1;
                    }
                    g.chunks.push_back(Slot {
                        len,
                        hashes,
                        pieces: Vec::new(),
                    });
                    return;
                }
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                notified,
            )
            .await;
        }
    }

    /// Pieces of chunk `index` held so far (0 if it has not begun).
    pub(crate) fn pieces_held(&self, index: u32) -> usize {
        self.lock().slot(index).map_or(0, |s| s.pieces.len())
    }

    /// Adds verified piece `p` of chunk `index` (begun, and `p` the next piece; anything else is
    /// ignored). Returns true when that completes the chunk.
    pub(crate) fn push_piece(&self, index: u32, p: usize, piece: Piece) -> bool {
        let mut g = self.lock();
        let Some(slot) = g.slot_mut(index) else {
            return false;
        };
        if slot.pieces.len() != p || p >= piece_count(slot.len) {
            return false;
        }
        slot.pieces.push(piece);
        let done = slot.pieces.len() == piece_count(slot.len);
        drop(g);
        self.frontier.send_replace(if done {
            Frontier {
                complete: index + 1,
                pieces: 0,
            }
        } else {
            Frontier {
                complete: index,
                pieces: p as u32 + 1,
            }
        });
        done
    }

    /// Adds the pieces of chunk `index` that are still missing, cut from the whole verified chunk
    /// `data` (a repair); begins the chunk first if needed.
    pub(crate) async fn fill(&self, index: u32, data: Bytes, grace: Duration) {
        let begun = self.lock().slot(index).is_some();
        if !begun {
            let hashes = kd_proto::piece::piece_hashes(&data).into();
            self.begin(index, data.len(), hashes, grace).await;
        }
        for p in self.pieces_held(index)..piece_count(data.len()) {
            self.push_piece(index, p, data.slice(piece_range(data.len(), p)));
        }
    }

    /// The pieces of complete chunk `index`.
    pub(crate) fn pieces(&self, index: u32) -> Option<Vec<Piece>> {
        self.lock()
            .slot(index)
            .filter(|s| s.pieces.len() == piece_count(s.len))
            .map(|s| s.pieces.clone())
    }

    /// The length and piece hashes of chunk `index`, once its first piece is here.
    pub(crate) fn head(&self, index: u32) -> Get {
        let g = self.lock();
        if index < g.base {
            return Get::Evicted;
        }
        match g.slot(index) {
            Some(s) if !s.pieces.is_empty() => Get::Ready(s.len, s.hashes.clone()),
            _ => Get::NotYet,
        }
    }

    /// Piece `p` of chunk `index`: `None` if the chunk has left the window.
    pub(crate) fn piece(&self, index: u32, p: usize) -> Option<Piece> {
        self.lock()
            .slot(index)
            .and_then(|s| s.pieces.get(p).cloned())
    }

    /// Waits until piece `p` of chunk `index` has arrived.
    pub(crate) async fn wait_for_piece(&self, index: u32, p: usize) {
        let want = Frontier {
            complete: index,
            pieces: p as u32,
        };
        let mut rx = self.frontier.subscribe();
        let _ = rx.wait_for(|&f| f > want).await;
    }

    /// A child starts reading at `from`; `paced`: a stream that moves in step with its siblings
    /// (a one-chunk request is not).
    pub(crate) fn register(&self, from: u32, paced: bool) -> u64 {
        if paced {
            self.streams.send_modify(|n| *n += 1);
        }
        let paced = paced.then(|| self.pacer.register(from));
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.children.insert(
            id,
            Child {
                pos: from,
                paced,
                overtaken: false,
            },
        );
        id
    }

    /// Waits until `n` streams have registered, at most `timeout`.
    pub(crate) async fn wait_for_streams(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.streams.subscribe();
        let ok = tokio::time::timeout(timeout, rx.wait_for(|&k| k >= n))
            .await
            .is_ok();
        ok
    }

    pub(crate) fn advance(&self, id: u64, pos: u32) {
        let paced = self.lock().children.get_mut(&id).and_then(|c| {
            c.overtaken &= c.pos == pos;
            c.pos = pos;
            c.paced
        });
        if let Some(p) = paced {
            self.pacer.advance(p, pos);
        }
        self.advanced.notify_waiters();
    }

    /// Waits until child `id` may be sent chunk `index` (see [`Pacer::pace`]).
    pub(crate) async fn pace(&self, id: u64, index: u32) {
        let paced = self.lock().children.get(&id).and_then(|c| c.paced);
        if let Some(p) = paced {
            self.pacer.pace(p, index).await;
        }
    }

    pub(crate) fn unregister(&self, id: u64) {
        let child = self.lock().children.remove(&id);
        if let Some(p) = child.and_then(|c| c.paced) {
            self.pacer.unregister(p);
        }
        self.advanced.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole one-piece chunk.
    async fn push(s: &Store, index: u32, byte: u8, grace: Duration) {
        s.fill(index, Bytes::from(vec![byte]), grace).await;
    }

    #[tokio::test]
    async fn window_evicts_and_waits_for_children() {
        let s = Arc::new(Store::new(2));
        let c = s.register(0, true);
        push(&s, 0, 0, Duration::from_secs(5)).await;
        push(&s, 1, 1, Duration::from_secs(5)).await;
        // Full and the child still needs chunk 0: the next chunk waits until the child advances.
        let s2 = s.clone();
        let h = tokio::spawn(async move { push(&s2, 2, 2, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!h.is_finished());
        s.advance(c, 1);
        h.await.unwrap();
        assert!(matches!(s.head(0), Get::Evicted));
        assert!(matches!(s.head(2), Get::Ready(1, _)));
        assert!(matches!(s.head(3), Get::NotYet));
        assert_eq!(s.pieces(2).unwrap(), vec![Bytes::from(vec![2])]);
        // A stalled child is overtaken after the grace period …
        push(&s, 3, 3, Duration::from_millis(50)).await;
        assert_eq!(s.available(), 4);
        // … and holds nothing back any more while it does not move: a frozen child costs
        // one grace period, not one per chunk.
        let t = tokio::time::Instant::now();
        for i in 4..10 {
            push(&s, i, i as u8, Duration::from_secs(5)).await;
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Once it moves, it is waited for again.
        s.advance(c, 8);
        let s2 = s.clone();
        let h = tokio::spawn(async move { push(&s2, 10, 10, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!h.is_finished());
        s.advance(c, 9);
        h.await.unwrap();
        s.unregister(c);
    }

    #[tokio::test]
    async fn pieces_arrive_in_order_and_a_repair_fills_the_rest() {
        use kd_proto::piece::{piece_hashes, PIECE_LEN};
        let s = Arc::new(Store::new(4));
        let len = 3 * PIECE_LEN + 10;
        let data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
        let hashes: Arc<[Digest]> = piece_hashes(&data).into();
        s.begin(0, len, hashes.clone(), Duration::from_secs(1))
            .await;
        // A sender waiting for piece 1 wakes when it arrives, not before.
        let s2 = s.clone();
        let w = tokio::spawn(async move { s2.wait_for_piece(0, 1).await });
        assert!(matches!(s.head(0), Get::NotYet));
        assert!(!s.push_piece(0, 0, data.slice(piece_range(len, 0))));
        assert!(matches!(s.head(0), Get::Ready(l, _) if l == len));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        // Out of order or repeated: ignored.
        assert!(!s.push_piece(0, 2, data.slice(piece_range(len, 2))));
        assert!(!s.push_piece(0, 0, data.slice(piece_range(len, 0))));
        assert!(!s.push_piece(0, 1, data.slice(piece_range(len, 1))));
        tokio::time::timeout(Duration::from_millis(500), w)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.pieces_held(0), 2);
        assert_eq!(s.available(), 0);
        assert!(s.pieces(0).is_none());
        // Beginning again (a new upstream) keeps what is held; a repair adds only the rest.
        s.begin(0, len, hashes, Duration::from_secs(1)).await;
        assert_eq!(s.pieces_held(0), 2);
        s.fill(0, data.clone(), Duration::from_secs(1)).await;
        assert_eq!(s.available(), 1);
        assert_eq!(s.pieces(0).unwrap().concat(), data.to_vec());
        assert_eq!(s.piece(0, 3).unwrap(), data.slice(3 * PIECE_LEN..));
    }

    #[tokio::test]
    async fn streams_are_paced_one_chunk_requests_are_not() {
        let s = Arc::new(Store::new(64));
        let a = s.register(0, true);
        let b = s.register(0, true);
        let one = s.register(0, false);
        let lead = kd_net::pace::LEAD;
        // a is held back by b, never by the one-chunk request; the request by nobody.
        s.advance(one, 0);
        tokio::time::timeout(Duration::from_millis(50), s.pace(one, 1000))
            .await
            .unwrap();
        let s2 = s.clone();
        let h = tokio::spawn(async move { s2.pace(a, lead).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!h.is_finished());
        s.unregister(b);
        tokio::time::timeout(Duration::from_millis(500), h)
            .await
            .unwrap()
            .unwrap();
    }
}
