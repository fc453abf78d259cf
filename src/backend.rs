//! Backends: lifecycle, status streams, routes for proxies, keepalives, termination
//! candidates and cleanup.

use crate::error::{
    check_batch_size, check_non_negative, skip_undecodable, to_json, Error, Result,
};
use crate::events::{emit_ephemeral, NotificationPayload};
use crate::metrics::{self, Operation};
use crate::types::{
    BackendAddr, BackendMetricsMessage, BackendName, BackendState, BackendStatus,
    BackendStatusStreamEntry, BearerToken, ClusterName, DroneName, NodeId, RouteInfo, SecretToken,
    Subdomain, TerminationReason,
};
use crate::PlaneDatabase;
use chrono::{DateTime, Utc};
use futures_util::Stream;
use sqlx::PgPool;
use std::time::Duration;

/// Backend operations. Get one from [`PlaneDatabase::backend`].
pub struct BackendDatabase<'a> {
    db: &'a PlaneDatabase,
}

/// A backend as stored.
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
struct RawBackendRow {
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

/// What a proxy learns from a bearer token.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteInfoResult {
    /// Unknown or expired token, or a backend that is terminating or terminated.
    NotFound,
    /// The backend exists but is not ready yet: wait for it (e.g. on its status stream).
    Pending(PartialRouteInfo),
    /// The backend is ready at this address.
    Available(RouteInfo),
}

/// Everything about a route except the address, which is known once the backend is ready.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialRouteInfo {
    /// The backend.
    pub backend_id: BackendName,
    /// The secret handed to the backend with each request (empty for static tokens).
    pub secret_token: SecretToken,
    /// The backend's cluster.
    pub cluster: ClusterName,
    /// The user the token was issued to.
    pub user: Option<String>,
    /// The JSON passed to the backend with each request.
    pub user_data: Option<serde_json::Value>,
    /// The backend's subdomain, if any.
    pub subdomain: Option<Subdomain>,
}

impl PartialRouteInfo {
    /// Completes the route with the backend's address.
    pub fn with_address(self, address: BackendAddr) -> RouteInfo {
        RouteInfo {
            backend_id: self.backend_id,
            address,
            secret_token: self.secret_token,
            cluster: self.cluster,
            user: self.user,
            user_data: self.user_data,
            subdomain: self.subdomain,
        }
    }
}

/// What one [`BackendDatabase::cleanup`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CleanupReport {
    /// Terminated backends deleted.
    pub backends: u64,
    /// Their state history rows.
    #[serde(rename = "backend_states")]
    pub states: u64,
    /// Their tokens.
    #[serde(rename = "backend_tokens")]
    pub tokens: u64,
    /// Their actions.
    #[serde(rename = "backend_actions")]
    pub actions: u64,
    /// Their (expired) keys.
    #[serde(rename = "backend_keys")]
    pub keys: u64,
    /// How many batches (transactions) it took.
    #[serde(rename = "backend_batches")]
    pub batches: u64,
}

impl<'a> BackendDatabase<'a> {
    pub(crate) fn new(db: &'a PlaneDatabase) -> Self {
        Self { db }
    }

