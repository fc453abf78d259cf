//! Backend actions: what drones are asked to do (spawn, terminate), queued until acknowledged.
//!
//! Each action is stored in `backend_action` and emitted (kind `backend_action`, keyed by the
//! drone id) in the same statement, so a drone's controller can push it live. Until the drone
//! acknowledges it, [`BackendActionDatabase::pending`] returns it again: that is how an
//! action sent to a drone that was disconnected, or that crashed before acting, is delivered
//! again when it asks next.

use crate::context::Context;
use crate::error::{skip_undecodable, to_json, Error, Result};
use crate::events::{EventWriter, NotificationPayload};
use crate::types::{
    BackendAction, BackendActionMessage, BackendActionName, BackendName, BackendStatus, NodeId,
    TerminationKind, TerminationReason,
};
use crate::validate::check_non_negative;

/// Queued drone actions. Get one from [`PlaneDatabase::backend_action`](crate::PlaneDatabase::backend_action).
pub struct BackendActionDatabase<'a> {
    ctx: &'a Context,
}

/// The outcome of [`BackendActionDatabase::request_termination`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminationRequest {
    /// A terminate action was queued for the backend's drone.
    Requested {
        /// The action's id (the drone acknowledges it by this id).
        action_id: BackendActionName,
        /// The drone that must carry it out.
        drone: NodeId,
    },
    /// The backend has already terminated; nothing was queued.
    AlreadyTerminated,
}

impl<'a> BackendActionDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Asks the drone running `backend` to terminate it (`kind` soft or hard), for `reason`.
    /// The action is persisted and emitted keyed by the drone's id, in one statement. An
    /// unknown backend is [`Error::NotFound`]; a terminated one is
    /// [`TerminationRequest::AlreadyTerminated`].
    ///
    /// This only queues the request: the backend's state changes when its drone reports
    /// them through [`update_state`](crate::backend::BackendDatabase::update_state).
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn request_termination(
        &self,
        backend: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> Result<TerminationRequest> {
        let action_id = BackendActionName::new_random();
        let action = to_json("backend action", &BackendAction::Terminate { kind, reason })?;
        let writer = EventWriter::new(self.ctx.bus());
        let row = sqlx::query!(
            r#"
            with target as (
                -- The lock makes a concurrent termination finish first; the status is then
                -- checked again, so no action is queued for a backend that just terminated.
                select id, drone_id from backend
                where id = $1 and last_status_number < $2
                for no key update
            ),
            queued as (
                insert into backend_action (id, backend_id, drone_id, action)
                select $3, id, drone_id, $4 from target
                returning drone_id
            ),
            emitted as (
                -- The payload (a BackendActionMessage) and its key are built here: the drone
                -- is the backend's, read under the lock above.
                select plane_write_events(array[$5], array[drone_id::text],
                       array[jsonb_build_object('action_id', $3::text, 'backend_id', $1::text,
                                                'drone_id', drone_id, 'action', $4::jsonb)],
                       $6)
                from queued
            )
            select (select drone_id from queued) as "drone_id?",
                   exists (select 1 from backend where id = $1) as "known!",
                   (select count(*) from emitted) as "emitted!"
            "#,
            backend.as_str(),
            BackendStatus::Terminated.as_int(),
            action_id.as_str(),
            action,
            BackendActionMessage::kind(),
            writer.wake(),
        )
        .fetch_one(self.ctx.pool())
        .await?;
        if row.emitted > 0 {
            writer.committed();
        }
        match (row.drone_id, row.known) {
            (Some(drone), _) => Ok(TerminationRequest::Requested {
                action_id,
                drone: NodeId::from(drone),
            }),
            (None, true) => Ok(TerminationRequest::AlreadyTerminated),
            (None, false) => Err(Error::NotFound {
                what: "backend",
                id: backend.to_string(),
            }),
        }
    }

    /// The actions queued for `drone` that it has not acknowledged, oldest first, at most
    /// `limit`. Rows that do not decode are skipped with a warning.
    #[tracing::instrument(skip(self), fields(drone = %drone))]
    pub async fn pending(&self, drone: NodeId, limit: i64) -> Result<Vec<BackendActionMessage>> {
        check_non_negative("limit", limit)?;
        let rows = sqlx::query!(
            r#"
            select id, backend_id, drone_id, action
            from backend_action
            where drone_id = $1 and acked_at is null
            order by created_at, id
            limit $2
            "#,
            drone.as_i32(),
            limit,
        )
        .fetch_all(self.ctx.pool())
        .await?;
        Ok(skip_undecodable(rows.into_iter().map(|row| {
            Ok(BackendActionMessage {
                action_id: BackendActionName::try_from(row.id.clone())
                    .map_err(|e| Error::decode("backend_action", "id", &row.id, e))?,
                backend_id: BackendName::try_from(row.backend_id)
                    .map_err(|e| Error::decode("backend_action", "backend_id", &row.id, e))?,
                drone_id: NodeId::from(row.drone_id),
                action: serde_json::from_value(row.action)
                    .map_err(|e| Error::decode("backend_action", "action", &row.id, e))?,
            })
        })))
    }

    /// Acknowledges action `action_id` on behalf of `drone`. Only the drone the action was
    /// queued for can acknowledge it. Returns true if this call acknowledged it; false if the
    /// action is unknown, belongs to another drone, or was already acknowledged.
    #[tracing::instrument(skip(self), fields(drone = %drone, action = %action_id))]
    pub async fn ack(&self, action_id: &BackendActionName, drone: NodeId) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            update backend_action set acked_at = now()
            where id = $1 and drone_id = $2 and acked_at is null
            "#,
            action_id.as_str(),
            drone.as_i32(),
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }
}
