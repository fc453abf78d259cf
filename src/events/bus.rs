//! The bus: the handle a `PlaneDatabase` keeps, which starts the listener and the reader
//! and lets this process's writers wake them. The [module docs](super) state its promises.

use super::listener::{connect_listener, listen_loop, new_wake_id, wake_others_loop};
use super::reader::{current_cursor, read_loop};
use super::registry::Shared;
use crate::config::BusConfig;
use crate::error::Result;
use crate::metrics as m;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The handle a `PlaneDatabase` keeps. Starting is lazy (on the first subscription) so that
/// building a `PlaneDatabase` stays synchronous and costs no connection.
pub(crate) struct EventBus {
    shared: Arc<Shared>,
    pool: PgPool,
    /// Where the listening connection comes from: a pool of one connection, which may reach
    /// Postgres another way than `pool` (see `PlaneDatabase::with_listener`).
    listener: PgPool,
    config: BusConfig,
    /// The reader and listener tasks, once started. They run on the runtime of the first
    /// subscription; if they die (that runtime shut down, or a panic), the subscriptions of
    /// the time end and the next subscription starts them again.
    tasks: tokio::sync::Mutex<Option<Tasks>>,
    /// Whether the waker task runs (set by whoever starts it, cleared when it ends).
    waker_running: Arc<AtomicBool>,
    /// Changes when the listener's pool moves to another host of a multi-host URL: the
    /// listening connection, held outside the pool, is then replaced.
    listener_moves: Option<watch::Receiver<u64>>,
}

/// The bus's long-running tasks.
struct Tasks {
    reader: JoinHandle<()>,
    listener: JoinHandle<()>,
}

impl Tasks {
    fn alive(&self) -> bool {
        !(self.reader.is_finished() || self.listener.is_finished())
    }
}

/// Held by each of the bus's tasks. If a task ends while the bus is open (its runtime shut
/// down and dropped it, or it panicked), the subscriptions it fed end rather than wait
/// forever; see [`EventBus::ensure_started`].
pub(super) struct TaskGuard {
    pub(super) shared: Arc<Shared>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.shared.is_closed() {
            tracing::warn!(
                "event bus: a task of the bus stopped (its runtime shut down, or it \
                 panicked); current subscriptions end, and the next one starts it again"
            );
            self.shared.end_subscriptions();
        }
    }
}

/// Clears the waker's flag when its task ends, however it ends.
struct WakerGuard(Arc<AtomicBool>);

impl Drop for WakerGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl EventBus {
    pub(crate) fn new(pool: PgPool, listener: PgPool, mut config: BusConfig) -> Self {
        // A page of zero rows never finishes a read (and a negative one is an SQL error).
        config.fetch_batch_size = config.fetch_batch_size.max(1);
        // Cheap, and makes the help texts reach a recorder installed before this bus.
        m::describe();
        let shared = Arc::new(Shared::new(
            pool.clone(),
            config.max_pending_per_subscription.max(1),
            new_wake_id(),
        ));
        Self {
            shared,
            pool,
            listener,
            config,
            tasks: tokio::sync::Mutex::new(None),
            waker_running: Arc::new(AtomicBool::new(false)),
            listener_moves: None,
        }
    }

    /// Has the listening connection replaced whenever `moves` changes (its pool moved to
    /// another host); `None` leaves it as it is.
    pub(crate) fn following(mut self, moves: Option<watch::Receiver<u64>>) -> Self {
        self.listener_moves = moves;
        self
    }

    /// The listening connection's options (a copy, for the host its pool uses now), for
    /// other connections that only LISTEN, such as a leader election's.
    pub(crate) fn listener_options(&self) -> sqlx::postgres::PgConnectOptions {
        self.listener.connect_options().as_ref().clone()
    }

    /// What a writer of this process sets `plane.event_wake` to in a transaction that
    /// inserts events: `deferred` (the `event` trigger stays silent, and the writer calls
    /// [`committed`](Self::committed) after the commit) or `notify` (the trigger notifies).
    pub(crate) fn event_wake_setting(&self) -> &'static str {
        if self.config.coalesce_wakeups {
            "deferred"
        } else {
            "notify"
        }
    }

    /// Called by a writer after committing a transaction that inserted events with
    /// `plane.event_wake` set to [`event_wake_setting`](Self::event_wake_setting): wakes this
    /// process's reader at once and asks the waker task for one coalesced NOTIFY for other
    /// processes. Must be called from within the tokio runtime.
    ///
    /// If it is not called (e.g. the writer's future was dropped after the commit), readers
    /// still get the events at their next poll: a lost wake-up costs latency, not events.
    pub(crate) fn committed(&self) {
        if !self.config.coalesce_wakeups {
            return;
        }
        // Without a running reader this stores a permit, which costs one extra read later.
        self.shared.wake.notify_one();
        if !self.waker_running.swap(true, Ordering::AcqRel) {
            let guard = WakerGuard(self.waker_running.clone());
            let (shared, pool, interval) = (
                self.shared.clone(),
                self.pool.clone(),
                self.config.wake_interval,
            );
            tokio::spawn(async move {
                let _guard = guard;
                wake_others_loop(shared, pool, interval).await;
            });
        }
        self.shared.wake_others.notify_one();
    }

    /// Starts the bus if it is not running, and returns once it is: the listening connection
    /// is listening and the read cursor is set, so every event committed from now on will be
    /// delivered to subscribers registered from now on. Fails fast if the database cannot be
    /// reached; a later call tries again.
    pub(crate) async fn ensure_started(&self) -> Result<Arc<Shared>> {
        let mut tasks = self.tasks.lock().await;
        if let Some(running) = tasks.as_ref() {
            if running.alive() {
                return Ok(self.shared.clone());
            }
            // One of them died (see `TaskGuard`, which ended the subscriptions it fed):
            // start both afresh on this runtime, from a new cursor.
            running.reader.abort();
            running.listener.abort();
            *tasks = None;
            tracing::info!("event bus: starting its tasks again");
        }
        let listener = connect_listener(&self.listener).await?;
        let (cursor, seen) = current_cursor(&self.pool).await?;
        let guard = TaskGuard {
            shared: self.shared.clone(),
        };
        let listener = tokio::spawn({
            let (shared, pool, max_backoff) = (
                self.shared.clone(),
                self.listener.clone(),
                self.config.max_backoff,
            );
            let mut moves = self.listener_moves.clone();
            if let Some(moves) = moves.as_mut() {
                // Only moves from now on: this listener was just connected.
                moves.mark_unchanged();
            }
            async move {
                let _guard = guard;
                listen_loop(shared, pool, listener, max_backoff, moves).await;
            }
        });
        let guard = TaskGuard {
            shared: self.shared.clone(),
        };
        let reader = tokio::spawn({
            let (shared, pool, config) =
                (self.shared.clone(), self.pool.clone(), self.config.clone());
            async move {
                let _guard = guard;
                read_loop(shared, pool, cursor, seen, config).await;
            }
        });
        *tasks = Some(Tasks { reader, listener });
        Ok(self.shared.clone())
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        self.shared.close();
    }
}
