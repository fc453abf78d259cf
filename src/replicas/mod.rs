//! Streaming replicas for reads: which reads may go to one, how a replica is chosen, how its
//! lag is measured, and what happens when it is behind or gone.
//!
//! A [`PlaneDatabase`](crate::PlaneDatabase) opened with
//! [`ConnectOptions::replica_url`](crate::ConnectOptions::replica_url) keeps a pool per
//! replica (`application_name` `plane-db-replica`, opened lazily) and a background probe
//! that measures each replica's lag every [`ReplicaConfig::probe_interval`]. A read that may
//! go to a replica goes to the next *usable* one in turn (its last probe answered, it is in
//! recovery, its lag is within [`ReplicaConfig::max_lag`], and no read failed on it since),
//! or to the primary when none is usable.
//!
//! # Which reads, and what each guarantees
//!
//! | Read | On a replica | What the caller can rely on |
//! |---|---|---|
//! | [`route_info_for_token`](crate::backend::BackendDatabase::route_info_for_token), [`route_info_for_static_token`](crate::backend::BackendDatabase::route_info_for_static_token) | yes | `NotFound` and `Pending` are only ever the primary's answer: a replica's `NotFound` or `Pending` is asked again on the primary. So a token `connect` issued on the primary never reads as not found, and a backend the primary has ready never reads as pending. An `Available` answer may be stale by the replica's lag: a token revoked, or a backend that began terminating, less than `max_lag` ago may still route. |
//! | [`list`](crate::backend::BackendDatabase::list), [`list_backends`](crate::backend::BackendDatabase::list_backends), [`state_history`](crate::backend::BackendDatabase::state_history), [`node().list`](crate::node::NodeDatabase::list) | yes | A listing as the database was at most `max_lag` ago: no read-your-writes. |
//! | [`status_stream`](crate::backend::BackendDatabase::status_stream)'s history | yes, fenced | Complete as on the primary: after the stream's subscription is live, the primary's WAL insert position is read (one statement touching no table), and the history is read on the replica only if the replica has replayed up to it; else on the primary. The live part is the primary's event bus. |
//! | everything else: writes, `connect`, the event bus, [`backend`](crate::backend::BackendDatabase::backend), [`list_alive_backends_for_drone`](crate::backend::BackendDatabase::list_alive_backends_for_drone), [`termination_candidates`](crate::backend::BackendDatabase::termination_candidates), keys, drones, scheduling, cleanup | no | as without replicas |
//!
//! `list_alive_backends_for_drone` and `termination_candidates` stay on the primary because
//! their answers turn into actions: a backend missing from a drone's list, or one kept alive
//! a moment ago that reads as idle, would be terminated by mistake.
//!
//! # Lag
//!
//! Every probe interval, one task reads the primary's WAL write position
//! (`pg_current_wal_lsn()`) and remembers when it read it, and a task per replica reads the
//! replica's replay position (`pg_last_wal_replay_lsn()`). A replica's lag is the age of the
//! newest remembered primary position it has replayed: it holds every change the primary had
//! written at that moment. An idle primary's position does not move, so a replica that
//! replayed it has lag ≈ 0 however long ago the last write was (unlike
//! `now() - pg_last_xact_replay_timestamp()`, which grows on an idle primary). The
//! measurement is as fine as the probe interval: under steady writes a healthy replica
//! reads up to one interval behind. The lag in bytes (the primary's position less the
//! replica's) is reported beside it.
//!
//! A probe that measures lag `L` keeps the replica usable for `max_lag - L` from then, not
//! until the next probe: even if the replica stops replaying right after, or its next probe
//! hangs, no answer it serves is older than `max_lag`. With `synchronous_commit = off` on the
//! primary, a commit is visible before it is written, so the bound stretches by the WAL
//! writer's delay (`wal_writer_delay`, 200 ms by default).
//!
//! # Failures
//!
//! A read that fails on a replica with a database error (connection refused or lost,
//! recovery conflict, no connection within [`ReplicaConfig::acquire_timeout`]) is run again
//! on the primary, and the replica is not used again until its probe finds it answering, in
//! recovery and within the bound. A replica that goes down therefore costs the reads in
//! flight on it one more round trip (or up to `acquire_timeout`, when a new connection was
//! needed), then nothing but its share of the reads. A server that is not in recovery (e.g. a promoted replica) is not
//! used. Replica pools open lazily, so a replica down at start does not fail `connect`.

