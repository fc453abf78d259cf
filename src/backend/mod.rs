//! Backends: what is stored about them and the reads that list them. The rest of the area
//! is split by idea: `lifecycle` (state changes, keepalives, metrics), `routes` (what a
//! proxy learns from a token), `status_stream` (history then live changes), `lost`
//! (backends whose drone is gone). Their cleanup lives with the rest of cleanup
//! ([`BackendDatabase::cleanup_terminated`] is a door into it).

mod lifecycle;
mod lost;
mod routes;
pub(crate) mod state_write;
mod status_stream;

pub use routes::RouteInfoResult;

use crate::cleanup::{Cleanup, CleanupReport};
use crate::context::Context;
use crate::error::{skip_undecodable, Error, Result};
use crate::replicas::ReadKind;
use crate::types::{BackendName, BackendState, BackendStatus, ClusterName, NodeId, Subdomain};
use crate::validate::check_non_negative;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Map;
use sqlx::{PgPool, Postgres};
use std::time::Duration;

/// Backend operations. Get one from [`PlaneDatabase::backend`](crate::PlaneDatabase::backend).
pub struct BackendDatabase<'a> {
    ctx: &'a Context,
}

/// A backend as stored. Its own name is [`id`](Self::id); other types refer to a backend
/// as `backend_id` (the rule is in [`types`](crate::types#ids)).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendRow {
    /// The backend's name.
    pub id: BackendName,
    /// The cluster it runs in.
    pub cluster: ClusterName,
    /// When its current state was set (database clock).
    pub last_status_time: DateTime<Utc>,
    /// Its current state.
    pub state: BackendState,
    /// The last time a proxy reported a connection to it.
    pub last_keepalive: DateTime<Utc>,
    /// The drone it was scheduled on.
    pub drone_id: NodeId,
    /// When it becomes a termination candidate regardless of activity, if ever.
    pub expiration_time: Option<DateTime<Utc>>,
    /// How long it may go without a keepalive, if limited.
    pub allowed_idle_seconds: Option<i32>,
    /// The database clock when the row was read, to compute ages against.
    /// Not serialized: it belongs to the read, not to the backend (two reads of the same
    /// state serialize the same).
    #[serde(skip_serializing)]
    pub as_of: DateTime<Utc>,
}

impl BackendRow {
    /// How long the backend has been in its current state, as of the read.
    pub fn status_age(&self) -> chrono::Duration {
        self.as_of - self.last_status_time
    }
}

/// The row as selected; converted into [`BackendRow`] in one place, keeping decode errors.
pub(crate) struct RawBackendRow {
    id: String,
    cluster: String,
    last_status_time: DateTime<Utc>,
    state: serde_json::Value,
    last_keepalive: DateTime<Utc>,
    drone_id: i32,
    expiration_time: Option<DateTime<Utc>>,
    allowed_idle_seconds: Option<i32>,
    as_of: DateTime<Utc>,
}

impl TryFrom<RawBackendRow> for BackendRow {
    type Error = Error;

    fn try_from(row: RawBackendRow) -> Result<Self> {
        let id = BackendName::try_from(row.id.clone())
            .map_err(|e| Error::decode("backend", "id", &row.id, e))?;
        let cluster = ClusterName::try_from(row.cluster)
            .map_err(|e| Error::decode("backend", "cluster", &row.id, e))?;
        let state = serde_json::from_value(row.state)
            .map_err(|e| Error::decode("backend", "state", &row.id, e))?;
        Ok(BackendRow {
            id,
            cluster,
            last_status_time: row.last_status_time,
            state,
            last_keepalive: row.last_keepalive,
            drone_id: NodeId::from(row.drone_id),
            expiration_time: row.expiration_time,
            allowed_idle_seconds: row.allowed_idle_seconds,
            as_of: row.as_of,
        })
    }
}

