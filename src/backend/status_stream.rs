//! A backend's status history followed by its live changes, each status once, in order.

use super::{read_state_records, BackendDatabase};
use crate::error::{Error, Result};
use crate::events::Subscription;
use crate::replicas::{ReadKind, Reads};
use crate::types::{BackendName, BackendState, BackendStatus, BackendStatusStreamEntry};
use futures_util::Stream;
use std::time::Duration;

impl BackendDatabase<'_> {
    /// The backend's status history followed by its live changes, as a stream that ends
    /// after `terminated` (or if the `PlaneDatabase` is dropped).
    ///
    /// It subscribes before reading the history, so no change falls between the two, and
    /// yields only strictly increasing statuses, so nothing is repeated. If the subscription
    /// lags, the stream re-reads the history instead of ending. A history row that does not
    /// decode is skipped with a warning. Errors with `NotFound` for an unknown backend.
    ///
    /// With streaming replicas, the history may be read on one, but only on one that has
    /// replayed everything the primary had committed when the subscription went live (else
    /// on the primary), so the stream is as complete as without them; the live part is the
    /// primary's. See [`replicas`](crate::replicas).
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn status_stream(
        &self,
        backend: &BackendName,
    ) -> Result<impl Stream<Item = BackendStatusStreamEntry> + Send + 'static> {
        let bus = self.ctx.bus().ensure_started().await?;
        let mut sub = Subscription::<BackendState>::new(bus, Some(backend.to_string()));
        let reads = self.ctx.reads().clone();
        let history = read_history(&reads, backend).await?;
        if history.is_empty() && self.backend(backend).await?.is_none() {
            return Err(Error::NotFound {
                what: "backend",
                id: backend.to_string(),
            });
        }
        let backend = backend.clone();

        Ok(async_stream::stream! {
            let mut forward = Forward::default();
            for entry in history {
                if forward.admit(&entry) {
                    yield entry;
                }
            }
            while !forward.is_terminated() {
                match sub.next().await {
                    None => break,
                    Some(Ok(notification)) => {
                        let entry = BackendStatusStreamEntry::from_state(
                            &notification.payload,
                            notification.timestamp,
                        );
                        if forward.admit(&entry) {
                            yield entry;
                        }
                    }
                    Some(Err(lagged)) => {
                        tracing::info!(%backend, missed = lagged.missed, "status stream lagged; re-reading history");
                        // Boxed: the re-read is rare, and its future inline would make
                        // every open stream's state that much larger.
                        for entry in Box::pin(read_history_retrying(&reads, &backend)).await {
                            if forward.admit(&entry) {
                                yield entry;
                            }
                        }
                    }
                }
            }
        })
    }
}

/// Lets through only entries whose status is beyond every status seen so far: the history
/// read and the live subscription overlap, and this is what removes the overlap.
#[derive(Default)]
struct Forward {
    last: Option<BackendStatus>,
}

impl Forward {
    fn admit(&mut self, entry: &BackendStatusStreamEntry) -> bool {
        let admitted = self.last.is_none_or(|last| entry.status > last);
        if admitted {
            self.last = Some(entry.status);
        }
        admitted
    }

    fn is_terminated(&self) -> bool {
        self.last == Some(BackendStatus::Terminated)
    }
}

/// The backend's state history as status stream entries, complete up to this call: on a
/// replica that has replayed up to the primary's position, else on the primary.
async fn read_history(
    reads: &Reads,
    backend: &BackendName,
) -> Result<Vec<BackendStatusStreamEntry>> {
    Ok(reads
        .run_fenced(ReadKind::StatusStreamHistory, |pool| async move {
            read_state_records(&pool, backend).await
        })
        .await?
        .iter()
        .map(|record| BackendStatusStreamEntry::from_state(&record.state, record.created_at))
        .collect())
}

/// [`read_history`] for a stream that must not end early: retries until the database
/// answers.
async fn read_history_retrying(
    reads: &Reads,
    backend: &BackendName,
) -> Vec<BackendStatusStreamEntry> {
    let mut delay = Duration::from_millis(50);
    loop {
        match read_history(reads, backend).await {
            Ok(history) => return history,
            Err(error) => {
                tracing::warn!(%error, %backend, "re-reading status history failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
