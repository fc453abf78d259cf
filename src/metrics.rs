//! Metrics, recorded through the [`metrics`](https://docs.rs/metrics) facade: the library
//! records, the application chooses the exporter (Prometheus, StatsD, …) by installing a
//! recorder. Without one, every call here is a no-op costing an atomic load.
//!
//! Every metric name is a constant of this module, listed with its type, labels and meaning
//! in [`ALL`]; call [`describe`] once after installing a recorder so that the exporter knows
//! the units and help texts. METRICS.md in the repository lists them all with the alerts
//! worth setting, and `docs/grafana-dashboard.json` is a dashboard over them.
//!
//! Labels are bounded: an operation name, an outcome, an event kind among the crate's own
//! payload types (others are counted as `other`), a table name. Never a backend id, a key or a
//! token.
//!
//! # Operations and spans
//! The `operation` label of [`OPERATION_DURATION_SECONDS`] and [`OPERATIONS_TOTAL`] is the
//! name of the tracing span of the same call (the method's name, which
//! `#[tracing::instrument]` gives its span): a spike of `operation="update_state"` is
//! followed in the traces by the spans named `update_state`. See [`OPERATIONS`].

use crate::events::CRATE_KINDS;
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};

/// Stored events the bus read and dispatched, by `kind`.
pub const BUS_EVENTS_READ_TOTAL: &str = "plane_db_bus_events_read_total";
/// Reads of the `event` table by the bus, by `outcome` (`ok`, `error`, `server_changed`).
pub const BUS_READS_TOTAL: &str = "plane_db_bus_reads_total";
/// How long one read of the `event` table took (all its pages), in seconds.
pub const BUS_READ_DURATION_SECONDS: &str = "plane_db_bus_read_duration_seconds";
/// From an event's `created_at` to its dispatch to the subscriber queues, in seconds.
pub const BUS_DELIVERY_DELAY_SECONDS: &str = "plane_db_bus_delivery_delay_seconds";
/// Times the bus's listening connection was lost.
pub const BUS_LISTENER_DISCONNECTS_TOTAL: &str = "plane_db_bus_listener_disconnects_total";
/// Times the bus's listening connection was re-established.
pub const BUS_LISTENER_RECONNECTS_TOTAL: &str = "plane_db_bus_listener_reconnects_total";
/// Reads after a database server change (restart, failover), by `bound`.
pub const BUS_RESTART_READS_TOTAL: &str = "plane_db_bus_restart_reads_total";
/// Counter: events found with transaction ids from another cluster (a restored dump, a
/// logical copy) and made history, so that they are never delivered.
pub const BUS_FOREIGN_EVENTS_TOTAL: &str = "plane_db_bus_foreign_events_total";
/// [`Lagged`](crate::events::Lagged) reports handed to subscribers, by `cause`.
pub const BUS_LAGGED_TOTAL: &str = "plane_db_bus_lagged_total";
/// Events missed by subscribers (the sum of the `Lagged` reports' `missed`), by `cause`.
pub const BUS_EVENTS_MISSED_TOTAL: &str = "plane_db_bus_events_missed_total";
/// Catch-ups from the `event` table started by paused subscriptions.
pub const BUS_CATCH_UPS_TOTAL: &str = "plane_db_bus_catch_ups_total";
/// Events read back from the `event` table by catch-ups.
pub const BUS_EVENTS_CAUGHT_UP_TOTAL: &str = "plane_db_bus_events_caught_up_total";
/// Open subscriptions, by `kind` (`all` for [`subscribe_all_events`](crate::PlaneDatabase::subscribe_all_events)).
pub const BUS_SUBSCRIPTIONS: &str = "plane_db_bus_subscriptions";
/// Subscriptions paused (their queue was full) at the bus's last read.
pub const BUS_PAUSED_SUBSCRIPTIONS: &str = "plane_db_bus_paused_subscriptions";
/// The most events queued for one subscription, at the bus's last read.
pub const BUS_DEEPEST_QUEUE_EVENTS: &str = "plane_db_bus_deepest_queue_events";
/// Connections the pool holds (busy and idle), sampled by the bus and by operations.
pub const POOL_CONNECTIONS: &str = "plane_db_pool_connections";
/// Idle connections in the pool, sampled with [`POOL_CONNECTIONS`].
pub const POOL_IDLE_CONNECTIONS: &str = "plane_db_pool_idle_connections";
/// Time spent waiting for a pooled connection, in seconds, by `operation`.
pub const POOL_ACQUIRE_DURATION_SECONDS: &str = "plane_db_pool_acquire_duration_seconds";
/// How long an operation took, in seconds, by `operation` and `outcome`.
pub const OPERATION_DURATION_SECONDS: &str = "plane_db_operation_duration_seconds";
/// Operations finished, by `operation` and `outcome`.
pub const OPERATIONS_TOTAL: &str = "plane_db_operations_total";
/// Reads that may be served by a replica, by `read` and `source` (`replica`, `primary`).
pub const READS_TOTAL: &str = "plane_db_reads_total";
/// Reads a replica answered or failed that were read again on the primary, by `read` and
/// `reason` (`not_found`, `pending`, `behind`, `error`).
pub const REPLICA_FALLBACKS_TOTAL: &str = "plane_db_replica_fallbacks_total";
/// A replica's lag at its last probe, in seconds, by `replica` (its index).
pub const REPLICA_LAG_SECONDS: &str = "plane_db_replica_lag_seconds";
/// A replica's replay position behind the primary's write position at its last probe, in
/// bytes, by `replica`.
pub const REPLICA_LAG_BYTES: &str = "plane_db_replica_lag_bytes";
/// 1 when reads go to a replica, 0 when it is skipped (down, not in recovery, lagging), by
/// `replica`.
pub const REPLICA_USABLE: &str = "plane_db_replica_usable";
/// Rows deleted by cleanup, by `table`.
pub const CLEANUP_ROWS_DELETED_TOTAL: &str = "plane_db_cleanup_rows_deleted_total";
/// How long a cleanup run took, in seconds, by `outcome` (`ok`, `error`).
pub const CLEANUP_DURATION_SECONDS: &str = "plane_db_cleanup_duration_seconds";
/// 1 while this process leads a lease, 0 otherwise, by `lease`.
pub const LEADER: &str = "plane_db_leader";
/// When this process became the leader of a lease (Unix time, seconds; 0 while it does not
/// lead), by `lease`.
pub const LEADER_ELECTED_TIMESTAMP_SECONDS: &str = "plane_db_leader_elected_timestamp_seconds";
/// Changes of this process's leadership, by `lease` and `change` (`elected`, `lost`,
/// `resigned`).
pub const LEADER_CHANGES_TOTAL: &str = "plane_db_leader_changes_total";

