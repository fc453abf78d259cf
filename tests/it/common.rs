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
    let pool = plane_db::open(&database.url)
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
        id: None,
        cluster: Some(cluster()),
        pool: DronePoolName::default(),
        executable: serde_json::json!({"image": "ghcr.io/example/app:1"}),
        lifetime_limit_seconds: None,
        max_idle_seconds: None,
        use_static_token: false,
        subdomain: None,
    }
}

/// A backend name as Plane 0.5.5 makes them: 14 characters from `[a-z0-9]`, no prefix
/// (like `5gnlc2uthninii`).
pub fn plane_made_name() -> BackendName {
    let random = BackendName::new_random();
    let name = &random.as_str()[BackendName::RANDOM_PREFIX.len()..];
    assert_eq!(name.len(), 14);
    assert!(!name.starts_with("ba-"));
    name.parse().expect("a Plane-made name parses")
}

/// [`request`] for a backend named `id` (`SpawnConfig::id`).
pub fn request_named(key: &str, id: &BackendName) -> ConnectRequest {
    let mut req = request(key);
    if let Some(spawn) = req.spawn_config.as_mut() {
        spawn.id = Some(id.clone());
    }
    req
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

/// Hands out every id of the first `event` partition (the sequence moves to its last id),
/// so that cleanup may retire it: `run_cleanup` drops whole partitions, never the one the
/// sequence is still in.
pub async fn fill_first_event_partition(db: &PlaneDatabase) {
    exec(
        db,
        r"select setval('event_id_seq',
                 (regexp_match(pg_get_expr(relpartbound, oid), 'TO \(''(\d+)''\)'))[1]::bigint - 1)
          from pg_class where relname = 'event_p0'",
    )
    .await;
}

/// The number of rows in `table`.
pub async fn count(db: &PlaneDatabase, table: &str) -> i64 {
    sqlx::query_scalar(&format!("select count(*) from {table}"))
        .fetch_one(db.pool())
        .await
        .expect("count rows")
}

/// A controller's everyday work on `db`, each step asserted: a drone, a backend for a key,
/// connecting again by the key, its route pending and then available, its whole lifecycle
/// seen in order by a keyed subscription, the drone's spawn action and its acknowledgement,
/// a keepalive, the route gone once it terminated, and cleanup deleting it. Tests run it as
/// another build or another role would.
pub async fn everyday_work(db: &PlaneDatabase) {
    use plane_db::backend::RouteInfoResult;
    let drone = drone(db).await;
    let key = format!("work-{}", BackendName::new_random());
    let first = db.connect(&request(&key)).await.expect("connect");
    assert!(first.spawned);
    let backend = first.backend_id.clone();
    let mut states = db
        .subscribe_with_key::<BackendState>(&backend)
        .await
        .expect("subscribe to the backend's states");
    let again = db.connect(&request(&key)).await.expect("connect by key");
    assert!(!again.spawned);
    assert_eq!(again.backend_id, backend);

    let pending = db
        .backend_action()
        .pending(drone.id, 10)
        .await
        .expect("pending actions");
    assert_eq!(pending.len(), 1, "the spawn action");
    assert!(db
        .backend_action()
        .ack(&pending[0].action_id, drone.id)
        .await
        .expect("ack"));

    let backends = db.backend();
    let route = || backends.route_info_for_token(&again.token);
    assert!(
        matches!(route().await.expect("route"), RouteInfoResult::Pending(_)),
        "a scheduled backend's route is pending"
    );
    let lifecycle = lifecycle();
    for state in &lifecycle[..4] {
        assert!(db
            .backend()
            .update_state(&backend, state)
            .await
            .expect("update state"));
    }
    match route().await.expect("route") {
        RouteInfoResult::Available(info) => assert_eq!(info.route.backend_id, backend),
        other => panic!("a ready backend's route is available, got {other:?}"),
    }
    assert!(db
        .backend()
        .update_keepalive(&backend)
        .await
        .expect("keepalive"));
    for state in &lifecycle[4..] {
        assert!(db
            .backend()
            .update_state(&backend, state)
            .await
            .expect("update state"));
    }
    for expected in &lifecycle {
        let seen = tokio::time::timeout(Duration::from_secs(30), states.next())
            .await
            .expect("the state arrives")
            .expect("bus open")
            .expect("not lagged");
        assert_eq!(seen.payload.status(), expected.status());
    }
    assert_eq!(
        route().await.expect("route"),
        RouteInfoResult::NotFound,
        "a terminated backend has no route"
    );

    exec(
        db,
        &format!(
            "update backend set last_status_time = now() - interval '30 days' where id = '{backend}'"
        ),
    )
    .await;
    let summary = db
        .run_cleanup(&plane_db::CleanupConfig::default())
        .await
        .expect("cleanup");
    assert_eq!(summary.backends.backends, 1, "the old backend is deleted");
    assert!(db
        .backend()
        .backend(&backend)
        .await
        .expect("read backend")
        .is_none());
}

/// The bus under concurrent writers: `writers` tasks take 5 backends each through 5 state
/// changes, and one subscription to every event receives each of those state events exactly
/// once, by id: the same ids as the table holds, and nothing more.
pub async fn bus_delivers_each_event_once(db: &PlaneDatabase, writers: usize) {
    const BACKENDS_PER_WRITER: usize = 5;
    const STATES: usize = 5;
    drone(db).await;
    let mut backends = Vec::new();
    for _ in 0..writers * BACKENDS_PER_WRITER {
        backends.push(spawn(db).await.backend_id);
    }
    let floor = db
        .latest_event_id()
        .await
        .expect("latest event")
        .unwrap_or(0);
    let mut all = db.subscribe_all_events().await.expect("subscribe");
    let tasks: Vec<_> = backends
        .chunks(BACKENDS_PER_WRITER)
        .map(|chunk| {
            let db = db.clone();
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                for backend in &chunk {
                    for state in lifecycle().iter().take(STATES) {
                        assert!(db
                            .backend()
                            .update_state(backend, state)
                            .await
                            .expect("update state"));
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let expected = writers * BACKENDS_PER_WRITER * STATES;
    let mut received = std::collections::HashSet::new();
    let mut earlier = std::collections::HashSet::new();
    while received.len() < expected {
        let event = tokio::time::timeout(Duration::from_secs(30), all.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {expected} events arrived", received.len()))
            .expect("bus open")
            .expect("not lagged");
        let id = event.id.expect("a stored event has an id");
        // The spawns' own events, committed before the subscription, may arrive too if the
        // bus had not read them yet; each at most once as well.
        if id <= floor {
            assert!(earlier.insert(id), "event {id} delivered twice");
            continue;
        }
        assert_eq!(
            event.kind, "backend_state",
            "only state changes were written"
        );
        assert!(received.insert(id), "event {id} delivered twice");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all.next())
            .await
            .is_err(),
        "nothing more is delivered"
    );
    let stored: std::collections::HashSet<i64> =
        sqlx::query_scalar("select id from event where id > $1")
            .bind(floor)
            .fetch_all(db.pool())
            .await
            .expect("read event ids")
            .into_iter()
            .collect();
    assert_eq!(received, stored, "exactly the stored events, by id");
}

/// Waits until `n` statements of `db`'s database wait for a lock (a test that holds a row
/// locked knows then that the calls it started are queued behind it).
pub async fn wait_for_lock_waiters(db: &PlaneDatabase, n: i64) {
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
