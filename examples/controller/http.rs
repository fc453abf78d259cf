//! The HTTP routes (see the table in `main.rs`'s documentation): listing and connecting
//! backends, terminating them, route lookups. The status routes are in [`super::status`].

use super::error::{backend_id, unknown_backend, ApiError};
use super::guard::{self, RequestGuard};
use super::page::page;
use super::prometheus::metrics_router;
use super::status::{status, status_stream};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use plane_db::actions::TerminationRequest;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::{ConnectRequest, ConnectResponse};
use plane_db::types::{
    BackendAddr, BackendName, BackendStatus, BearerToken, ClusterName, NodeId, SecretToken,
    Subdomain, TerminationKind, TerminationReason,
};
use plane_db::{ConnectError, PlaneDatabase};
use serde::{Deserialize, Serialize};

/// The controller's HTTP routes over `db` (see the module documentation), with `/metrics`
/// when given a Prometheus handle, every request behind `guard` (Host, Origin, JSON bodies
/// of bounded size: see [`super::guard`]).
pub fn router(db: PlaneDatabase, guard: RequestGuard, metrics: Option<PrometheusHandle>) -> Router {
    let routes = Router::new()
        .route("/", get(page))
        .route("/backends", get(backends))
        .route("/connect", post(connect))
        .route("/backend/{id}/status", get(status))
        .route("/backend/{id}/status-stream", get(status_stream))
        .route("/backend/{id}/terminate", post(terminate))
        .route("/route/{token}", get(route_by_path))
        .route("/route", get(route_by_header))
        .with_state(db);
    let routes = match metrics {
        Some(handle) => routes.merge(metrics_router(handle)),
        None => routes,
    };
    // The layer goes last so that it covers every route, `/metrics` and the fallback too.
    routes
        .fallback(|| async { ApiError::not_found("no_such_route", "no such route") })
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard))
}

/// How many backends `GET /backends` lists at most.
const BACKENDS_LIMIT: i64 = 100;

/// One entry of `GET /backends`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackendListEntry {
    /// The backend.
    pub backend_id: BackendName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its current status.
    pub status: BackendStatus,
    /// The status number, usable as `Last-Event-ID` on its status stream.
    pub event_id: i32,
}

/// `GET /backends`: the backends with their current statuses (at most [`BACKENDS_LIMIT`],
/// in id order).
async fn backends(
    State(db): State<PlaneDatabase>,
) -> Result<Json<Vec<BackendListEntry>>, ApiError> {
    let rows = db
        .backend()
        .list(&plane_db::backend::BackendFilter {
            limit: Some(BACKENDS_LIMIT),
            ..Default::default()
        })
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|row| BackendListEntry {
                status: row.state.status(),
                event_id: row.state.status().as_int(),
                backend_id: row.id,
                cluster: row.cluster,
            })
            .collect(),
    ))
}

/// What `POST /connect` answers: the library's response and where to follow the backend.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectBody {
    /// The library's answer.
    #[serde(flatten)]
    pub response: ConnectResponse,
    /// `GET` this for the backend's current status.
    pub status_url: String,
    /// `GET` this for its status stream (SSE).
    pub status_stream_url: String,
}

/// `POST /connect`: gets or creates the backend of a key.
async fn connect(State(db): State<PlaneDatabase>, body: Bytes) -> Result<Response, ApiError> {
    // Parsed here rather than by axum's `Json`, so that bad input is a 400 with our error
    // body; the guard has already refused anything but a bounded JSON body.
    let request: ConnectRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_request", format!("invalid connect request: {e}"))
    })?;
    if request.key.is_none() && request.spawn_config.is_none() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "a connect request needs a key, a spawn_config, or both",
        ));
    }
    let response = db.connect(&request).await.map_err(connect_error)?;
    let id = response.backend_id.clone();
    let status = if response.spawned {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = ConnectBody {
        response,
        status_url: format!("/backend/{id}/status"),
        status_stream_url: format!("/backend/{id}/status-stream"),
    };
    Ok((status, Json(body)).into_response())
}

fn connect_error(error: ConnectError) -> ApiError {
    let message = error.to_string();
    match error {
        ConnectError::KeyHeld { .. } => ApiError::new(StatusCode::CONFLICT, "key_held", message),
        ConnectError::BackendIdTaken { .. } => {
            ApiError::new(StatusCode::CONFLICT, "backend_id_taken", message)
        }
        ConnectError::NoClusterProvided => {
            ApiError::new(StatusCode::BAD_REQUEST, "no_cluster", message)
        }
        ConnectError::NoSpawnConfig { .. } => ApiError::not_found("no_backend", message),
        ConnectError::NoDroneAvailable { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_drone", message)
        }
        ConnectError::Contended { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "contended", message)
        }
        ConnectError::Other(error) => error.into(),
        // The enum may grow; anything new is a failure until handled above.
        other => ApiError::internal(other),
    }
}

