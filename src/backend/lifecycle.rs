//! A backend's state changes as its drone reports them, proxies' keepalives, and live metrics.

use super::BackendDatabase;
use crate::error::{to_json, Result};
use crate::events::{emit_ephemeral, EventBatch, EventWriter};
use crate::metrics::{self, Operation};
use crate::types::{BackendMetricsMessage, BackendName, BackendState, BackendStatus};

impl BackendDatabase<'_> {
    /// Moves the backend to `new_state` if that is a forward transition (a higher status
    /// than its current one). In one statement: updates the row, appends the history, emits
    /// the `backend_state` event, and on `terminated` releases the backend's key. The
    /// event's wake-up is sent after the commit, coalesced with other writers' (see
    /// [`BusConfig::coalesce_wakeups`](crate::events::BusConfig::coalesce_wakeups)).
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
        let mut conn = metrics::acquire(Operation::UpdateState, self.ctx.pool()).await?;
        let status = new_state.status();
        let state = to_json("backend state", new_state)?;
        let events = EventBatch::one(backend, new_state)?;
        let writer = EventWriter::new(self.ctx.bus());
        let updated = sqlx::query_scalar!(
            r#"
            with updated as (
                update backend set
                    last_status = $2,
                    last_status_number = $3,
                    last_status_time = now(),
                    cluster_address = $4,
                    state = $5
                where id = $1 and last_status_number < $3
                returning id
            ),
            history as (
                insert into backend_state (backend_id, state, created_at)
                select id, $5, now() from updated
            ),
            released as (
                delete from backend_key
                where $6 and id in (select id from updated)
            ),
            emitted as (
                select plane_write_events(array_agg(e.kind), array_agg(e.key), array_agg(e.data), $10)
                from unnest($7::text[], $8::text[], $9::jsonb[]) as e(kind, key, data)
                where e.key in (select id from updated)
            )
            select count(*) as "updated!" from updated, emitted
            "#,
            backend.as_str(),
            status.to_string(),
            status.as_int(),
            new_state.address().map(|a| a.to_string()),
            state,
            status == BackendStatus::Terminated,
            events.kinds() as &[&str],
            events.keys(),
            events.payloads(),
            writer.wake(),
        )
        .fetch_one(&mut *conn)
        .await?;
        drop(conn);
        if updated == 0 {
            tracing::debug!("state update refused: unknown backend or not a forward transition");
        } else {
            writer.committed();
        }
        Ok(updated > 0)
    }

    /// Records that a proxy holds a connection to the backend now. Returns false for an
    /// unknown or terminated backend.
    #[tracing::instrument(skip(self), fields(backend = %backend_id))]
    pub async fn update_keepalive(&self, backend_id: &BackendName) -> Result<bool> {
        let update = self.update_keepalive_inner(backend_id);
        metrics::timed(Operation::UpdateKeepalive, self.ctx.pool(), update).await
    }

    /// [`update_keepalive`](Self::update_keepalive), without its metrics.
    async fn update_keepalive_inner(&self, backend_id: &BackendName) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            update backend set last_keepalive = now()
            where id = $1 and last_status_number < $2
            "#,
            backend_id.as_str(),
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