pub use crate::config::ReplicaConfig;
use crate::error::{Error, Result};
use crate::metrics;
use sqlx::PgPool;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One replica as [`PlaneDatabase::replicas`](crate::PlaneDatabase::replicas) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Its place in the order the replicas were given (the `replica` label of its metrics).
    pub index: usize,
    /// `user@host:port/database` (no password).
    pub endpoint: String,
    /// Whether reads go to it now: its last probe answered, it is in recovery, its lag is
    /// within the bound, and no read has failed on it since.
    pub usable: bool,
    /// The lag its last successful probe measured; `None` before one, or when it was behind
    /// every primary position the probe remembers (then it is not usable). The replica
    /// stays usable until `lag` plus [`last_probe_age`](Self::last_probe_age) reaches
    /// [`ReplicaConfig::max_lag`], unless a newer probe measures less.
    pub lag: Option<Duration>,
    /// How long ago its last successful probe answered.
    pub last_probe_age: Option<Duration>,
    /// How far its replay position was behind the primary's write position at its last
    /// successful probe, in bytes of WAL.
    pub lag_bytes: Option<u64>,
    /// Reads it answered.
    pub reads: u64,
    /// Reads it answered that were asked again on the primary (a `NotFound` or `Pending`
    /// route, a status history it had not replayed far enough for), or that failed on it.
    pub fallbacks: u64,
    /// Reads that failed on it.
    pub errors: u64,
    /// Why it was last found unusable (a probe or read error, not in recovery, lag), if it
    /// has been.
    pub last_problem: Option<String>,
}

/// A read that may be served by a replica (the `read` label of the read metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    RouteInfoForToken,
    RouteInfoForStaticToken,
    BackendList,
    StateHistory,
    NodeList,
    StatusStreamHistory,
}

impl ReadKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReadKind::RouteInfoForToken => "route_info_for_token",
            ReadKind::RouteInfoForStaticToken => "route_info_for_static_token",
            ReadKind::BackendList => "backend_list",
            ReadKind::StateHistory => "state_history",
            ReadKind::NodeList => "node_list",
            ReadKind::StatusStreamHistory => "status_stream_history",
        }
    }
}

/// Why a read a replica answered was asked again on the primary (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// A route lookup found nothing: the token may be newer than the replica.
    NotFound,
    /// A route lookup found the backend pending: the primary may have it ready.
    Pending,
    /// The replica had not replayed up to the primary's position (status stream history).
    Behind,
    /// The read failed on the replica.
    Error,
}

impl Fallback {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fallback::NotFound => "not_found",
            Fallback::Pending => "pending",
            Fallback::Behind => "behind",
            Fallback::Error => "error",
        }
    }
}

/// A replica's pool as opened by [`ConnectOptions`](crate::ConnectOptions), with its
/// endpoint for reports.
pub(crate) struct ReplicaPool {
    pub endpoint: String,
    pub pool: PgPool,
}

/// Where reads go: the primary's pool and the replicas (none without replicas). Cheap to
/// clone, for streams that outlive the call that built them.
#[derive(Clone)]
pub(crate) struct Reads {
    primary: PgPool,
    replicas: Option<Arc<ReplicaSet>>,
}

