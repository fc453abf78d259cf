//! How a leader lease is held ([`LeaderConfig`], [`Config::leader`](super::Config::leader)):
//! the lease's duration, how often the leader renews it and followers try to take it, and
//! the margin by which a leader stops before its lease could expire.

use std::time::Duration;

/// How a [`LeaderElection`](crate::leader::LeaderElection) holds its lease (also the
/// cleanup loop's, [`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop)).
/// `LeaderConfig::default()` holds a 30 s lease, renewed every 10 s.
///
/// The leader's death hands the work on within `lease_duration + retry_interval` (when its
/// lease expires, plus at most one wait of a follower); a leader that resigns hands it on at
/// once (its followers are woken by a notification).
///
/// ```
/// use plane_db::LeaderConfig;
/// use std::time::Duration;
/// let mut config = LeaderConfig::default();
/// assert!(config.validate().is_ok());
/// config.renew_interval = Duration::from_secs(40); // longer than the lease
/// let error = config.validate().unwrap_err();
/// assert!(error.to_string().contains("leader.renew_interval"));
/// ```
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// How long a lease lasts after it is taken or renewed (server clock). Defaults to 30 s.
    pub lease_duration: Duration,
    /// How often the leader renews its lease. Defaults to 10 s (a third of the lease, so
    /// two renewals may fail before it runs out). Must be shorter than
    /// `lease_duration - safety_margin`.
    pub renew_interval: Duration,
    /// How often a follower tries to take the lease when nothing wakes it earlier (the
    /// fallback for a lost resignation notice; a follower also wakes when the current lease
    /// is due to expire). Defaults to 10 s.
    pub retry_interval: Duration,
    /// A leader treats itself as leader only until `lease_duration - safety_margin` after it
    /// *sent* its last successful acquire or renewal: the margin absorbs a difference in
    /// clock rate between this process and the database server. Defaults to 2 s. Must be
    /// shorter than `lease_duration`.
    pub safety_margin: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(30),
            renew_interval: Duration::from_secs(10),
            retry_interval: Duration::from_secs(10),
            safety_margin: Duration::from_secs(2),
        }
    }
}

impl LeaderConfig {
    /// A configuration for a lease of `lease_duration`, the others in proportion to it:
    /// renewal and retries every third, a margin of a fifteenth (2 s of 30 s).
    ///
    /// ```
    /// use plane_db::LeaderConfig;
    /// use std::time::Duration;
    /// let config = LeaderConfig::with_lease(Duration::from_secs(3));
    /// assert_eq!(config.renew_interval, Duration::from_secs(1));
    /// assert_eq!(config.safety_margin, Duration::from_millis(200));
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn with_lease(lease_duration: Duration) -> Self {
        Self {
            lease_duration,
            renew_interval: lease_duration / 3,
            retry_interval: lease_duration / 3,
            safety_margin: lease_duration / 15,
        }
    }

    /// Its durations, named as [`Config::validate`](super::Config::validate) names them.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 4] {
        [
            ("leader.lease_duration", self.lease_duration),
            ("leader.renew_interval", self.renew_interval),
            ("leader.retry_interval", self.retry_interval),
            ("leader.safety_margin", self.safety_margin),
        ]
    }

    /// Refuses a configuration under which a leader could not keep its lease or a follower
    /// would never retry: a zero lease, renewal or retry interval, a margin not shorter than
    /// the lease, a renewal interval not shorter than the lease less the margin, or any
    /// duration beyond [`LONGEST_DURATION`](crate::LONGEST_DURATION).
    /// [`Config::validate`](super::Config::validate) calls it, and so does every election
    /// before it starts. [`Error::InvalidArgument`](crate::Error::InvalidArgument) names the
    /// field.
    pub fn validate(&self) -> crate::Result<()> {
        let invalid = |argument: &'static str, reason: String| {
            Err(crate::Error::InvalidArgument { argument, reason })
        };
        for (argument, value) in self.durations() {
            if value > crate::LONGEST_DURATION {
                return invalid(
                    argument,
                    format!("{value:?} is longer than the longest duration allowed"),
                );
            }
        }
        for (argument, value) in [
            ("leader.lease_duration", self.lease_duration),
            ("leader.renew_interval", self.renew_interval),
            ("leader.retry_interval", self.retry_interval),
        ] {
            if value.is_zero() {
                return invalid(argument, "must be greater than zero".to_string());
            }
        }
        if self.safety_margin >= self.lease_duration {
            return invalid(
                "leader.safety_margin",
                format!(
                    "{:?} must be shorter than the lease ({:?})",
                    self.safety_margin, self.lease_duration
                ),
            );
        }
        let usable = self.lease_duration - self.safety_margin;
        if self.renew_interval >= usable {
            return invalid(
                "leader.renew_interval",
                format!(
                    "{:?} must be shorter than the lease less the safety margin ({usable:?}), \
                     or the leader would stop before it renews",
                    self.renew_interval
                ),
            );
        }
        Ok(())
    }
}
