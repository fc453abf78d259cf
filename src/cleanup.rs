//! Periodic cleanup: partitions created ahead of the history sequences, old terminated
//! backends (with everything hanging off them) in bounded batches (one transaction each),
//! whole partitions of old events and emptied state partitions dropped
//! ([`crate::partition`]), and expired tokens in batches, so that cleanup never holds locks
//! for long or bloats one transaction.

use crate::config::CleanupConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::leader::{
    holder_for_this_process, wait_leading, LeaderElection, Leadership, CLEANUP_LEASE,
};
use crate::metrics;
use crate::partition::{lacks_privilege, History, PartitionReport, Partitions};
use crate::types::BackendStatus;
use crate::validate::{check_batch_size, interval_secs};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How many completed cleanup runs `cleanup_run` keeps.
const CLEANUP_RUNS_KEPT: i64 = 100;

/// What the backends phase of a cleanup deleted (see
/// [`BackendDatabase::cleanup_terminated`](crate::backend::BackendDatabase::cleanup_terminated)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CleanupReport {
    /// Terminated backends deleted.
    pub backends: u64,
    /// Their state history rows.
    #[serde(rename = "backend_states")]
    pub states: u64,
    /// Their tokens.
    #[serde(rename = "backend_tokens")]
    pub tokens: u64,
    /// Their actions.
    #[serde(rename = "backend_actions")]
    pub actions: u64,
    /// Their (expired) keys.
    #[serde(rename = "backend_keys")]
    pub keys: u64,
    /// How many batches (transactions) it took.
    #[serde(rename = "backend_batches")]
    pub batches: u64,
}

/// What one [`PlaneDatabase::run_cleanup`](crate::PlaneDatabase::run_cleanup) deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CleanupSummary {
    /// Old terminated backends and their rows.
    /// Serialized inline: `backends`, `backend_states`, `backend_tokens`, …
    #[serde(flatten)]
    pub backends: CleanupReport,
    /// Old events: in [`run_cleanup`](crate::PlaneDatabase::run_cleanup), the events of the
    /// `event` partitions it dropped.
    pub events: u64,
    /// What partition maintenance and retention did. Serialized inline.
    #[serde(flatten)]
    pub partitions: PartitionReport,
    /// Expired tokens (of backends not deleted above).
    /// Serialized as `expired_tokens`.
    #[serde(rename = "expired_tokens")]
    pub tokens: u64,
}

/// Which part of a cleanup run a [`CleanupProgress`] is about, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupPhase {
    /// Old terminated backends and the rows hanging off them.
    Backends,
    /// Old events.
    Events,
    /// Expired tokens.
    Tokens,
}

impl std::fmt::Display for CleanupPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CleanupPhase::Backends => "backends",
            CleanupPhase::Events => "events",
            CleanupPhase::Tokens => "tokens",
        })
    }
}

/// Where a [`PlaneDatabase::run_cleanup_with_progress`](crate::PlaneDatabase::run_cleanup_with_progress) run is: reported after every batch
/// (each its own transaction), with running totals for the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupProgress {
    /// The phase the batch belonged to.
    pub phase: CleanupPhase,
    /// Rows deleted in this phase so far (backends, not counting their history, for
    /// [`CleanupPhase::Backends`]).
    pub deleted: u64,
    /// Batches run in this phase so far.
    pub batches: u64,
}

/// A running [`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop):
/// the loop and its election for the [`CLEANUP_LEASE`]. Dropping it (or calling
/// [`stop`](Self::stop)) stops the loop; [`shutdown`](Self::shutdown) also hands the lease
/// on at once.
#[derive(Debug)]
pub struct CleanupTask {
    handle: tokio::task::JoinHandle<()>,
    election: Option<LeaderElection>,
}

impl CleanupTask {
    /// Stops the loop (a cleanup in progress is abandoned between statements; every batch
    /// is its own transaction, so nothing is left half done). If it led, it resigns in the
    /// background when a runtime is there to run it, else its lease expires.
    pub fn stop(self) {}

