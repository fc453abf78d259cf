//! Periodic cleanup: old terminated backends (with everything hanging off them), old events
//! and expired tokens, each in bounded batches (one transaction each), so that cleanup never
//! holds locks for long or bloats one transaction.

use crate::config::CleanupConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::metrics;
use crate::types::BackendStatus;
use crate::validate::{check_batch_size, interval_secs};
use sqlx::postgres::PgQueryResult;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
    /// Old events.
    pub events: u64,
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

/// A running [`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop). Dropping it (or calling
/// [`stop`](Self::stop)) stops the loop.
#[derive(Debug)]
pub struct CleanupTask {
    handle: tokio::task::JoinHandle<()>,
}

impl CleanupTask {
    /// Stops the loop (a cleanup in progress is abandoned between statements; every batch
    /// is its own transaction, so nothing is left half done).
    pub fn stop(self) {}
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Every cleanup statement, on a context. Every phase reports a [`CleanupProgress`] after each
/// batch; the public entry points are on [`PlaneDatabase`](crate::PlaneDatabase).
pub(crate) struct Cleanup<'a> {
    ctx: &'a Context,
}

/// Where progress reports go.
pub(crate) type Progress<'p> = dyn FnMut(CleanupProgress) + Send + 'p;

impl<'a> Cleanup<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// One full cleanup: old terminated backends, old events, then expired tokens; records
    /// the run in `cleanup_run`. Returns what was deleted.
    #[tracing::instrument(name = "run_cleanup", skip(self, progress))]
    pub(crate) async fn run(
        &self,
        config: &CleanupConfig,
        progress: &mut Progress<'_>,
    ) -> Result<CleanupSummary> {
        let started = std::time::Instant::now();
        let result = self.run_phases(config, progress).await;
        metrics::cleanup_run(started.elapsed(), result.is_ok());
        result
    }

    async fn run_phases(
        &self,
        config: &CleanupConfig,
        progress: &mut Progress<'_>,
    ) -> Result<CleanupSummary> {
        let started = std::time::Instant::now();
        let backends = self
            .backends(config.backend_min_age, config.batch_size, progress)
            .await?;
        let events = self
            .events(config.event_min_age, config.batch_size, progress)
            .await?;
        let tokens = self.tokens(progress).await?;
        let summary = CleanupSummary {
            backends,
            events,
            tokens,
        };
        self.record_run(&summary, started.elapsed()).await?;
        tracing::info!(?summary, "cleanup finished");
        Ok(summary)
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
        loop {
            // One transaction per batch; SKIP LOCKED lets two controllers share the work.
            let row = sqlx::query!(
                r#"
                with doomed as (
                    select b.id from backend b
                    where b.last_status_number = $1
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
                    (select count(*) from backends) as "backends!",
                    (select count(*) from states) as "states!",
                    (select count(*) from tokens) as "tokens!",
                    (select count(*) from actions) as "actions!",
                    (select count(*) from keys) as "keys!"
                "#,
                BackendStatus::Terminated.as_int(),
                interval_secs(min_age),
                i64::from(batch_size),
            )
            .fetch_one(self.ctx.pool())
            .await?;
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
        delete_in_batches(CleanupPhase::Events, "event", batch_size, progress, || {
            sqlx::query!(
                r#"
                delete from event where id in (
                    select id from event
                    where created_at < now() - make_interval(secs => $1)
                    order by created_at
                    limit $2
                    for update skip locked
                )
                "#,
                interval_secs(min_age),
                i64::from(batch_size),
            )
            .execute(self.ctx.pool())
        })
        .await
    }

    /// Deletes expired tokens, 1,000 per transaction until none are left. Returns how many
    /// were deleted.
    #[tracing::instrument(name = "cleanup_tokens", skip(self, progress))]
    pub(crate) async fn tokens(&self, progress: &mut Progress<'_>) -> Result<u64> {
        const BATCH: i32 = 1000;
        // Through the expiration_time index; SKIP LOCKED lets controllers share the work.
        delete_in_batches(CleanupPhase::Tokens, "token", BATCH, progress, || {
            sqlx::query!(
                r#"
                delete from token where token_digest in (
                    select token_digest from token
                    where expiration_time <= now()
                    limit $1
                    for update skip locked
                )
                "#,
                i64::from(BATCH),
            )
            .execute(self.ctx.pool())
        })
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
        let offset = random_offset(interval);
        let handle = tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            loop {
                if let Err(error) = Cleanup::new(&ctx).run(&config, &mut |_| {}).await {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cleanup failed; retrying at the next interval"
                    );
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(CleanupTask { handle })
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
/// transaction, until it deletes fewer; returns how many rows went in all. Reports progress
/// for `phase` after each batch.
async fn delete_in_batches<F, Fut>(
    phase: CleanupPhase,
    table: &'static str,
    batch: i32,
    progress: &mut Progress<'_>,
    mut delete: F,
) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<PgQueryResult>>,
{
    let mut deleted = 0;
    let mut batches = 0;
    loop {
        let affected = delete().await?.rows_affected();
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
    }
}

/// A uniformly random delay in `[0, interval)`. Falls back to no delay if the OS random
/// source fails: a missing offset only makes controllers more likely to coincide.
fn random_offset(interval: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    let fraction = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_fall_within_the_interval_and_vary() {
        let interval = Duration::from_secs(60);
        let offsets: Vec<Duration> = (0..64).map(|_| random_offset(interval)).collect();
        assert!(offsets.iter().all(|o| *o < interval));
        let first = offsets[0];
        assert!(offsets.iter().any(|o| *o != first), "offsets should vary");
    }
}
