//! What cleanup deletes ([`CleanupConfig`], passed to
//! [`PlaneDatabase::run_cleanup`](crate::PlaneDatabase::run_cleanup)); cleanup itself is in
//! `src/cleanup.rs`.

use std::time::Duration;

/// What [`PlaneDatabase::run_cleanup`](crate::PlaneDatabase::run_cleanup) deletes. `CleanupConfig::default()` keeps a week.
#[derive(Debug, Clone)]
pub struct CleanupConfig {
    /// Backends that terminated longer ago than this are deleted (with everything hanging
    /// off them; see [`BackendDatabase::cleanup_terminated`](crate::backend::BackendDatabase::cleanup_terminated)).
    /// Defaults to 7 days. Was `backend_min_age_days: i32` (a number of days) before 0.2.0.
    pub backend_min_age: Duration,
    /// Events older than this are deleted. Defaults to 7 days. [`run_cleanup`](crate::PlaneDatabase::run_cleanup)
    /// drops whole `event` partitions whose newest event is older than this (an older event
    /// stays until the rest of its partition is old too); [`cleanup_events`](crate::PlaneDatabase::cleanup_events)
    /// deletes the older rows one by one. Events are only needed to
    /// resume streams ([`PlaneDatabase::get_events_since`](crate::PlaneDatabase::get_events_since)); live delivery never reads old
    /// ones.
    pub event_min_age: Duration,
    /// Rows per transaction (backends, events). Defaults to 1,000: each batch holds its
    /// locks briefly, at the cost of one round trip per batch.
    pub batch_size: i32,
    /// Ids per partition that cleanup creates ahead of the `event` and `backend_state`
    /// sequences. Defaults to 1,000,000. Partitions are dropped whole, so this is also how
    /// finely retention cuts; size it so that [`partitions_ahead`](Self::partitions_ahead)
    /// partitions hold more than one cleanup interval of writes.
    pub partition_rows: i64,
    /// How many empty partitions cleanup keeps ahead of each sequence. Defaults to 2.
    pub partitions_ahead: u32,
    /// The largest share of wall time cleanup spends running its statements: after each
    /// batch or partition drop that took `t`, it waits `t × (1 − busy_share) / busy_share`
    /// (at most a minute) before the next. Defaults to 1.0: batches back to back. Below 1,
    /// writers meet cleanup's work on the server (CPU, WAL) only that share of the time, and
    /// a cleanup with a backlog takes `1 / busy_share` times as long; a share too small for
    /// the rate at which backends terminate lets the backlog grow. Must be in `(0, 1]`.
    pub busy_share: f64,
}

impl Default for CleanupConfig {
    fn default() -> Self {
        Self {
            backend_min_age: Duration::from_secs(7 * 24 * 3600),
            event_min_age: Duration::from_secs(7 * 24 * 3600),
            batch_size: 1000,
            partition_rows: 1_000_000,
            partitions_ahead: 2,
            busy_share: 1.0,
        }
    }
}
