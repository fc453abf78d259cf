//! Probing: each replica's lag, measured against samples of the primary's WAL position, and
//! what a probe's answer does to the replica's use.

use super::routing::{Replica, ReplicaSet};
use super::ReplicaConfig;
use crate::metrics;
use sqlx::PgPool;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default, Clone)]
pub(super) struct ProbeState {
    pub(super) lag: Option<Duration>,
    pub(super) lag_bytes: Option<u64>,
    pub(super) probed_at: Option<Instant>,
    pub(super) last_problem: Option<String>,
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

impl ProbeTask {
    /// No probes (no replicas).
    pub(super) fn none() -> Self {
        Self(Vec::new())
    }
}

/// Starts the probes of `set` against `primary`: one task samples the primary's position,
/// one per replica measures its lag. Needs a Tokio runtime.
pub(super) fn start(primary: &PgPool, set: &Arc<ReplicaSet>, config: &ReplicaConfig) -> ProbeTask {
    let samples = Arc::new(Mutex::new(Samples::new(config)));
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
    ProbeTask(tasks)
}

impl Replica {
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
