//! Sibling pacing: the streams one sender serves move in step.
//!
//! A sender's uplink is shared by its children's connections, and congestion control shares it
//! unevenly. The child that falls behind is often the one with a subtree: a leaf can take more
//! than its share, while an inner node needs exactly its share and can never catch up later,
//! because its own uplink is then the limit. So a stream may not be given a chunk more than
//! [`LEAD`] chunks ahead of its slowest live sibling; a sibling that has not moved for
//! [`GRACE`] (stalled, dying) no longer holds the others back.
//!
//! Streams move in step within their **group** only: the coordinator serves each speed class
//! of an `auto` tree ([`kd_proto::auto`]) as its own group, so that a class of slow nodes does
//! not hold the fast class back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How many chunks a stream may be ahead of its slowest live sibling.
pub const LEAD: u32 = 2;
/// A sibling that has not moved for this long no longer holds the others back.
pub const GRACE: Duration = Duration::from_secs(5);

struct Pos {
    /// The streams this one moves in step with share its group.
    group: u64,
    /// Next chunk the stream will be given.
    next: u32,
    /// When `next` last moved (or the stream registered).
    moved: Instant,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<u64, Pos>,
    next_id: u64,
}

/// The positions of the streams a sender serves.
#[derive(Default)]
pub struct Pacer {
    inner: Mutex<Inner>,
    moved: Notify,
}

impl Pacer {
    /// An empty pacer.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream starts at chunk `from`; returns its id.
    pub fn register(&self, from: u32) -> u64 {
        self.register_in(from, 0)
    }

    /// A stream of group `group` starts at chunk `from`; returns its id.
    pub fn register_in(&self, from: u32, group: u64) -> u64 {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.streams.insert(
            id,
            Pos {
                group,
                next: from,
                moved: Instant::now(),
            },
        );
        id
    }

    /// Stream `id` will next be given chunk `next`.
    pub fn advance(&self, id: u64, next: u32) {
        if let Some(p) = self.lock().streams.get_mut(&id) {
            p.next = next;
            p.moved = Instant::now();
        }
        self.moved.notify_waiters();
    }

    /// Stream `id` is over.
    pub fn unregister(&self, id: u64) {
        self.lock().streams.remove(&id);
        self.moved.notify_waiters();
    }

    /// Whether stream `id` may be given chunk `index` now.
    fn may_send(&self, id: u64, index: u32) -> bool {
        let g = self.lock();
        let now = Instant::now();
        let Some(group) = g.streams.get(&id).map(|p| p.group) else {
            return true;
        };
        let slowest = g
            .streams
            .iter()
            .filter(|(&sid, p)| {
                sid != id && p.group == group && now.duration_since(p.moved) < GRACE
            })
            .map(|(_, p)| p.next)
            .min();
        slowest.is_none_or(|s| index < s.saturating_add(LEAD))
    }

    /// Waits until stream `id` may be given chunk `index` (at most [`GRACE`] and a little).
    pub async fn pace(&self, id: u64, index: u32) {
        let deadline = Instant::now() + GRACE + Duration::from_millis(100);
        loop {
            let moved = self.moved.notified();
            if self.may_send(id, index) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + Duration::from_millis(200)), moved)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn siblings_move_in_step() {
        let p = Arc::new(Pacer::new());
        let a = p.register(0);
        let b = p.register(0);
        // Alone or not, a may run LEAD chunks ahead of b, not more.
        for i in 0..LEAD {
            tokio::time::timeout(Duration::from_millis(50), p.pace(a, i))
                .await
                .unwrap();
        }
        let p2 = p.clone();
        let h = tokio::spawn(async move { p2.pace(a, LEAD).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!h.is_finished());
        p.advance(b, 1);
        tokio::time::timeout(Duration::from_millis(500), h)
            .await
            .unwrap()
            .unwrap();
        // A sibling that stops moving is ignored after the grace period.
        tokio::time::pause();
        let p3 = p.clone();
        let h = tokio::spawn(async move { p3.pace(a, 10).await });
        tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
        assert!(h.is_finished());
        h.await.unwrap();
        // An unregistered sibling holds nobody back.
        p.unregister(b);
        tokio::time::timeout(Duration::from_millis(50), p.pace(a, 100))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn groups_move_apart() {
        let p = Pacer::new();
        let fast = p.register_in(0, 0);
        let _slow = p.register_in(0, 1);
        // The slow stream of another group holds nobody back.
        tokio::time::timeout(Duration::from_millis(50), p.pace(fast, 50))
            .await
            .unwrap();
        let _twin = p.register_in(0, 0);
        assert!(!p.may_send(fast, LEAD));
    }
}