struct ReplicaSet {
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

struct Replica {
    index: usize,
    label: String,
    endpoint: String,
    pool: PgPool,
    /// Its last probe answered, it is in recovery, and no read failed since.
    healthy: AtomicBool,
    /// Until when its last probe's lag keeps it within the bound, in nanoseconds since
    /// `epoch` (0: not fresh).
    fresh_until: AtomicU64,
    epoch: Instant,
    reads: AtomicU64,
    fallbacks: AtomicU64,
    errors: AtomicU64,
    probe: Mutex<ProbeState>,
}

#[derive(Default, Clone)]
struct ProbeState {
    lag: Option<Duration>,
    lag_bytes: Option<u64>,
    probed_at: Option<Instant>,
    last_problem: Option<String>,
}

/// Stops the probes when the last `PlaneDatabase` clone goes.
pub(crate) struct ProbeTask(Vec<tokio::task::AbortHandle>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

impl Reads {
    /// Reads on `primary` alone, or also on `replicas`; with replicas, starts their probes
    /// (which needs a Tokio runtime) and returns the handle that stops them.
    pub(crate) fn new(
        primary: PgPool,
        replicas: Vec<ReplicaPool>,
        config: ReplicaConfig,
    ) -> (Self, ProbeTask) {
        if replicas.is_empty() {
            let reads = Self {
                primary,
                replicas: None,
            };
            return (reads, ProbeTask(Vec::new()));
        }
        let epoch = Instant::now();
        let set = Arc::new(ReplicaSet {
            replicas: replicas
                .into_iter()
                .enumerate()
                .map(|(index, replica)| Replica {
                    index,
                    label: index.to_string(),
                    endpoint: replica.endpoint,
                    pool: replica.pool,
                    healthy: AtomicBool::new(false),
                    fresh_until: AtomicU64::new(0),
                    epoch,
                    reads: AtomicU64::new(0),
                    fallbacks: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    probe: Mutex::new(ProbeState::default()),
                })
                .collect(),
            next: AtomicUsize::new(0),
        });
        let samples = Arc::new(Mutex::new(Samples::new(&config)));
        let mut tasks = vec![tokio::spawn(sample_primary(
            primary.clone(),
            samples.clone(),
            config.clone(),
        ))
        .abort_handle()];
        for index in 0..set.replicas.len() {
            let task = tokio::spawn(probe_replica(
                set.clone(),
                index,
                samples.clone(),
                config.clone(),
            ));
            tasks.push(task.abort_handle());
        }
        let reads = Self {
            primary,
            replicas: Some(set),
        };
        (reads, ProbeTask(tasks))
    }

    /// The replicas' state, in the order they were given.
    pub(crate) fn status(&self) -> Vec<ReplicaStatus> {
        let Some(set) = &self.replicas else {
            return Vec::new();
        };
        set.replicas
            .iter()
            .map(|r| {
                let probe = r.probe_state();
                let usable = r.usable();
                let last_probe_age = probe.probed_at.map(|at| at.elapsed());
                // Healthy but not usable: its last probe's lag has used up the bound since.
                let last_problem = match (usable, r.healthy.load(Ordering::Relaxed)) {
                    (false, true) => Some(format!(
                        "lag beyond the bound: {:?} at its last probe, {:?} ago",
                        probe.lag, last_probe_age
                    )),
                    _ => probe.last_problem,
                };
                ReplicaStatus {
                    index: r.index,
                    endpoint: r.endpoint.clone(),
                    usable,
                    lag: probe.lag,
                    last_probe_age,
                    lag_bytes: probe.lag_bytes,
                    reads: r.reads.load(Ordering::Relaxed),
                    fallbacks: r.fallbacks.load(Ordering::Relaxed),
                    errors: r.errors.load(Ordering::Relaxed),
                    last_problem,
                }
            })
            .collect()
    }

    /// The next usable replica in turn, if any.
    fn pick(&self) -> Option<&Replica> {
        let set = self.replicas.as_ref()?;
        let n = set.replicas.len();
        let start = set.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &set.replicas[(start + i) % n])
            .find(|r| r.usable())
    }

    /// Runs `read` on a usable replica, or on the primary. A replica's answer for which
    /// `confirm` names a reason, or a database error on the replica, is read again on the
    /// primary; an error that is not the database's (a row that does not decode) is
    /// returned as it is, since the primary holds the same row.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        kind: ReadKind,
        confirm: impl Fn(&T) -> Option<Fallback>,
        read: F,
    ) -> Result<T>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Some(replica) = self.pick() {
            match read(replica.pool.clone()).await {
                Ok(value) => match confirm(&value) {
                    None => {
                        replica.served(kind);
                        return Ok(value);
                    }
                    Some(reason) => replica.fell_back(kind, reason),
                },
                Err(Error::Database(error)) => replica.failed(kind, &error),
                Err(error) => {
                    replica.served(kind);
                    return Err(error);
                }
            }
        }
        let result = read(self.primary.clone()).await;
        metrics::read_served(kind.name(), "primary");
        result
    }

    /// Runs `read` on a usable replica that has replayed everything the primary had
    /// committed when this was called, or on the primary: the primary's WAL insert position
    /// is read first (one statement that touches no table), and the replica must have
    /// replayed up to it, checked in a statement of its own before `read` takes its
    /// snapshot. An answer read this way is as complete as the primary's at the call.
    pub(crate) async fn run_fenced<T, F, Fut>(&self, kind: ReadKind, read: F) -> Result<T>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Some(replica) = self.pick() {
            // The insert position, not the write position: with `synchronous_commit = off`
            // a commit is visible before its record is written.
            let fence = sqlx::query_scalar!(
                r#"select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint as "lsn!""#
            )
            .fetch_one(&self.primary)
            .await?;
            // A statement of its own: a statement's snapshot is taken before it runs, so a
            // replay position read inside `read` could be newer than what it sees.
            let reached = sqlx::query_scalar!(
                r#"select coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint >= $1,
                                   false) as "reached!""#,
                fence,
            )
            .fetch_one(&replica.pool)
            .await;
            match reached {
                Ok(true) => match read(replica.pool.clone()).await {
                    Ok(value) => {
                        replica.served(kind);
                        return Ok(value);
                    }
                    Err(Error::Database(error)) => replica.failed(kind, &error),
                    Err(error) => {
                        replica.served(kind);
                        return Err(error);
                    }
                },
                Ok(false) => replica.fell_back(kind, Fallback::Behind),
                Err(error) => replica.failed(kind, &error),
            }
        }
        let result = read(self.primary.clone()).await;
        metrics::read_served(kind.name(), "primary");
        result
    }
}

