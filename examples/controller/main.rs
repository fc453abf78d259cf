//! A small HTTP controller over plane-db: clients ask for backends and watch their status
//! over Server-Sent Events, proxies look up routes, users terminate backends.
//!
//! ```text
//! cargo run --example controller                        # throwaway Postgres + a demo drone
//! DATABASE_URL=postgres://… cargo run --example controller -- --demo-drone
//! cargo run --example controller -- --listen 127.0.0.1:9000 --cluster plane.example
//! cargo run --example controller -- --allowed-host 127.0.0.1:9999   # also answer that Host
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
//! | `POST /connect` | a [`ConnectRequest`](plane_db::connect::ConnectRequest) as JSON: get or create the backend of a key; 201 when created |
//! | `GET /backend/{id}/status` | the backend's current status |
//! | `GET /backend/{id}/status-stream` | SSE: its status history, then live changes, until `terminated` |
//! | `POST /backend/{id}/terminate` | queue a termination (`{}` for soft, `{"kind":"hard"}` for hard) |
//! | `GET /route/{token}` or `GET /route` with `Authorization: Bearer …` | the route a proxy needs |
//! | `GET /metrics` | the library's metrics in Prometheus text format (see METRICS.md) |
//!
//! Errors are JSON, `{"error": "<code>", "message": "<what went wrong>"}`, with 400 for bad
//! input (a spawn config without a cluster included), 404 for an unknown backend or token,
//! 409 for a key held under another tag or a backend `id` already taken, 503
//! when no drone can take a backend, and 500 otherwise (details only in the log); and from
//! the request guard (below) 421, 403, 415 and 413.
//!
//! # What it checks, and what it does not
//!
//! Every request passes [`guard`] first (its documentation says why each check):
//!
//! - its `Host` must be one this controller serves: the listen address, `localhost:PORT`,
//!   `127.0.0.1:PORT`, `[::1]:PORT`, or one given with `--allowed-host`
//!   (`CONTROLLER_ALLOWED_HOSTS`), else 421 `unknown_host`: a DNS-rebinding page arrives
//!   with its own name;
//! - a request that changes state (any method but GET, HEAD, OPTIONS) with an `Origin` must
//!   come from `http://` one of those hosts, else 403 `forbidden_origin`;
//! - such a request must carry `Content-Type: application/json` (`{}` when there is nothing to
//!   say), else 415 `unsupported_media_type`: a cross-site form cannot send that;
//! - and a body of at most [`guard::MAX_BODY_BYTES`] (256 KiB), else 413 `body_too_large`.
//!
//! GET routes (the page, lists, statuses, streams, route lookups) need only the Host check.
//!
//! # Authentication
//!
//! This example has none: the checks above keep other web pages out, not other programs.
//! Anything that can reach its port can create and terminate backends, and `/route` hands
//! out the secret token a proxy passes to its backend. A real controller puts authentication
//! in front of every route: a reverse proxy that requires client certificates (mTLS) or a
//! login, or a middleware (an `axum::middleware::from_fn` like [`guard`]) that checks a
//! bearer token per client, with `/route` reachable by the proxies' credentials only. Behind
//! a reverse proxy, give its public name with `--allowed-host`.
//!
//! # Resuming the status stream
//!
//! Each SSE event's `id:` is the status number of the entry (`scheduled` 10, `loading` 20, …,
//! `terminated` 70; see [`BackendStatus::as_int`](plane_db::types::BackendStatus::as_int)).
//! A backend's statuses only move forward, and the library's stream yields each backend's
//! statuses strictly increasing, history first, so the status number identifies an event
//! within its stream and orders it. A client that reconnects with `Last-Event-ID: N` gets
//! exactly the entries with a status number above `N`: nothing it has seen, nothing it has
//! not. After `terminated` (70) there is nothing more, and the answer is `204 No Content`,
//! which also tells a browser's `EventSource` to stop reconnecting.
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
//! curl -s localhost:8080/backend/ba-…/terminate -H 'content-type: application/json' -d '{}'
//! ```
//!
//! # Files
//!
//! `main.rs` starts it (database, heartbeats, server); `options.rs` reads the command line;
//! `guard.rs` checks every request (Host, Origin, JSON bodies of bounded size);
//! `http.rs` holds the routes, with `status.rs` for the status routes and their stream and
//! `error.rs` for error answers; `page.rs` serves the live page (`page.html`);
//! `prometheus.rs` serves `/metrics`; `demo_drone.rs` is the stand-in drone.

mod demo_drone;
mod error;
mod guard;
mod http;
mod options;
mod page;
mod prometheus;
mod status;

pub use demo_drone::DemoDrone;
pub use guard::{RequestGuard, MAX_BODY_BYTES};
pub use http::router;
pub use prometheus::prometheus_recorder;

use error::error_chain;
use options::{Options, DEFAULT_CLUSTER, USAGE};
use plane_db::types::{ClusterName, ControllerName};
use plane_db::PlaneDatabase;
use prometheus::metrics_upkeep;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::time::Duration;

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
            (plane_db::open_and_migrate(url.trim()).await?, None)
        }
        _ => {
            let database = plane_db::testing::create_database().await?;
            tracing::info!(database = %database.name, "using a throwaway Postgres (no DATABASE_URL)");
            (
                plane_db::open_and_migrate(&database.url).await?,
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
    // From the bound address, so that `--listen 127.0.0.1:0` allows the port it got.
    let guard = RequestGuard::new(address, &options.allowed_hosts);
    print_walkthrough(
        address,
        &guard,
        demo.as_ref().map(|d| &d.cluster),
        throwaway_url.as_deref(),
    );

    let app = router(db.clone(), guard, Some(metrics_handle));
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
    guard: &RequestGuard,
    demo_cluster: Option<&ClusterName>,
    throwaway_url: Option<&str>,
) {
    let base = format!("http://{address}");
    let cluster = demo_cluster.map_or(DEFAULT_CLUSTER.to_string(), ToString::to_string);
    println!("controller listening on {base}");
    println!(
        "answering the Host names {} (more with --allowed-host)",
        guard.hosts().join(", ")
    );
    println!("no authentication: anything that can reach this port can use it");
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
  curl -s {base}/backend/<backend_id>/terminate -H 'content-type: application/json' -d '{{}}'
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
