//! How drones are picked for new backends ([`Config::scheduler`](super::Config::scheduler)).

use std::time::Duration;

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
    /// Its durations, named as [`Config::validate`](super::Config::validate) names them.
    pub(super) fn durations(&self) -> [(&'static str, Duration); 2] {
        [
            (
                "scheduler.drone_heartbeat_timeout",
                self.drone_heartbeat_timeout,
            ),
            (
                "scheduler.controller_heartbeat_timeout",
                self.controller_heartbeat_timeout,
            ),
        ]
    }

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
