//! What every area works with: the pool, the configuration, the event bus, and where reads
//! that a streaming replica may serve go.
//!
//! The areas (`backend`, `drone`, `connect`, `cleanup`…) borrow a [`Context`]; none of them
//! sees the [`PlaneDatabase`](crate::PlaneDatabase) facade, which owns one and hands it out.

use crate::backend::state_write::StateChanges;
use crate::config::Config;
use crate::connect::spawn::Spawns;
use crate::events::EventBus;
use crate::group_commit::GroupCommit;
use crate::hosts::HostWatch;
use crate::replicas::{ProbeTask, Reads};
use sqlx::PgPool;

/// The pool, the configuration, the event bus and the read routing, shared by every clone
/// of a `PlaneDatabase`.
pub(crate) struct Context {
    pool: PgPool,
    config: Config,
    bus: EventBus,
    state_writer: GroupCommit<StateChanges>,
    spawner: GroupCommit<Spawns>,
    reads: Reads,
    /// Stops the replicas' probe with the last clone.
    _probe: ProbeTask,
    /// Stops the watch of multi-host URLs with the last clone.
    _hosts: HostWatch,
}

impl Context {
    pub(crate) fn new(
        pool: PgPool,
        config: Config,
        bus: EventBus,
        (reads, probe): (Reads, ProbeTask),
    ) -> Self {
        let wake = bus.event_wake_setting();
        let state_writer =
            GroupCommit::new(pool.clone(), StateChanges { wake }, &config.write_batching);
        let spawner = GroupCommit::new(
            pool.clone(),
            Spawns {
                wake,
                lease: config.key_lease.clone(),
                token_lifetime: config.token_lifetime,
                scheduler: config.scheduler.clone(),
            },
            &config.write_batching,
        );
        Self {
            pool,
            config,
            bus,
            state_writer,
            spawner,
            reads,
            _probe: probe,
            _hosts: HostWatch::default(),
        }
    }

    /// Keeps the tasks that watch multi-host URLs (see [`HostWatch`]) until the last clone
    /// goes.
    pub(crate) fn watching(mut self, hosts: HostWatch) -> Self {
        self._hosts = hosts;
        self
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
    pub(crate) fn state_writer(&self) -> &GroupCommit<StateChanges> {
        &self.state_writer
    }

    /// Writes `connect`'s new backends, batching concurrent ones (see
    /// [`WriteBatchConfig`](crate::WriteBatchConfig)).
    pub(crate) fn spawner(&self) -> &GroupCommit<Spawns> {
        &self.spawner
    }
}
