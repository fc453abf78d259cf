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

/// What one [`PlaneDatabase::run_cleanup`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupSummary {
    /// Old terminated backends and their rows.
    pub backends: CleanupReport,
    /// Old events.
    pub events: u64,
    /// Expired tokens (of backends not deleted above).
    pub tokens: u64,
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
    #[tracing::instrument(skip(self), err)]
    pub async fn cleanup_events(&self, min_age: Duration, batch_size: i32) -> Result<u64> {
        check_batch_size(batch_size)?;
        // Oldest first through the created_at index; SKIP LOCKED lets two controllers clean
        // up at once without waiting on each other.
        delete_in_batches(batch_size, || {
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
    #[tracing::instrument(skip(self), err)]
    pub async fn clean_up_tokens(&self) -> Result<u64> {
        const BATCH: i32 = 1000;
        // Through the expiration_time index; SKIP LOCKED lets controllers share the work.
        delete_in_batches(BATCH, || {
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
    #[tracing::instrument(skip(self), err)]
    pub async fn run_cleanup(&self, config: &CleanupConfig) -> Result<CleanupSummary> {
        let backends = self
            .backend()
            .cleanup(config.backend_min_age_days, config.batch_size)
            .await?;
        let events = self
            .cleanup_events(config.event_min_age, config.batch_size)
            .await?;
        let tokens = self.clean_up_tokens().await?;
        let summary = CleanupSummary {
            backends,
            events,
            tokens,
        };
        tracing::info!(?summary, "cleanup finished");
        Ok(summary)
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
async fn delete_in_batches<F, Fut>(batch: i32, mut delete: F) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<PgQueryResult>>,
{
    let mut deleted = 0;
    loop {
        let affected = delete().await?.rows_affected();
        deleted += affected;
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