/// A backend that has been idle or alive for too long; see
/// [`BackendDatabase::termination_candidates`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TerminationCandidate {
    /// The backend.
    pub backend_id: BackendName,
    /// Its hard deadline, if any.
    pub expiration_time: Option<DateTime<Utc>>,
    /// Its last keepalive.
    pub last_keepalive: DateTime<Utc>,
    /// How long it may be idle, if limited.
    pub allowed_idle_seconds: Option<i32>,
    /// The database clock at the read.
    /// Not serialized: it belongs to the read, not to the backend (two reads of the same
    /// state serialize the same).
    #[serde(skip_serializing)]
    pub as_of: DateTime<Utc>,
}

/// Which backends [`BackendDatabase::list`] returns; every field left `None` matches all.
///
/// ```
/// use plane_db::backend::BackendFilter;
/// use plane_db::types::BackendStatus;
///
/// let ready = BackendFilter {
///     status: Some(BackendStatus::Ready),
///     limit: Some(100),
///     ..BackendFilter::default()
/// };
/// assert!(ready.cluster.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendFilter {
    /// Only backends of this cluster.
    pub cluster: Option<ClusterName>,
    /// Only backends scheduled on this drone.
    pub drone: Option<NodeId>,
    /// Only backends whose current status is this one.
    pub status: Option<BackendStatus>,
    /// At most this many (in id order). Must not be negative.
    pub limit: Option<i64>,
}

/// One row of a backend's state history; see [`BackendDatabase::state_history`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendStateRecord {
    /// The history row's id (increasing with each change of this backend).
    pub id: i64,
    /// When the state was recorded (database clock).
    pub created_at: DateTime<Utc>,
    /// The state.
    pub state: BackendState,
}

impl<'a> BackendDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }
}

