//! What every area works with: the pool, the configuration and the event bus.
//!
//! The areas (`backend`, `drone`, `connect`, `cleanup`…) borrow a [`Context`]; none of them
//! sees the [`PlaneDatabase`](crate::PlaneDatabase) facade, which owns one and hands it out.

use crate::config::Config;
use crate::events::EventBus;
use sqlx::PgPool;

/// The pool, the configuration and the event bus, shared by every clone of a
/// `PlaneDatabase`.
pub(crate) struct Context {
    pool: PgPool,
    config: Config,
    bus: EventBus,
}

impl Context {
    pub(crate) fn new(pool: PgPool, config: Config, bus: EventBus) -> Self {
        Self { pool, config, bus }
    }

    /// The pool every statement runs on.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configuration in use.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// This process's event bus (subscriptions, and the wake-ups of the write path).
    pub(crate) fn bus(&self) -> &EventBus {
        &self.bus
    }
}