/// The body of `POST /backend/{id}/terminate`: `{}` for soft.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminateBody {
    #[serde(default = "soft")]
    kind: TerminationKind,
}

fn soft() -> TerminationKind {
    TerminationKind::Soft
}

/// What `POST /backend/{id}/terminate` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct TerminateResponse {
    /// The backend.
    pub backend_id: BackendName,
    /// `"requested"` (202: the drone was asked) or `"already_terminated"` (200).
    pub result: String,
    /// The termination kind asked for.
    pub kind: TerminationKind,
    /// The queued action, when one was queued.
    pub action_id: Option<String>,
    /// The drone asked to carry it out, when one was asked.
    pub drone_id: Option<NodeId>,
}

/// `POST /backend/{id}/terminate`: asks the backend's drone to terminate it. The status
/// stream shows when it does.
async fn terminate(
    State(db): State<PlaneDatabase>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<TerminateResponse>), ApiError> {
    let id = backend_id(id)?;
    // A JSON body is required (`{}` for soft): every request that changes state carries
    // one (the guard has checked its content type), so there is one rule to state and test.
    let kind = serde_json::from_slice::<TerminateBody>(&body)
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!(
                    r#"invalid terminate request (expected {{}} or {{"kind": "soft"|"hard"}}): {e}"#
                ),
            )
        })?
        .kind;
    // Checked first, as in `status_stream`, so an unknown id is `unknown_backend`.
    if db.backend().backend(&id).await?.is_none() {
        return Err(unknown_backend(&id));
    }
    let requested = db
        .backend_action()
        .request_termination(&id, kind, TerminationReason::External)
        .await?;
    let (status, result, action_id, drone_id) = match requested {
        TerminationRequest::Requested { action_id, drone } => (
            StatusCode::ACCEPTED,
            "requested",
            Some(action_id.to_string()),
            Some(drone),
        ),
        TerminationRequest::AlreadyTerminated => (StatusCode::OK, "already_terminated", None, None),
    };
    tracing::info!(backend = %id, %kind, result, "termination");
    Ok((
        status,
        Json(TerminateResponse {
            backend_id: id,
            result: result.to_string(),
            kind,
            action_id,
            drone_id,
        }),
    ))
}

/// What a route lookup answers: everything a proxy needs, the address once the backend is
/// ready.
#[derive(Debug, Serialize, Deserialize)]
pub struct RouteBody {
    /// `"pending"` (not ready yet: wait on the status stream) or `"ready"`.
    pub status: String,
    /// The backend.
    pub backend_id: BackendName,
    /// Its address, when ready.
    pub address: Option<BackendAddr>,
    /// The secret the proxy passes to the backend with each request.
    pub secret_token: SecretToken,
    /// The backend's cluster.
    pub cluster: ClusterName,
    /// The user the token was issued to.
    pub user: Option<String>,
    /// The JSON the proxy passes to the backend with each request.
    pub user_data: Option<serde_json::Value>,
    /// The backend's subdomain, if any.
    pub subdomain: Option<Subdomain>,
}

/// `GET /route/{token}`: the route for a bearer token.
async fn route_by_path(
    State(db): State<PlaneDatabase>,
    Path(token): Path<String>,
) -> Result<Json<RouteBody>, ApiError> {
    route(&db, BearerToken::from(token)).await
}

/// `GET /route` with `Authorization: Bearer <token>`: the same, keeping the token out of
/// URLs (and so out of access logs).
async fn route_by_header(
    State(db): State<PlaneDatabase>,
    headers: HeaderMap,
) -> Result<Json<RouteBody>, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request",
                "expected an Authorization: Bearer <token> header",
            )
        })?;
    route(&db, BearerToken::from(token)).await
}

async fn route(db: &PlaneDatabase, token: BearerToken) -> Result<Json<RouteBody>, ApiError> {
    let (status, partial, address) = match db.backend().route_info_for_token(&token).await? {
        // The token is a credential: it is neither echoed nor logged.
        RouteInfoResult::NotFound => {
            return Err(ApiError::not_found(
                "unknown_token",
                "unknown or expired token, or its backend is terminating",
            ))
        }
        RouteInfoResult::Pending(partial) => ("pending", partial, None),
        RouteInfoResult::Available(route) => ("ready", route.route, Some(route.address)),
    };
    Ok(Json(RouteBody {
        status: status.to_string(),
        backend_id: partial.backend_id,
        address,
        secret_token: partial.secret_token,
        cluster: partial.cluster,
        user: partial.user,
        user_data: partial.user_data,
        subdomain: partial.subdomain,
    }))
}
