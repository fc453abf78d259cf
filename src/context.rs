//! What every area works with: the pool, the configuration, the event bus, and where reads
//! that a streaming replica may serve go.
//!
//! The areas (`backend`, `drone`, `connect`, `cleanup`…) borrow a [`Context`]; none of them
//! sees the [`PlaneDatabase`](crate::PlaneDatabase) facade, which owns one and hands it out.

use crate::config::Config;
use crate::events::EventBus;
use crate::group_commit::StateWriter;
use crate::replicas::{ProbeTask, Reads};
use sqlx::PgPool;

/// The pool, the configuration, the event bus and the read routing, shared by every clone
/// of a `PlaneDatabase`.
pub(crate) struct Context {
    pool: PgPool,
    config: Config,
    bus: EventBus,
    state_writer: StateWriter,
    reads: Reads,
    /// Stops the replicas' probe with the last clone.
    _probe: ProbeTask,
}

impl Context {
    pub(crate) fn new(
        pool: PgPool,
        config: Config,
        bus: EventBus,
        (reads, probe): (Reads, ProbeTask),
    ) -> Self {
        let state_writer = StateWriter::new(
            pool.clone(),
            bus.event_wake_setting(),
            &config.write_batching,
        );
        Self {
            pool,
            config,
            bus,
            state_writer,
            reads,
            _probe: probe,
        }
    }

    /// The pool every statement runs on.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configuration in use.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Where the reads that a replica may serve go (the primary alone without replicas).
    pub(crate) fn reads(&self) -> &Reads {
        &self.reads
    }

    /// This process's event bus (subscriptions, and the wake-ups of the write path).
    pub(crate) fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// Writes `update_state`'s changes, batching concurrent ones (see
    /// [`WriteBatchConfig`](crate::WriteBatchConfig)).
    pub(crate) fn state_writer(&self) -> &StateWriter {
        &self.state_writer
    }
}
