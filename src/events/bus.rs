//! The bus: the handle a `PlaneDatabase` keeps, which starts the listener and the reader
//! and lets this process's writers wake them. The [module docs](super) state its promises.

use super::config::BusConfig;
use super::listener::{connect_listener, listen_loop, new_wake_id, wake_others_loop};
use super::reader::{current_cursor, read_loop};
use super::registry::Shared;
use crate::error::Result;
use crate::metrics as m;
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The handle a `PlaneDatabase` keeps. Starting is lazy (on the first subscription) so that
/// building a `PlaneDatabase` stays synchronous and costs no connection.
pub(crate) struct EventBus {
    shared: Arc<Shared>,
    pool: PgPool,
    /// Where the listening connection comes from: a pool of one connection, which may reach
    /// Postgres another way than `pool` (see `PlaneDatabase::with_listener`).
    listener: PgPool,
    config: BusConfig,
    started: OnceCell<()>,
    waker_started: std::sync::OnceLock<()>,
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
            started: OnceCell::new(),
            waker_started: std::sync::OnceLock::new(),
        }
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
        self.waker_started.get_or_init(|| {
            tokio::spawn(wake_others_loop(
                self.shared.clone(),
                self.pool.clone(),
                self.config.wake_interval,
            ));
        });
        self.shared.wake_others.notify_one();
    }

    /// Starts the bus if it is not running, and returns once it is: the listening connection
    /// is listening and the read cursor is set, so every event committed from now on will be
    /// delivered to subscribers registered from now on. Fails fast if the database cannot be
    /// reached; a later call tries again.
    pub(crate) async fn ensure_started(&self) -> Result<Arc<Shared>> {
        self.started
            .get_or_try_init(|| async {
                let listener = connect_listener(&self.listener).await?;
                let (cursor, seen) = current_cursor(&self.pool).await?;
                tokio::spawn(listen_loop(
                    self.shared.clone(),
                    self.listener.clone(),
                    listener,
                    self.config.max_backoff,
                ));
                tokio::spawn(read_loop(
                    self.shared.clone(),
                    self.pool.clone(),
                    cursor,
                    seen,
                    self.config.clone(),
                ));
                Ok::<_, crate::Error>(())
            })
            .await?;
        Ok(self.shared.clone())
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        self.shared.close();
    }
}