impl Replica {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn usable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.now() < self.fresh_until.load(Ordering::Relaxed)
    }

    fn probe_state(&self) -> ProbeState {
        self.probe
            .lock()
            .map(|state| state.clone())
            .unwrap_or_default()
    }

    fn set_problem(&self, problem: String) {
        if let Ok(mut state) = self.probe.lock() {
            state.last_problem = Some(problem);
        }
    }

    fn served(&self, kind: ReadKind) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        metrics::read_served(kind.name(), "replica");
    }

    fn fell_back(&self, kind: ReadKind, reason: Fallback) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::replica_fallback(kind.name(), reason.name());
    }

    /// A read failed on this replica: not used again until its probe finds it well.
    fn failed(&self, kind: ReadKind, error: &sqlx::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.fell_back(kind, Fallback::Error);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                replica = self.index,
                endpoint = %self.endpoint,
                error = error as &dyn std::error::Error,
                "a read failed on a replica; reading from the primary until it answers its probe"
            );
            metrics::replica_usable(&self.label, false);
        }
        self.set_problem(format!("read failed: {error}"));
    }

    /// What one probe found: a lag (`None`: behind every position remembered) and how far
    /// behind in bytes, or a problem.
    fn record_probe(
        &self,
        answered_at: Instant,
        outcome: std::result::Result<(Option<Duration>, Option<u64>), String>,
        max_lag: Duration,
    ) {
        let was_usable = self.usable();
        match outcome {
            Ok((lag, lag_bytes)) => {
                // Within the bound until `max_lag - lag` after the answer.
                let until = lag
                    .and_then(|lag| max_lag.checked_sub(lag))
                    .map(|left| {
                        answered_at
                            .saturating_duration_since(self.epoch)
                            .saturating_add(left)
                    })
                    .map_or(0, |until| {
                        u64::try_from(until.as_nanos()).unwrap_or(u64::MAX)
                    });
                self.fresh_until.store(until, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                if let Ok(mut state) = self.probe.lock() {
                    state.lag = lag;
                    state.lag_bytes = lag_bytes;
                    state.probed_at = Some(answered_at);
                    if until == 0 {
                        state.last_problem = Some(match lag {
                            Some(lag) => format!("lag {lag:?} beyond the bound"),
                            None => "behind every primary position remembered".to_string(),
                        });
                    }
                }
            }
            Err(problem) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(replica = self.index, endpoint = %self.endpoint, %problem, "replica not used");
                }
                self.set_problem(problem);
            }
        }
        let usable = self.usable();
        if usable != was_usable {
            if usable {
                tracing::info!(replica = self.index, endpoint = %self.endpoint, "replica used for reads");
            }
            metrics::replica_usable(&self.label, usable);
        }
    }
}

