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
use std::sync::Mutex;
use std::time::Duration;

use kd_net::pace::Pacer;
use tokio::sync::{watch, Notify};

/// A verified compressed chunk, shared between the writer and the children's senders.
pub(crate) type Chunk = bytes::Bytes;

/// What [`Store::get`] found.
pub(crate) enum Get {
    Ready(Chunk),
    Evicted,
    NotYet,
}

struct Child {
    /// Next chunk this child will be sent.
    pos: u32,
    /// Its id in the pacer, for a stream (a one-chunk request is not paced).
    paced: Option<u64>,
}

struct Inner {
    chunks: VecDeque<Chunk>,
    base: u32,
    children: HashMap<u64, Child>,
    next_id: u64,
}

pub(crate) struct Store {
    inner: Mutex<Inner>,
    window: usize,
    available: watch::Sender<u32>,
    advanced: Notify,
    pacer: Pacer,
}

impl Store {
    pub(crate) fn new(window: usize) -> Self {
        let (available, _) = watch::channel(0);
        Self {
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                base: 0,
                children: HashMap::new(),
                next_id: 0,
            }),
            window: window.max(1),
            available,
            advanced: Notify::new(),
            pacer: Pacer::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of chunks received so far (the next index expected).
    pub(crate) fn available(&self) -> u32 {
        *self.available.borrow()
    }

    /// Appends chunk `index` (must be the next one); waits while the window is full and a child
    /// still needs the oldest chunk, at most `grace` in all.
    pub(crate) async fn push(&self, index: u32, data: Chunk, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.advanced.notified();
            {
                let mut g = self.lock();
                debug_assert_eq!(g.base + g.chunks.len() as u32, index);
                let full = g.chunks.len() >= self.window;
                let needed = g.children.values().any(|c| c.pos <= g.base);
                if !full || !needed || tokio::time::Instant::now() >= deadline {
                    if full {
                        g.chunks.pop_front();
                        g.base += 1;
                    }
                    g.chunks.push_back(data);
                    drop(g);
                    self.available.send_replace(index + 1);
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

    pub(crate) fn get(&self, index: u32) -> Get {
        let g = self.lock();
        if index < g.base {
            return Get::Evicted;
        }
        match g.chunks.get((index - g.base) as usize) {
            Some(c) => Get::Ready(c.clone()),
            None => Get::NotYet,
        }
    }

    /// Waits until chunk `index` has arrived.
    pub(crate) async fn wait_for(&self, index: u32) {
        let mut rx = self.available.subscribe();
        let _ = rx.wait_for(|&n| n > index).await;
    }

    /// A child starts reading at `from`; `paced`: a stream that moves in step with its siblings
    /// (a one-chunk request is not).
    pub(crate) fn register(&self, from: u32, paced: bool) -> u64 {
        let paced = paced.then(|| self.pacer.register(from));
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.children.insert(id, Child { pos: from, paced });
        id
    }

    pub(crate) fn advance(&self, id: u64, pos: u32) {
        let paced = self.lock().children.get_mut(&id).and_then(|c| {
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
    use std::sync::Arc;

    #[tokio::test]
    async fn window_evicts_and_waits_for_children() {
        let s = Arc::new(Store::new(2));
        let c = s.register(0, true);
        s.push(0, Chunk::from(vec![0]), Duration::from_secs(5))
            .await;
        s.push(1, Chunk::from(vec![1]), Duration::from_secs(5))
            .await;
        // Full and the child still needs chunk 0: push waits until the child advances.
        let s2 = s.clone();
        let h = tokio::spawn(async move {
            s2.push(2, Chunk::from(vec![2]), Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!h.is_finished());
        s.advance(c, 1);
        h.await.unwrap();
        assert!(matches!(s.get(0), Get::Evicted));
        assert!(matches!(s.get(2), Get::Ready(_)));
        assert!(matches!(s.get(3), Get::NotYet));
        // A stalled child is overtaken after the grace period.
        s.push(3, Chunk::from(vec![3]), Duration::from_millis(50))
            .await;
        assert_eq!(s.available(), 4);
        s.unregister(c);
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
