//! KV transfer between engines: the buffers a prefill worker holds until a
//! decode worker pulls them ([`KvStore`]), the chunk stream `PullKv` sends
//! ([`KvChunks`]), and the puller's side ([`receive`], [`verify`], [`pull`]).
//!
//! Invariants: a buffer leaves the store after its last chunk is streamed or
//! when its time-to-live passes, whichever comes first; the store is a small
//! lock-protected map (critical sections never await). A pull returns bytes
//! only when every chunk arrived at the offset that follows the previous one
//! and the last one was marked last; [`pull`] also checks the checksum.
//!
//! Throughput (see `benches/kv_transfer.rs`): chunks are cut as the stream
//! is polled, so the holder copies one chunk at a time while earlier ones are
//! on the wire, and the puller opens its connection with HTTP/2 windows and a
//! frame size sized for multi-megabyte streams rather than h2's defaults
//! (2 MiB stream window, 16 KiB frames).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::tls::ClientTls;
use tokio::time::Instant;
use tonic::Status;

use crate::error::{Error, Result};
use crate::sim;

/// Largest gRPC message a puller accepts (the holder's chunks are at most
/// its `kv_chunk_bytes`, 1 MiB by default; the server accepts the same).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 stream window a puller advertises: 16 chunks may be in flight, so
/// the holder keeps sending while the puller's task waits for a core (h2's
/// default is 2 MiB).
const PULL_STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 connection window a puller advertises (one stream per connection).
const PULL_CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 DATA frame a puller accepts. With h2's default of 16 KiB a
/// 48 MiB KV crosses as 3,000 frames, and per-frame work halved throughput
/// in `benches/kv_transfer.rs`; at 1 MiB a 1 MiB chunk (plus its few bytes
/// of gRPC and protobuf framing) crosses in two.
const PULL_MAX_FRAME: u32 = 1 << 20;

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

/// The `PullKv` reply stream of one buffer: chunks of at most `chunk` bytes,
/// each copied out of the shared buffer only when the transport asks for it.
/// An empty buffer is one empty chunk marked last.
#[derive(Debug)]
pub struct KvChunks {
    data: Arc<Vec<u8>>,
    chunk: usize,
    offset: usize,
    done: bool,
}

impl KvChunks {
    /// Streams `data` in chunks of `chunk` bytes (at least 1).
    pub fn new(data: Arc<Vec<u8>>, chunk: usize) -> Self {
        Self {
            data,
            chunk: chunk.max(1),
            offset: 0,
            done: false,
        }
    }
}

impl tokio_stream::Stream for KvChunks {
    type Item = std::result::Result<pb::KvChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let start = self.offset;
        let end = (start + self.chunk).min(self.data.len());
        let last = end == self.data.len();
        let chunk = pb::KvChunk {
            offset: start as u64,
            data: self.data[start..end].to_vec(),
            last,
        };
        self.offset = end;
        self.done = last;
        Poll::Ready(Some(Ok(chunk)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.done {
            0
        } else {
            (self.data.len() - self.offset).div_ceil(self.chunk).max(1)
        };
        (left, Some(left))
    }
}

/// Streams `handle`'s KV from its holder into one buffer, checking that the
/// chunks are contiguous, complete and `handle.bytes` long; counts received
/// bytes into `received`. Does not check content (see [`verify`]). The
/// connection goes through `tls` (mutual TLS unless the process runs
/// plaintext), with the large h2 windows and frames the pull needs.
pub async fn receive(
    handle: &pb::KvHandle,
    max_chunk_bytes: u32,
    received: &IntCounter,
    tls: &ClientTls,
) -> Result<Vec<u8>> {
    let endpoint = &handle.kv_endpoint;
    let channel = tls
        .endpoint(endpoint)
        .map_err(|e| Error::KvTransfer(format!("endpoint {endpoint}: {e}")))?
        .initial_stream_window_size(PULL_STREAM_WINDOW)
        .initial_connection_window_size(PULL_CONNECTION_WINDOW)
        .max_frame_size(PULL_MAX_FRAME);
    let channel = tls
        .channel(&channel)
        .await
        .map_err(|e| Error::KvTransfer(e.to_string()))?;
    let mut stream = EngineServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .pull_kv(pb::PullKvRequest {
            kv_id: handle.id.clone(),
            max_chunk_bytes,
        })
        .await
        .map_err(|s| Error::KvTransfer(s.message().to_string()))?
        .into_inner();
    let mut kv = Assembler::new(handle.bytes);
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| Error::KvTransfer(s.message().to_string()))?
    {
        kv.push(chunk.offset, &chunk.data, chunk.last)?;
        received.inc_by(chunk.data.len() as u64);
    }
    kv.finish()
}

/// Most bytes preallocated for a pull up front; a larger KV grows as its
/// chunks arrive, so a handle that claims absurd sizes cannot make the
/// puller allocate them before a byte arrives.
const MAX_PREALLOC: u64 = 1 << 30;

