//! Tuning for scheduling, keys and tokens, and the event bus ([`Config`]).
//!
//! One file per part: `bus` ([`BusConfig`], also `plane_db::events::BusConfig`),
//! `scheduler` ([`SchedulerConfig`]), `keys` ([`KeyLeaseConfig`]), `write_batching`
//! ([`WriteBatchConfig`]), `replicas` ([`ReplicaConfig`], also
//! `plane_db::replicas::ReplicaConfig`), and `cleanup` ([`CleanupConfig`], which is not part
//! of [`Config`]: it is passed to each cleanup run).

mod bus;
mod cleanup;
mod keys;
mod replicas;
mod scheduler;
mod write_batching;

use crate::types::ClusterName;
pub use bus::BusConfig;
pub use cleanup::CleanupConfig;
pub use keys::KeyLeaseConfig;
pub use replicas::ReplicaConfig;
pub use scheduler::SchedulerConfig;
use std::time::Duration;
pub use write_batching::WriteBatchConfig;

/// Tuning for scheduling, keys and tokens, and the event bus. `Config::default()` suits a
/// controller; each field documents its default.
#[derive(Debug, Clone)]
pub struct Config {
    /// How the event bus reads and delivers events.
    pub bus: BusConfig,
    /// How drones are picked for new backends.
    pub scheduler: SchedulerConfig,
    /// Key lease durations handed to drones with each spawn.
    pub key_lease: KeyLeaseConfig,
    /// How long a bearer token issued by `connect` routes. Defaults to 1 hour.
    pub token_lifetime: Duration,
    /// The cluster a backend is spawned in when its spawn config names none (Plane's
    /// controller option of the same name). Defaults to none: then a spawn config without
    /// a cluster is [`ConnectError::NoClusterProvided`](crate::ConnectError::NoClusterProvided).
    pub default_cluster: Option<ClusterName>,
    /// Group commit of this process's concurrent writes (`update_state`, and `connect`'s new
    /// backends). On by default.
    pub write_batching: WriteBatchConfig,
    /// How streaming replicas named with
    /// [`ConnectOptions::replica_url`](crate::ConnectOptions::replica_url) serve reads (lag
    /// bound, probe interval). No effect without replicas.
    pub replicas: ReplicaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bus: BusConfig::default(),
            scheduler: SchedulerConfig::default(),
            key_lease: KeyLeaseConfig::default(),
            token_lifetime: Duration::from_secs(3600),
            default_cluster: None,
            write_batching: WriteBatchConfig::default(),
            replicas: ReplicaConfig::default(),
        }
    }
}

/// The longest duration any [`Config`] field may hold: a century. Beyond it a deadline
/// computed from it cannot be represented (`Duration::MAX` overflows every clock), and
/// nothing a controller waits for takes that long.
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Config {
    /// Refuses a configuration that cannot work: a duration beyond [`LONGEST_DURATION`], a
    /// scheduler sample size below 1. [`ConnectOptions::connect`](crate::ConnectOptions::connect)
    /// and [`connect_and_migrate`](crate::ConnectOptions::connect_and_migrate) call it before
    /// they open anything; call it yourself before
    /// [`PlaneDatabase::with_config`](crate::PlaneDatabase::with_config), which cannot fail
    /// (the library does not panic on such values either: deadlines saturate).
    ///
    /// ```
    /// use plane_db::Config;
    /// use std::time::Duration;
    /// let mut config = Config::default();
    /// assert!(config.validate().is_ok());
    /// config.bus.wake_interval = Duration::MAX;
    /// let error = config.validate().unwrap_err();
    /// assert!(error.to_string().contains("bus.wake_interval"));
    /// ```
    pub fn validate(&self) -> crate::Result<()> {
        let durations = [
            ("bus.poll_interval", self.bus.poll_interval),
            ("bus.max_backoff", self.bus.max_backoff),
            ("bus.wake_interval", self.bus.wake_interval),
            (
                "scheduler.drone_heartbeat_timeout",
                self.scheduler.drone_heartbeat_timeout,
            ),
            (
                "scheduler.controller_heartbeat_timeout",
                self.scheduler.controller_heartbeat_timeout,
            ),
            ("key_lease.renew_after", self.key_lease.renew_after),
            (
                "key_lease.soft_terminate_after",
                self.key_lease.soft_terminate_after,
            ),
            (
                "key_lease.hard_terminate_after",
                self.key_lease.hard_terminate_after,
            ),
            (
                "key_lease.expiration_margin",
                self.key_lease.expiration_margin,
            ),
            ("token_lifetime", self.token_lifetime),
            ("replicas.max_lag", self.replicas.max_lag),
            ("replicas.probe_interval", self.replicas.probe_interval),
            ("replicas.acquire_timeout", self.replicas.acquire_timeout),
        ];
        for (argument, value) in durations {
            if value > LONGEST_DURATION {
                return Err(crate::Error::InvalidArgument {
                    argument,
                    reason: format!(
                        "{value:?} is longer than the longest duration allowed ({} years)",
                        LONGEST_DURATION.as_secs() / (365 * 24 * 3600)
                    ),
                });
            }
        }
        self.scheduler.checked_sample_size()?;
        Ok(())
    }
}
