//! Key lease durations handed to drones with each spawn ([`Config::key_lease`](super::Config::key_lease)).

use std::time::Duration;

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
    /// Its durations, named as [`Config::validate`](super::Config::validate) names them.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 4] {
        [
            ("key_lease.renew_after", self.renew_after),
            ("key_lease.soft_terminate_after", self.soft_terminate_after),
            ("key_lease.hard_terminate_after", self.hard_terminate_after),
            ("key_lease.expiration_margin", self.expiration_margin),
        ]
    }

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
