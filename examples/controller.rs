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
//! | `GET /` | a live page: the backends and their statuses, a connect form, terminate buttons |
//! | `GET /backends` | the backends (at most 100, terminated ones until cleanup) with their statuses |
//! | `POST /connect` | a [`ConnectRequest`] as JSON: get or create the backend of a key; 201 when created |
//! | `GET /backend/{id}/status` | the backend's current status |
//! | `GET /backend/{id}/status-stream` | SSE: its status history, then live changes, until `terminated` |
//! | `POST /backend/{id}/terminate` | queue a termination (`{"kind":"hard"}` for hard; soft without a body) |
//! | `GET /route/{token}` or `GET /route` with `Authorization: Bearer …` | the route a proxy needs |
//! | `GET /metrics` | the library's metrics in Prometheus text format (see METRICS.md) |
//!
//! Errors are JSON, `{"error": "<code>", "message": "<what went wrong>"}`, with 400 for bad
//! input (a spawn config without a cluster included), 404 for an unknown backend or token,
//! 409 for a key held under another tag or a backend `id` already taken, 503
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
        .route("/", get(page))
        .route("/backends", get(backends))
        .route("/connect", post(connect))
        .route("/backend/{id}/status", get(status))
        .route("/backend/{id}/status-stream", get(status_stream))
        .route("/backend/{id}/terminate", post(terminate))
        .route("/route/{token}", get(route_by_path))
        .route("/route", get(route_by_header))
        .fallback(|| async { ApiError::not_found("no_such_route", "no such route") })
        .with_state(db)
}

/// `GET /`: the live page ([`PAGE`]).
async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
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
                .subscribe_with_key::<BackendActionMessage>(&self.id)
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
        for backend in db.backend().list_alive_backends_for_drone(self.id).await? {
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

/// The page `GET /` serves: one static document, no framework and no build step. It lists
/// the backends (`GET /backends`) and follows each live one over its status stream with the
/// browser's own `EventSource`, which reconnects by itself after a dropped connection and
/// sends `Last-Event-ID`, so the server resumes after the last status shown. Every status
/// received is appended to the backend's "seen" list as it arrives (nothing is filtered
/// client-side), so a status shown twice or missing would be visible there. Browsers allow
/// about six connections per host over HTTP/1.1, so it follows at most five backends at once
/// and keeps one connection for its own requests.
const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>plane-db controller</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
  h1 { font-size: 1.4em; }
  form { display: flex; gap: .8em; align-items: end; flex-wrap: wrap; margin-bottom: 1em; }
  label { display: flex; flex-direction: column; font-size: .85em; color: #555; }
  input { font: inherit; padding: .2em .4em; }
  table { border-collapse: collapse; min-width: 40em; }
  th, td { text-align: left; padding: .35em .8em; border-bottom: 1px solid #ddd; }
  th { font-size: .85em; color: #555; }
  td.id { font-family: ui-monospace, monospace; }
  .status { font-weight: 600; }
  .good { color: #17803d; } .busy { color: #a15c00; } .bad { color: #b42318; } .dim { color: #888; }
  .seen span { display: inline-block; margin-right: .4em; padding: 0 .35em; border-radius: .3em;
               background: #f1f1f1; font-size: .85em; }
  #message { min-height: 1.4em; color: #555; }
</style>
</head>
<body>
<h1>Backends</h1>
<form id="connect">
  <label>Key <input id="key" name="key" required value="doc-42"></label>
  <label>Cluster <input id="cluster" name="cluster" required value="plane.example"></label>
  <label>Image <input id="image" name="image" required value="ghcr.io/example/editor"></label>
  <button id="connect-button" type="submit">Connect</button>
</form>
<p id="message" role="status"></p>
<table>
  <thead><tr><th>Backend</th><th>Cluster</th><th>Status</th><th>Seen</th><th></th></tr></thead>
  <tbody id="rows"></tbody>
</table>
<script>
"use strict";
const MAX_STREAMS = 5;
const TONES = { ready: "good", scheduled: "busy", loading: "busy", starting: "busy",
  waiting: "busy", terminating: "bad", "hard-terminating": "bad", terminated: "dim" };
const backends = new Map();
const message = document.getElementById("message");

function say(text) { message.textContent = text; }

function row(id, cluster) {
  let b = backends.get(id);
  if (b) return b;
  const tr = document.createElement("tr");
  tr.dataset.backend = id;
  const cell = (cls) => { const td = document.createElement("td"); td.className = cls; tr.append(td); return td; };
  cell("id").textContent = id;
  cell("cluster").textContent = cluster || "";
  const status = cell("status");
  const seen = cell("seen");
  const button = document.createElement("button");
  button.textContent = "Terminate";
  button.className = "terminate";
  button.addEventListener("click", () => terminate(id));
  cell("actions").append(button);
  document.getElementById("rows").append(tr);
  b = { tr, status, seen, button, source: null };
  backends.set(id, b);
  return b;
}

function setStatus(b, status) {
  b.status.textContent = status;
  b.status.className = "status " + (TONES[status] || "");
  b.button.disabled = status === "terminated";
}

function follow(id) {
  const b = backends.get(id);
  if (b.source) return;
  const open = [...backends.values()].filter((x) => x.source).length;
  if (open >= MAX_STREAMS) { b.status.title = "not followed: too many open streams"; return; }
  const source = new EventSource("/backend/" + encodeURIComponent(id) + "/status-stream");
  b.source = source;
  source.onmessage = (event) => {
    const entry = JSON.parse(event.data);
    const span = document.createElement("span");
    span.textContent = entry.status;
    span.dataset.eventId = event.lastEventId;
    b.seen.append(span);
    setStatus(b, entry.status);
    b.tr.dataset.reconnecting = "";
    if (entry.status === "terminated") { source.close(); b.source = null; }
  };
  source.onerror = () => {
    // The browser reconnects by itself (sending Last-Event-ID) unless it gave up.
    if (source.readyState === EventSource.CLOSED) { b.source = null; }
    else { b.tr.dataset.reconnecting = "yes"; }
  };
}

async function call(method, url, body) {
  const response = await fetch(url, {
    method, headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((json && json.message) || response.status + " " + response.statusText);
  return json;
}

async function terminate(id) {
  try {
    const answer = await call("POST", "/backend/" + encodeURIComponent(id) + "/terminate");
    say(id + ": " + answer.result.replace("_", " "));
  } catch (error) { say(id + ": " + error.message); }
}

document.getElementById("connect").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = document.getElementById("key").value;
  const cluster = document.getElementById("cluster").value;
  const image = document.getElementById("image").value;
  try {
    const answer = await call("POST", "/connect", {
      key: { name: key }, spawn_config: { cluster, executable: { image } } });
    row(answer.backend_id, cluster);
    follow(answer.backend_id);
    say(key + ": " + (answer.spawned ? "new backend " : "backend ") + answer.backend_id);
  } catch (error) { say(key + ": " + error.message); }
});

(async () => {
  try {
    for (const entry of await call("GET", "/backends")) {
      const b = row(entry.backend_id, entry.cluster);
      if (entry.status === "terminated") setStatus(b, entry.status);
      else follow(entry.backend_id);
    }
  } catch (error) { say("cannot list backends: " + error.message); }
  document.body.dataset.loaded = "yes";
})();
</script>
</body>
</html>
"#;
