//! Periodic cleanup: old terminated backends (with everything hanging off them), old events
//! and expired tokens, each in bounded batches (one transaction each), so that cleanup never
//! holds locks for long or bloats one transaction.

use crate::backend::CleanupReport;
use crate::error::{check_batch_size, interval_secs, Error, Result};
use crate::PlaneDatabase;
use sqlx::postgres::PgQueryResult;
use std::future::Future;
use std::time::Duration;

/// What [`PlaneDatabase::run_cleanup`] deletes. `CleanupConfig::default()` keeps a week.
#[derive(Debug, Clone)]
pub struct CleanupConfig {
    /// Backends that terminated more than this many days ago are deleted. Defaults to 7.
    pub backend_min_age_days: i32,
    /// Events older than this are deleted. Defaults to 7 days. Events are only needed to
    /// resume streams ([`PlaneDatabase::get_events_since`]); live delivery never reads old
    /// ones.
    pub event_min_age: Duration,
    /// Rows per transaction (backends, events). Defaults to 1,000: each batch holds its
    /// locks briefly, at the cost of one round trip per batch.
    pub batch_size: i32,
}

impl Default for CleanupConfig {
    fn default() -> Self {
        Self {
            backend_min_age_days: 7,
            event_min_age: Duration::from_secs(7 * 24 * 3600),
            batch_size: 1000,
        }
    }
}

/// How many completed cleanup runs `cleanup_run` keeps.
const CLEANUP_RUNS_KEPT: i64 = 100;

/// What one [`PlaneDatabase::run_cleanup`] deleted.
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

/// Where a [`PlaneDatabase::run_cleanup_with_progress`] run is: reported after every batch
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

/// A running [`PlaneDatabase::spawn_cleanup_loop`]. Dropping it (or calling
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

impl PlaneDatabase {
    /// Deletes events older than `min_age`, `batch_size` per transaction until none are
    /// left. Returns how many were deleted.
    #[tracing::instrument(skip(self))]
    pub async fn cleanup_events(&self, min_age: Duration, batch_size: i32) -> Result<u64> {
        self.cleanup_events_reporting(min_age, batch_size, &mut |_, _| {})
            .await
    }