    /// The backend's status history followed by its live changes, as a stream that ends
    /// after `terminated` (or if the `PlaneDatabase` is dropped).
    ///
    /// It subscribes before reading the history, so no change falls between the two, and
    /// yields only strictly increasing statuses, so nothing is repeated. If the subscription
    /// lags, the stream re-reads the history instead of ending. A history row that does not
    /// decode is skipped with a warning. Errors with `NotFound` for an unknown backend.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn status_stream(
        &self,
        backend: &BackendName,
    ) -> Result<impl Stream<Item = BackendStatusStreamEntry> + Send + 'static> {
        let mut sub = self
            .db
            .subscribe_with_key::<BackendState>(backend.as_str())
            .await?;
        let pool = self.db.pool().clone();
        let history = read_history(&pool, backend).await?;
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
                        for entry in read_history_retrying(&pool, &backend).await {
                            if forward.admit(&entry) {
                                yield entry;
                            }
                        }
                    }
                }
            }
        })
    }

    /// The backend, or `None` if there is no such backend.
    #[tracing::instrument(skip(self), fields(backend = %backend_id))]
    pub async fn backend(&self, backend_id: &BackendName) -> Result<Option<BackendRow>> {
        let row = sqlx::query_as!(
            RawBackendRow,
            r#"
            select id, cluster, last_status_time, state, last_keepalive, drone_id,
                   expiration_time, allowed_idle_seconds, now() as "as_of!"
            from backend
            where id = $1
            "#,
            backend_id.as_str(),
        )
        .fetch_optional(self.db.pool())
        .await?;
        row.map(BackendRow::try_from).transpose()
    }

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
        metrics::timed(Operation::UpdateState, self.db.pool(), update).await
    }

    /// [`update_state`](Self::update_state), without its metrics.
    async fn update_state_inner(
        &self,
        backend: &BackendName,
        new_state: &BackendState,
    ) -> Result<bool> {
        let mut conn = metrics::acquire(Operation::UpdateState, self.db.pool()).await?;
        let status = new_state.status();
        let state = to_json("backend state", new_state)?;
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
            wake as (
                select set_config('plane.event_wake', $8, true)
            ),
            emitted as (
                insert into event (kind, key, data, created_at)
                select $7, id, $5, now() from updated, wake
            )
            select count(*) as "updated!" from updated
            "#,
            backend.as_str(),
            status.to_string(),
            status.as_int(),
            new_state.address().map(|a| a.to_string()),
            state,
            status == BackendStatus::Terminated,
            BackendState::kind(),
            self.db.event_wake_setting(),
        )
        .fetch_one(&mut *conn)
        .await?;
        drop(conn);
        if updated == 0 {
            tracing::debug!("state update refused: unknown backend or not a forward transition");
        } else {
            self.db.events_committed();
        }
        Ok(updated > 0)
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
    /// [`Error::InvalidArgument`].
    #[tracing::instrument(skip_all, fields(cluster = ?filter.cluster, drone = ?filter.drone, status = ?filter.status))]
    pub async fn list(&self, filter: &BackendFilter) -> Result<Vec<BackendRow>> {
        if let Some(limit) = filter.limit {
            check_non_negative("limit", limit)?;
        }
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
        .fetch_all(self.db.pool())
        .await?;
        Ok(decode_rows(rows))
    }

    /// Every state the backend has been in, oldest first. Empty for an unknown backend (and
    /// for one whose history was cleaned up). Rows that do not decode are skipped with a
    /// warning.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn state_history(&self, backend: &BackendName) -> Result<Vec<BackendStateRecord>> {
        read_state_records(self.db.pool(), backend).await
    }

    /// The backends of drone `drone` in `cluster` that have not terminated.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, drone = %drone))]
    pub async fn list_alive_backends_for_drone(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Result<Vec<BackendRow>> {
        let rows = sqlx::query_as!(
            RawBackendRow,
            r#"
            select b.id, b.cluster, b.last_status_time, b.state, b.last_keepalive, b.drone_id,
                   b.expiration_time, b.allowed_idle_seconds, now() as "as_of!"
            from backend b
            where b.drone_id = (select n.id from node n where n.name = $1 and n.cluster = $2)
              and b.last_status_number < $3
            order by b.id
            "#,
            drone.as_str(),
            cluster.as_str(),
            BackendStatus::Terminated.as_int(),
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(decode_rows(rows))
    }

    /// The route for a static token (`s.…`), which is stored on the backend row.
    #[tracing::instrument(skip_all, fields(backend = tracing::field::Empty))]
    pub async fn route_info_for_static_token(
        &self,
        token: &BearerToken,
    ) -> Result<RouteInfoResult> {
        let lookup = self.route_info_for_static_token_inner(token);
        metrics::timed(Operation::RouteInfoForStaticToken, self.db.pool(), lookup).await
    }

    /// [`route_info_for_static_token`](Self::route_info_for_static_token), without its
    /// metrics.
    async fn route_info_for_static_token_inner(
        &self,
        token: &BearerToken,
    ) -> Result<RouteInfoResult> {
        // A token is client input. One with a NUL cannot be stored (Postgres text refuses
        // it), so it matches nothing; asking would make the server refuse the parameter and
        // turn an unknown token into a database error.
        if !token.is_static() || token.as_str().contains('\0') {
            return Ok(RouteInfoResult::NotFound);
        }
        let row = sqlx::query!(
            r#"
            select id, cluster, last_status_number, cluster_address, subdomain
            from backend
            where static_token = $1
            "#,
            token.as_str(),
        )
        .fetch_optional(
            &mut *metrics::acquire(Operation::RouteInfoForStaticToken, self.db.pool()).await?,
        )
        .await?;
        let Some(row) = row else {
            return Ok(RouteInfoResult::NotFound);
        };
        tracing::Span::current().record("backend", row.id.as_str());
        route_result(RouteParts {
            backend_id: row.id,
            cluster: row.cluster,
            status_number: row.last_status_number,
            address: row.cluster_address,
            subdomain: row.subdomain,
            secret_token: String::new(),
            user: None,
            user_data: None,
        })
    }

    /// The route for a bearer token: `NotFound` for an unknown or expired token or a
    /// terminating/terminated backend, `Pending` before the backend is ready, `Available`
    /// once it is. Static tokens are looked up on the backend row.
    #[tracing::instrument(skip_all, fields(backend = tracing::field::Empty))]
    pub async fn route_info_for_token(&self, token: &BearerToken) -> Result<RouteInfoResult> {
        let lookup = self.route_info_for_token_inner(token);
        metrics::timed(Operation::RouteInfoForToken, self.db.pool(), lookup).await
    }

    /// [`route_info_for_token`](Self::route_info_for_token), without its metrics.
    async fn route_info_for_token_inner(&self, token: &BearerToken) -> Result<RouteInfoResult> {
        if token.is_static() {
            return self.route_info_for_static_token(token).await;
        }
        let digest = token.digest();
        let row = sqlx::query!(
            r#"
            select t.backend_id, t.username, t.auth, t.secret_token,
                   b.cluster, b.last_status_number, b.cluster_address, b.subdomain
            from token t
            join backend b on b.id = t.backend_id
            where t.token_digest = $1 and t.expiration_time > now()
            "#,
            digest.as_slice(),
        )
        .fetch_optional(&mut *metrics::acquire(Operation::RouteInfoForToken, self.db.pool()).await?)
        .await?;
        let Some(row) = row else {
            return Ok(RouteInfoResult::NotFound);
        };
        tracing::Span::current().record("backend", row.backend_id.as_str());
        route_result(RouteParts {
            backend_id: row.backend_id,
            cluster: row.cluster,
            status_number: row.last_status_number,
            address: row.cluster_address,
            subdomain: row.subdomain,
            secret_token: row.secret_token,
            user: row.username,
            user_data: Some(row.auth),
        })
    }

    /// Records that a proxy holds a connection to the backend now. Returns false for an
    /// unknown or terminated backend.
    #[tracing::instrument(skip(self), fields(backend = %backend_id))]
    pub async fn update_keepalive(&self, backend_id: &BackendName) -> Result<bool> {
        let update = self.update_keepalive_inner(backend_id);
        metrics::timed(Operation::UpdateKeepalive, self.db.pool(), update).await
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
        .execute(&mut *metrics::acquire(Operation::UpdateKeepalive, self.db.pool()).await?)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Publishes a backend's metrics to live subscribers (key: the backend name). Metrics
    /// are ephemeral: never stored, lost for nobody but current subscribers.
    #[tracing::instrument(skip_all, fields(backend = %metrics.backend_id))]
    pub async fn publish_metrics(&self, metrics: &BackendMetricsMessage) -> Result<()> {
        emit_ephemeral(self.db.pool(), Some(metrics.backend_id.as_str()), metrics).await
    }

    /// Backends on drone `drone_id` that have started (not `scheduled`), have not
    /// terminated, and have either gone without a keepalive for longer than they may be
    /// idle or passed their expiration time.
    #[tracing::instrument(skip(self), fields(drone = %drone_id))]
    pub async fn termination_candidates(
        &self,
        drone_id: NodeId,
    ) -> Result<Vec<TerminationCandidate>> {
        let rows = sqlx::query!(
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
            drone_id.as_i32(),
            BackendStatus::Scheduled.as_int(),
            BackendStatus::Terminated.as_int(),
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match BackendName::try_from(row.id.clone()) {
                Ok(backend_id) => Some(TerminationCandidate {
                    backend_id,
                    expiration_time: row.expiration_time,
                    last_keepalive: row.last_keepalive,
                    allowed_idle_seconds: row.allowed_idle_seconds,
                    as_of: row.as_of,
                }),
                Err(error) => {
                    tracing::warn!(%error, id = row.id, "skipping termination candidate with a bad name");
                    None
                }
            })
            .collect())
    }

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

    /// Marks every backend of drone `drone` in `cluster` that has not terminated as lost, as
    /// [`mark_lost`](Self::mark_lost) does. Returns the backends that were marked.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, drone = %drone))]
    pub async fn mark_drone_lost(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Result<Vec<BackendName>> {
        let ids = sqlx::query_scalar!(
            r#"
            select b.id from backend b
            where b.drone_id = (select n.id from node n where n.name = $1 and n.cluster = $2)
              and b.last_status_number < $3
            "#,
            drone.as_str(),
            cluster.as_str(),
            BackendStatus::Terminated.as_int(),
        )
        .fetch_all(self.db.pool())
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
            .fetch_all(self.db.pool())
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
        let mut states = Vec::with_capacity(alive.len());
        for row in alive {
            let lost = lost_state(&row);
            states.push(to_json("backend state", &lost)?);
            ids.push(row.id);
            expected.push(row.last_status_number);
        }
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
                insert into event (kind, key, data, created_at)
                select $6, id, state, now() from updated
            )
            select id as "id!" from updated
            "#,
            &ids,
            &expected,
            &states,
            BackendStatus::Terminated.to_string(),
            BackendStatus::Terminated.as_int(),
            BackendState::kind(),
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(skip_undecodable(updated.into_iter().map(|id| {
            BackendName::try_from(id.clone()).map_err(|e| Error::decode("backend", "id", &id, e))
        })))
    }

    /// Deletes backends that terminated more than `min_age_days` days ago, with their
    /// tokens, actions, state history and expired keys, `batch_size` backends per
    /// transaction until none are left. A backend whose key has not expired is kept (the
    /// key still fences it). Returns what was deleted.
    #[tracing::instrument(skip(self))]
    pub async fn cleanup(&self, min_age_days: i32, batch_size: i32) -> Result<CleanupReport> {
        self.cleanup_reporting(min_age_days, batch_size, &mut |_| {})
            .await
    }

    /// [`cleanup`](Self::cleanup), calling `progress` with the running totals after each
    /// batch.
    pub(crate) async fn cleanup_reporting(
        &self,
        min_age_days: i32,
        batch_size: i32,
        progress: &mut (dyn FnMut(&CleanupReport) + Send),
    ) -> Result<CleanupReport> {
        if min_age_days < 0 {
            return Err(Error::InvalidArgument {
                argument: "min_age_days",
                reason: format!("must not be negative, got {min_age_days}"),
            });
        }
        check_batch_size(batch_size)?;
        let mut report = CleanupReport::default();
        loop {
            let row = sqlx::query!(
                r#"
                with doomed as (
                    select b.id from backend b
                    where b.last_status_number = $1
                      and b.last_status_time < now() - make_interval(days => $2)
                      and not exists (
                          select 1 from backend_key k where k.id = b.id and k.expires_at >= now()
                      )
                    order by b.last_status_time
                    limit $3
                    for update skip locked
                ),
                tokens as (
                    delete from token where backend_id in (select id from doomed) returning 1
                ),
                actions as (
                    delete from backend_action where backend_id in (select id from doomed) returning 1
                ),
                keys as (
                    delete from backend_key where id in (select id from doomed) returning 1
                ),
                states as (
                    delete from backend_state where backend_id in (select id from doomed) returning 1
                ),
                backends as (
                    delete from backend where id in (select id from doomed) returning 1
                )
                select
                    (select count(*) from backends) as "backends!",
                    (select count(*) from states) as "states!",
                    (select count(*) from tokens) as "tokens!",
                    (select count(*) from actions) as "actions!",
                    (select count(*) from keys) as "keys!"
                "#,
                BackendStatus::Terminated.as_int(),
                min_age_days,
                i64::from(batch_size),
            )
            .fetch_one(self.db.pool())
            .await?;
            report.batches += 1;
            report.backends += count(row.backends);
            report.states += count(row.states);
            report.tokens += count(row.tokens);
            report.actions += count(row.actions);
            report.keys += count(row.keys);
            // Each batch is committed: count it even if a later one fails.
            metrics::cleanup_deleted("backend", count(row.backends));
            metrics::cleanup_deleted("backend_state", count(row.states));
            metrics::cleanup_deleted("token", count(row.tokens));
            metrics::cleanup_deleted("backend_action", count(row.actions));
            metrics::cleanup_deleted("backend_key", count(row.keys));
            progress(&report);
            if row.backends < i64::from(batch_size) {
                break;
            }
        }
        tracing::info!(?report, "cleanup finished");
        Ok(report)
    }
}

/// Decodes listed rows, skipping (with a warning) any that do not decode, so one bad row
/// does not hide the others.
fn decode_rows(rows: Vec<RawBackendRow>) -> Vec<BackendRow> {
    rows.into_iter()
        .filter_map(|row| match BackendRow::try_from(row) {
            Ok(row) => Some(row),
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "skipping undecodable backend row"
                );
                None
            }
        })
        .collect()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The columns a route lookup reads, before decoding.