/// Primary write positions the probe read, with when it read them, oldest first.
struct Samples {
    positions: VecDeque<(Instant, i64)>,
    keep: Duration,
}

impl Samples {
    /// At most this many positions are kept, whatever the interval.
    const MAX: usize = 4096;

    fn new(config: &ReplicaConfig) -> Self {
        // Twice the bound (and a few intervals): older positions cannot make a replica
        // usable, and an older replay position is found beyond the bound by the oldest kept.
        let keep = config
            .max_lag
            .saturating_mul(2)
            .saturating_add(config.probe_interval.saturating_mul(4));
        Self {
            positions: VecDeque::new(),
            keep,
        }
    }

    fn push(&mut self, at: Instant, position: i64) {
        self.positions.push_back((at, position));
        while self.positions.len() > Self::MAX
            || (self.positions.len() > 1
                && self
                    .positions
                    .front()
                    .is_some_and(|(t, _)| at.saturating_duration_since(*t) > self.keep))
        {
            self.positions.pop_front();
        }
    }

    /// How old the newest primary position that `replayed` covers is, at `now`; `None`
    /// if it covers none of those kept.
    fn lag(&self, replayed: i64, now: Instant) -> Option<Duration> {
        self.positions
            .iter()
            .rev()
            .find(|(_, position)| *position <= replayed)
            .map(|(at, _)| now.saturating_duration_since(*at))
    }

    fn latest(&self) -> Option<i64> {
        self.positions.back().map(|(_, position)| *position)
    }

    /// The age of the oldest position kept: a lower bound of the lag of a replica behind
    /// all of them.
    fn oldest_age(&self, now: Instant) -> Option<Duration> {
        self.positions
            .front()
            .map(|(at, _)| now.saturating_duration_since(*at))
    }
}

