//! Tuning for scheduling, keys and tokens, and the event bus ([`Config`]).

use crate::events::BusConfig;
use crate::replicas::ReplicaConfig;
use crate::types::ClusterName;
use std::time::Duration;

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
            replicas: ReplicaConfig::default(),
        }
    }
}

/// How [`DroneDatabase::pick_for_spawn`](crate::drone::DroneDatabase::pick_for_spawn) chooses a drone.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How many eligible drones are sampled at random; the least loaded of them wins.
    /// Defaults to 2 ("the power of two choices": near-even load without every controller
    /// piling onto the same least-loaded drone). 1 is purely random.
    pub sample_size: i64,
    /// A drone not heard from for this long is not picked. Defaults to 30 s.
    pub drone_heartbeat_timeout: Duration,
    /// A drone whose controller has not heartbeated for this long is not picked. Defaults
    /// to 30 s.
    pub controller_heartbeat_timeout: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            sample_size: 2,
            drone_heartbeat_timeout: Duration::from_secs(30),
            controller_heartbeat_timeout: Duration::from_secs(30),
        }
    }
}

/// The lease of a backend's key, as deadlines relative to its scheduling or to a renewal.
///
/// The drone is told to renew at `renew_after`, to soft-terminate the backend at
/// `soft_terminate_after` and to hard-terminate it at `hard_terminate_after` if renewal
/// failed; the key itself expires (and may be taken over by a new backend) only
/// `expiration_margin` later, [`expires_after`](Self::expires_after) in all. As in Plane 0.5.5
/// (renew 30 s, soft 40 s, hard 50 s, expiry 60 s), a key outlives the hard-terminate
/// deadline, so a backend has been stopped before another can take its key, even if the
/// drone's clock or its connection lags a little.
#[derive(Debug, Clone)]
pub struct KeyLeaseConfig {
    /// When the drone should renew the key. Defaults to 30 s.
    pub renew_after: Duration,
    /// When the drone should soft-terminate the backend if renewal failed. Defaults to 40 s.
    pub soft_terminate_after: Duration,
    /// When the drone should hard-terminate it if renewal failed. Defaults to 50 s.
    pub hard_terminate_after: Duration,
    /// How long after the hard-terminate deadline the key stays held. Defaults to 10 s
    /// (Plane's margin). A renewal within it is granted; a `connect` for the key within it
    /// gets the existing backend. Zero makes the key expire at the hard-terminate deadline.
    pub expiration_margin: Duration,
}

impl KeyLeaseConfig {
    /// How long after its scheduling or renewal a key expires:
    /// `hard_terminate_after + expiration_margin` (60 s by default).
    pub fn expires_after(&self) -> Duration {
        self.hard_terminate_after
            .saturating_add(self.expiration_margin)
    }
}

impl Default for KeyLeaseConfig {
    fn default() -> Self {
        Self {
            renew_after: Duration::from_secs(30),
            soft_terminate_after: Duration::from_secs(40),
            hard_terminate_after: Duration::from_secs(50),
            expiration_margin: Duration::from_secs(10),
        }
    }
}
