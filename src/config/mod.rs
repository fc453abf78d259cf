//! Tuning for scheduling, keys and tokens, and the event bus ([`Config`]).
//!
//! One file per part: `bus` ([`BusConfig`], also `plane_db::events::BusConfig`),
//! `scheduler` ([`SchedulerConfig`]), `keys` ([`KeyLeaseConfig`]), `write_batching`
//! ([`WriteBatchConfig`]), `leader` ([`LeaderConfig`]), `replicas` ([`ReplicaConfig`], also
//! `plane_db::replicas::ReplicaConfig`), and `cleanup` ([`CleanupConfig`], which is not part
//! of [`Config`]: it is passed to each cleanup run).

mod bus;
mod cleanup;
mod keys;
mod leader;
mod replicas;
mod scheduler;
mod write_batching;

use crate::types::ClusterName;
pub use bus::BusConfig;
pub use cleanup::CleanupConfig;
pub use keys::KeyLeaseConfig;
pub use leader::LeaderConfig;
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
    /// [`OpenOptions::replica_url`](crate::OpenOptions::replica_url) serve reads (lag
    /// bound, probe interval). No effect without replicas.
    pub replicas: ReplicaConfig,
    /// The leader lease that elects one controller of the fleet to run cleanup
    /// ([`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop)) and
    /// any other [`LeaderElection`](crate::leader::LeaderElection): a 30 s lease renewed
    /// every 10 s by default.
    pub leader: LeaderConfig,
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
            leader: LeaderConfig::default(),
        }
    }
}

/// The longest duration any [`Config`] field may hold: a century. Beyond it a deadline
/// computed from it cannot be represented (`Duration::MAX` overflows every clock), and
/// nothing a controller waits for takes that long.
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Config {
    /// Refuses a configuration that cannot work: a duration beyond [`LONGEST_DURATION`], a
    /// scheduler sample size below 1, a leader lease that could not be kept
    /// ([`LeaderConfig::validate`]). [`OpenOptions::open`](crate::OpenOptions::open)
    /// and [`open_and_migrate`](crate::OpenOptions::open_and_migrate) call it before
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
        // Part by part, in the order of the fields; the first one too long is named.
        let durations = self
            .bus
            .durations()
            .into_iter()
            .chain(self.scheduler.durations())
            .chain(self.key_lease.durations())
            .chain([("token_lifetime", self.token_lifetime)])
            .chain(self.replicas.durations())
            .chain(self.leader.durations());
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
        self.leader.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duration field of a [`Config`].
    type Field = fn(&mut Config) -> &mut Duration;

    #[test]
    fn validate_names_each_duration_beyond_the_longest() {
        let fields: [(&str, Field); 17] = [
            ("bus.poll_interval", |c| &mut c.bus.poll_interval),
            ("bus.max_backoff", |c| &mut c.bus.max_backoff),
            ("bus.wake_interval", |c| &mut c.bus.wake_interval),
            ("scheduler.drone_heartbeat_timeout", |c| {
                &mut c.scheduler.drone_heartbeat_timeout
            }),
            ("scheduler.controller_heartbeat_timeout", |c| {
                &mut c.scheduler.controller_heartbeat_timeout
            }),
            ("key_lease.renew_after", |c| &mut c.key_lease.renew_after),
            ("key_lease.soft_terminate_after", |c| {
                &mut c.key_lease.soft_terminate_after
            }),
            ("key_lease.hard_terminate_after", |c| {
                &mut c.key_lease.hard_terminate_after
            }),
            ("key_lease.expiration_margin", |c| {
                &mut c.key_lease.expiration_margin
            }),
            ("token_lifetime", |c| &mut c.token_lifetime),
            ("replicas.max_lag", |c| &mut c.replicas.max_lag),
            ("replicas.probe_interval", |c| {
                &mut c.replicas.probe_interval
            }),
            ("replicas.acquire_timeout", |c| {
                &mut c.replicas.acquire_timeout
            }),
            ("leader.lease_duration", |c| &mut c.leader.lease_duration),
            ("leader.renew_interval", |c| &mut c.leader.renew_interval),
            ("leader.retry_interval", |c| &mut c.leader.retry_interval),
            ("leader.safety_margin", |c| &mut c.leader.safety_margin),
        ];
        for (name, field) in fields {
            let mut config = Config::default();
            *field(&mut config) = LONGEST_DURATION;
            // A leader's renewal or margin as long as the lease itself is refused for that
            // (leader_config_refuses_a_lease_it_cannot_keep), not for its length.
            if !name.starts_with("leader.") || name == "leader.lease_duration" {
                assert!(config.validate().is_ok(), "{name} at the longest");
            }
            *field(&mut config) = Duration::MAX;
            match config.validate() {
                Err(crate::Error::InvalidArgument { argument, .. }) => assert_eq!(argument, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        // The first field in order is named; the sample size is checked after every duration.
        let mut config = Config::default();
        config.scheduler.sample_size = 0;
        config.replicas.max_lag = Duration::MAX;
        config.bus.poll_interval = Duration::MAX;
        match config.validate() {
            Err(crate::Error::InvalidArgument { argument, .. }) => {
                assert_eq!(argument, "bus.poll_interval")
            }
            other => panic!("{other:?}"),
        }
        config = Config::default();
        config.scheduler.sample_size = 0;
        config.replicas.max_lag = Duration::MAX;
        match config.validate() {
            Err(crate::Error::InvalidArgument { argument, .. }) => {
                assert_eq!(argument, "replicas.max_lag")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leader_config_refuses_a_lease_it_cannot_keep() {
        let name = |config: &Config| match config.validate() {
            Err(crate::Error::InvalidArgument { argument, .. }) => argument,
            other => panic!("{other:?}"),
        };
        let mut config = Config::default();
        config.leader.lease_duration = Duration::ZERO;
        assert_eq!(name(&config), "leader.lease_duration");
        config.leader = LeaderConfig::default();
        config.leader.retry_interval = Duration::ZERO;
        assert_eq!(name(&config), "leader.retry_interval");
        config.leader = LeaderConfig::default();
        config.leader.safety_margin = config.leader.lease_duration;
        assert_eq!(name(&config), "leader.safety_margin");
        config.leader = LeaderConfig::default();
        // 28 s usable of 30: a renewal every 28 s would come too late.
        config.leader.renew_interval = Duration::from_secs(28);
        assert_eq!(name(&config), "leader.renew_interval");
        config.leader.renew_interval = Duration::from_secs(27);
        assert!(config.validate().is_ok());
        let short = LeaderConfig::with_lease(Duration::from_millis(300));
        assert!(short.validate().is_ok(), "{short:?}");
    }
}
