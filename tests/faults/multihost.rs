//! URLs that list several hosts (issue 22, item 1), against real servers:
//!
//! - a read-write search skips a host that is down and a standby, and lands on the primary;
//!   `standby` and `prefer-standby` land on the standby; when no host fits, `open` fails
//!   with every host named and why it was refused;
//! - a pool moves when its host stops fitting (turned read-only) and when it goes down:
//!   new and pooled connections, and the event bus's listener, all end up on the host that
//!   fits, and events written there are delivered.

use crate::common::drone;
use crate::support::*;
use plane_db::hosts::{HostRefusal, NoSuitableHost, TargetSessionAttrs};
use plane_db::testing::{private_server, TestServer};
use plane_db::{Error, OpenOptions, PlaneDatabase};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn start_server() -> Arc<TestServer> {
    match blocking(private_server).await {
        Ok(server) => Arc::new(server),
        // No local Postgres binaries fails too: a scenario that did not run must not pass.
        Err(error) => panic!("could not start a private server: {error}"),
    }
}

/// A port on 127.0.0.1 where nothing listens.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `postgres://postgres@127.0.0.1:p1,127.0.0.1:p2/database?query`.
fn multi_url(ports: &[u16], database: &str, query: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("postgres://postgres@{}/{database}?{query}", hosts.join(","))
}

/// The port of the server a pool's connection reaches.
async fn server_port(executor: impl sqlx::PgExecutor<'_>) -> u16 {
    let port: i32 = sqlx::query_scalar("select inet_server_port()")
        .fetch_one(executor)
        .await
        .unwrap();
    port as u16
}

