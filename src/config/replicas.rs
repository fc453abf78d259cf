//! How streaming replicas serve reads ([`Config::replicas`](super::Config::replicas)); the
//! routing and the lag probe are in [`replicas`](crate::replicas).

use std::time::Duration;

/// How streaming replicas are used for reads (see
/// [`OpenOptions::replica_url`](crate::OpenOptions::replica_url), which names them).
/// Without replicas this has no effect.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The most a replica may lag while it serves reads: no answer served by a replica (a
    /// route of a token just revoked, a listing) is older than this. Defaults to 1 s: a
    /// healthy streaming replica replays within milliseconds, so only a replica that is
    /// stuck, paused or overloaded reaches it. Lower it to bound staleness more tightly, but
    /// keep it above two probe intervals: under steady writes a replica measures up to one
    /// interval behind, and it stays usable only for `max_lag` less that after each probe.
    pub max_lag: Duration,
    /// How often each replica's lag is measured: one statement on the primary and one on
    /// each replica per interval, neither touching a table. Defaults to 100 ms. A probe that
    /// takes longer than `max_lag` counts as failed.
    pub probe_interval: Duration,
    /// How long a read waits for a connection of a replica's pool (a free one, or a new one
    /// to open) before it reads on the primary instead and the replica is skipped until its
    /// next good probe. Defaults to 250 ms: opening a connection takes milliseconds, and a
    /// replica that was just stopped refuses connections, which the pool retries until this
    /// runs out, so it is what a read in flight pays when a replica goes down. A replica
    /// whose pool is exhausted for that long sheds its reads to the primary.
    pub acquire_timeout: Duration,
}

impl ReplicaConfig {
    /// Its durations, named as [`Config::validate`](super::Config::validate) names them.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 3] {
        [
            ("replicas.max_lag", self.max_lag),
            ("replicas.probe_interval", self.probe_interval),
            ("replicas.acquire_timeout", self.acquire_timeout),
        ]
    }
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(1),
            probe_interval: Duration::from_millis(100),
            acquire_timeout: Duration::from_millis(250),
        }
    }
}