/// Times a pool moved to another host of its URL, by `url` (`main`, `direct`, `replica N`).
pub const HOST_MOVES_TOTAL: &str = "plane_db_host_moves_total";
/// Searches of a URL's hosts that found none fitting, by `url`.
pub const HOST_SEARCH_FAILURES_TOTAL: &str = "plane_db_host_search_failures_total";

/// Calls written per statement by group commit (1 for a call written alone), by
/// `operation` (`update_state`, `connect`).
pub const WRITE_BATCH_CALLS: &str = "plane_db_write_batch_calls";
/// Batches the server refused and that were written again call by call, by `operation`.
pub const WRITE_BATCHES_SPLIT_TOTAL: &str = "plane_db_write_batches_split_total";

/// The `operation` label values, each the name of the tracing span of the same call.
pub const OPERATIONS: &[&str] = &[
    "update_state",
    "connect",
    "route_info_for_token",
    "route_info_for_static_token",
    "update_keepalive",
];

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observed values.
    Histogram,
}

/// One metric: its name, type, labels, unit and meaning.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    /// The metric's name (one of this module's constants).
    pub name: &'static str,
    /// Its type.
    pub kind: MetricType,
    /// Its label names.
    pub labels: &'static [&'static str],
    /// Its unit, if any.
    pub unit: Option<metrics::Unit>,
    /// What it measures.
    pub help: &'static str,
}