/// Connections of the library on `url`'s server, by application name.
async fn library_connections(url: &str, name: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(
        "select count(*) from pg_stat_activity where application_name = $1 and pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn searches_skip_down_and_unfit_hosts_and_name_each_refusal() {
    let primary = start_server().await;
    let database = primary.create_database().await.unwrap();
    migrate(&database.url).await;
    let p = primary.clone();
    let standby = match blocking(move || p.replica()).await {
        Ok(replica) => Arc::new(replica),
        Err(error) => panic!("could not start a standby: {error}"),
    };
    let (primary_port, standby_port) = (primary.port().unwrap(), standby.port().unwrap());
    let dead = dead_port();
    let name = &database.name;

    // read-write: past a host that is down and a standby, to the primary.
    let url = multi_url(
        &[dead, standby_port, primary_port],
        name,
        "target_session_attrs=read-write",
    );
    let db = OpenOptions::new(&url)
        .unwrap()
        .max_connections(4)
        .open()
        .await
        .expect("open finds the primary");
    assert_eq!(server_port(db.pool()).await, primary_port);
    drone(&db).await; // a write
    db.pool().close().await;

    // standby and prefer-standby (the primary listed first): to the standby.
    for target in ["standby", "prefer-standby"] {
        let url = multi_url(
            &[dead, primary_port, standby_port],
            name,
            &format!("target_session_attrs={target}"),
        );
        let db = OpenOptions::new(&url).unwrap().open().await.unwrap();
        assert_eq!(server_port(db.pool()).await, standby_port, "{target}");
        db.pool().close().await;
    }
    // prefer-standby without a standby: the first primary that answered.
    let url = multi_url(
        &[dead, primary_port],
        name,
        "target_session_attrs=prefer-standby",
    );
    let db = OpenOptions::new(&url).unwrap().open().await.unwrap();
    assert_eq!(server_port(db.pool()).await, primary_port);
    db.pool().close().await;

    // No host fits: every host named, with its reason.
    let url = multi_url(
        &[dead, standby_port],
        name,
        "target_session_attrs=primary&connect_timeout=2",
    );
    let error = OpenOptions::new(&url).unwrap().open().await.unwrap_err();
    let text = error.to_string();
    let Error::NoSuitableHost(NoSuitableHost { target, attempts }) = error else {
        panic!("expected NoSuitableHost, got {text}");
    };
    assert_eq!(target, TargetSessionAttrs::Primary);
    assert_eq!(attempts.len(), 2, "{text}");
    assert_eq!(attempts[0].host, format!("127.0.0.1:{dead}"));
    assert!(
        matches!(&attempts[0].refusal, HostRefusal::Failed(reason) if reason.contains("refused")),
        "{text}"
    );
    assert_eq!(attempts[1].host, format!("127.0.0.1:{standby_port}"));
    assert!(
        matches!(&attempts[1].refusal, HostRefusal::Unfit(state) if state.in_recovery && state.read_only),
        "{text}"
    );
    assert!(text.contains("is a standby, read-only"), "{text}");

    // A replica URL with several hosts reads from the standby.
    let replica_url = multi_url(
        &[dead, primary_port, standby_port],
        name,
        "target_session_attrs=standby",
    );
    let db = OpenOptions::new(&database.url)
        .unwrap()
        .replica_url(&replica_url)
        .unwrap()
        .open()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = db.replicas();
        if status.first().is_some_and(|r| r.usable) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never became usable: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(library_connections(&standby.url_for(name), "plane-db-replica").await > 0);
    db.pool().close().await;
    drop(standby);
}

/// Two servers that are not replicas of each other, with the same database: the pool moves
/// between them as each stops fitting, with no restart, and the bus follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_moves_when_its_host_stops_fitting_or_goes_down() {
    let a = start_server().await;
    let b = start_server().await;
    let database = a.create_database().await.unwrap();
    let name = database.name.clone();
    as_superuser(
        &b.url_for("postgres"),
        &format!("create database \"{name}\""),
    )
    .await;
    migrate(&a.url_for(&name)).await;
    migrate(&b.url_for(&name)).await;
    let (port_a, port_b) = (a.port().unwrap(), b.port().unwrap());
    let url = multi_url(&[port_a, port_b], &name, "target_session_attrs=read-write");
    let db = OpenOptions::new(&url)
        .unwrap()
        .max_connections(4)
        .host_check_interval(Duration::from_millis(200))
        .open()
        .await
        .unwrap();
    assert_eq!(server_port(db.pool()).await, port_a);
    let mut events = db.subscribe_all_events().await.unwrap();
    assert_eq!(
        library_connections(&a.url_for(&name), "plane-db-listener").await,
        1
    );
    // Fill the pool with connections to A.
    hold_all(&db, 4, port_a).await;

    // A turns read-only (as a primary demoted in place would).
    as_superuser(
        &a.url_for("postgres"),
        "alter system set default_transaction_read_only = on",
    )
    .await;
    as_superuser(&a.url_for("postgres"), "select pg_reload_conf()").await;
    let moved = wait_for_port(&db, port_b).await;
    figures(
        "multihost_read_only",
        &[("seconds_to_move", format!("{:.2}", moved.as_secs_f64()))],
    );
    // Every pooled connection now reaches B: those to A were retired, not handed out.
    hold_all(&db, 4, port_b).await;
    drone(&db).await;
    emit_and_receive(&db, &mut events, "after-move-to-b").await;
    wait_until("the listener moved to B", || async {
        library_connections(&b.url_for(&name), "plane-db-listener").await == 1
            && library_connections(&a.url_for(&name), "plane-db-listener").await == 0
    })
    .await;

    // A writable again, B down: back to A.
    as_superuser(
        &a.url_for("postgres"),
        "alter system reset default_transaction_read_only",
    )
    .await;
    as_superuser(&a.url_for("postgres"), "select pg_reload_conf()").await;
    let b2 = b.clone();
    blocking(move || b2.stop()).await.unwrap();
    let moved = wait_for_port(&db, port_a).await;
    figures(
        "multihost_down",
        &[("seconds_to_move", format!("{:.2}", moved.as_secs_f64()))],
    );
    hold_all(&db, 4, port_a).await;
    drone(&db).await;
    emit_and_receive(&db, &mut events, "after-move-to-a").await;
    db.pool().close().await;
}

/// Acquires `n` connections at once and checks that each reaches `port`.
async fn hold_all(db: &PlaneDatabase, n: usize, port: u16) {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = db.pool().acquire().await.unwrap();
        assert_eq!(server_port(&mut *conn).await, port);
        held.push(conn);
    }
}

/// Waits until a new query of the pool reaches `port`; how long it took.
async fn wait_for_port(db: &PlaneDatabase, port: u16) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(2), async {
            let port: sqlx::Result<i32> = sqlx::query_scalar("select inet_server_port()")
                .fetch_one(db.pool())
                .await;
            port
        })
        .await
        {
            if p as u16 == port {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the pool did not move to port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn emit_and_receive(
    db: &PlaneDatabase,
    events: &mut plane_db::events::EventSubscription,
    key: &str,
) {
    emit_retrying(db, key).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(event))) if event.key.as_deref() == Some(key) => return,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("the event {key} was not delivered"),
        }
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