/// Reassembles the chunks of one KV pull: they must be contiguous from
/// offset 0, nothing may follow the one marked last, and the total must be
/// exactly the `expected` bytes the handle names (checked as chunks arrive,
/// so a holder that sends too much is cut off at once). Pure; the KV
/// framing fuzz target drives it with arbitrary chunk sequences.
#[derive(Debug)]
pub struct Assembler {
    data: Vec<u8>,
    expected: u64,
    last: bool,
}

impl Assembler {
    /// An empty KV of `expected` bytes.
    pub fn new(expected: u64) -> Self {
        Self {
            data: Vec::with_capacity(expected.min(MAX_PREALLOC) as usize),
            expected,
            last: false,
        }
    }

    /// Appends the chunk at `offset`.
    pub fn push(&mut self, offset: u64, bytes: &[u8], last: bool) -> Result<()> {
        let have = self.data.len() as u64;
        if self.last {
            return Err(Error::KvCorrupt(format!(
                "chunk at offset {offset} after the last one"
            )));
        }
        if offset != have {
            return Err(Error::KvCorrupt(format!(
                "chunk at offset {offset} after {have} bytes"
            )));
        }
        if have + bytes.len() as u64 > self.expected {
            return Err(Error::KvCorrupt(format!(
                "{} bytes sent for a KV of {}",
                have + bytes.len() as u64,
                self.expected
            )));
        }
        self.data.extend_from_slice(bytes);
        self.last = last;
        Ok(())
    }

    /// The whole KV, once the last chunk made it complete.
    pub fn finish(self) -> Result<Vec<u8>> {
        let got = self.data.len() as u64;
        if !self.last || got != self.expected {
            return Err(Error::KvCorrupt(format!(
                "received {got} of {} bytes",
                self.expected
            )));
        }
        Ok(self.data)
    }
}

/// Checks that `data` is the KV the holder produced for `handle` (the
/// simulated backend's checksum), off the async workers.
pub async fn verify(handle: &pb::KvHandle, data: Vec<u8>) -> Result<Vec<u8>> {
    let id = handle.id.clone();
    let (ok, data) = tokio::task::spawn_blocking(move || {
        let len = data.len() as u64;
        (
            sim::checksum(&data) == sim::expected_checksum(&id, len),
            data,
        )
    })
    .await
    .map_err(|e| Error::KvTransfer(format!("checksum task failed: {e}")))?;
    if ok {
        Ok(data)
    } else {
        Err(Error::KvCorrupt("checksum mismatch".into()))
    }
}

/// Pulls `handle`'s KV: [`receive`] then [`verify`]; returns its length.
pub async fn pull(
    handle: &pb::KvHandle,
    max_chunk_bytes: u32,
    received: &IntCounter,
    tls: &ClientTls,
) -> Result<u64> {
    let data = receive(handle, max_chunk_bytes, received, tls).await?;
    Ok(verify(handle, data).await?.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    async fn chunks(len: usize, chunk: usize) -> Vec<pb::KvChunk> {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        KvChunks::new(Arc::new(data), chunk)
            .map(|c| c.expect("chunk"))
            .collect()
            .await
    }

    #[tokio::test]
    async fn chunks_cover_the_buffer_in_order_and_mark_the_last() {
        let out = chunks(10, 4).await;
        let offsets: Vec<u64> = out.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, vec![0, 4, 8]);
        assert_eq!(
            out.iter().map(|c| c.last).collect::<Vec<_>>(),
            vec![false, false, true]
        );
        let joined: Vec<u8> = out.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, (0..10).collect::<Vec<u8>>());
        assert_eq!(chunks(8, 4).await.len(), 2);
    }

    #[tokio::test]
    async fn an_empty_buffer_is_one_empty_last_chunk() {
        let out = chunks(0, 4).await;
        assert_eq!(out.len(), 1);
        assert!(out[0].last && out[0].data.is_empty() && out[0].offset == 0);
    }

    #[test]
    fn the_assembler_takes_contiguous_chunks_of_the_expected_size_only() {
        let mut kv = Assembler::new(10);
        kv.push(0, &[1; 4], false).unwrap();
        kv.push(4, &[2; 6], true).unwrap();
        assert_eq!(kv.finish().unwrap().len(), 10);
        // A gap, an overlap, too many bytes, anything after the last chunk,
        // a short KV and no last mark are all corrupt.
        let corrupt = |e: Error| assert_eq!(e.category(), "kv_corrupt", "{e}");
        let mut kv = Assembler::new(10);
        kv.push(0, &[1; 4], false).unwrap();
        corrupt(kv.push(5, &[1], false).unwrap_err());
        corrupt(kv.push(3, &[1], false).unwrap_err());
        corrupt(kv.push(4, &[1; 7], false).unwrap_err());
        kv.push(4, &[1; 2], true).unwrap();
        corrupt(kv.push(6, &[1], true).unwrap_err());
        corrupt(kv.finish().unwrap_err());
        let mut open = Assembler::new(2);
        open.push(0, &[1, 2], false).unwrap();
        corrupt(open.finish().unwrap_err());
        // A handle claiming an absurd size allocates nothing up front.
        assert!(Assembler::new(u64::MAX).data.capacity() <= MAX_PREALLOC as usize);
    }

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
