//! The event bus's tuning knobs ([`Config::bus`](super::Config::bus)).

use std::time::Duration;

/// Tuning of the event bus. The defaults suit a controller; each knob says what it costs.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How often the bus reads the `event` table even without a wake-up. Wake-ups normally
    /// arrive within a millisecond; this only bounds the delay if one is lost. Defaults to 1 s;
    /// each poll is one cheap indexed query.
    pub poll_interval: Duration,
    /// How many undelivered events one subscription may hold. Beyond it the subscription is
    /// paused (nothing more is queued for it); once its consumer has read what it holds, it
    /// reads the stored events it did not get from the `event` table, a page at a time, and
    /// goes on live (see [the promises](crate::events#promises)). Memory is used only for events
    /// actually queued. Defaults to 10,000; 0 counts as 1.
    pub max_pending_per_subscription: usize,
    /// How many rows one read of the `event` table fetches at most; a larger backlog is read
    /// in several pages. Defaults to 1,000; values below 1 count as 1.
    pub fetch_batch_size: i64,
    /// How many bytes of payload one page of a read holds at most (as stored:
    /// `pg_column_size` of the `data` column), beyond its first row: a backlog of large events
    /// is read in more, smaller pages, so the reader's memory stays bounded by bytes as well
    /// as rows. Defaults to 8 MiB.
    pub max_page_bytes: usize,
    /// The longest wait between reconnection attempts of the listening connection or retries
    /// of a failed read (the wait doubles from 50 ms up to this). Defaults to 1 s: after a
    /// failover of a few seconds, a longer cap left subscribers waiting up to that long after
    /// writes resumed (measured on Patroni with 5 s: the first event 3.1 s after the first
    /// write), while one attempt a second per controller costs the server nothing.
    pub max_backoff: Duration,
    /// Whether this process's own writers (`update_state`, `connect`) coalesce their
    /// wake-ups. When true (the default) their transactions issue no NOTIFY; after each
    /// commit the writer wakes this process's bus directly, and one background task sends a
    /// single `NOTIFY plane_events` (its payload only identifies this bus) for all commits
    /// since its previous one, so that other processes wake too. This takes Postgres's
    /// commit-time notification lock out of the writers' commits, which otherwise serialises
    /// concurrent writers. When false, every writing transaction notifies from the `event`
    /// trigger (one NOTIFY per commit). Either way this changes latency and throughput only
    /// (see [the promises](crate::events#promises)).
    pub coalesce_wakeups: bool,
    /// With [`coalesce_wakeups`](Self::coalesce_wakeups), the shortest time between two
    /// wake-ups this process sends to others: commits in between share the next one. Defaults
    /// to 1 ms, which bounds the NOTIFYs a busy process sends to about 1,000 per second (each
    /// one a transaction that takes Postgres's notification lock and wakes every listener)
    /// and adds at most about that much to the delivery latency seen by other processes
    /// (this process's own bus is woken at each commit, without waiting).
    pub wake_interval: Duration,
}

impl BusConfig {
    /// Its durations, named as [`Config::validate`](super::Config::validate) names them.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 3] {
        [
            ("bus.poll_interval", self.poll_interval),
            ("bus.max_backoff", self.max_backoff),
            ("bus.wake_interval", self.wake_interval),
        ]
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_pending_per_subscription: 10_000,
            fetch_batch_size: 1_000,
            max_page_bytes: 8 * 1024 * 1024,
            max_backoff: Duration::from_secs(1),
            coalesce_wakeups: true,
            wake_interval: Duration::from_millis(1),
        }
    }
}
