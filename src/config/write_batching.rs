//! Group commit of one process's concurrent writes ([`Config::write_batching`](super::Config::write_batching)).

use std::time::Duration;

/// Group commit: concurrent writes of one process share one statement and one transaction
/// ([`Config::write_batching`](crate::Config::write_batching)).
///
/// With it, concurrent [`update_state`](crate::backend::BackendDatabase::update_state) calls
/// are combined, and so are the new backends of concurrent
/// [`connect`](crate::PlaneDatabase::connect) calls (each kind in batches of its own, with
/// the same settings): up to [`max_alone`](Self::max_alone) calls at once write alone, at
/// once; calls beyond that queue, and one statement writes everything queued; calls
/// arriving during that one form the next batch. No call waits for company (a batch closes
/// as soon as no other call is waiting), so batching adds no delay at low load and saves a
/// transaction per call under load. Each call still gets its own answer, and every promise
/// of the single-call path holds (changes of one backend are applied in call order; one
/// backend per key, with its own fencing token; a failing call fails only itself), and a
/// row locked by another transaction holds back only the calls that change that row (see
/// [`lock_timeout`](Self::lock_timeout)); RELIABILITY.md ("What we promise", group commit)
/// says how failures are handled.
#[derive(Debug, Clone)]
pub struct WriteBatchConfig {
    /// Whether concurrent calls are combined. Defaults to true; when false, each call runs
    /// its own statement on its own pooled connection.
    pub enabled: bool,
    /// The most changes one batch holds; more waiting calls go into the next batch. Defaults
    /// to 64; 0 counts as 1.
    pub max_batch_size: usize,
    /// How many calls may write their change alone at once, each in its own transaction,
    /// before further calls queue theirs for a batch (one batch is written at a time).
    /// Defaults to 1: a call made while another is being written waits and joins the next
    /// batch, which packs the most changes into each transaction. 0 counts as 1. Measured
    /// on two cores (BENCHMARKS.md, "Group commit"), against one transaction per call: with
    /// 1, about 2.7x at 16 and 3.4x at 32 writers but about 0.7x at 4; with 4, 1.04x at 4
    /// writers but only about 1.7x and 2.0x at 16 and 32.
    pub max_alone: usize,
    /// How long a batch's statements wait for a row lock held by another transaction
    /// (Postgres's `lock_timeout`, set on the batch writer's connection and put back before
    /// it returns to the pool). Defaults to 500 ms; zero leaves the session's own setting.
    /// Off (zero) with [`PoolerMode::Transaction`](crate::PoolerMode::Transaction), where a
    /// session setting would reach other clients of the pooler's server connection (with a
    /// pool of your own behind such a pooler, set it to zero yourself).
    /// A batch that waits longer is rolled back and its changes are written alone,
    /// concurrently (one after the other for the same backend or key), each waiting for its
    /// lock as a lone call would: a lock held elsewhere holds back the calls that need that
    /// row, not the batch. (`update_state`'s batches do not wait for backend rows at all:
    /// they skip rows locked elsewhere and write those changes alone; the timeout guards the
    /// other rows a batch locks, such as keys.)
    pub lock_timeout: Duration,
    /// The most calls group commit holds at once (queued for a batch, being written in one,
    /// or handed out of one to be written alone); a call that finds no room waits for it,
    /// in the order calls came. Calls writing alone at once
    /// ([`max_alone`](Self::max_alone)) are not counted. Defaults to 4096; 0 counts as 1.
    pub max_queued: usize,
}

impl Default for WriteBatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_size: 64,
            max_alone: 1,
            lock_timeout: Duration::from_millis(500),
            max_queued: 4096,
        }
    }
}
