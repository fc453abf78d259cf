//! Exponential backoff for the bus's retries, cut short when the bus shuts down.

use super::registry::Shared;
use std::time::Duration;

/// Exponential backoff from 50 ms up to a cap.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) const START: Duration = Duration::from_millis(50);

    pub(super) fn new(max: Duration) -> Self {
        Self {
            next: Self::START,
            max,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::START;
    }

    pub(super) async fn wait(&mut self, shared: &Shared) {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.closed() => {}
        }
    }
}