const fn info(
    name: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
    unit: Option<metrics::Unit>,
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        labels,
        unit,
        help,
    }
}

use metrics::Unit;
use MetricType::{Counter, Gauge, Histogram};

/// Every metric this crate records.
pub const ALL: &[MetricInfo] = &[
    info(BUS_EVENTS_READ_TOTAL, Counter, &["kind"], Some(Unit::Count),
        "Stored events the bus read from the event table and dispatched to subscriber queues."),
    info(BUS_READS_TOTAL, Counter, &["outcome"], Some(Unit::Count),
        "Reads of the event table by the bus: ok, error (retried with backoff), server_changed (the server changed between two pages; read again)."),
    info(BUS_READ_DURATION_SECONDS, Histogram, &[], Some(Unit::Seconds),
        "Duration of one read of the event table by the bus, all pages included."),
    info(BUS_DELIVERY_DELAY_SECONDS, Histogram, &[], Some(Unit::Seconds),
        "From an event's created_at (its writing transaction's start, server clock) to its dispatch to subscriber queues (this process's clock)."),
    info(BUS_LISTENER_DISCONNECTS_TOTAL, Counter, &[], Some(Unit::Count),
        "Times the bus's listening connection was lost."),
    info(BUS_LISTENER_RECONNECTS_TOTAL, Counter, &[], Some(Unit::Count),
        "Times the bus's listening connection was re-established after a loss."),
    info(BUS_RESTART_READS_TOTAL, Counter, &["bound", "cause"], Some(Unit::Count),
        "Reads after the server's past may have changed: bound=precise (the floor is the first new transaction id), ids_went_back (the server reused ids of rows already read); cause=restart (new start time), crash_recovery_or_promotion (incarnation marker erased)."),
    info(BUS_FOREIGN_EVENTS_TOTAL, Counter, &[], Some(Unit::Count),
        "Events found with transaction ids from another cluster (a restored dump, a logical copy) and made history, never delivered."),
    info(BUS_LAGGED_TOTAL, Counter, &["cause"], Some(Unit::Count),
        "Lagged reports handed to subscribers: cause=ephemeral (ephemeral messages dropped from a full queue), server_changed (a catch-up could not be delimited)."),
    info(BUS_EVENTS_MISSED_TOTAL, Counter, &["cause"], Some(Unit::Count),
        "Events not delivered to a subscriber, the sum of the Lagged reports' missed."),
    info(BUS_CATCH_UPS_TOTAL, Counter, &[], Some(Unit::Count),
        "Catch-ups from the event table started by subscriptions that had been paused (queue full)."),
    info(BUS_EVENTS_CAUGHT_UP_TOTAL, Counter, &[], Some(Unit::Count),
        "Events read back from the event table by catch-ups."),
    info(BUS_SUBSCRIPTIONS, Gauge, &["kind"], Some(Unit::Count),
        "Open subscriptions by event kind (all: subscribe_all_events)."),
    info(BUS_PAUSED_SUBSCRIPTIONS, Gauge, &[], Some(Unit::Count),
        "Subscriptions paused because their queue was full, at the bus's last read."),
    info(BUS_DEEPEST_QUEUE_EVENTS, Gauge, &[], Some(Unit::Count),
        "The most events queued for one subscription, at the bus's last read."),
    info(POOL_CONNECTIONS, Gauge, &[], Some(Unit::Count),
        "Connections held by the pool (busy and idle), sampled at each bus read and operation."),
    info(POOL_IDLE_CONNECTIONS, Gauge, &[], Some(Unit::Count),
        "Idle connections in the pool, sampled with plane_db_pool_connections."),
    info(POOL_ACQUIRE_DURATION_SECONDS, Histogram, &["operation"], Some(Unit::Seconds),
        "Time an operation waited for a pooled connection."),
    info(OPERATION_DURATION_SECONDS, Histogram, &["operation", "outcome"], Some(Unit::Seconds),
        "Duration of an operation (the span of the same name), by outcome: accepted, refused, not_found, error."),
    info(OPERATIONS_TOTAL, Counter, &["operation", "outcome"], Some(Unit::Count),
        "Operations finished, by outcome: accepted, refused, not_found, error."),
    info(READS_TOTAL, Counter, &["read", "source"], Some(Unit::Count),
        "Reads that may be served by a replica (route lookups, listings, status stream histories), by where the answer came from: replica, primary."),
    info(REPLICA_FALLBACKS_TOTAL, Counter, &["read", "reason"], Some(Unit::Count),
        "Reads tried on a replica and read again on the primary: not_found and pending (route lookups confirm these on the primary), behind (a status history the replica had not replayed far enough for), error (the replica failed; it is skipped until its probe succeeds)."),
    info(REPLICA_LAG_SECONDS, Gauge, &["replica"], Some(Unit::Seconds),
        "A replica's lag at its last probe: the age of the newest primary WAL position it has replayed (a lower bound when it is behind every position remembered)."),
    info(REPLICA_LAG_BYTES, Gauge, &["replica"], Some(Unit::Bytes),
        "How far a replica's replay position was behind the primary's WAL write position at its last probe."),
    info(REPLICA_USABLE, Gauge, &["replica"], Some(Unit::Count),
        "1 while reads go to a replica; 0 while it is skipped (probe failed, read failed, not in recovery, lag beyond ReplicaConfig::max_lag)."),
    info(HOST_MOVES_TOTAL, Counter, &["url"], Some(Unit::Count),
        "Times the pools of a URL listing several hosts moved to another host (a failover, a host that stopped answering or fitting target_session_attrs), by url: main, direct, replica N."),
    info(HOST_SEARCH_FAILURES_TOTAL, Counter, &["url"], Some(Unit::Count),
        "Searches of a URL's hosts that found none reachable and fitting target_session_attrs; the pool keeps trying."),
    info(WRITE_BATCH_CALLS, Histogram, &["operation"], Some(Unit::Count),
        "Calls written together by group commit, per batch (1 for a call written alone): update_state, connect."),
    info(WRITE_BATCHES_SPLIT_TOTAL, Counter, &["operation"], Some(Unit::Count),
        "Batches the server refused (rolled back) and that were written again call by call, so that only the bad call failed."),
    info(CLEANUP_ROWS_DELETED_TOTAL, Counter, &["table"], Some(Unit::Count),
        "Rows deleted by cleanup, by table."),
    info(CLEANUP_DURATION_SECONDS, Histogram, &["outcome"], Some(Unit::Seconds),
        "Duration of one cleanup run (run_cleanup), by outcome: ok, error."),
    info(LEADER, Gauge, &["lease"], Some(Unit::Count),
        "1 while this process holds the lease (leads the fleet's periodic work of that name, e.g. maintenance: cleanup), 0 otherwise."),
    info(LEADER_ELECTED_TIMESTAMP_SECONDS, Gauge, &["lease"], Some(Unit::Seconds),
        "When this process was elected leader of the lease (Unix time); 0 while it does not lead."),
    info(LEADER_CHANGES_TOTAL, Counter, &["lease", "change"], Some(Unit::Count),
        "Changes of this process's leadership of the lease: elected, lost (a renewal failed, came late or found another term), resigned."),
];

