//! Pool events (revoke notices, lost leases, servers going away) and their fan-out to subscribers.
//!
//! Owns: [`PoolEvent`] and the event bus. Producers (control-connection readers, the heartbeat) call
//! [`EventBus::emit`], which never blocks: it hands the event to one dispatcher thread through a bounded
//! queue. The dispatcher delivers each event to every [`crate::Pool::events`] channel (bounded; a full
//! one loses the event, counted and logged) and then to every registered callback, in registration
//! order. Callbacks run on the dispatcher thread, so they may call back into the pool.
//!
//! Invariants: no producer ever waits on a subscriber; every queue is bounded; the dispatcher exits
//! when the bus is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use farpool_core::{Error, LeaseId, SlabId};
use parking_lot::Mutex;

/// Capacity of the queue between producers and the dispatcher thread.
const DISPATCH_QUEUE_CAPACITY: usize = 4096;
/// How long closing the bus waits for the dispatcher thread.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Something that happened to the pool's servers or leases.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PoolEvent {
    /// The server will revoke these slabs of this lease at `deadline`: move what matters before then.
    RevokeNotice {
        /// Server index.
        server: usize,
        /// The lease.
        lease: LeaseId,
        /// The slabs to be revoked.
        slabs: Vec<SlabId>,
        /// When access stops (local clock, computed when the notice arrived).
        deadline: Instant,
    },
    /// These slabs of this lease are revoked: access is denied from now on.
    Revoked {
        /// Server index.
        server: usize,
        /// The lease.
        lease: LeaseId,
        /// The revoked slabs.
        slabs: Vec<SlabId>,
    },
    /// The control connection to the server broke (crash, network, protocol error).
    ServerDown {
        /// Server index.
        server: usize,
        /// Why.
        error: Arc<Error>,
    },
    /// The server announced that it is shutting down.
    ServerGoodbye {
        /// Server index.
        server: usize,
        /// The server's reason.
        reason: String,
        /// When it stops serving (local clock).
        deadline: Instant,
    },
    /// A lease could not be kept (renewal refused or not answered before expiry, or its server went
    /// down): its memory must be considered gone.
    LeaseLost {
        /// Server index.
        server: usize,
        /// The lease.
        lease: LeaseId,
        /// Why.
        error: Arc<Error>,
    },
}

type Callback = Arc<dyn Fn(&PoolEvent) + Send + Sync + 'static>;

enum Dispatch {
    Event(PoolEvent),
    Stop,
}

#[derive(Default)]
struct Subscribers {
    channels: Vec<Sender<PoolEvent>>,
    callbacks: Vec<Callback>,
}

/// The producer side of the bus, plus subscription.
pub(crate) struct EventBus {
    queue: Sender<Dispatch>,
    subs: Arc<Mutex<Subscribers>>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").field("dropped", &self.dropped.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl EventBus {
    /// Start the dispatcher thread; each subscriber channel holds at most `capacity` events.
    pub(crate) fn start(capacity: usize) -> Self {
        let (tx, rx) = bounded(DISPATCH_QUEUE_CAPACITY);
        let subs: Arc<Mutex<Subscribers>> = Arc::default();
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = {
            let (subs, dropped) = (subs.clone(), dropped.clone());
            std::thread::Builder::new()
                .name("farpool-events".into())
                .spawn(move || dispatch_loop(&rx, &subs, &dropped))
                .expect("spawning the event dispatcher thread")
        };
        Self { queue: tx, subs, capacity, dropped, thread: Mutex::new(Some(thread)) }
    }

    /// Queue an event for delivery; never blocks (a full queue drops it, counted and logged).
    pub(crate) fn emit(&self, ev: PoolEvent) {
        tracing::debug!(?ev, "pool event");
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Dispatch::Event(ev)) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped_total = n, "event dispatcher queue full; event dropped");
        }
    }

    /// A new subscription channel.
    pub(crate) fn subscribe(&self) -> Receiver<PoolEvent> {
        let (tx, rx) = bounded(self.capacity);
        self.subs.lock().channels.push(tx);
        rx
    }

    /// Register a callback run on the dispatcher thread for every later event.
    pub(crate) fn on_event(&self, f: Callback) {
        self.subs.lock().callbacks.push(f);
    }

    /// Events lost because a queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Deliver what is queued, then stop the dispatcher. Waits at most [`CLOSE_WAIT`] for it (a callback
    /// that never returns is left behind, logged), and never waits when called from a callback.
    pub(crate) fn close(&self) {
        let _ = self.queue.send_timeout(Dispatch::Stop, CLOSE_WAIT);
        let Some(t) = self.thread.lock().take() else { return };
        if t.thread().id() == std::thread::current().id() {
            return; // the pool is being dropped by one of its own callbacks
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("event callback still running after {CLOSE_WAIT:?}; dispatcher left to finish alone");
        }
        // Drop the senders so subscribers see the end of the stream.
        self.subs.lock().channels.clear();
    }
}

fn dispatch_loop(rx: &Receiver<Dispatch>, subs: &Mutex<Subscribers>, dropped: &AtomicU64) {
    while let Ok(Dispatch::Event(ev)) = rx.recv() {
        let callbacks = {
            let mut s = subs.lock();
            s.channels.retain(|tx| match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(dropped_total = n, "a pool event subscriber is full; event dropped for it");
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
            s.callbacks.clone()
        };
        for cb in callbacks {
            cb(&ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(lease: u64) -> PoolEvent {
        PoolEvent::Revoked { server: 0, lease: LeaseId(lease), slabs: vec![SlabId(1)] }
    }

    #[test]
    fn fans_out_to_channels_and_callbacks_and_drops_when_full() {
        let bus = EventBus::start(2);
        let a = bus.subscribe();
        let b = bus.subscribe();
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        bus.on_event(Arc::new(move |_| {
            s2.fetch_add(1, Ordering::Relaxed);
        }));
        drop(b); // a dropped subscriber is pruned, not an error
        for i in 0..3 {
            bus.emit(revoked(i));
        }
        bus.close();
        let got: Vec<_> = a.try_iter().collect();
        assert_eq!(got.len(), 2, "capacity 2: the third event is dropped for this subscriber");
        assert!(matches!(got[0], PoolEvent::Revoked { lease: LeaseId(0), .. }));
        assert_eq!(seen.load(Ordering::Relaxed), 3, "callbacks see every event");
        assert_eq!(bus.dropped(), 1);
        assert!(a.recv_timeout(Duration::from_millis(10)).is_err(), "closed bus ends the stream");
    }
}
