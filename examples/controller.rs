//! A small HTTP controller over plane-db: clients ask for backends and watch their status
//! over Server-Sent Events, proxies look up routes, users terminate backends.
//!
//! ```text
//! cargo run --example controller                        # throwaway Postgres + a demo drone
//! DATABASE_URL=postgres://… cargo run --example controller -- --demo-drone
//! cargo run --example controller -- --listen 127.0.0.1:9000 --cluster plane.example
//! ```
//!
//! It uses the database `DATABASE_URL` names (migrating it), or else a fresh database on a
//! throwaway Postgres started from the local server binaries (removed when the process
//! exits). It registers itself as a controller and heartbeats. So that it can be tried alone,
//! it also runs a *demo drone* (on by default with the throwaway database, `--demo-drone`
//! otherwise): a stand-in that takes the backends scheduled on it through `loading`,
//! `starting`, `waiting` and `ready`, a second apart, and carries out termination requests.
//! Without a drone, `POST /connect` answers 503.
//!
//! # Routes
//!
//! | Route | What |
//! |---|---|
//! | `POST /connect` | a [`ConnectRequest`] as JSON: get or create the backend of a key; 201 when created |
//! | `GET /backend/{id}/status` | the backend's current status |
//! | `GET /backend/{id}/status-stream` | SSE: its status history, then live changes, until `terminated` |
//! | `POST /backend/{id}/terminate` | queue a termination (`{"kind":"hard"}` for hard; soft without a body) |
//! | `GET /route/{token}` or `GET /route` with `Authorization: Bearer …` | the route a proxy needs |
//! | `GET /metrics` | the library's metrics in Prometheus text format (see METRICS.md) |
//!
//! Errors are JSON, `{"error": "<code>", "message": "<what went wrong>"}`, with 400 for bad
//! input, 404 for an unknown backend or token, 409 for a key held under another tag, 503
//! when no drone can take a backend, and 500 otherwise (details only in the log).
//!
//! # Resuming the status stream
//!
//! Each SSE event's `id:` is the status number of the entry (`scheduled` 10, `loading` 20, …,
//! `terminated` 70; see [`BackendStatus::as_int`]). A backend's statuses only move forward,
//! and the library's stream yields each backend's statuses strictly increasing, history
//! first, so the status number identifies an event within its stream and orders it. A client
//! that reconnects with `Last-Event-ID: N` gets exactly the entries with a status number
//! above `N`: nothing it has seen, nothing it has not. After `terminated` (70) there is
//! nothing more, and the answer is `204 No Content`, which also tells a browser's
//! `EventSource` to stop reconnecting.
//!
//! # Walkthrough (another terminal, with the default address)
//!
//! ```text
//! curl -s localhost:8080/connect -H 'content-type: application/json' -d '{
//!   "key": {"name": "doc-42"},
//!   "spawn_config": {"cluster": "plane.example", "executable": {"image": "ghcr.io/example/editor"}},
//!   "user": "alice"}'
//! curl -s localhost:8080/backend/ba-…/status
//! curl -N localhost:8080/backend/ba-…/status-stream
//! curl -N localhost:8080/backend/ba-…/status-stream -H 'Last-Event-ID: 30'
//! curl -s localhost:8080/route/<token>
//! curl -s -X POST localhost:8080/backend/ba-…/terminate
//! ```
//!
//! This is an example: it has no authentication, and `/route` hands out the secret token a
//! proxy passes to the backend. A real controller keeps such routes for its proxies.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use plane_db::actions::TerminationRequest;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::{ConnectRequest, ConnectResponse};
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendAction, BackendActionMessage, BackendAddr, BackendName, BackendState, BackendStatus,
    BackendStatusStreamEntry, BearerToken, ClusterName, ControllerName, DroneName, DronePoolName,
    NodeId, NodeKind, SecretToken, Subdomain, TerminationKind, TerminationReason,
};
use plane_db::{ConnectError, PlaneDatabase};
use serde::{Deserialize, Serialize};
use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The address served when neither `--listen` nor `CONTROLLER_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The cluster the demo drone joins unless `--cluster` says otherwise.
const DEFAULT_CLUSTER: &str = "plane.example";
/// How often the controller (and the demo drone) heartbeat: well within the 30 s after which
/// the scheduler stops picking their drones.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// The version reported in heartbeats.
const VERSION: &str = env!("CARGO_PKG_VERSION");

type BoxError = Box<dyn StdError + Send + Sync>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Logs go to stderr, so stdout holds only the address and the walkthrough.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo run --example controller -- [--listen ADDR] [--cluster NAME] [--demo-drone | --no-demo-drone]

  --listen ADDR     address to serve on (env CONTROLLER_LISTEN; default 127.0.0.1:8080)
  --cluster NAME    the demo drone's cluster (default plane.example)
  --demo-drone      run a demo drone (the default without DATABASE_URL)
  --no-demo-drone   do not run one (the default with DATABASE_URL)

Uses DATABASE_URL's database, or a fresh database on a throwaway Postgres without it.";

/// Command-line options.
#[derive(Debug)]
struct Options {
    listen: SocketAddr,
    cluster: ClusterName,
    /// `None`: decided by where the database is.
    demo_drone: Option<bool>,
}

impl Options {
    /// Parses the arguments; `Ok(None)` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
        let mut listen = std::env::var("CONTROLLER_LISTEN")
            .ok()
            .filter(|value| !value.trim().is_empty());
        let mut cluster = DEFAULT_CLUSTER.to_string();
        let mut demo_drone = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--listen" => listen = Some(args.next().ok_or("--listen needs an address")?),
                "--cluster" => cluster = args.next().ok_or("--cluster needs a name")?,
                "--demo-drone" => demo_drone = Some(true),
                "--no-demo-drone" => demo_drone = Some(false),
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let listen = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        Ok(Some(Options {
            listen: listen
                .trim()
                .parse()
                .map_err(|e| format!("invalid listen address {listen:?}: {e}"))?,
            cluster: cluster
                .parse()
                .map_err(|e| format!("invalid cluster {cluster:?}: {e}"))?,
            demo_drone,
        }))
    }
}

/// Sets everything up, serves until Ctrl-C, then says goodbye as a controller.
async fn run(options: Options) -> Result<(), BoxError> {
    // The recorder goes in before the database, so that the library's metrics are described.
    let recorder = prometheus_recorder();
    let metrics_handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    plane_db::metrics::describe();
    tokio::spawn(metrics_upkeep(metrics_handle.clone()));

    // The throwaway database's URL is printed for the CLI; a DATABASE_URL is not (it may
    // hold a password), and the CLI reads it from the environment anyway.
    let (db, throwaway_url) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            tracing::info!("using the DATABASE_URL database");
            (plane_db::connect_and_migrate(url.trim()).await?, None)
        }
        _ => {
            let database = plane_db::testing::create_database().await?;
            tracing::info!(database = %database.name, "using a throwaway Postgres (no DATABASE_URL)");
            (
                plane_db::connect_and_migrate(&database.url).await?,
                Some(database.url.clone()),
            )
        }
    };
    let throwaway = throwaway_url.is_some();

    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, VERSION, "example")
        .await?;
    tokio::spawn(heartbeat_loop(db.clone(), controller.clone()));

    let demo = if options.demo_drone.unwrap_or(throwaway) {
        let drone = DemoDrone::register(&db, &controller, &options.cluster).await?;
        tracing::info!(drone = %drone.name, cluster = %drone.cluster, "demo drone registered");
        tokio::spawn(drone.clone().run(db.clone(), Duration::from_secs(1)));
        Some(drone)
    } else {
        None
    };

    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    print_walkthrough(
        address,
        demo.as_ref().map(|d| &d.cluster),
        throwaway_url.as_deref(),
    );

    let app = router(db.clone()).merge(metrics_router(metrics_handle));
    let server = axum::serve(listener, app);
    tokio::select! {
        served = server => served?,
        signal = tokio::signal::ctrl_c() => {
            signal?;
            tracing::info!("shutting down");
        }
    }
    // Going offline stops the scheduler from picking this controller's drones. Open status
    // streams are not waited for (they last until their backends terminate), nor is the pool
    // closed under them: returning ends every task. A throwaway database goes with its
    // server when the process exits.
    db.controller()
        .heartbeat(&controller, false, VERSION, "example")
        .await?;
    Ok(())
}

/// Prints where the controller listens and what to try.
fn print_walkthrough(
    address: SocketAddr,
    demo_cluster: Option<&ClusterName>,
    throwaway_url: Option<&str>,
) {
    let base = format!("http://{address}");
    let cluster = demo_cluster.map_or(DEFAULT_CLUSTER.to_string(), ToString::to_string);
    println!("controller listening on {base}");
    if demo_cluster.is_none() {
        println!("(no demo drone: connect needs a drone in the requested cluster)");
    }
    println!(
        r#"
try:
  curl -s {base}/connect -H 'content-type: application/json' \
    -d '{{"key": {{"name": "doc-42"}}, "spawn_config": {{"cluster": "{cluster}", "executable": {{"image": "ghcr.io/example/editor"}}}}, "user": "alice"}}'
  curl -s {base}/backend/<backend_id>/status
  curl -N {base}/backend/<backend_id>/status-stream
  curl -N {base}/backend/<backend_id>/status-stream -H 'Last-Event-ID: 30'
  curl -s {base}/route/<token>
  curl -s -X POST {base}/backend/<backend_id>/terminate
"#
    );
    let cli_env = throwaway_url.map_or(String::new(), |url| format!("DATABASE_URL={url} "));
    println!(
        "and from the operator CLI, in the repository:\n  {cli_env}cargo run --features cli -- watch <backend_id>\n"
    );
}

/// Tells the database every [`HEARTBEAT_INTERVAL`] that this controller is alive; a failed
/// heartbeat is logged and the next one tried.
async fn heartbeat_loop(db: PlaneDatabase, controller: ControllerName) {
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        interval.tick().await;
        if let Err(error) = db
            .controller()
            .heartbeat(&controller, true, VERSION, "example")
            .await
        {
            tracing::warn!(error = %error_chain(&error), "controller heartbeat failed");
        }
    }
}

/// The controller's HTTP routes over `db` (see the module documentation).
pub fn router(db: PlaneDatabase) -> Router {
    Router::new()
        .route("/connect", post(connect))
        .route("/backend/{id}/status", get(status))
        .route("/backend/{id}/status-stream", get(status_stream))
        .route("/backend/{id}/terminate", post(terminate))
        .route("/route/{token}", get(route_by_path))
        .route("/route", get(route_by_header))
        .fallback(|| async { ApiError::not_found("no_such_route", "no such route") })
        .with_state(db)
}

/// Histogram buckets of every `…_seconds` metric: 1 ms to 30 s, so that a dashboard can
/// compute quantiles (`histogram_quantile`) across controllers.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus recorder for the library's metrics, with histogram buckets for durations.
/// `main` installs it process-wide; the HTTP test installs one for its own thread.
pub fn prometheus_recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), SECONDS_BUCKETS)
        // Only an empty bucket list is refused, and this one is not empty.
        .unwrap_or_else(|_| PrometheusBuilder::new())
        .build_recorder()
}

/// `GET /metrics`: what `handle`'s recorder holds, in Prometheus text format.
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(|State(handle): State<PrometheusHandle>| async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
        })
        .with_state(handle),
    )
}

/// Folds recorded histogram samples into their buckets every few seconds, so that memory
/// stays bounded between scrapes.
async fn metrics_upkeep(handle: PrometheusHandle) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        handle.run_upkeep();
    }
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
    // body, and a client that forgets the content type is not refused.
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

/// What `GET /backend/{id}/status` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusBody {
    /// The backend.
    pub backend_id: BackendName,
    /// The status number: the `id` of this status's event on the status stream, so a client
    /// can open the stream with `Last-Event-ID` set to it to get only later changes.
    pub event_id: i32,
    /// The status, its termination details and when it was entered.
    #[serde(flatten)]
    pub entry: BackendStatusStreamEntry,
    /// Where the backend listens, once it does (waiting and ready).
    pub address: Option<BackendAddr>,
}

/// `GET /backend/{id}/status`: the backend's current status.
async fn status(
    State(db): State<PlaneDatabase>,
    Path(id): Path<String>,
) -> Result<Json<StatusBody>, ApiError> {
    let id = backend_id(id)?;
    let row = db
        .backend()
        .backend(&id)
        .await?
        .ok_or_else(|| unknown_backend(&id))?;
    Ok(Json(StatusBody {
        backend_id: row.id,
        event_id: row.state.status().as_int(),
        entry: BackendStatusStreamEntry::from_state(&row.state, row.last_status_time),
        address: row.state.address(),
    }))
}

/// `GET /backend/{id}/status-stream`: the backend's statuses as Server-Sent Events, resumed
/// after `Last-Event-ID` if the client sends one (see the module documentation).
async fn status_stream(
    State(db): State<PlaneDatabase>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = backend_id(id)?;
    let after = last_event_id(&headers)?;
    // Checked first so that an unknown id is answered as `unknown_backend` (404) whatever
    // the library's error for it, and because the 204 below needs to know the backend
    // exists.
    if db.backend().backend(&id).await?.is_none() {
        return Err(unknown_backend(&id));
    }
    if after == Some(BackendStatus::Terminated) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let stream = db.backend().status_stream(&id).await?;
    Ok(Sse::new(status_events(stream, after, id))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The SSE events of a status stream, skipping entries up to and including `after`.
///
/// The library's stream yields strictly increasing statuses, so the status number is a
/// unique, ordered event id and "above `after`" is exactly what the client has not seen.
pub fn status_events(
    stream: impl Stream<Item = BackendStatusStreamEntry> + Send + 'static,
    after: Option<BackendStatus>,
    backend: BackendName,
) -> impl Stream<Item = Result<Event, axum::Error>> + Send + 'static {
    stream
        .filter(move |entry| std::future::ready(after.is_none_or(|seen| entry.status > seen)))
        .map(move |entry| {
            Event::default()
                .id(entry.status.as_int().to_string())
                .json_data(&entry)
                .inspect_err(|error| {
                    // Ends the response; the client resumes from the last id it got.
                    tracing::error!(%backend, error = %error_chain(error), "could not encode a status event");
                })
        })
}

/// The status named by the `Last-Event-ID` header, if the client sent one. Only ids this
/// server hands out (status numbers) are accepted.
fn last_event_id(headers: &HeaderMap) -> Result<Option<BackendStatus>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::bad_request(
            "invalid_last_event_id",
            "Last-Event-ID must be an event id of this stream: a status number (10, 20, … 70)",
        )
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let number: i32 = value.parse().map_err(|_| invalid())?;
    BackendStatus::from_int(number)
        .map(Some)
        .ok_or_else(invalid)
}

/// The optional body of `POST /backend/{id}/terminate`.
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
    let kind = if body.iter().all(u8::is_ascii_whitespace) {
        TerminationKind::Soft
    } else {
        serde_json::from_slice::<TerminateBody>(&body)
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_request",
                    format!(
                        r#"invalid terminate request (expected {{"kind": "soft"|"hard"}}): {e}"#
                    ),
                )
            })?
            .kind
    };
    // Checked first, as in `status_stream`, so an unknown id is `unknown_backend`.
    if db.backend().backend(&id).await?.is_none() {
        return Err(unknown_backend(&id));
    }
    let requested = db
        .backend_actions()
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
        RouteInfoResult::Available(route) => {
            let address = route.address;
            let partial = plane_db::backend::PartialRouteInfo {
                backend_id: route.backend_id,
                secret_token: route.secret_token,
                cluster: route.cluster,
                user: route.user,
                user_data: route.user_data,
                subdomain: route.subdomain,
            };
            ("ready", partial, Some(address))
        }
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

/// Parses a backend id from the path.
fn backend_id(id: String) -> Result<BackendName, ApiError> {
    BackendName::try_from(id)
        .map_err(|e| ApiError::bad_request("invalid_backend_id", e.to_string()))
}

fn unknown_backend(id: &BackendName) -> ApiError {
    ApiError::not_found("unknown_backend", format!("no backend {id}"))
}

/// An error answer: a status code and a JSON body. It is logged once, when turned into the
/// response (client errors at debug level, failures at error level with their causes).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The failure behind a 500, for the log only.
    source: Option<BoxError>,
}

/// The body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`unknown_backend`, `no_drone`, …).
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            source: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    fn internal(source: impl Into<BoxError>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the controller's log",
            )
        }
    }
}

impl From<plane_db::Error> for ApiError {
    fn from(error: plane_db::Error) -> Self {
        match error {
            plane_db::Error::NotFound { what, id } => {
                ApiError::not_found("not_found", format!("{what} {id} not found"))
            }
            plane_db::Error::InvalidArgument { .. } => {
                ApiError::bad_request("invalid_argument", error.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self.source {
            Some(source) => tracing::error!(
                status = self.status.as_u16(),
                error = %error_chain(source.as_ref()),
                "request failed"
            ),
            None if self.status.is_server_error() => tracing::warn!(
                status = self.status.as_u16(),
                code = self.code,
                detail = %self.message,
                "request refused"
            ),
            None => tracing::debug!(
                status = self.status.as_u16(),
                code = self.code,
                detail = %self.message,
                "bad request"
            ),
        }
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// An error and its causes on one line, skipping a cause whose text the line already has
/// (plane-db's errors name their cause in their own message).
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A stand-in drone, so the controller can be tried without one: it takes the backends
/// scheduled on it through their start-up and carries out termination requests, writing
/// each state as a real drone reports it (`update_state`), and renews their keys.
#[derive(Debug, Clone)]
pub struct DemoDrone {
    /// Its node id.
    pub id: NodeId,
    /// Its name.
    pub name: DroneName,
    /// Its cluster.
    pub cluster: ClusterName,
}

impl DemoDrone {
    /// Registers a ready drone in `cluster` (default pool), connected to `controller`.
    pub async fn register(
        db: &PlaneDatabase,
        controller: &ControllerName,
        cluster: &ClusterName,
    ) -> plane_db::Result<DemoDrone> {
        let name = DroneName::new_random();
        let id = db
            .node()
            .register(&NodeRegistration {
                controller,
                kind: NodeKind::Drone,
                name: name.as_str(),
                cluster: Some(cluster),
                plane_version: VERSION,
                plane_hash: "example",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await?
            .id;
        db.drone()
            .register(id, true, &DronePoolName::default())
            .await?;
        Ok(DemoDrone {
            id,
            name,
            cluster: cluster.clone(),
        })
    }

    /// Runs the drone until the database's event bus stops: carries out its queued actions
    /// as they arrive, moving each new backend one status further every `step`, and
    /// heartbeats. A failed round is logged and retried.
    pub async fn run(self, db: PlaneDatabase, step: Duration) {
        let mut actions = loop {
            match db
                .subscribe_with_key::<BackendActionMessage>(&self.id.to_string())
                .await
            {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "demo drone could not subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            // Queued actions are read from the table, so none is missed while subscribing or
            // after a failed round; the subscription only says when to look again.
            if let Err(error) = self.take_actions(&db, step).await {
                tracing::warn!(error = %error_chain(&error), "demo drone round failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            tokio::select! {
                next = actions.next() => if next.is_none() { return },
                _ = heartbeat.tick() => {
                    if let Err(error) = self.heartbeat(&db).await {
                        tracing::warn!(error = %error_chain(&error), "demo drone heartbeat failed");
                    }
                }
            }
        }
    }

    /// Acknowledges and carries out the actions queued for this drone.
    async fn take_actions(&self, db: &PlaneDatabase, step: Duration) -> plane_db::Result<()> {
        for message in db.backend_actions().pending(self.id, 100).await? {
            // Acknowledged first: an action is carried out once, even if the next round
            // reads the queue before it is done.
            if !db
                .backend_actions()
                .ack(&message.action_id, self.id)
                .await?
            {
                continue;
            }
            let backend = message.backend_id;
            match message.action {
                BackendAction::Spawn { .. } => {
                    tokio::spawn(start_backend(db.clone(), backend, step));
                }
                BackendAction::Terminate { kind, reason } => {
                    tokio::spawn(stop_backend(db.clone(), backend, kind, reason, step));
                }
            }
        }
        Ok(())
    }

    /// Heartbeats as a drone, and renews the keys of its live backends (which would
    /// otherwise lapse and let another backend take them).
    async fn heartbeat(&self, db: &PlaneDatabase) -> plane_db::Result<()> {
        db.drone().heartbeat(self.id, Utc::now()).await?;
        for backend in db
            .backend()
            .list_alive_backends_for_drone(&self.cluster, &self.name)
            .await?
        {
            db.keys().renew(&backend.id, Utc::now()).await?;
        }
        Ok(())
    }
}

/// Takes a new backend through loading, starting and waiting to ready, one `step` apart.
/// Stops early when a state is refused (the backend is terminating meanwhile).
async fn start_backend(db: PlaneDatabase, backend: BackendName, step: Duration) {
    // Nothing listens there: this drone only pretends.
    let address = BackendAddr(SocketAddr::from(([127, 0, 0, 1], 18080)));
    let waiting = BackendState::Starting.to_waiting(address.0);
    for state in [
        BackendState::Loading,
        BackendState::Starting,
        waiting.clone(),
        waiting.to_ready(address),
    ] {
        tokio::time::sleep(step).await;
        match db.backend().update_state(&backend, &state).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%backend, error = %error_chain(&error), "demo drone could not report a state");
                return;
            }
        }
    }
}

/// Terminates a backend as asked: terminating (soft or hard), then terminated one `step`
/// later, with exit code 0 for soft and 137 (killed) for hard.
async fn stop_backend(
    db: PlaneDatabase,
    backend: BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
    step: Duration,
) {
    if let Err(error) = report_termination(&db, &backend, kind, reason, step).await {
        tracing::warn!(%backend, error = %error_chain(&error), "demo drone could not terminate a backend");
    }
}

async fn report_termination(
    db: &PlaneDatabase,
    backend: &BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
    step: Duration,
) -> plane_db::Result<()> {
    let Some(row) = db.backend().backend(backend).await? else {
        return Ok(());
    };
    let (terminating, exit_code) = match kind {
        TerminationKind::Soft => (row.state.to_terminating(reason), 0),
        TerminationKind::Hard => (row.state.to_hard_terminating(reason), 137),
    };
    db.backend().update_state(backend, &terminating).await?;
    tokio::time::sleep(step).await;
    db.backend()
        .update_state(backend, &terminating.to_terminated(Some(exit_code)))
        .await?;
    Ok(())
}
