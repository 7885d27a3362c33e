//! The agent's event bus: rank lifecycle and GPU health events, numbered.
//!
//! Every published event gets the next sequence number under one lock, so
//! subscribers see strictly increasing numbers and a gap means they lagged
//! and lost events. Subscribers are `tokio::sync::broadcast` receivers.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::gpu::HealthChange;
use crate::rank::{RankKey, RankStatus};

/// How many events a slow subscriber may fall behind before it loses some.
pub const EVENT_BUFFER: usize = 1024;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A rank's process started.
    RankStarted(RankStatus),
    /// A rank exited normally (asked to stop, or status 0).
    RankExited {
        /// Which rank.
        key: RankKey,
        /// Its generation.
        generation: u64,
        /// Exit code; `128 + signal` when killed by a signal.
        exit_code: i32,
        /// Whether a stop asked for it.
        requested: bool,
    },
    /// A rank failed: could not start, crashed or was killed.
    RankFailed {
        /// Which rank.
        key: RankKey,
        /// Its generation.
        generation: u64,
        /// Exit code; `None` when killed by a signal or never started.
        exit_code: Option<i32>,
        /// Short reason.
        reason: String,
    },
    /// A GPU changed health.
    GpuHealth(HealthChange),
}

/// One numbered event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Per-agent sequence number, starting at 1; 0 marks a replayed snapshot.
    pub sequence: u64,
    /// When the agent observed it.
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

/// Publishes numbered events to every subscriber. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct EventBus {
    sequence: Arc<Mutex<u64>>,
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// An empty bus.
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            sequence: Arc::new(Mutex::new(0)),
            sender,
        }
    }

    /// Numbers and publishes `kind`; returns the event.
    pub fn publish(&self, kind: EventKind) -> Event {
        let mut sequence = self.sequence.lock().unwrap_or_else(PoisonError::into_inner);
        *sequence += 1;
        let event = Event {
            sequence: *sequence,
            at: SystemTime::now(),
            kind,
        };
        // No subscriber is not an error: events are for whoever listens.
        let _ = self.sender.send(event.clone());
        event
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}
