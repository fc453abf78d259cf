//! Routing: which replica a read goes to, and its way back to the primary.

use super::probe::{self, ProbeState, ProbeTask};
use super::{Fallback, ReadKind, ReplicaConfig, ReplicaPool, ReplicaStatus};
use crate::error::{Error, Result};
use crate::metrics;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where reads go: the primary's pool and the replicas (none without replicas). Cheap to
/// clone, for streams that outlive the call that built them.
#[derive(Clone)]
pub(crate) struct Reads {
    primary: PgPool,
    replicas: Option<Arc<ReplicaSet>>,
}

pub(super) struct ReplicaSet {
    pub(super) replicas: Vec<Replica>,
    next: AtomicUsize,
}

pub(super) struct Replica {
    pub(super) index: usize,
    pub(super) label: String,
    pub(super) endpoint: String,
    pub(super) pool: PgPool,
    /// Its last probe answered, it is in recovery, and no read failed since.
    pub(super) healthy: AtomicBool,
    /// Until when its last probe's lag keeps it within the bound, in nanoseconds since
    /// `epoch` (0: not fresh).
    pub(super) fresh_until: AtomicU64,
    pub(super) epoch: Instant,
    reads: AtomicU64,
    fallbacks: AtomicU64,
    errors: AtomicU64,
    pub(super) probe: Mutex<ProbeState>,
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
            return (reads, ProbeTask::none());
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
        let probes = probe::start(&primary, &set, &config);
        let reads = Self {
            primary,
            replicas: Some(set),
        };
        (reads, probes)
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

    pub(super) fn usable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.now() < self.fresh_until.load(Ordering::Relaxed)
    }

    fn probe_state(&self) -> ProbeState {
        self.probe
            .lock()
            .map(|state| state.clone())
            .unwrap_or_default()
    }

    pub(super) fn set_problem(&self, problem: String) {
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
}