/// Describes every metric (unit and help text) to the installed recorder. Call it once after
/// installing one; describing again is harmless. Without a recorder it does nothing.
pub fn describe() {
    for m in ALL {
        match (m.kind, m.unit) {
            (Counter, Some(unit)) => metrics::describe_counter!(m.name, unit, m.help),
            (Counter, None) => metrics::describe_counter!(m.name, m.help),
            (Gauge, Some(unit)) => metrics::describe_gauge!(m.name, unit, m.help),
            (Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Histogram, Some(unit)) => metrics::describe_histogram!(m.name, unit, m.help),
            (Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The `kind` label of an event kind: the crate's own payload types by name, anything else
/// as `other` (kinds come from the `event` table, so they are not trusted to be few).
pub(crate) fn kind_label(kind: &str) -> &'static str {
    KindTally::LABELS[KindTally::index(kind)]
}

/// Per-kind tallies of events, added to a counter once per page rather than once per event.
#[derive(Default)]
pub(crate) struct KindTally([u64; CRATE_KINDS.len() + 1]);

impl KindTally {
    /// The crate's own event kinds (every `NotificationPayload` it defines, as listed in
    /// [`CRATE_KINDS`]), then `other`.
    const LABELS: [&'static str; CRATE_KINDS.len() + 1] = {
        let mut labels = ["other"; CRATE_KINDS.len() + 1];
        let mut i = 0;
        while i < CRATE_KINDS.len() {
            labels[i] = CRATE_KINDS[i];
            i += 1;
        }
        labels
    };

    fn index(kind: &str) -> usize {
        CRATE_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(CRATE_KINDS.len())
    }

    pub(crate) fn add(&mut self, kind: &str) {
        self.0[Self::index(kind)] += 1;
    }

    /// Adds the tallies to `counter` (labelled `kind`) and resets them.
    pub(crate) fn flush(&mut self, counter: &'static str) {
        for (label, count) in Self::LABELS.iter().zip(self.0.iter_mut()) {
            if *count > 0 {
                metrics::counter!(counter, "kind" => *label).increment(std::mem::take(count));
            }
        }
    }
}

/// Samples the pool's size and idle connections (two atomic loads).
pub(crate) fn sample_pool(pool: &PgPool) {
    metrics::gauge!(POOL_CONNECTIONS).set(f64::from(pool.size()));
    metrics::gauge!(POOL_IDLE_CONNECTIONS).set(pool.num_idle() as f64);
}

/// An operation whose duration and outcome are recorded; its name is its span's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    UpdateState,
    Connect,
    RouteInfoForToken,
    RouteInfoForStaticToken,
    UpdateKeepalive,
}

impl Operation {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Operation::UpdateState => "update_state",
            Operation::Connect => "connect",
            Operation::RouteInfoForToken => "route_info_for_token",
            Operation::RouteInfoForStaticToken => "route_info_for_static_token",
            Operation::UpdateKeepalive => "update_keepalive",
        }
    }
}