    /// Stops the loop and, if it led, resigns, so that another controller takes cleanup over
    /// at once instead of after the lease expires. A batch already sent finishes first.
    pub async fn shutdown(mut self) {
        self.handle.abort();
        if let Some(election) = self.election.take() {
            election.resign().await;
        }
    }

    /// The term under which this loop leads cleanup right now, if it does.
    pub fn leader_term(&self) -> Option<i64> {
        self.election.as_ref().and_then(LeaderElection::term)
    }

    /// The loop's holder name in the [`CLEANUP_LEASE`] (as `plane-db status` shows it).
    pub fn holder(&self) -> &str {
        self.election.as_ref().map_or("", LeaderElection::holder)
    }
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The term a cleanup's batches are fenced with: each batch runs only if this process still
/// leads under `term` by its own clock, and its statement deletes only if the lease row still
/// carries `term` and has not expired (locked `FOR SHARE` in the same statement).
#[derive(Clone)]
pub(crate) struct Fence {
    pub(crate) lease: String,
    pub(crate) term: i64,
    /// The election's view; `None` to check in the database only (the tests' stale terms).
    pub(crate) state: Option<watch::Receiver<Leadership>>,
}

impl Fence {
    fn refused(&self) -> Error {
        Error::NotLeader {
            lease: self.lease.clone(),
            term: self.term,
        }
    }

    /// Before a batch: does this process still lead under the term?
    fn check_locally(&self) -> Result<()> {
        match &self.state {
            Some(state) if state.borrow().term_now() != Some(self.term) => Err(self.refused()),
            _ => Ok(()),
        }
    }
}

/// Every cleanup statement, on a context. Every phase reports a [`CleanupProgress`] after each
/// batch; the public entry points are on [`PlaneDatabase`](crate::PlaneDatabase).
pub(crate) struct Cleanup<'a> {
    ctx: &'a Context,
    fence: Option<Fence>,
    /// [`CleanupConfig::busy_share`]: 1.0 runs batches back to back.
    busy_share: f64,
}

/// Where progress reports go.
pub(crate) type Progress<'p> = dyn FnMut(CleanupProgress) + Send + 'p;

