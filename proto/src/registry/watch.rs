//! [`Watcher`]: a typed watch on a registry prefix that never loses events.
//!
//! Invariant: every change up to [`Watcher::revision`] has been queued for
//! the caller, and nothing after it. The watcher starts from a listing
//! (delivered as one [`WatchEvent::Resync`]) and opens an etcd watch at
//! `revision + 1`; when the stream breaks it reopens at `revision + 1` again,
//! so no change is lost or repeated. When etcd has compacted past that
//! revision the changes are gone, so it lists the prefix again and delivers a
//! fresh `Resync` that replaces everything the caller knew.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};

use super::client::{Registry, call};
use crate::error::{Error, Result};
use crate::records::RegistryRecord;

/// One change seen by a [`Watcher`].
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<T> {
    /// The complete current contents of the prefix; replaces all earlier state.
    /// Sent first, and again after etcd compacted away events the watcher missed.
    Resync {
        /// Every valid record (invalid ones are reported as `Err` items after it).
        records: Vec<T>,
        /// The revision the contents reflect.
        revision: i64,
    },
    /// A record was created or replaced.
    Put {
        /// Its key.
        key: String,
        /// The new value.
        record: T,
        /// The revision of the change.
        revision: i64,
    },
    /// The value at `key` was deleted (or its lease expired).
    Delete {
        /// The deleted key.
        key: String,
        /// The revision of the change.
        revision: i64,
    },
}

/// A resuming, typed watch on one prefix. Owned by one task; call [`Watcher::next`]
/// in a loop.
pub struct Watcher<T> {
    registry: Registry,
    prefix: String,
    timeout: Duration,
    revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<WatchEvent<T>>>,
    needs_resync: bool,
    reopened: u64,
    _record: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Watcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .field("revision", &self.revision)
            .field("connected", &self.stream.is_some())
            .field("reopened", &self.reopened)
            .finish_non_exhaustive()
    }
}

impl<T: RegistryRecord> Watcher<T> {
    pub(crate) async fn start(
        registry: Registry,
        prefix: String,
        timeout: Duration,
    ) -> Result<Self> {
        let mut watcher = Self {
            registry,
            prefix,
            timeout,
            revision: 0,
            stream: None,
            pending: VecDeque::new(),
            needs_resync: true,
            reopened: 0,
            _record: PhantomData,
        };
        watcher.resync().await?;
        Ok(watcher)
    }

    /// The next change. An `Err` is either one value that failed to decode
    /// (the watch goes on past it) or a failure to reach etcd (nothing is
    /// lost: calling `next` again retries from [`Watcher::revision`]).
    pub async fn next(&mut self) -> Result<WatchEvent<T>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            if self.needs_resync {
                self.resync().await?;
                continue;
            }
            let stream = match self.stream.as_mut() {
                Some(stream) => stream,
                None => self.open().await?,
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        tracing::info!(
                            prefix = %self.prefix,
                            revision = self.revision,
                            compacted = response.compact_revision(),
                            "watch fell behind compaction; re-listing"
                        );
                        self.stream = None;
                        self.needs_resync = true;
                        continue;
                    }
                    if response.canceled() {
                        self.stream = None;
                        return Err(Error::WatchBroken {
                            prefix: self.prefix.clone(),
                            reason: response.cancel_reason().to_owned(),
                        });
                    }
                    for event in response.events() {
                        self.queue(event);
                    }
                }
                Ok(None) => {
                    tracing::debug!(prefix = %self.prefix, "watch stream ended; resuming");
                    self.stream = None;
                }
                Err(err) => {
                    tracing::debug!(prefix = %self.prefix, error = %err, "watch stream broke; resuming");
                    self.stream = None;
                }
            }
        }
    }

    /// The revision of the last change queued for the caller.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// How many times the etcd watch stream has been (re)opened.
    pub fn reopened(&self) -> u64 {
        self.reopened
    }

    /// Drops the underlying etcd stream as if the connection had broken; the
    /// next [`Watcher::next`] reopens it from [`Watcher::revision`]. For tests
    /// of resumption, and for callers that suspect a stalled stream.
    pub fn reconnect(&mut self) {
        self.stream = None;
    }

    async fn open(&mut self) -> Result<&mut WatchStream> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let mut client = self.registry.etcd().watch_client();
        let stream = call(
            "watch",
            self.timeout,
            client.watch(self.prefix.as_str(), Some(options)),
        )
        .await?;
        self.reopened += 1;
        Ok(self.stream.insert(stream))
    }

    async fn resync(&mut self) -> Result<()> {
        let listing = self.registry.list::<T>(&self.prefix, self.timeout).await?;
        self.revision = listing.revision;
        self.needs_resync = false;
        self.stream = None;
        self.pending.push_back(Ok(WatchEvent::Resync {
            records: listing.records,
            revision: listing.revision,
        }));
        self.pending.extend(listing.invalid.into_iter().map(Err));
        Ok(())
    }

    fn queue(&mut self, event: &etcd_client::Event) {
        let Some(kv) = event.kv() else { return };
        let revision = kv.mod_revision();
        if revision < self.revision {
            // Already delivered. Cannot happen with `start_revision`; events of
            // one transaction share a revision, hence `<`.
            return;
        }
        self.revision = revision;
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let item = match event.event_type() {
            EventType::Put => T::decode(&key, kv.value()).map(|record| WatchEvent::Put {
                key,
                record,
                revision,
            }),
            EventType::Delete => Ok(WatchEvent::Delete { key, revision }),
        };
        self.pending.push_back(item);
    }
}