/// How an operation ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It did what was asked (a state changed, a backend returned, a route found).
    Accepted,
    /// The request was valid but refused (a transition that is not forward, a key held under
    /// another tag, no drone, invalid input).
    Refused,
    /// What it was about does not exist (an unknown token, an unknown or terminated backend).
    NotFound,
    /// The database failed.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::NotFound => "not_found",
            Outcome::Error => "error",
        }
    }
}

/// The outcome of an operation's result.
pub(crate) trait HasOutcome {
    fn outcome(&self, operation: Operation) -> Outcome;
}

/// An error that is not the database's is the caller's request being refused.
pub(crate) fn error_outcome(error: &crate::Error) -> Outcome {
    match error {
        crate::Error::InvalidArgument { .. } => Outcome::Refused,
        crate::Error::NotFound { .. } => Outcome::NotFound,
        _ => Outcome::Error,
    }
}

impl HasOutcome for crate::Result<bool> {
    fn outcome(&self, operation: Operation) -> Outcome {
        match self {
            Ok(true) => Outcome::Accepted,
            // `update_keepalive`: unknown or terminated backend.
            Ok(false) if operation == Operation::UpdateKeepalive => Outcome::NotFound,
            // `update_state`: unknown backend or not a forward transition.
            Ok(false) => Outcome::Refused,
            Err(error) => error_outcome(error),
        }
    }
}