    /// [`cleanup_events`](Self::cleanup_events), calling `progress(deleted, batches)` after
    /// each batch.
    async fn cleanup_events_reporting(
        &self,
        min_age: Duration,
        batch_size: i32,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64> {
        check_batch_size(batch_size)?;
        // Oldest first through the created_at index; SKIP LOCKED lets two controllers clean
        // up at once without waiting on each other.
        delete_in_batches("event", batch_size, progress, || {
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
            .execute(self.pool())
        })
        .await
    }

    /// Deletes expired tokens, 1,000 per transaction until none are left. Returns how many
    /// were deleted.
    #[tracing::instrument(skip(self))]
    pub async fn clean_up_tokens(&self) -> Result<u64> {
        self.clean_up_tokens_reporting(&mut |_, _| {}).await
    }

    /// [`clean_up_tokens`](Self::clean_up_tokens), calling `progress(deleted, batches)` after
    /// each batch.
    async fn clean_up_tokens_reporting(
        &self,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64> {
        const BATCH: i32 = 1000;
        // Through the expiration_time index; SKIP LOCKED lets controllers share the work.
        delete_in_batches("token", BATCH, progress, || {
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
            .execute(self.pool())
        })
        .await
    }

    /// One full cleanup: old terminated backends (see
    /// [`BackendDatabase::cleanup`](crate::backend::BackendDatabase::cleanup)), old events,
    /// then expired tokens. Returns what was deleted.
    ///
    /// ```no_run
    /// # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
    /// let summary = db.run_cleanup(&plane_db::CleanupConfig::default()).await?;
    /// println!("deleted {} backends, {} events", summary.backends.backends, summary.events);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self))]
    pub async fn run_cleanup(&self, config: &CleanupConfig) -> Result<CleanupSummary> {
        self.run_cleanup_with_progress(config, |_| {}).await
    }

    /// [`run_cleanup`](Self::run_cleanup), calling `progress` after every batch, e.g. to
    /// show an operator how far a long first cleanup has got.
    ///
    /// ```no_run
    /// # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
    /// let config = plane_db::CleanupConfig::default();
    /// let summary = db
    ///     .run_cleanup_with_progress(&config, |p| eprintln!("{}: {} deleted", p.phase, p.deleted))
    ///     .await?;
    /// println!("{} expired tokens deleted", summary.tokens);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self, progress))]
    pub async fn run_cleanup_with_progress(
        &self,
        config: &CleanupConfig,
        progress: impl FnMut(CleanupProgress) + Send,
    ) -> Result<CleanupSummary> {
        let started = std::time::Instant::now();
        let result = self.run_cleanup_phases(config, progress).await;
        crate::metrics::cleanup_run(started.elapsed(), result.is_ok());
        result
    }

    /// The phases of [`run_cleanup_with_progress`](Self::run_cleanup_with_progress).
    async fn run_cleanup_phases(
        &self,
        config: &CleanupConfig,
        mut progress: impl FnMut(CleanupProgress) + Send,
    ) -> Result<CleanupSummary> {
        let started = std::time::Instant::now();
        let backends = self
            .backend()
            .cleanup_reporting(config.backend_min_age_days, config.batch_size, &mut |r| {
                progress(CleanupProgress {
                    phase: CleanupPhase::Backends,
                    deleted: r.backends,
                    batches: r.batches,
                })
            })
            .await?;
        let events = self
            .cleanup_events_reporting(config.event_min_age, config.batch_size, &mut |d, b| {
                progress(CleanupProgress {
                    phase: CleanupPhase::Events,
                    deleted: d,
                    batches: b,
                })
            })
            .await?;
        let tokens = self
            .clean_up_tokens_reporting(&mut |d, b| {
                progress(CleanupProgress {
                    phase: CleanupPhase::Tokens,
                    deleted: d,
                    batches: b,
                })
            })
            .await?;
        let summary = CleanupSummary {
            backends,
            events,
            tokens,
        };
        self.record_cleanup_run(&summary, started.elapsed()).await?;
        tracing::info!(?summary, "cleanup finished");
        Ok(summary)
    }

    /// Records a completed run in `cleanup_run` (for `plane-db status`), keeping the latest
    /// [`CLEANUP_RUNS_KEPT`] runs. Its start is the database clock less the run's duration.
    async fn record_cleanup_run(
        &self,
        summary: &CleanupSummary,
        took: std::time::Duration,
    ) -> Result<()> {
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
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Runs [`run_cleanup`](Self::run_cleanup) every `interval` in a background task,
    /// starting after a random delay within the first interval so that several controllers
    /// started together do not all clean up at the same moment. A failed run is logged and
    /// retried at the next interval. The task holds a clone of this database and stops when
    /// the returned [`CleanupTask`] is dropped. Must be called within a Tokio runtime.
    ///
    /// An `interval` of zero is [`Error::InvalidArgument`].
    pub fn spawn_cleanup_loop(
        &self,
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
        let db = self.clone();
        let handle = tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            loop {
                if let Err(error) = db.run_cleanup(&config).await {
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

/// Runs `delete`, a statement that deletes at most `batch` rows in its own transaction,
/// until it deletes fewer; returns how many rows went in all.
/// Calls `progress(deleted, batches)` after each batch.
async fn delete_in_batches<F, Fut>(
    table: &'static str,
    batch: i32,
    progress: &mut (dyn FnMut(u64, u64) + Send),
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
        crate::metrics::cleanup_deleted(table, affected);
        deleted += affected;
        batches += 1;
        progress(deleted, batches);
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
