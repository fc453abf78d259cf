//! Backends whose drone is gone: moved to `terminated` with reason `lost`, exactly as a
//! state update would record it.

use super::BackendDatabase;
use crate::error::{skip_undecodable, Error, Result};
use crate::events::{EventBatch, EventWriter};
use crate::types::{BackendName, BackendState, BackendStatus, NodeId, TerminationReason};

impl BackendDatabase<'_> {
    /// Marks the given backends lost: each one that has not terminated moves to
    /// `terminated` with reason [`lost`](TerminationReason::Lost), exactly as
    /// [`update_state`](Self::update_state) would record it (history row, event, key
    /// released). Use it when their drone is gone for good. Returns the backends that were
    /// marked; unknown and already terminated ones are left alone. A backend whose state
    /// keeps changing under the call (its drone is evidently not gone) may be left unmarked
    /// after a few attempts: it is then missing from the result.
    #[tracing::instrument(skip(self), fields(count = backends.len()))]
    pub async fn mark_lost(&self, backends: &[BackendName]) -> Result<Vec<BackendName>> {
        let ids: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        self.mark_lost_ids(&ids).await
    }

    /// Marks every backend of drone `drone` that has not terminated as lost, as
    /// [`mark_lost`](Self::mark_lost) does. Returns the backends that were marked.
    #[tracing::instrument(skip(self), fields(drone = %drone))]
    pub async fn mark_drone_lost(&self, drone: NodeId) -> Result<Vec<BackendName>> {
        let ids = sqlx::query_scalar!(
            r#"
            select b.id from backend b
            where b.drone_id = $1 and b.last_status_number < $2
            "#,
            drone.as_i32(),
            BackendStatus::Terminated.as_int(),
        )
        .fetch_all(self.ctx.pool())
        .await?;
        self.mark_lost_ids(&ids).await
    }

    /// Reads which of `ids` have not terminated and marks them lost, again for any whose
    /// status changed between the read and the update.
    async fn mark_lost_ids(&self, ids: &[String]) -> Result<Vec<BackendName>> {
        let mut marked = Vec::new();
        for _ in 0..MARK_LOST_ROUNDS {
            let alive = sqlx::query_as!(
                AliveRow,
                r#"
                select id, last_status_number, state from backend
                where id = any($1) and last_status_number < $2
                "#,
                ids,
                BackendStatus::Terminated.as_int(),
            )
            .fetch_all(self.ctx.pool())
            .await?;
            if alive.is_empty() {
                break;
            }
            marked.extend(self.terminate_lost(alive).await?);
        }
        Ok(marked)
    }

    /// Moves the given backends to `terminated` (lost) in one statement. Each row is only
    /// updated if its status is still the one read, so a state change that raced in is
    /// never overwritten with a stale `last_status`; such rows are simply read again by the
    /// caller's next round.
    async fn terminate_lost(&self, alive: Vec<AliveRow>) -> Result<Vec<BackendName>> {
        let mut ids = Vec::with_capacity(alive.len());
        let mut expected = Vec::with_capacity(alive.len());
        let mut events = EventBatch::default();
        for row in alive {
            let lost = lost_state(&row);
            // A row whose id is not a valid name cannot be keyed; it is still marked lost,
            // with its event written under its stored id.
            match BackendName::try_from(row.id.clone()) {
                Ok(name) => events.push(&name, &lost)?,
                Err(_) => events.push_raw::<BackendState>(row.id.clone(), &lost)?,
            }
            ids.push(row.id);
            expected.push(row.last_status_number);
        }
        let writer = EventWriter::new(self.ctx.bus());
        let updated = sqlx::query_scalar!(
            r#"
            with input as (
                select * from unnest($1::text[], $2::integer[], $3::jsonb[]) as i(id, expected, state)
            ),
            updated as (
                update backend b set
                    last_status = $4,
                    last_status_number = $5,
                    last_status_time = now(),
                    cluster_address = null,
                    state = i.state
                from input i
                where b.id = i.id and b.last_status_number = i.expected
                returning b.id, i.state
            ),
            history as (
                insert into backend_state (backend_id, state, created_at)
                select id, state, now() from updated
            ),
            released as (
                delete from backend_key where id in (select id from updated)
            ),
            emitted as (
                select plane_write_events(array_agg(e.kind), array_agg(e.key), array_agg(e.data), $9)
                from unnest($6::text[], $7::text[], $8::jsonb[]) as e(kind, key, data)
                where e.key in (select id from updated)
            )
            select id as "id!" from updated, emitted
            "#,
            &ids,
            &expected,
            // One event per row, in the rows' order: its payload is the row's new state.
            events.payloads(),
            BackendStatus::Terminated.to_string(),
            BackendStatus::Terminated.as_int(),
            events.kinds() as &[&str],
            events.keys(),
            events.payloads(),
            writer.wake(),
        )
        .fetch_all(self.ctx.pool())
        .await?;
        if !updated.is_empty() {
            writer.committed();
        }
        Ok(skip_undecodable(updated.into_iter().map(|id| {
            BackendName::try_from(id.clone()).map_err(|e| Error::decode("backend", "id", &id, e))
        })))
    }
}

/// How many times the mark-lost calls re-read backends whose status changed under them.
const MARK_LOST_ROUNDS: usize = 5;

/// A backend that has not terminated, as the mark-lost calls read it.
struct AliveRow {
    id: String,
    last_status_number: i32,
    state: serde_json::Value,
}

/// The terminated state recording that a backend was lost. A row whose state does not
/// decode still gets a correct `last_status` from its status number.
fn lost_state(row: &AliveRow) -> BackendState {
    match serde_json::from_value::<BackendState>(row.state.clone()) {
        Ok(current) => current.to_lost(),
        Err(_) => BackendState::Terminated {
            last_status: BackendStatus::from_int(row.last_status_number)
                .unwrap_or(BackendStatus::Scheduled),
            termination: None,
            reason: Some(TerminationReason::Lost),
            exit_code: None,
        },
    }
}
