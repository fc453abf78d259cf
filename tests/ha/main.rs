//! The high-availability suite: the library against a real Patroni cluster (etcd, three
//! PostgreSQL nodes managed by Patroni, HAProxy in front), started per test by
//! `plane_db::testing::TestPatroniCluster`.
//!
//! A binary of its own: each cluster takes several seconds and most of a core while it
//! fails over, so these tests neither slow down nor disturb the others. They need the
//! `patroni`, `etcd-server` and `haproxy` packages and fail, naming the package, if one is
//! missing. Each test prints one `FIGURES` line; see them with
//! `cargo test --test ha -- --nocapture`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[allow(dead_code)]
#[path = "../it/common.rs"]
mod common;
mod failover;
mod killed;
#[allow(dead_code)]
#[path = "../faults/support.rs"]
mod support;

use plane_db::testing::{PatroniOptions, TestPatroniCluster};
use sqlx::{Connection, PgConnection};

/// How long a client waits for one connection attempt or one statement: a node that died
/// or hangs must not stall the writer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Rows acknowledged by the writer: each key with when its INSERT returned.
type Acknowledged = Arc<Mutex<Vec<(String, Instant)>>>;

/// Inserts rows with keys of its own (`{prefix}-{n}`) through `url` one after another
/// until `stop` is set, on one connection that it opens again after any error, and records
/// every acknowledged key.
async fn writer(url: String, prefix: String, stop: Arc<AtomicBool>, acknowledged: Acknowledged) {
    let mut connection: Option<PgConnection> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if connection.is_none() {
            match tokio::time::timeout(CLIENT_TIMEOUT, PgConnection::connect(&url)).await {
                Ok(Ok(opened)) => connection = Some(opened),
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let key = format!("{prefix}-{n}");
        n += 1;
        let insert = sqlx::query("insert into ha_rows (key) values ($1)")
            .bind(&key)
            .execute(connection.as_mut().expect("opened above"));
        match tokio::time::timeout(CLIENT_TIMEOUT, insert).await {
            Ok(Ok(_)) => acknowledged.lock().unwrap().push((key, Instant::now())),
            // Connection refused or cut, a read-only primary that is still being promoted
            // (SQLSTATE 25006), a timeout: all mean "try again on a new connection".
            _ => connection = None,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A prefix no other run uses, so that keys are the client's own and never repeat.
fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

fn seconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64())
}

/// Starts a synchronous cluster, writes through HAProxy, kills the primary's postmaster,
/// and checks that Patroni promotes the sync standby, that writes go on through HAProxy,
/// that the old primary comes back as a streaming standby and that no acknowledged row was
/// lost.
/// The acknowledged keys that the server at `url` does not have, and how many were
/// acknowledged.
async fn lost_rows(acknowledged: &Acknowledged, url: &str) -> (Vec<String>, usize) {
    let acknowledged: Vec<String> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .collect();
    let mut check = PgConnection::connect(url).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar("select key from ha_rows")
        .fetch_all(&mut check)
        .await
        .unwrap();
    check.close().await.unwrap();
    let stored: HashSet<String> = stored.into_iter().collect();
    let total = acknowledged.len();
    let lost = acknowledged
        .into_iter()
        .filter(|key| !stored.contains(key))
        .collect();
    (lost, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_starts_fails_over_and_rejoins() {
    let _one = failover::ONE_CLUSTER_AT_A_TIME.lock().await;
    let started = Instant::now();
    let cluster =
        tokio::task::block_in_place(|| TestPatroniCluster::start(&PatroniOptions::new(true)))
            .unwrap();
    let start_time = started.elapsed();
    let old = cluster.leader().unwrap().expect("a leader after start");
    let sync = cluster
        .sync_standby()
        .unwrap()
        .expect("a sync standby after start");
    assert_ne!(old, sync);
    let timeline_before = cluster.timeline().unwrap();

    let url = cluster.create_database("ha_rows").unwrap();
    let mut setup = PgConnection::connect(&url).await.unwrap();
    sqlx::query("create table ha_rows (key text primary key)")
        .execute(&mut setup)
        .await
        .unwrap();
    setup.close().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Acknowledged = Arc::default();
    let writing = tokio::spawn(writer(
        url.clone(),
        run_prefix(),
        stop.clone(),
        acknowledged.clone(),
    ));
    // Rows written before the fault.
    while acknowledged.lock().unwrap().len() < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fault_clock = SystemTime::now();
    let fault = Instant::now();
    cluster.kill_postmaster(old).unwrap();
    let (new, elected) =
        tokio::task::block_in_place(|| cluster.wait_for_new_leader(old, Duration::from_secs(30)))
            .unwrap();
    assert_eq!(
        new,
        sync,
        "Patroni promoted {} rather than the sync standby {}",
        cluster.node_name(new),
        cluster.node_name(sync)
    );

    // Writes through HAProxy go on after the failover.
    let resumed = loop {
        let after_fault = acknowledged
            .lock()
            .unwrap()
            .iter()
            .find(|(_, at)| *at > elected)
            .map(|(_, at)| *at);
        if let Some(at) = after_fault {
            break at;
        }
        assert!(
            fault.elapsed() < Duration::from_secs(30),
            "no write succeeded through HAProxy after the failover{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let rejoined = tokio::task::block_in_place(|| {
        cluster.wait_for_streaming_replica(old, Duration::from_secs(30))
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();

    let timeline_after = cluster.timeline().unwrap();
    assert!(timeline_after > timeline_before, "{timeline_after}");
    let promoted_at = tokio::task::block_in_place(|| {
        cluster.promoted_at(timeline_after, Duration::from_secs(10))
    })
    .unwrap();
    let patroni_promotion = promoted_at.duration_since(fault_clock).unwrap_or_default();

    // Every acknowledged row is on the new primary.
    let (lost, total) = lost_rows(&acknowledged, &cluster.node_url(new, "ha_rows")).await;
    assert!(
        lost.is_empty(),
        "{} of {total} acknowledged rows are not on the new primary, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );

    let root = cluster.root().to_owned();
    let teardown = Instant::now();
    drop(cluster);
    let teardown = teardown.elapsed();
    assert!(!root.exists(), "{} was not removed", root.display());

    println!(
        "FIGURES ha failover: start {} s; after SIGKILL of the primary's postmaster: Patroni \
         promoted after {} s, new leader seen {} s, writes through HAProxy resumed {} s, old \
         primary streaming again {} s; {} rows acknowledged, 0 lost; teardown {} s",
        seconds(start_time),
        seconds(patroni_promotion),
        seconds(elected - fault),
        seconds(resumed - fault),
        seconds(rejoined - fault),
        total,
        seconds(teardown),
    );
}

/// The rest of the cluster's faults, with a writer running through HAProxy all along: a
/// planned switchover, a hung primary (its Patroni and PostgreSQL stopped with SIGSTOP)
/// that rejoins once it wakes, and a standby's Patroni killed and started again. No
/// acknowledged row may be lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_switches_over_and_survives_a_hung_primary() {
    let _one = failover::ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster =
        tokio::task::block_in_place(|| TestPatroniCluster::start(&PatroniOptions::new(true)))
            .unwrap();
    let hosts = cluster.multi_host_url("postgres");
    for node in 0..cluster.node_count() {
        let port = cluster.node_port(node);
        assert!(hosts.contains(&format!("127.0.0.1:{port}")), "{hosts}");
    }
    assert!(hosts.ends_with("/postgres"), "{hosts}");

    let url = cluster.create_database("ha_rows").unwrap();
    let mut setup = PgConnection::connect(&url).await.unwrap();
    sqlx::query("create table ha_rows (key text primary key)")
        .execute(&mut setup)
        .await
        .unwrap();
    setup.close().await.unwrap();
    let mut standby = PgConnection::connect(&cluster.replicas_url("postgres"))
        .await
        .unwrap();
    let in_recovery: bool = sqlx::query_scalar("select pg_is_in_recovery()")
        .fetch_one(&mut standby)
        .await
        .unwrap();
    assert!(in_recovery, "HAProxy's replica port reached the primary");
    standby.close().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Acknowledged = Arc::default();
    let writing = tokio::spawn(writer(
        url.clone(),
        run_prefix(),
        stop.clone(),
        acknowledged.clone(),
    ));
    let timeline = cluster.timeline().unwrap();

    // A planned switchover promotes the sync standby.
    let sync = cluster.sync_standby().unwrap().expect("a sync standby");
    let switch = Instant::now();
    let old = tokio::task::block_in_place(|| cluster.switchover()).unwrap();
    let (leader, _) =
        tokio::task::block_in_place(|| cluster.wait_for_new_leader(old, Duration::from_secs(30)))
            .unwrap();
    let switched = switch.elapsed();
    assert_eq!(leader, sync);
    tokio::task::block_in_place(|| {
        cluster.wait_for_streaming_replica(old, Duration::from_secs(30))
    })
    .unwrap();
    assert_eq!(cluster.timeline().unwrap(), timeline + 1);

    // A hung primary: its leader key expires (ttl 10 s), a standby takes over; once it
    // wakes it is demoted, rewound if needed, and streams again.
    tokio::task::block_in_place(|| cluster.wait_until_ready(Duration::from_secs(30))).unwrap();
    let hung = leader;
    let fault_clock = SystemTime::now();
    let fault = Instant::now();
    cluster.pause(hung).unwrap();
    let (leader, elected) =
        tokio::task::block_in_place(|| cluster.wait_for_new_leader(hung, Duration::from_secs(40)))
            .unwrap();
    cluster.resume(hung).unwrap();
    let rejoined = tokio::task::block_in_place(|| {
        cluster.wait_for_streaming_replica(hung, Duration::from_secs(40))
    })
    .unwrap();
    assert_eq!(cluster.timeline().unwrap(), timeline + 2);
    let promoted_at =
        tokio::task::block_in_place(|| cluster.promoted_at(timeline + 2, Duration::from_secs(10)))
            .unwrap();
    let history = cluster.history().unwrap();
    assert_eq!(history.len(), timeline as usize + 1, "{history:?}");
    assert_eq!(
        history.last().unwrap().new_leader.as_deref(),
        Some(cluster.node_name(leader))
    );

    // A standby's Patroni dies; its PostgreSQL keeps streaming, and a new Patroni takes it
    // over.
    let standby = (0..cluster.node_count())
        .find(|&node| node != leader)
        .unwrap();
    cluster.kill_patroni(standby).unwrap();
    cluster.restart_patroni(standby).unwrap();
    tokio::task::block_in_place(|| {
        cluster.wait_until_ready(Duration::from_secs(30))?;
        cluster.wait_for_streaming_replica(standby, Duration::from_secs(30))
    })
    .unwrap();

    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    let (lost, total) = lost_rows(&acknowledged, &cluster.node_url(leader, "ha_rows")).await;
    assert!(
        lost.is_empty(),
        "{} of {total} acknowledged rows lost",
        lost.len()
    );

    println!(
        "FIGURES ha switchover and hung primary: switchover {} s; after SIGSTOP of the \
         primary: Patroni promoted after {} s, new leader seen {} s, old primary streaming \
         again {} s after the fault; {} rows acknowledged, 0 lost",
        seconds(switched),
        seconds(promoted_at.duration_since(fault_clock).unwrap_or_default()),
        seconds(elected - fault),
        seconds(rejoined - fault),
        total,
    );
}