impl BackendDatabase<'_> {
    /// The backend, or `None` if there is no such backend.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn backend(&self, backend: &BackendName) -> Result<Option<BackendRow>> {
        let row = sqlx::query_as!(
            RawBackendRow,
            r#"
            select id, cluster, last_status_time, state, last_keepalive, drone_id,
                   expiration_time, allowed_idle_seconds, now() as "as_of!"
            from backend
            where id = $1
            "#,
            backend.as_str(),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        row.map(BackendRow::try_from).transpose()
    }

    /// Every backend, including terminated ones not yet cleaned up (rows that do not decode
    /// are skipped with a warning). The result grows with
    /// history: prefer [`list_alive_backends_for_drone`](Self::list_alive_backends_for_drone)
    /// on hot paths. The same as [`list`](Self::list) with no filter.
    pub async fn list_backends(&self) -> Result<Vec<BackendRow>> {
        self.list(&BackendFilter::default()).await
    }

    /// The backends matching `filter`, in id order, including terminated ones not yet
    /// cleaned up. Rows that do not decode are skipped with a warning. A negative `limit` is
    /// [`Error::InvalidArgument`]. Served by a streaming replica when one is usable: then as
    /// the database was up to the replica lag bound ago (see [`replicas`](crate::replicas)).
    #[tracing::instrument(skip_all, fields(cluster = ?filter.cluster, drone = ?filter.drone, status = ?filter.status))]
    pub async fn list(&self, filter: &BackendFilter) -> Result<Vec<BackendRow>> {
        if let Some(limit) = filter.limit {
            check_non_negative("limit", limit)?;
        }
        self.ctx
            .reads()
            .run(
                ReadKind::BackendList,
                |_| None,
                |pool| async move { list_backends_on(&pool, filter).await },
            )
            .await
    }

    /// Every state the backend has been in, oldest first. Empty for an unknown backend (and
    /// for one whose history was cleaned up). Rows that do not decode are skipped with a
    /// warning. Served by a streaming replica when one is usable: then as the database was
    /// up to the replica lag bound ago (see [`replicas`](crate::replicas));
    /// [`status_stream`](Self::status_stream) reads the history without that lag.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn state_history(&self, backend: &BackendName) -> Result<Vec<BackendStateRecord>> {
        self.ctx
            .reads()
            .run(
                ReadKind::StateHistory,
                |_| None,
                |pool| async move { read_state_records(&pool, backend).await },
            )
            .await
    }

    /// The backends of drone `drone` that have not terminated, in id order. Rows that do not
    /// decode are skipped with a warning.
    #[tracing::instrument(skip(self), fields(drone = %drone))]
    pub async fn list_alive_backends_for_drone(&self, drone: NodeId) -> Result<Vec<BackendRow>> {
        let rows = alive_for_drone_query(drone)
            .fetch_all(self.ctx.pool())
            .await?;
        Ok(skip_undecodable(rows.into_iter().map(BackendRow::try_from)))
    }

    /// Backends on drone `drone` that have started (not `scheduled`), have not
    /// terminated, and have either gone without a keepalive for longer than they may be
    /// idle or passed their expiration time.
    #[tracing::instrument(skip(self), fields(drone = %drone))]
    pub async fn termination_candidates(&self, drone: NodeId) -> Result<Vec<TerminationCandidate>> {
        let rows = termination_candidates_query(drone)
            .fetch_all(self.ctx.pool())
            .await?;
        Ok(skip_undecodable(rows.into_iter().map(|row| {
            Ok(TerminationCandidate {
                backend_id: BackendName::try_from(row.id.clone())
                    .map_err(|e| Error::decode("backend", "id", &row.id, e))?,
                expiration_time: row.expiration_time,
                last_keepalive: row.last_keepalive,
                allowed_idle_seconds: row.allowed_idle_seconds,
                as_of: row.as_of,
            })
        })))
    }

    /// Deletes backends that terminated longer than `min_age` ago, with their tokens,
    /// actions, state history and expired keys, `batch_size` backends per transaction until
    /// none are left. A backend whose key has not expired is kept (the key still fences it).
    /// Returns what was deleted. A `min_age` beyond about a century counts as a century.
    pub async fn cleanup_terminated(
        &self,
        min_age: Duration,
        batch_size: i32,
    ) -> Result<CleanupReport> {
        Cleanup::new(self.ctx)
            .backends(min_age, batch_size, &mut |_| {})
            .await
    }

    /// [`cleanup_terminated`](Self::cleanup_terminated) with the age in whole days, as
    /// Plane 0.5.5's `cleanup(min_age_days)` takes it. A negative `min_age_days` is
    /// [`Error::InvalidArgument`] (`min_age_days`).
    #[deprecated(
        since = "0.2.0",
        note = "renamed to `cleanup_terminated`, which takes the age as a `Duration`"
    )]
    pub async fn cleanup(&self, min_age_days: i32, batch_size: i32) -> Result<CleanupReport> {
        if min_age_days < 0 {
            return Err(Error::InvalidArgument {
                argument: "min_age_days",
                reason: format!("must not be negative, got {min_age_days}"),
            });
        }
        let days = u64::from(min_age_days.unsigned_abs());
        self.cleanup_terminated(Duration::from_secs(days * 24 * 3600), batch_size)
            .await
    }
}

/// The backends matching `filter`, read on `pool`.
async fn list_backends_on(pool: &PgPool, filter: &BackendFilter) -> Result<Vec<BackendRow>> {
    let rows = sqlx::query_as!(
        RawBackendRow,
        r#"
        select id, cluster, last_status_time, state, last_keepalive, drone_id,
               expiration_time, allowed_idle_seconds, now() as "as_of!"
        from backend
        where ($1::text is null or cluster = $1)
          and ($2::integer is null or drone_id = $2)
          and ($3::integer is null or last_status_number = $3)
        order by id
        limit $4
        "#,
        filter.cluster.as_ref().map(ClusterName::as_str),
        filter.drone.map(NodeId::as_i32),
        filter.status.map(BackendStatus::as_int),
        filter.limit,
    )
    .fetch_all(pool)
    .await?;
    Ok(skip_undecodable(rows.into_iter().map(BackendRow::try_from)))
}