/// Runs an operation, recording its duration and outcome (and sampling the pool).
pub(crate) async fn timed<F>(operation: Operation, pool: &PgPool, future: F) -> F::Output
where
    F: Future,
    F::Output: HasOutcome,
{
    let started = Instant::now();
    let result = future.await;
    let elapsed = started.elapsed();
    let outcome = result.outcome(operation).label();
    let name = operation.name();
    metrics::histogram!(OPERATION_DURATION_SECONDS, "operation" => name, "outcome" => outcome)
        .record(elapsed);
    metrics::counter!(OPERATIONS_TOTAL, "operation" => name, "outcome" => outcome).increment(1);
    sample_pool(pool);
    result
}

/// [`timed`] for [`PlaneDatabase::connect`](crate::PlaneDatabase::connect) (a one-line call
/// in its body).
pub(crate) async fn timed_connect<F>(pool: &PgPool, future: F) -> F::Output
where
    F: Future,
    F::Output: HasOutcome,
{
    timed(Operation::Connect, pool, future).await
}

/// Takes a connection from the pool, recording how long that waited.
pub(crate) async fn acquire(
    operation: Operation,
    pool: &PgPool,
) -> crate::Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let started = Instant::now();
    let conn = pool.acquire().await;
    metrics::histogram!(POOL_ACQUIRE_DURATION_SECONDS, "operation" => operation.name())
        .record(started.elapsed());
    Ok(conn?)
}

/// Records one write of group commit: `calls` calls in one batch (1: alone).
pub(crate) fn write_batch(operation: Operation, calls: usize) {
    metrics::histogram!(WRITE_BATCH_CALLS, "operation" => operation.name()).record(calls as f64);
}

/// Counts a batch the server refused, written again call by call.
pub(crate) fn write_batch_split(operation: Operation) {
    metrics::counter!(WRITE_BATCHES_SPLIT_TOTAL, "operation" => operation.name()).increment(1);
}

/// Records one bus read.
pub(crate) fn bus_read(elapsed: Duration, outcome: &'static str) {
    metrics::histogram!(BUS_READ_DURATION_SECONDS).record(elapsed);
    metrics::counter!(BUS_READS_TOTAL, "outcome" => outcome).increment(1);
}

/// Counts a read by where it was served (`replica` or `primary`).
pub(crate) fn read_served(read: &'static str, source: &'static str) {
    metrics::counter!(READS_TOTAL, "read" => read, "source" => source).increment(1);
}

/// Counts a read that a replica answered or failed and the primary was asked again.
pub(crate) fn replica_fallback(read: &'static str, reason: &'static str) {
    metrics::counter!(REPLICA_FALLBACKS_TOTAL, "read" => read, "reason" => reason).increment(1);
}

/// Records a replica's lag as its probe measured it.
pub(crate) fn replica_lag(replica: &str, lag: Option<Duration>, lag_bytes: Option<u64>) {
    if let Some(lag) = lag {
        metrics::gauge!(REPLICA_LAG_SECONDS, "replica" => replica.to_string())
            .set(lag.as_secs_f64());
    }
    if let Some(bytes) = lag_bytes {
        metrics::gauge!(REPLICA_LAG_BYTES, "replica" => replica.to_string()).set(bytes as f64);
    }
}

/// Records whether reads go to a replica.
pub(crate) fn replica_usable(replica: &str, usable: bool) {
    metrics::gauge!(REPLICA_USABLE, "replica" => replica.to_string()).set(if usable {
        1.0
    } else {
        0.0
    });
}

