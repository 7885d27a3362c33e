//! KV buffers a prefill worker holds until a decode worker pulls them.
//!
//! Invariant: a buffer leaves the store after its last chunk is streamed or
//! when its time-to-live passes, whichever comes first; the store is a small
//! lock-protected map (critical sections never await).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

#[derive(Debug)]
struct Held {
    data: Arc<Vec<u8>>,
    expires: Instant,
}

/// The KV buffers of completed prefills, by handle id.
#[derive(Debug)]
pub struct KvStore {
    held: Mutex<HashMap<String, Held>>,
    ttl: Duration,
    next: AtomicU64,
}

impl KvStore {
    /// An empty store freeing unpulled buffers after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            ttl,
            next: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        // A panic while holding the lock leaves the map consistent (every
        // operation is a single insert/remove), so poisoning is ignored.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh handle id for `request_id`, unique in this store.
    pub fn next_id(&self, request_id: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("kv-{n}-{request_id}")
    }

    /// Holds `data` under `id`; returns when it expires (wall clock).
    pub fn insert(&self, id: String, data: Vec<u8>) -> SystemTime {
        let now = Instant::now();
        let mut held = self.lock();
        held.retain(|_, h| h.expires > now);
        held.insert(
            id,
            Held {
                data: Arc::new(data),
                expires: now + self.ttl,
            },
        );
        SystemTime::now() + self.ttl
    }

    /// The buffer under `id`, if held and not expired.
    pub fn get(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let now = Instant::now();
        let held = self.lock();
        held.get(id)
            .filter(|h| h.expires > now)
            .map(|h| Arc::clone(&h.data))
    }

    /// Frees the buffer under `id`.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Frees every expired buffer; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut held = self.lock();
        let before = held.len();
        held.retain(|_, h| h.expires > now);
        before - held.len()
    }

    /// Buffers held and their bytes.
    pub fn held(&self) -> (usize, u64) {
        let held = self.lock();
        (held.len(), held.values().map(|h| h.data.len() as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let store = KvStore::new(Duration::from_secs(5));
        let id = store.next_id("r");
        store.insert(id.clone(), vec![1, 2, 3]);
        assert_eq!(store.held(), (1, 3));
        assert!(store.get(&id).is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(store.get(&id).is_none());
        assert_eq!(store.purge_expired(), 1);
        assert_eq!(store.held(), (0, 0));
    }

    #[test]
    fn remove_frees() {
        let store = KvStore::new(Duration::from_secs(5));
        store.insert("a".into(), vec![0; 10]);
        store.remove("a");
        assert!(store.get("a").is_none());
    }
}
