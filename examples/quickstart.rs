//! One backend's journey through plane-db: connect, status stream from `scheduled` to
//! `ready`, route lookup, keepalive, termination, cleanup.
//!
//! Runs on the server `DATABASE_URL` names, or else on a throwaway Postgres started from the
//! local binaries; either way in a fresh database that is dropped at the end.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use futures_util::StreamExt;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::{ConnectRequest, SpawnConfig};
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendAddr, BackendState, ClusterName, ControllerName, DroneName, DronePoolName, KeyConfig,
    NodeKind, TerminationKind, TerminationReason,
};
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let server = plane_db::testing::server()?;
    let database = plane_db::testing::create_database().await?;
    println!(
        "database: {} on {}",
        database.name,
        if server.is_embedded() {
            "a throwaway Postgres (no DATABASE_URL set)"
        } else {
            "the DATABASE_URL server"
        }
    );
    let db = plane_db::open_and_migrate(&database.url).await?;

    // A controller and one drone that registers through it.
    let cluster: ClusterName = "plane.example:9090".parse()?;
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, env!("CARGO_PKG_VERSION"), "quickstart")
        .await?;
    let drone_name = DroneName::new_random();
    let drone = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: drone_name.as_str(),
            cluster: Some(&cluster),
            plane_version: env!("CARGO_PKG_VERSION"),
            plane_hash: "quickstart",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await?
        .id;
    db.drone()
        .register(drone, true, &DronePoolName::default())
        .await?;
    println!("drone {drone_name} registered as node {drone}");

    // A client asks for the backend of key "doc-42".
    let request = ConnectRequest {
        key: Some(KeyConfig {
            name: "doc-42".into(),
            ..KeyConfig::default()
        }),
        spawn_config: Some(SpawnConfig {
            id: None,
            cluster: Some(cluster.clone()),
            pool: DronePoolName::default(),
            executable: serde_json::json!({ "image": "ghcr.io/example/editor:latest" }),
            lifetime_limit_seconds: Some(3600),
            max_idle_seconds: Some(300),
            use_static_token: false,
            subdomain: None,
        }),
        user: Some("alice".into()),
        auth: serde_json::Map::new(),
    };
    let connected = db.connect(&request).await?;
    if let (Some(drone), Some(fencing)) = (&connected.drone, connected.fencing_token) {
        println!(
            "connect: backend {} scheduled on {drone}, key fencing token {fencing}",
            connected.backend_id
        );
    }

    // The client watches the backend's status while the drone reports its progress.
    let backend = connected.backend_id.clone();
    let mut stream = Box::pin(db.backend().status_stream(&backend).await?);
    let watcher = tokio::spawn(async move {
        while let Some(entry) = stream.next().await {
            println!("  status: {} at {}", entry.status, entry.time);
        }
        println!("  status stream ended");
    });

    let address = BackendAddr(SocketAddr::from(([10, 0, 0, 7], 8080)));
    let waiting = BackendState::Loading.to_starting().to_waiting(address.0);
    for state in [
        BackendState::Loading,
        BackendState::Starting,
        waiting.clone(),
        waiting.to_ready(address),
    ] {
        db.backend().update_state(&backend, &state).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A proxy turns the client's token into a route, then reports the connection.
    match db.backend().route_info_for_token(&connected.token).await? {
        RouteInfoResult::Available(route) => println!(
            "route: token -> {} at {} (user {:?})",
            route.route.backend_id, route.address, route.route.user
        ),
        other => println!("route: {other:?}"),
    }
    println!(
        "keepalive accepted: {}",
        db.backend().update_keepalive(&backend).await?
    );

    // The drone acknowledges its queued spawn action, so it is not delivered again.
    for action in db.backend_action().pending(drone, 10).await? {
        db.backend_action().ack(&action.action_id, drone).await?;
    }
    let state = db.cluster().state(&cluster).await?;
    for d in &state.drones {
        println!(
            "cluster {cluster}: drone {} ready={} live backends={}",
            d.node.name, d.ready, d.backend_count
        );
    }

    // A user stops the backend: a terminate action is queued for its drone, which then
    // reports the termination. Its key is released, and cleanup removes its rows.
    let requested = db
        .backend_action()
        .request_termination(&backend, TerminationKind::Soft, TerminationReason::External)
        .await?;
    println!("termination requested: {requested:?}");
    let row = db
        .backend()
        .backend(&backend)
        .await?
        .ok_or("backend vanished")?;
    let terminating = row.state.to_terminating(TerminationReason::External);
    db.backend().update_state(&backend, &terminating).await?;
    db.backend()
        .update_state(&backend, &terminating.to_terminated(Some(0)))
        .await?;
    watcher.await?;
    println!(
        "route after termination: {:?}",
        db.backend().route_info_for_token(&connected.token).await?
    );
    let report = db.backend().cleanup_terminated(Duration::ZERO, 100).await?;
    println!(
        "cleanup: {} backend(s), {} state rows, {} token(s), {} action(s) deleted",
        report.backends, report.states, report.tokens, report.actions
    );

    db.pool().close().await;
    drop(db);
    database.drop_database().await?;
    Ok(())
}