/// Records one cleanup run.
pub(crate) fn cleanup_run(elapsed: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::histogram!(CLEANUP_DURATION_SECONDS, "outcome" => outcome).record(elapsed);
}

/// Records rows deleted by cleanup from `table`.
pub(crate) fn cleanup_deleted(table: &'static str, rows: u64) {
    if rows > 0 {
        metrics::counter!(CLEANUP_ROWS_DELETED_TOTAL, "table" => table).increment(rows);
    }
}

/// Sets the leadership gauges of `lease`: `Some(when elected)` while this process leads.
pub(crate) fn set_leader(lease: &str, elected_at: Option<chrono::DateTime<chrono::Utc>>) {
    let lease = lease.to_string();
    metrics::gauge!(LEADER, "lease" => lease.clone()).set(if elected_at.is_some() {
        1.0
    } else {
        0.0
    });
    let at = elected_at.map_or(0.0, |at| at.timestamp_micros() as f64 / 1e6);
    metrics::gauge!(LEADER_ELECTED_TIMESTAMP_SECONDS, "lease" => lease).set(at);
}

/// Counts a change of this process's leadership of `lease`.
pub(crate) fn leader_changed(lease: &str, change: &'static str) {
    metrics::counter!(LEADER_CHANGES_TOTAL, "lease" => lease.to_string(), "change" => change)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("plane_db_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            match m.kind {
                Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            if m.unit == Some(Unit::Seconds) {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            assert!(!m.help.is_empty());
            for label in m.labels {
                assert!(
                    !["backend", "backend_id", "key", "token", "drone"].contains(label),
                    "{} has an unbounded label {label}",
                    m.name
                );
            }
        }
        assert_eq!(seen.len(), 34);
    }

    /// Every `plane_db_…` name in `text`, less the suffixes Prometheus adds to histograms.
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        let known = |name: &str| ALL.iter().any(|m| m.name == name);
        let mut names = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(start) = rest.find("plane_db_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| known(base)))
                .unwrap_or(name);
            names.insert(base.to_string());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn dashboard_and_metrics_md_use_exactly_these_names() {
        let all: std::collections::BTreeSet<String> =
            ALL.iter().map(|m| m.name.to_string()).collect();
        let dashboard = include_str!("../docs/grafana-dashboard.json");
        assert_eq!(names_in(dashboard), all, "docs/grafana-dashboard.json");
        let doc = include_str!("../METRICS.md");
        assert_eq!(names_in(doc), all, "METRICS.md");
    }

    #[test]
    fn operation_names_are_listed() {
        for op in [
            Operation::UpdateState,
            Operation::Connect,
            Operation::RouteInfoForToken,
            Operation::RouteInfoForStaticToken,
            Operation::UpdateKeepalive,
        ] {
            assert!(OPERATIONS.contains(&op.name()), "{}", op.name());
        }
        assert_eq!(OPERATIONS.len(), 5);
    }

    #[test]
    fn kinds_are_bounded() {
        use crate::events::NotificationPayload;
        // Every payload type of the crate has its own label (and every kind of the crate's
        // list: events::event's tests check that the list has every payload type in src/).
        for kind in [
            crate::types::BackendState::kind(),
            crate::types::BackendActionMessage::kind(),
            crate::types::BackendMetricsMessage::kind(),
            crate::node::NodeConnectionStatusChange::kind(),
        ]
        .into_iter()
        .chain(CRATE_KINDS)
        {
            assert_eq!(kind_label(kind), kind);
            assert_ne!(kind_label(kind), "other");
        }
        assert_eq!(kind_label("anything a caller emits"), "other");
        let mut tally = KindTally::default();
        tally.add("backend_action");
        tally.add("x");
        tally.add("x");
        assert_eq!(tally.0, [0, 1, 0, 0, 2]);
    }
}