impl<'a> Cleanup<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self {
            ctx,
            fence: None,
            busy_share: 1.0,
        }
    }

    /// Cleanup whose every batch is fenced by `fence` ([`Error::NotLeader`] once it fails).
    pub(crate) fn fenced(ctx: &'a Context, fence: Fence) -> Self {
        Self {
            ctx,
            fence: Some(fence),
            busy_share: 1.0,
        }
    }

    /// After a batch or a partition step that took `took`: waits so that statements take at
    /// most `busy_share` of the wall time (see [`CleanupConfig::busy_share`]).
    async fn pace(&self, took: Duration) {
        if self.busy_share < 1.0 {
            let wait = took.as_secs_f64() * (1.0 - self.busy_share) / self.busy_share;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(60.0))).await;
        }
    }

    /// The fence's term and lease as the statements take them (`None`: unfenced).
    fn fence_params(&self) -> (Option<i64>, &str) {
        match &self.fence {
            Some(fence) => (Some(fence.term), fence.lease.as_str()),
            None => (None, ""),
        }
    }

    /// Before each batch: refuses if this process no longer leads under the fence's term.
    fn check_fence(&self) -> Result<()> {
        self.fence.as_ref().map_or(Ok(()), Fence::check_locally)
    }

    /// After each batch: the statement's own check of the term.
    fn fence_held(&self, held: bool) -> Result<()> {
        match &self.fence {
            Some(fence) if !held => Err(fence.refused()),
            _ => Ok(()),
        }
    }

    /// One full cleanup: old terminated backends, old events, then expired tokens; records
    /// the run in `cleanup_run`. Returns what was deleted.
    #[tracing::instrument(name = "run_cleanup", skip(self, progress))]
    pub(crate) async fn run(
        &self,
        config: &CleanupConfig,
        progress: &mut Progress<'_>,
    ) -> Result<CleanupSummary> {
        check_busy_share(config.busy_share)?;
        let paced = Cleanup {
            ctx: self.ctx,
            fence: self.fence.clone(),
            busy_share: config.busy_share,
        };
        let started = std::time::Instant::now();
        let result = paced.run_phases(config, progress).await;
        metrics::cleanup_run(started.elapsed(), result.is_ok());
        result
    }

    async fn run_phases(
        &self,
        config: &CleanupConfig,
        progress: &mut Progress<'_>,
    ) -> Result<CleanupSummary> {
        let started = std::time::Instant::now();
        let mut partitions = PartitionReport::default();
        self.check_fence()?;
        self.fence_still_held().await?;
        match Partitions::new(self.ctx).ensure_ahead(config).await {
            Ok(ahead) => {
                partitions.partitions_created = ahead.created;
                partitions.tails_split = ahead.split;
            }
            Err(error) if lacks_privilege(&error) => partitions.ddl_refused = true,
            Err(error) => return Err(error),
        }
        let backends = self
            .backends(config.backend_min_age, config.batch_size, progress)
            .await?;
        if !partitions.ddl_refused {
            match self
                .drop_partitions(config, &mut partitions, progress)
                .await
            {
                Ok(()) => {}
                Err(error) if lacks_privilege(&error) => partitions.ddl_refused = true,
                Err(error) => return Err(error),
            }
        }
        // A role that may not drop partitions (the least-privilege application role) still
        // keeps the event table bounded: old events go row by row, as before partitioning.
        let mut events = partitions.events_dropped;
        if partitions.ddl_refused {
            tracing::warn!(
                "cleanup: this role may not create or drop partitions (it does not own the \
                 history tables); old events are deleted row by row instead. Run cleanup as \
                 the tables' owner now and then to keep partitions ahead and drop old ones"
            );
            events += self
                .events(config.event_min_age, config.batch_size, progress)
                .await?;
        }
        let tokens = self.tokens(progress).await?;
        let summary = CleanupSummary {
            backends,
            events,
            partitions,
            tokens,
        };
        self.record_run(&summary, started.elapsed()).await?;
        tracing::info!(?summary, "cleanup finished");
        Ok(summary)
    }

    /// Retention by partitions: detaches and drops the `event` partitions whose newest event
    /// is older than `config.event_min_age` and the emptied `backend_state` partitions (see
    /// [`crate::partition`]), checking the fence before each. Reports progress as
    /// [`CleanupPhase::Events`] (events dropped so far, partitions dropped so far).
    async fn drop_partitions(
        &self,
        config: &CleanupConfig,
        report: &mut PartitionReport,
        progress: &mut Progress<'_>,
    ) -> Result<()> {
        let partitions = Partitions::new(self.ctx);
        let (retired, kept) = partitions.retired(config.event_min_age).await?;
        report.state_partitions_kept = kept;
        for (table, name, rows) in retired {
            self.check_fence()?;
            self.fence_still_held().await?;
            let step = std::time::Instant::now();
            partitions.drop_partition(table, &name).await?;
            self.pace(step.elapsed()).await;
            match table {
                History::Event => {
                    report.event_partitions_dropped += 1;
                    report.events_dropped += rows;
                    metrics::cleanup_deleted("event", rows);
                }
                History::BackendState => report.state_partitions_dropped += 1,
            }
            progress(CleanupProgress {
                phase: CleanupPhase::Events,
                deleted: report.events_dropped,
                batches: report.event_partitions_dropped + report.state_partitions_dropped,
            });
        }
        Ok(())
    }

    /// For DDL, which cannot check the lease in its own statement: whether the lease still
    /// carries the fence's term right now (a takeover between this check and the DDL that
    /// follows would at worst run the same idempotent step twice).
    async fn fence_still_held(&self) -> Result<()> {
        let (term, lease) = self.fence_params();
        let Some(term) = term else { return Ok(()) };
        let held = sqlx::query_scalar!(
            r#"
            select exists (
                select 1 from leader_lease
                where name = $1 and term = $2 and expires_at > clock_timestamp()
            ) as "held!"
            "#,
            lease,
            term,
        )
        .fetch_one(self.ctx.pool())
        .await?;
        self.fence_held(held)
    }

    /// Deletes backends that terminated longer than `min_age` ago with everything hanging
    /// off them, `batch_size` backends per transaction; a backend whose key has not expired
    /// is kept (the key still fences it).
    #[tracing::instrument(name = "cleanup_backends", skip(self, progress))]
    pub(crate) async fn backends(
        &self,
        min_age: Duration,
        batch_size: i32,
        progress: &mut Progress<'_>,
    ) -> Result<CleanupReport> {
        check_batch_size(batch_size)?;
        let mut report = CleanupReport::default();
        let (term, lease) = self.fence_params();
        loop {
            self.check_fence()?;
            let step = std::time::Instant::now();
            // One transaction per batch; SKIP LOCKED lets two controllers share the work.
            // `fence`: with a term, nothing is deleted unless the lease row still carries it;
            // the row stays locked until the commit, so no takeover commits in between.
            let row = sqlx::query!(
                r#"
                with fence as (
                    select 1 from leader_lease
                    where $4::bigint is not null and name = $5 and term = $4
                      and expires_at > clock_timestamp()
                    for share
                ),
                allowed as (
                    select $4::bigint is null or exists (select 1 from fence) as ok
                ),
                doomed as (
                    select b.id from backend b
                    where (select ok from allowed)
                      and b.last_status_number = $1
                      and b.last_status_time < now() - make_interval(secs => $2)
                      and not exists (
                          select 1 from backend_key k where k.id = b.id and k.expires_at >= now()
                      )
                    order by b.last_status_time
                    limit $3
                    for update skip locked
                ),
                tokens as (
                    delete from token where backend_id in (select id from doomed) returning 1
                ),
                actions as (
                    delete from backend_action where backend_id in (select id from doomed) returning 1
                ),
                keys as (
                    delete from backend_key where id in (select id from doomed) returning 1
                ),
                states as (
                    delete from backend_state where backend_id in (select id from doomed) returning 1
                ),
                backends as (
                    delete from backend where id in (select id from doomed) returning 1
                )
                select
                    (select ok from allowed) as "allowed!",
                    (select count(*) from backends) as "backends!",
                    (select count(*) from states) as "states!",
                    (select count(*) from tokens) as "tokens!",
                    (select count(*) from actions) as "actions!",
                    (select count(*) from keys) as "keys!"
                "#,
                BackendStatus::Terminated.as_int(),
                interval_secs(min_age),
                i64::from(batch_size),
                term,
                lease,
            )
            .fetch_one(self.ctx.pool())
            .await?;
            self.fence_held(row.allowed)?;
            let batch = CleanupReport {
                backends: count(row.backends),
                states: count(row.states),
                tokens: count(row.tokens),
                actions: count(row.actions),
                keys: count(row.keys),
                batches: 1,
            };
            // Each batch is committed: count it even if a later one fails.
            metrics::cleanup_deleted("backend", batch.backends);
            metrics::cleanup_deleted("backend_state", batch.states);
            metrics::cleanup_deleted("token", batch.tokens);
            metrics::cleanup_deleted("backend_action", batch.actions);
            metrics::cleanup_deleted("backend_key", batch.keys);
            report.add(&batch);
            progress(CleanupProgress {
                phase: CleanupPhase::Backends,
                deleted: report.backends,
                batches: report.batches,
            });
            if row.backends < i64::from(batch_size) {
                break;
            }
            self.pace(step.elapsed()).await;
        }
        Ok(report)
    }

    /// Deletes events older than `min_age`, `batch_size` per transaction until none are
    /// left. Returns how many were deleted.
    #[tracing::instrument(name = "cleanup_events", skip(self, progress))]
    pub(crate) async fn events(
        &self,
        min_age: Duration,
        batch_size: i32,
        progress: &mut Progress<'_>,
    ) -> Result<u64> {
        check_batch_size(batch_size)?;
        // Oldest first through the created_at index; SKIP LOCKED lets two controllers clean
        // up at once without waiting on each other.
        // The fence as in `backends`.
        let (term, lease) = self.fence_params();
        delete_in_batches(
            self,
            CleanupPhase::Events,
            "event",
            batch_size,
            progress,
            || async move {
                let row = sqlx::query!(
                    r#"
                with fence as (
                    select 1 from leader_lease
                    where $3::bigint is not null and name = $4 and term = $3
                      and expires_at > clock_timestamp()
                    for share
                ),
                allowed as (
                    select $3::bigint is null or exists (select 1 from fence) as ok
                ),
                deleted as (
                    delete from event where id in (
                        select id from event
                        where (select ok from allowed)
                          and created_at < now() - make_interval(secs => $1)
                        order by created_at
                        limit $2
                        for update skip locked
                    )
                    returning 1
                )
                select (select ok from allowed) as "allowed!",
                       (select count(*) from deleted) as "deleted!"
                "#,
                    interval_secs(min_age),
                    i64::from(batch_size),
                    term,
                    lease,
                )
                .fetch_one(self.ctx.pool())
                .await?;
                Ok((row.allowed, count(row.deleted)))
            },
        )
        .await
    }

    /// Deletes expired tokens, 1,000 per transaction until none are left. Returns how many
    /// were deleted.
    #[tracing::instrument(name = "cleanup_tokens", skip(self, progress))]
    pub(crate) async fn tokens(&self, progress: &mut Progress<'_>) -> Result<u64> {
        const BATCH: i32 = 1000;
        // Through the expiration_time index; SKIP LOCKED lets controllers share the work.
        // The fence as in `backends`.
        let (term, lease) = self.fence_params();
        delete_in_batches(
            self,
            CleanupPhase::Tokens,
            "token",
            BATCH,
            progress,
            || async move {
                let row = sqlx::query!(
                    r#"
                with fence as (
                    select 1 from leader_lease
                    where $2::bigint is not null and name = $3 and term = $2
                      and expires_at > clock_timestamp()
                    for share
                ),
                allowed as (
                    select $2::bigint is null or exists (select 1 from fence) as ok
                ),
                deleted as (
                    delete from token where token_digest in (
                        select token_digest from token
                        where (select ok from allowed) and expiration_time <= now()
                        limit $1
                        for update skip locked
                    )
                    returning 1
                )
                select (select ok from allowed) as "allowed!",
                       (select count(*) from deleted) as "deleted!"
                "#,
                    i64::from(BATCH),
                    term,
                    lease,
                )
                .fetch_one(self.ctx.pool())
                .await?;
                Ok((row.allowed, count(row.deleted)))
            },
        )
        .await
    }

    /// Records a completed run in `cleanup_run` (for `plane-db status`), keeping the latest
    /// [`CLEANUP_RUNS_KEPT`] runs. Its start is the database clock less the run's duration.
    async fn record_run(&self, summary: &CleanupSummary, took: Duration) -> Result<()> {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query!(
            r#"
            with run as (
                insert into cleanup_run (started_at, backends, events, tokens)
                values (now() - make_interval(secs => $1), $2, $3, $4)
                returning id
            )
            delete from cleanup_run
            where id <= (select id from run) - $5
            "#,
            took.as_secs_f64(),
            count(summary.backends.backends),
            count(summary.events),
            count(summary.tokens),
            CLEANUP_RUNS_KEPT,
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(())
    }

    /// [`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop): the
    /// task holds the context (so the pool and the bus) until the [`CleanupTask`] is dropped.
    /// It runs cleanup only while its election leads the [`CLEANUP_LEASE`], every batch
    /// fenced with the term.
    pub(crate) fn spawn_loop(
        ctx: Arc<Context>,
        interval: Duration,
        config: CleanupConfig,
    ) -> Result<CleanupTask> {
        if interval.is_zero() {
            return Err(Error::InvalidArgument {
                argument: "interval",
                reason: "must be greater than zero".to_string(),
            });
        }
        let election = LeaderElection::spawn(
            ctx.pool().clone(),
            ctx.bus().listener_options(),
            CLEANUP_LEASE,
            holder_for_this_process(),
            ctx.config().leader.clone(),
        )?;
        let mut state = election.watch();
        let handle = tokio::spawn(async move {
            loop {
                let term = wait_leading(&mut state).await;
                // The fleet keeps one schedule: a new leader waits for what is left of the
                // interval since the last recorded run (by whichever controller).
                let wait = match Cleanup::new(&ctx).until_due(interval).await {
                    Ok(wait) => wait,
                    Err(error) => {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            "cannot read the last cleanup run"
                        );
                        interval
                    }
                };
                tokio::time::sleep(wait).await;
                if state.borrow().term_now() != Some(term) {
                    continue;
                }
                let fence = Fence {
                    lease: CLEANUP_LEASE.to_string(),
                    term,
                    state: Some(state.clone()),
                };
                match Cleanup::fenced(&ctx, fence).run(&config, &mut |_| {}).await {
                    Ok(_) => {}
                    Err(Error::NotLeader { term, .. }) => {
                        tracing::info!(term, "cleanup stopped: no longer the leader");
                    }
                    Err(error) => tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cleanup failed; retrying at the next interval"
                    ),
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(CleanupTask {
            handle,
            election: Some(election),
        })
    }

    /// How long until the next cleanup is due: `interval` after the last recorded run, zero
    /// if none was recorded within it.
    async fn until_due(&self, interval: Duration) -> Result<Duration> {
        let row = sqlx::query!(
            r#"
            select extract(epoch from greatest(
                       make_interval(secs => $1) - (now() - max(finished_at)), interval '0'
                   ))::float8 as "wait"
            from cleanup_run
            "#,
            interval_secs(interval),
        )
        .fetch_one(self.ctx.pool())
        .await?;
        Ok(row
            .wait
            .filter(|s| s.is_finite() && *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(Duration::ZERO)
            .min(interval))
    }
}

impl CleanupReport {
    fn add(&mut self, batch: &CleanupReport) {
        self.backends += batch.backends;
        self.states += batch.states;
        self.tokens += batch.tokens;
        self.actions += batch.actions;
        self.keys += batch.keys;
        self.batches += batch.batches;
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Runs `delete`, a statement that deletes at most `batch` rows of `table` in its own
/// transaction and says whether its fence held and how many it deleted, until it deletes
/// fewer; returns how many rows went in all. Reports progress for `phase` after each batch.
/// Checks `cleanup`'s fence before and after each batch.
async fn delete_in_batches<F, Fut>(
    cleanup: &Cleanup<'_>,
    phase: CleanupPhase,
    table: &'static str,
    batch: i32,
    progress: &mut Progress<'_>,
    mut delete: F,
) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(bool, u64)>>,
{
    let mut deleted = 0;
    let mut batches = 0;
    loop {
        cleanup.check_fence()?;
        let step = std::time::Instant::now();
        let (held, affected) = delete().await?;
        cleanup.fence_held(held)?;
        metrics::cleanup_deleted(table, affected);
        deleted += affected;
        batches += 1;
        progress(CleanupProgress {
            phase,
            deleted,
            batches,
        });
        if affected < batch as u64 {
            return Ok(deleted);
        }
        cleanup.pace(step.elapsed()).await;
    }
}

/// [`CleanupConfig::busy_share`] must be in `(0, 1]`.
fn check_busy_share(share: f64) -> Result<()> {
    if share > 0.0 && share <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            argument: "busy_share",
            reason: format!("must be greater than 0 and at most 1, not {share}"),
        })
    }
}