/// The row [`BackendDatabase::termination_candidates`] selects.
pub(crate) struct RawCandidate {
    id: String,
    expiration_time: Option<DateTime<Utc>>,
    allowed_idle_seconds: Option<i32>,
    last_keepalive: DateTime<Utc>,
    as_of: DateTime<Utc>,
}

/// The statement behind [`BackendDatabase::termination_candidates`], built in one place so
/// that the bench can show the plan of this very statement (`testing::bench`).
pub(crate) fn termination_candidates_query(
    drone: NodeId,
) -> Map<'static, Postgres, impl FnMut(PgRow) -> sqlx::Result<RawCandidate> + Send, PgArguments> {
    sqlx::query_as!(
        RawCandidate,
        r#"
        select id, expiration_time, allowed_idle_seconds, last_keepalive, now() as "as_of!"
        from backend
        where drone_id = $1
          and last_status_number > $2
          and last_status_number < $3
          and (now() - last_keepalive > make_interval(secs => allowed_idle_seconds)
               or now() > expiration_time)
        order by id
        "#,
        drone.as_i32(),
        BackendStatus::Scheduled.as_int(),
        BackendStatus::Terminated.as_int(),
    )
}

/// The statement behind [`BackendDatabase::list_alive_backends_for_drone`], built in one
/// place so that the bench can show the plan of this very statement (`testing::bench`).
pub(crate) fn alive_for_drone_query(
    drone: NodeId,
) -> Map<'static, Postgres, impl FnMut(PgRow) -> sqlx::Result<RawBackendRow> + Send, PgArguments> {
    sqlx::query_as!(
        RawBackendRow,
        r#"
        select b.id, b.cluster, b.last_status_time, b.state, b.last_keepalive, b.drone_id,
               b.expiration_time, b.allowed_idle_seconds, now() as "as_of!"
        from backend b
        where b.drone_id = $1 and b.last_status_number < $2
        order by b.id
        "#,
        drone.as_i32(),
        BackendStatus::Terminated.as_int(),
    )
}

/// A backend's identifying columns, decoded in one place for every query that reads them.
pub(crate) struct BackendIdentity {
    pub id: BackendName,
    pub status: BackendStatus,
    pub cluster: ClusterName,
    pub subdomain: Option<Subdomain>,
}

impl BackendIdentity {
    pub(crate) fn decode(
        id: String,
        status_number: i32,
        cluster: String,
        subdomain: Option<String>,
    ) -> Result<Self> {
        let status = BackendStatus::from_int(status_number).ok_or_else(|| {
            Error::decode(
                "backend",
                "last_status_number",
                &id,
                format!("unknown status number {status_number}"),
            )
        })?;
        let cluster = ClusterName::try_from(cluster)
            .map_err(|e| Error::decode("backend", "cluster", &id, e))?;
        let subdomain = subdomain
            .map(Subdomain::try_from)
            .transpose()
            .map_err(|e| Error::decode("backend", "subdomain", &id, e))?;
        let id = BackendName::try_from(id.clone())
            .map_err(|e| Error::decode("backend", "id", &id, e))?;
        Ok(Self {
            id,
            status,
            cluster,
            subdomain,
        })
    }
}

/// The backend's state history in order, skipping (with a warning) rows that do not decode.
async fn read_state_records(
    pool: &PgPool,
    backend: &BackendName,
) -> Result<Vec<BackendStateRecord>> {
    let rows = sqlx::query!(
        r#"
        select id, state, created_at
        from backend_state
        where backend_id = $1
        order by id
        "#,
        backend.as_str(),
    )
    .fetch_all(pool)
    .await?;
    Ok(skip_undecodable(rows.into_iter().map(|row| {
        let state = serde_json::from_value(row.state)
            .map_err(|e| Error::decode("backend_state", "state", row.id, e))?;
        Ok(BackendStateRecord {
            id: row.id,
            created_at: row.created_at,
            state,
        })
    })))
}
