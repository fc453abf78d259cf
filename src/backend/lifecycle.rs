//! A backend's state changes as its drone reports them, proxies' keepalives, and live metrics.

use super::BackendDatabase;
use crate::backend::state_write::StateChange;
use crate::error::Result;
use crate::events::{emit_ephemeral, EventWriter};
use crate::metrics::{self, Operation};
use crate::types::{BackendMetricsMessage, BackendName, BackendState, BackendStatus};

impl BackendDatabase<'_> {
    /// Moves the backend to `new_state` if that is a forward transition (a higher status
    /// than its current one). In one statement: updates the row, appends the history, emits
    /// the `backend_state` event, and on `terminated` releases the backend's key. The
    /// event's wake-up is sent after the commit, coalesced with other writers' (see
    /// [`BusConfig::coalesce_wakeups`](crate::events::BusConfig::coalesce_wakeups)).
    ///
    /// Concurrent calls in one process share that statement and its transaction (group
    /// commit, [`Config::write_batching`](crate::Config::write_batching)); each still gets
    /// its own answer, and two changes of one backend are applied in call order.
    ///
    /// Returns false, changing nothing, for an unknown backend or a transition that is not
    /// forward (including a repeat of the current status).
    #[tracing::instrument(skip(self, new_state), fields(backend = %backend, status = %new_state.status()))]
    pub async fn update_state(
        &self,
        backend: &BackendName,
        new_state: &BackendState,
    ) -> Result<bool> {
        let update = self.update_state_inner(backend, new_state);
        metrics::timed(Operation::UpdateState, self.ctx.pool(), update).await
    }

    /// [`update_state`](Self::update_state), without its metrics.
    async fn update_state_inner(
        &self,
        backend: &BackendName,
        new_state: &BackendState,
    ) -> Result<bool> {
        let change = StateChange::new(backend, new_state)?;
        let applied = self.ctx.state_writer().write(change).await?;
        if applied {
            EventWriter::new(self.ctx.bus()).committed();
        } else {
            tracing::debug!("state update refused: unknown backend or not a forward transition");
        }
        Ok(applied)
    }

    /// Records that a proxy holds a connection to the backend now. Returns false for an
    /// unknown or terminated backend.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn update_keepalive(&self, backend: &BackendName) -> Result<bool> {
        let update = self.update_keepalive_inner(backend);
        metrics::timed(Operation::UpdateKeepalive, self.ctx.pool(), update).await
    }

    /// [`update_keepalive`](Self::update_keepalive), without its metrics.
    async fn update_keepalive_inner(&self, backend: &BackendName) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            update backend set last_keepalive = now()
            where id = $1 and last_status_number < $2
            "#,
            backend.as_str(),
            BackendStatus::Terminated.as_int(),
        )
        .execute(&mut *metrics::acquire(Operation::UpdateKeepalive, self.ctx.pool()).await?)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Publishes a backend's metrics to live subscribers (key: the backend name). Metrics
    /// are ephemeral: never stored, lost for nobody but current subscribers.
    #[tracing::instrument(skip_all, fields(backend = %metrics.backend_id))]
    pub async fn publish_metrics(&self, metrics: &BackendMetricsMessage) -> Result<()> {
        emit_ephemeral(self.ctx.pool(), Some(&metrics.backend_id), metrics).await
    }
}
