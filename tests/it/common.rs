//! Fixtures shared by the integration tests.

use plane_db::connect::{ConnectRequest, ConnectResponse, SpawnConfig};
use plane_db::node::NodeRegistration;
use plane_db::testing::create_database;
use plane_db::types::{
    BackendName, BackendState, ClusterName, ControllerName, DroneName, DronePoolName, KeyConfig,
    NodeId, NodeKind,
};
use plane_db::{Config, PlaneDatabase};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Every test is bounded, so a lost event fails fast instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `test` against a fresh, migrated database (default config); drops the database
/// when the test passes (a failed test leaves it for inspection).
pub async fn with_db<F, Fut>(test: F)
where
    F: FnOnce(PlaneDatabase) -> Fut,
    Fut: Future<Output = ()>,
{
    with_db_config(Config::default(), test).await
}

/// [`with_db`] with a custom configuration.
pub async fn with_db_config<F, Fut>(config: Config, test: F)
where
    F: FnOnce(PlaneDatabase) -> Fut,
    Fut: Future<Output = ()>,
{
    with_db_url(config, |db, _| test(db)).await
}

/// [`with_db_config`], also passing the database's URL (for tests that run the CLI on it).
pub async fn with_db_url<F, Fut>(config: Config, test: F)
where
    F: FnOnce(PlaneDatabase, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let database = create_database().await.expect("create a test database");
    let pool = plane_db::connect(&database.url)
        .await
        .expect("connect to the test database")
        .pool()
        .clone();
    plane_db::MIGRATOR.run(&pool).await.expect("migrate");
    let db = PlaneDatabase::with_config(pool.clone(), config);
    tokio::time::timeout(TEST_TIMEOUT, test(db, database.url.clone()))
        .await
        .expect("test timed out");
    pool.close().await;
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

pub fn cluster() -> ClusterName {
    "plane.test".parse().expect("valid cluster")
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), port)
}

/// A registered drone.
#[derive(Debug, Clone)]
pub struct Drone {
    pub id: NodeId,
    pub name: DroneName,
    pub controller: ControllerName,
}

/// A ready drone in `cluster()` and the default pool, with an online controller.
pub async fn drone(db: &PlaneDatabase) -> Drone {
    drone_in(db, &cluster(), &DronePoolName::default()).await
}

pub async fn drone_in(db: &PlaneDatabase, cluster: &ClusterName, pool: &DronePoolName) -> Drone {
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, "0.1.0", "abc")
        .await
        .expect("controller heartbeat");
    let name = DroneName::new_random();
    let id = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: name.as_str(),
            cluster: Some(cluster),
            plane_version: "0.1.0",
            plane_hash: "abc",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .expect("register node")
        .id;
    db.drone()
        .register(id, true, pool)
        .await
        .expect("register drone");
    Drone {
        id,
        name,
        controller,
    }
}

pub fn spawn_config() -> SpawnConfig {
    SpawnConfig {
        cluster: cluster(),
        pool: DronePoolName::default(),
        executable: serde_json::json!({"image": "ghcr.io/example/app:1"}),
        lifetime_limit_seconds: None,
        max_idle_seconds: None,
        use_static_token: false,
        subdomain: None,
    }
}

pub fn request(key: &str) -> ConnectRequest {
    ConnectRequest {
        key: Some(KeyConfig {
            name: key.to_string(),
            namespace: "ns".to_string(),
            tag: String::new(),
        }),
        spawn_config: Some(spawn_config()),
        user: Some("alice".to_string()),
        auth: serde_json::Map::new(),
    }
}

/// Creates a backend under a fresh key (a drone must exist).
pub async fn spawn(db: &PlaneDatabase) -> ConnectResponse {
    db.connect(&request(&format!("key-{}", BackendName::new_random())))
        .await
        .expect("connect")
}

/// The forward path of a backend's life after `scheduled`.
pub fn lifecycle() -> Vec<BackendState> {
    let waiting = BackendState::Scheduled
        .to_loading()
        .to_starting()
        .to_waiting(addr(8080));
    let ready = waiting.to_ready(plane_db::types::BackendAddr(addr(8080)));
    let terminating = ready.to_terminating(plane_db::types::TerminationReason::Swept);
    let terminated = terminating.to_terminated(Some(0));
    vec![
        BackendState::Loading,
        BackendState::Starting,
        waiting,
        ready,
        terminating,
        terminated,
    ]
}

/// Runs a SQL statement without parameters (test set-up: back-dating rows and the like).
pub async fn exec(db: &PlaneDatabase, sql: &str) {
    sqlx::query(sql).execute(db.pool()).await.expect(sql);
}

/// The number of rows in `table`.
pub async fn count(db: &PlaneDatabase, table: &str) -> i64 {
    sqlx::query_scalar(&format!("select count(*) from {table}"))
        .fetch_one(db.pool())
        .await
        .expect("count rows")
}