fn probe_ticks(config: &ReplicaConfig) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(config.probe_interval.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// A probe's time limit: one that takes longer than `max_lag` could not show the replica
/// within it.
fn probe_timeout(config: &ReplicaConfig) -> Duration {
    config.max_lag.max(Duration::from_millis(1))
}

/// Reads the primary's WAL write position every probe interval.
async fn sample_primary(primary: PgPool, samples: Arc<Mutex<Samples>>, config: ReplicaConfig) {
    let mut ticks = probe_ticks(&config);
    loop {
        ticks.tick().await;
        let at = Instant::now();
        let position = tokio::time::timeout(
            probe_timeout(&config),
            sqlx::query_scalar!(
                r#"select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint as "lsn!""#
            )
            .fetch_one(&primary),
        )
        .await;
        match position {
            Ok(Ok(position)) => {
                if let Ok(mut samples) = samples.lock() {
                    samples.push(at, position);
                }
            }
            // The replicas are still measured against the positions known: while the primary
            // does not answer, nothing newer can be written on it.
            Ok(Err(error)) => tracing::debug!(
                error = &error as &dyn std::error::Error,
                "replica probe: the primary did not answer"
            ),
            Err(_) => tracing::debug!("replica probe: the primary did not answer in time"),
        }
    }
}

/// Measures replica `index`'s lag every probe interval.
async fn probe_replica(
    set: Arc<ReplicaSet>,
    index: usize,
    samples: Arc<Mutex<Samples>>,
    config: ReplicaConfig,
) {
    let Some(replica) = set.replicas.get(index) else {
        return;
    };
    let timeout = probe_timeout(&config);
    let mut ticks = probe_ticks(&config);
    loop {
        ticks.tick().await;
        let answer = tokio::time::timeout(
            timeout,
            sqlx::query!(
                r#"select pg_is_in_recovery() as "in_recovery!",
                          pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint as replayed"#
            )
            .fetch_one(&replica.pool),
        )
        .await;
        let now = Instant::now();
        let outcome = match answer {
            Err(_) => Err(format!("probe took longer than {timeout:?}")),
            Ok(Err(error)) => Err(format!("probe failed: {error}")),
            Ok(Ok(row)) if !row.in_recovery => Err("not in recovery (a primary?)".to_string()),
            Ok(Ok(row)) => {
                let replayed = row.replayed.unwrap_or(0);
                match samples.lock() {
                    Ok(samples) => {
                        let lag = samples.lag(replayed, now);
                        let lag_bytes = samples.latest().map(|latest| {
                            u64::try_from(latest.saturating_sub(replayed)).unwrap_or(0)
                        });
                        metrics::replica_lag(
                            &replica.label,
                            lag.or_else(|| samples.oldest_age(now)),
                            lag_bytes,
                        );
                        Ok((lag, lag_bytes))
                    }
                    Err(_) => Err("probe state poisoned".to_string()),
                }
            }
        };
        replica.record_probe(now, outcome, config.max_lag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_newest_position_replayed() {
        let config = ReplicaConfig {
            max_lag: Duration::from_secs(1),
            probe_interval: Duration::from_millis(100),
            acquire_timeout: Duration::from_millis(250),
        };
        let mut samples = Samples::new(&config);
        let t0 = Instant::now();
        samples.push(t0, 100);
        samples.push(t0 + Duration::from_millis(100), 200);
        samples.push(t0 + Duration::from_millis(200), 200);
        let now = t0 + Duration::from_millis(250);
        // Replayed everything: as old as the newest sample (an idle primary: no lag grows).
        assert_eq!(samples.lag(200, now), Some(Duration::from_millis(50)));
        // Between two positions: covered only up to the older one.
        assert_eq!(samples.lag(150, now), Some(Duration::from_millis(250)));
        // Behind every position kept: unknown.
        assert_eq!(samples.lag(99, now), None);
        assert_eq!(samples.latest(), Some(200));
    }

    #[test]
    fn old_positions_are_dropped_but_one_is_kept() {
        let config = ReplicaConfig {
            max_lag: Duration::from_millis(100),
            probe_interval: Duration::from_millis(10),
            acquire_timeout: Duration::from_millis(250),
        };
        let mut samples = Samples::new(&config);
        let t0 = Instant::now();
        samples.push(t0, 1);
        samples.push(t0 + Duration::from_secs(10), 2);
        assert_eq!(samples.positions.len(), 1);
        assert_eq!(samples.lag(1, t0 + Duration::from_secs(10)), None);
        for i in 0..10_000u64 {
            samples.push(t0 + Duration::from_secs(10), 3 + i as i64);
        }
        assert_eq!(samples.positions.len(), Samples::MAX);
    }
}