struct RouteParts {
    backend_id: String,
    cluster: String,
    status_number: i32,
    address: Option<String>,
    subdomain: Option<String>,
    secret_token: String,
    user: Option<String>,
    user_data: Option<serde_json::Value>,
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

fn route_result(parts: RouteParts) -> Result<RouteInfoResult> {
    let BackendIdentity {
        id: backend_id,
        status,
        cluster,
        subdomain,
    } = BackendIdentity::decode(
        parts.backend_id,
        parts.status_number,
        parts.cluster,
        parts.subdomain,
    )?;
    if status >= BackendStatus::Terminating {
        return Ok(RouteInfoResult::NotFound);
    }
    let id = backend_id.to_string();
    let partial = PartialRouteInfo {
        backend_id,
        secret_token: SecretToken::from(parts.secret_token),
        cluster,
        user: parts.user,
        user_data: parts.user_data,
        subdomain,
    };
    if status < BackendStatus::Ready {
        return Ok(RouteInfoResult::Pending(partial));
    }
    let Some(address) = parts.address else {
        return Err(Error::decode(
            "backend",
            "cluster_address",
            &id,
            "backend is ready but has no address",
        ));
    };
    let address = address
        .parse()
        .map(BackendAddr)
        .map_err(|e| Error::decode("backend", "cluster_address", &id, e))?;
    Ok(RouteInfoResult::Available(partial.with_address(address)))
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

/// The backend's state history as status stream entries.
async fn read_history(
    pool: &PgPool,
    backend: &BackendName,
) -> Result<Vec<BackendStatusStreamEntry>> {
    Ok(read_state_records(pool, backend)
        .await?
        .iter()
        .map(|record| BackendStatusStreamEntry::from_state(&record.state, record.created_at))
        .collect())
}

/// [`read_history`] for a stream that must not end early: retries until the database
/// answers.
async fn read_history_retrying(
    pool: &PgPool,
    backend: &BackendName,
) -> Vec<BackendStatusStreamEntry> {
    let mut delay = Duration::from_millis(50);
    loop {
        match read_history(pool, backend).await {
            Ok(history) => return history,
            Err(error) => {
                tracing::warn!(%error, %backend, "re-reading status history failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
