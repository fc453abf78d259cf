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

impl SchedulerConfig {
    /// [`sample_size`](Self::sample_size), if it is at least 1.
    pub(crate) fn checked_sample_size(&self) -> crate::Result<i64> {
        if self.sample_size < 1 {
            return Err(crate::Error::InvalidArgument {
                argument: "scheduler.sample_size",
                reason: format!("must be at least 1, got {}", self.sample_size),
            });
        }
        Ok(self.sample_size)
    }
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

/// Group commit: concurrent writes of one process share one statement and one transaction
/// ([`Config::write_batching`]).
///
/// With it, concurrent [`update_state`](crate::backend::BackendDatabase::update_state) calls
/// are combined, and so are the new backends of concurrent
/// [`connect`](crate::PlaneDatabase::connect) calls (each kind in batches of its own, with
/// the same settings): up to [`max_alone`](Self::max_alone) calls at once write alone, at
/// once; calls beyond that queue, and one statement writes everything queued; calls
/// arriving during that one form the next batch. No call waits for company (a batch closes
/// as soon as no other call is waiting), so batching adds no delay at low load and saves a
/// transaction per call under load. Each call still gets its own answer, and every promise
/// of the single-call path holds (changes of one backend are applied in call order; one
/// backend per key, with its own fencing token; a failing call fails only itself), and a
/// row locked by another transaction holds back only the calls that change that row (see
/// [`lock_timeout`](Self::lock_timeout)); RELIABILITY.md ("What we promise", group commit)
/// says how failures are handled.
#[derive(Debug, Clone)]
pub struct WriteBatchConfig {
    /// Whether concurrent calls are combined. Defaults to true; when false, each call runs
    /// its own statement on its own pooled connection.
    pub enabled: bool,
    /// The most changes one batch holds; more waiting calls go into the next batch. Defaults
    /// to 64; 0 counts as 1.
    pub max_batch_size: usize,
    /// How many calls may write their change alone at once, each in its own transaction,
    /// before further calls queue theirs for a batch (one batch is written at a time).
    /// Defaults to 1: a call made while another is being written waits and joins the next
    /// batch, which packs the most changes into each transaction. 0 counts as 1. Measured
    /// on two cores (BENCHMARKS.md, "Group commit"), against one transaction per call: with
    /// 1, about 2.7x at 16 and 3.4x at 32 writers but about 0.7x at 4; with 4, 1.04x at 4
    /// writers but only about 1.7x and 2.0x at 16 and 32.
    pub max_alone: usize,
    /// How long a batch's statements wait for a row lock held by another transaction
    /// (Postgres's `lock_timeout`, set on the batch writer's connection and put back before
    /// it returns to the pool). Defaults to 500 ms; zero leaves the session's own setting.
    /// Off (zero) with [`PoolerMode::Transaction`](crate::PoolerMode::Transaction), where a
    /// session setting would reach other clients of the pooler's server connection (with a
    /// pool of your own behind such a pooler, set it to zero yourself).
    /// A batch that waits longer is rolled back and its changes are written alone,
    /// concurrently (one after the other for the same backend or key), each waiting for its
    /// lock as a lone call would: a lock held elsewhere holds back the calls that need that
    /// row, not the batch. (`update_state`'s batches do not wait for backend rows at all:
    /// they skip rows locked elsewhere and write those changes alone; the timeout guards the
    /// other rows a batch locks, such as keys.)
    pub lock_timeout: Duration,
    /// The most calls group commit holds at once (queued for a batch, being written in one,
    /// or handed out of one to be written alone); a call that finds no room waits for it,
    /// in the order calls came. Calls writing alone at once
    /// ([`max_alone`](Self::max_alone)) are not counted. Defaults to 4096; 0 counts as 1.
    pub max_queued: usize,
}

impl Default for WriteBatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_size: 64,
            max_alone: 1,
            lock_timeout: Duration::from_millis(500),
            max_queued: 4096,
        }
    }
}
