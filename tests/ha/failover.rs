//! plane-db under automatic failover (issue 22, items 3 and 4): a Patroni cluster of three
//! nodes, the library's controllers on it through HAProxy or through a multi-host URL.
//!
//! Load: 16 writers in one controller take backends through their whole lives (`connect`,
//! then seven `update_state`s), each call bounded by a client timeout (as a request handler
//! would be) and retried; 4 subscriber controllers, each with a bus of its own, receive
//! every event; a proxy controller looks up routes of ready backends on the replicas.
//! Faults, each followed by the old primary's return as a streaming replica (Patroni
//! rejoins it, with `pg_rewind` where needed): the primary's postmaster SIGKILLed, the
//! primary's node paused (SIGSTOP of Patroni and Postgres, as a hung machine; resumed once
//! another node leads), and a planned `patronictl switchover`.
//!
//! Checked at the end, on the final primary: every write a caller was told had committed is
//! there (with synchronous replication); every subscriber received every event of the
//! `event` table once (none lost, none twice); the route lookups never gave a ready
//! backend's route wrongly; the library holds no connection but replica reads on a node
//! that is not the primary. Measured per fault: seconds from the fault to Patroni's
//! promotion, to the first acknowledged write that began after the fault, and to the first
//! event of such a write delivered to all four subscribers.

use crate::common::{drone, request};
use crate::support::state_for;
use chrono::{DateTime, Utc};
use plane_db::backend::RouteInfoResult;
use plane_db::testing::{PatroniOptions, TestPatroniCluster};
use plane_db::types::{BackendStatus, BearerToken, ControllerName, NodeId};
use plane_db::{OpenOptions, PlaneDatabase};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How the controllers reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// HAProxy's primary and replica ports (routing by Patroni's REST checks).
    HaProxy,
    /// Every node listed in one URL, `target_session_attrs=read-write` for the primary and
    /// `prefer-standby` for the replica reads.
    MultiHost,
}

/// What happens to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of its postmaster.
    Kill,
    /// SIGSTOP of its Patroni and Postgres; SIGCONT once another node leads.
    Pause,
    /// `patronictl switchover`.
    Switchover,
}

const WRITERS: usize = 16;
const SUBSCRIBERS: usize = 4;
/// The bound on one call of a writer: a call stuck on a hung node is given up and retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Steady load before each fault, and after the last one.
const STEADY: Duration = Duration::from_secs(3);
/// Longest wait for a new leader, and for the old one to be streaming again.
const PATRONI_WAIT: Duration = Duration::from_secs(90);
/// Longest wait for a new leader: a kill takes 2 to 4 s, a pause the ttl and a loop.
const NEW_LEADER_WAIT: Duration = Duration::from_secs(40);
/// Longest wait for the old primary to stream again by itself (after `pg_rewind` it
/// replays what was written since it diverged), and again after a rebuild.
const REJOIN_WAIT: Duration = Duration::from_secs(120);
const REBUILD_WAIT: Duration = Duration::from_secs(300);
const DATABASE: &str = "plane";

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

/// One acknowledged write: the backend, the status written, when its first attempt began
/// and when it was acknowledged.
#[derive(Debug, Clone)]
struct Ack {
    backend: String,
    status: BackendStatus,
    began: Instant,
    acked: Instant,
}

/// What each subscriber received: event id, key, status, when.
/// (An event is known by its id and creation time: a failover that loses rows may hand
/// their ids out again.)
type Received = Arc<Mutex<Vec<(i64, DateTime<Utc>, String, Option<String>, Instant)>>>;

/// The figures of one fault.
#[derive(Debug)]
pub struct FaultFigures {
    pub fault: Fault,
    /// Patroni's promotion, from the fault (None for a switchover that Patroni did not
    /// record).
    pub promoted: Option<Duration>,
    pub first_write: Duration,
    pub first_event: Duration,
    /// The longest time without an acknowledged write, from the fault until the old
    /// primary streams again.
    pub write_gap: Duration,
    /// The same for deliveries, at the subscriber that waited longest.
    pub event_gap: Duration,
    /// From the fault until the old primary streamed again by itself (`None`: it had to
    /// be rebuilt).
    pub rejoin: Option<Duration>,
    /// Route lookups that failed (an error) from the fault until the first write.
    pub route_errors: u64,
}

/// The figures of one run.
#[derive(Debug)]
pub struct RunFigures {
    pub faults: Vec<FaultFigures>,
    pub acked: usize,
    pub acked_lost: usize,
    pub events_stored: usize,
    pub events_lost: usize,
    pub events_twice: usize,
    /// Events delivered whose rows the final primary does not have (asynchronous
    /// replication: committed on a primary, then lost with it).
    pub delivered_not_stored: usize,
    pub lagged_reports: u64,
    pub write_errors: u64,
    /// Updates refused on their first attempt: the backend's earlier acknowledged state was
    /// lost in a failover.
    pub refused: u64,
    pub route_lookups: u64,
    pub route_errors: u64,
    pub route_wrong: u64,
    /// Old primaries that did not stream again by themselves and were rebuilt.
    pub reinits: usize,
    /// Kills after which Patroni restarted the primary in place instead of failing over.
    pub restarted_in_place: usize,
}

/// Runs the load against a fresh cluster through `faults`, and checks and measures it.
pub async fn run(client: Client, synchronous: bool, faults: &[Fault]) -> RunFigures {
    let options = PatroniOptions::new(synchronous);
    let cluster = match blocking(move || TestPatroniCluster::start(&options)).await {
        Ok(cluster) => Arc::new(cluster),
        Err(error) => panic!("could not start a Patroni cluster: {error}"),
    };
    let c = cluster.clone();
    blocking(move || c.create_database(DATABASE))
        .await
        .expect("create the database");
    let (url, replica_url) = match client {
        Client::HaProxy => (
            cluster.primary_url(DATABASE),
            cluster.replicas_url(DATABASE),
        ),
        Client::MultiHost => {
            let url = cluster.multi_host_url(DATABASE);
            (
                format!("{url}?target_session_attrs=read-write&connect_timeout=2"),
                format!("{url}?target_session_attrs=prefer-standby&connect_timeout=2"),
            )
        }
    };
    plane_db::open_and_migrate(&url)
        .await
        .expect("migrate")
        .pool()
        .close()
        .await;

    let writers_db = OpenOptions::new(&url)
        .unwrap()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(4))
        .open()
        .await
        .expect("open the writers' controller");
    let drone = drone(&writers_db).await;
    let (controller, drone) = (drone.controller, drone.id);
    let stop = Arc::new(AtomicBool::new(false));

    let mut subscribers = Vec::new();
    let mut received: Vec<Received> = Vec::new();
    let lagged = Arc::new(AtomicU64::new(0));
    for _ in 0..SUBSCRIBERS {
        let db = OpenOptions::new(&url)
            .unwrap()
            .max_connections(2)
            .open()
            .await
            .expect("open a subscriber's controller");
        let mut subscription = db.subscribe_all_events().await.expect("subscribe");
        let got: Received = Arc::default();
        received.push(got.clone());
        let lagged = lagged.clone();
        subscribers.push(tokio::spawn(async move {
            let _db = db;
            while let Some(next) = subscription.next().await {
                match next {
                    Ok(event) => {
                        let Some(id) = event.id else { continue };
                        let status = event
                            .data
                            .get("status")
                            .and_then(|s| s.as_str())
                            .map(str::to_string);
                        got.lock().unwrap().push((
                            id,
                            event.created_at,
                            event.key.clone().unwrap_or_default(),
                            status,
                            Instant::now(),
                        ));
                    }
                    Err(_) => {
                        lagged.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Nothing writes yet: every event above this id was committed after every subscriber
    // was live, and each must be delivered (those before are not promised).
    let live_from: i64 = sqlx::query_scalar("select coalesce(max(id), 0) from event")
        .fetch_one(writers_db.pool())
        .await
        .unwrap();
    let heartbeats = tokio::spawn(heartbeat(
        writers_db.clone(),
        controller,
        drone,
        stop.clone(),
    ));

    let proxy_db = OpenOptions::new(&url)
        .unwrap()
        .replica_url(&replica_url)
        .unwrap()
        .max_connections(4)
        .open()
        .await
        .expect("open the proxy's controller");
    let routes: Arc<Mutex<Vec<BearerToken>>> = Arc::default();
    let first_route = ready_backend(&writers_db, "route-0").await;
    routes.lock().unwrap().push(first_route);
    let route_counts = Arc::new(RouteCounts::default());
    let proxy = tokio::spawn(look_up_routes(
        proxy_db.clone(),
        routes.clone(),
        route_counts.clone(),
        stop.clone(),
    ));

    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let write_errors = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            tokio::spawn(writer(
                writers_db.clone(),
                format!("w{i}"),
                acks.clone(),
                write_errors.clone(),
                refused.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut figures = Vec::new();
    let mut fault_times = Vec::new();
    let mut reinits = 0;
    let mut restarted_in_place = 0;
    for (round, fault) in faults.iter().enumerate() {
        // Every standby streaming and, in synchronous mode, a sync standby chosen: a fault
        // right after the last one's rejoin finds no candidate, and Patroni restarts the
        // primary in place instead of failing over (correctly: none is in sync).
        let c = cluster.clone();
        let ready = blocking(move || c.wait_until_ready(PATRONI_WAIT)).await;
        if let Err(error) = ready {
            // A standby that stays in recovery without streaming (seen after many pauses
            // under load) is rebuilt, and counted, as an old primary would be.
            eprintln!("round {round}: the cluster is not ready: {error}");
            let c = cluster.clone();
            reinits += blocking(move || rebuild_stuck_standbys(&c))
                .await
                .unwrap_or_else(|error| panic!("round {round}: rebuilding failed: {error}"));
            let c = cluster.clone();
            blocking(move || c.wait_until_ready(PATRONI_WAIT))
                .await
                .unwrap_or_else(|error| {
                    panic!("round {round}: the cluster is not ready after rebuilding: {error}")
                });
        }
        tokio::time::sleep(STEADY).await;
        let c = cluster.clone();
        let old = blocking(move || c.leader())
            .await
            .expect("ask Patroni")
            .expect("a leader");
        let timeline = {
            let c = cluster.clone();
            blocking(move || c.timeline()).await.expect("the timeline")
        };
        let route_errors_before = route_counts.errors.load(Ordering::Relaxed);
        let (at, at_system) = (Instant::now(), SystemTime::now());
        let at_fault = at;
        fault_times.push(at_system);
        let c = cluster.clone();
        let fault = *fault;
        blocking(move || match fault {
            Fault::Kill => c.kill_postmaster(old).map(|_| ()),
            Fault::Pause => c.pause(old),
            Fault::Switchover => c.switchover().map(|_| ()),
        })
        .await
        .expect("the fault");
        // A write that began between `at` and the signal could still reach the old primary:
        // the first write after a kill or a pause counts from the signal. A switchover
        // counts from the command, and is measured by the longest gap in writes.
        let from = match fault {
            Fault::Switchover => at,
            Fault::Kill | Fault::Pause => Instant::now(),
        };
        let c = cluster.clone();
        let elected = blocking(move || c.wait_for_new_leader(old, NEW_LEADER_WAIT)).await;
        let new = match elected {
            Ok((new, _)) => new,
            // A killed postmaster that Patroni restarts in place, keeping the leader key:
            // what it does when no standby is fit to take over (the sync standby more than
            // `maximum_lag_on_failover` behind under this load). Not a failover; the load
            // goes on against the restarted primary, and the round is counted apart.
            Err(error) if fault == Fault::Kill => {
                eprintln!("round {round}: no failover, the primary restarted in place? {error}");
                let c = cluster.clone();
                blocking(move || c.wait_until_ready(PATRONI_WAIT))
                    .await
                    .unwrap_or_else(|error| {
                        panic!("round {round}: no new leader and no primary: {error}")
                    });
                restarted_in_place += 1;
                continue;
            }
            Err(error) => panic!("round {round}: no new leader: {error}"),
        };
        if fault == Fault::Pause {
            let c = cluster.clone();
            blocking(move || c.resume(old)).await.expect("resume");
        }
        let c = cluster.clone();
        let promoted = blocking(move || c.promoted_at(timeline + 1, Duration::from_secs(10)))
            .await
            .ok()
            .and_then(|t| t.duration_since(at_system).ok());
        // A backend made ready on the new primary, whose route the proxy must find.
        let route = ready_backend(&writers_db, &format!("route-{}", round + 1)).await;
        routes.lock().unwrap().push(route);
        let first_write = wait_first_write(&acks, from).await;
        let first_event = wait_first_event(&acks, &received, from).await;
        let route_errors = route_counts.errors.load(Ordering::Relaxed) - route_errors_before;
        // The old primary back as a standby: by itself (Patroni rewinds it where needed),
        // or, when it stays in recovery without streaming, rebuilt (`patronictl reinit`),
        // counted.
        let c = cluster.clone();
        let rejoined = blocking(move || c.wait_for_streaming_replica(old, REJOIN_WAIT)).await;
        let rejoin = match rejoined {
            Ok(at) => Some(at - at_fault),
            Err(error) => {
                eprintln!("round {round}: the old primary did not stream again by itself: {error}");
                reinits += 1;
                let c = cluster.clone();
                blocking(move || {
                    c.reinit(old)?;
                    c.wait_for_streaming_replica(old, REBUILD_WAIT)
                })
                .await
                .unwrap_or_else(|error| {
                    panic!("round {round}: the old primary did not rejoin after reinit: {error}")
                });
                None
            }
        };
        let write_gap = longest_gap(
            acks.lock().unwrap().iter().map(|ack| ack.acked).collect(),
            at,
        );
        let event_gap = received
            .iter()
            .map(|got| longest_gap(got.lock().unwrap().iter().map(|r| r.4).collect(), at))
            .max()
            .unwrap_or_default();
        println!(
            "round {round}: {fault:?} of node {old}, node {new} leads; promoted after {promoted:?}, \
             first write after {first_write:?}, first event after {first_event:?}, \
             longest gap in writes {write_gap:?}, in deliveries {event_gap:?}"
        );
        figures.push(FaultFigures {
            fault,
            promoted,
            first_write,
            first_event,
            write_gap,
            event_gap,
            route_errors,
            rejoin,
        });
    }
    tokio::time::sleep(STEADY).await;

    // The old primaries are back as replicas: none holds a connection of the library but
    // replica reads (checked while the load still runs).
    let c = cluster.clone();
    let leader = blocking(move || c.leader())
        .await
        .expect("ask Patroni")
        .expect("a leader");
    for node in 0..cluster.node_count() {
        if node == leader {
            continue;
        }
        let names = library_connections(&cluster.node_url(node, "postgres")).await;
        assert!(
            names.iter().all(|name| name == "plane-db-replica"),
            "node {node} (a replica) holds connections of the library: {names:?}"
        );
    }

    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("a writer");
    }
    proxy.await.expect("the proxy");
    heartbeats.await.expect("the heartbeats");

    // Every event stored on the final primary, and every acknowledged write.
    let primary = sqlx::PgPool::connect(&cluster.node_url(leader, DATABASE))
        .await
        .expect("the final primary");
    let stored: Vec<(i64, DateTime<Utc>)> =
        sqlx::query_as("select id, created_at from event where id > $1 order by id")
            .bind(live_from)
            .fetch_all(&primary)
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.iter().any(|got| {
        let got = got.lock().unwrap();
        got.iter().filter(|(id, ..)| *id > live_from).count() < stored.len()
    }) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored_set: HashSet<(i64, DateTime<Utc>)> = stored.iter().copied().collect();
    let (mut events_lost, mut events_twice, mut delivered_not_stored) = (0, 0, 0);
    for (subscriber, got) in received.iter().enumerate() {
        let got = got.lock().unwrap().clone();
        let mut seen = HashSet::new();
        for (id, created, ..) in got.iter().filter(|(id, ..)| *id > live_from) {
            if !seen.insert((*id, *created)) {
                events_twice += 1;
                eprintln!("subscriber {subscriber}: event {id} delivered twice");
            } else if !stored_set.contains(&(*id, *created)) {
                delivered_not_stored += 1;
            }
        }
        let mut missing: Vec<i64> = stored_set.difference(&seen).map(|(id, _)| *id).collect();
        missing.sort();
        events_lost += missing.len();
        for id in missing.iter().take(20) {
            let row: (String, String, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
                "select coalesce(key, ''), xid::text, created_at from event where id = $1",
            )
            .bind(id)
            .fetch_one(&primary)
            .await
            .unwrap();
            eprintln!(
                "subscriber {subscriber}: event {id} not delivered (key {}, xid {}, created {})",
                row.0, row.1, row.2
            );
        }
    }
    for (round, at) in fault_times.iter().enumerate() {
        eprintln!(
            "round {round}: fault at {}",
            chrono::DateTime::<chrono::Utc>::from(*at)
        );
    }
    let states: Vec<(String, String)> =
        sqlx::query_as("select backend_id, state->>'status' from backend_state")
            .fetch_all(&primary)
            .await
            .unwrap();
    let states: HashSet<(String, String)> = states.into_iter().collect();
    let acks = acks.lock().unwrap().clone();
    let acked_lost = acks
        .iter()
        .filter(|ack| !states.contains(&(ack.backend.clone(), status_name(ack.status))))
        .count();
    primary.close().await;
    for subscriber in subscribers {
        subscriber.abort();
    }
    RunFigures {
        faults: figures,
        acked: acks.len(),
        acked_lost,
        events_stored: stored.len(),
        events_lost,
        events_twice,
        delivered_not_stored,
        lagged_reports: lagged.load(Ordering::Relaxed),
        write_errors: write_errors.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        route_lookups: route_counts.lookups.load(Ordering::Relaxed),
        route_errors: route_counts.errors.load(Ordering::Relaxed),
        route_wrong: route_counts.wrong.load(Ordering::Relaxed),
        reinits,
        restarted_in_place,
    }
}

/// Rebuilds (`patronictl reinit`) every standby that does not stream from the leader, and
/// waits until each streams; how many it rebuilt.
fn rebuild_stuck_standbys(
    cluster: &TestPatroniCluster,
) -> Result<usize, plane_db::testing::HarnessError> {
    let leader = cluster.leader()?;
    let mut rebuilt = 0;
    for node in 0..cluster.node_count() {
        if Some(node) == leader
            || cluster
                .wait_for_streaming_replica(node, Duration::from_secs(1))
                .is_ok()
        {
            continue;
        }
        cluster.reinit(node)?;
        cluster.wait_for_streaming_replica(node, REBUILD_WAIT)?;
        rebuilt += 1;
    }
    Ok(rebuilt)
}

/// The `application_name`s of the library's connections on a node.
async fn library_connections(url: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(url).await.expect("reach the node");
    let names: Vec<String> = sqlx::query_scalar(
        "select application_name from pg_stat_activity \
         where application_name like 'plane-db%' and pid <> pg_backend_pid()",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    names
}

/// The longest interval between `from` and the last of `times` that holds none of them.
fn longest_gap(mut times: Vec<Instant>, from: Instant) -> Duration {
    times.retain(|t| *t >= from);
    times.sort();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest
}

/// Waits for the first acknowledged write that began after `fault`; how long after.
async fn wait_first_write(acks: &Mutex<Vec<Ack>>, fault: Instant) -> Duration {
    let deadline = Instant::now() + PATRONI_WAIT;
    loop {
        let first = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|ack| ack.began > fault)
            .map(|ack| ack.acked)
            .min();
        if let Some(first) = first {
            return first - fault;
        }
        assert!(
            Instant::now() < deadline,
            "no write was acknowledged after the fault"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every subscriber has received an event of a write that began after
/// `fault`; how long after the fault the last of them got its first.
async fn wait_first_event(
    acks: &Mutex<Vec<Ack>>,
    received: &[Received],
    fault: Instant,
) -> Duration {
    let deadline = Instant::now() + PATRONI_WAIT;
    loop {
        let after: HashSet<(String, String)> = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|ack| ack.began > fault)
            .map(|ack| (ack.backend.clone(), status_name(ack.status)))
            .collect();
        let firsts: Vec<Option<Instant>> = received
            .iter()
            .map(|got| {
                got.lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, _, key, status, _)| {
                        status
                            .as_ref()
                            .is_some_and(|s| after.contains(&(key.clone(), s.clone())))
                    })
                    .map(|(.., at)| *at)
                    .min()
            })
            .collect();
        if firsts.iter().all(Option::is_some) {
            return firsts.into_iter().flatten().max().unwrap_or(fault) - fault;
        }
        assert!(
            Instant::now() < deadline,
            "not every subscriber received an event written after the fault"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates backends under its own keys and takes each through its whole life, each call
/// bounded by [`CALL_TIMEOUT`] and retried until it succeeds.
async fn writer(
    db: PlaneDatabase,
    prefix: String,
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{n}");
        n += 1;
        let began = Instant::now();
        let response = loop {
            match tokio::time::timeout(CALL_TIMEOUT, db.connect(&request(&key))).await {
                Ok(Ok(response)) => break Some(response),
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let Some(response) = response else { return };
        let backend = response.backend_id;
        acks.lock().unwrap().push(Ack {
            backend: backend.to_string(),
            status: BackendStatus::Scheduled,
            began,
            acked: Instant::now(),
        });
        'life: for status in &BackendStatus::ALL[1..] {
            let state = state_for(*status);
            let began = Instant::now();
            let mut failed = false;
            loop {
                let update =
                    tokio::time::timeout(CALL_TIMEOUT, db.backend().update_state(&backend, &state))
                        .await;
                match update {
                    // After a failed attempt, a refusal means that attempt had committed.
                    Ok(Ok(accepted)) if accepted || failed => {
                        acks.lock().unwrap().push(Ack {
                            backend: backend.to_string(),
                            status: *status,
                            began,
                            acked: Instant::now(),
                        });
                        break;
                    }
                    // Refused on its first attempt: an earlier acknowledged write of this
                    // backend was lost in a failover (asynchronous replication). The rest
                    // of its life is skipped; the final check counts what was lost.
                    Ok(Ok(_)) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        break 'life;
                    }
                    _ => {
                        failed = true;
                        errors.fetch_add(1, Ordering::Relaxed);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct RouteCounts {
    lookups: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
}

/// Looks up the routes of ready backends in turn, every 10 ms: each must be found
/// available (an error counts apart from a wrong answer).
async fn look_up_routes(
    db: PlaneDatabase,
    routes: Arc<Mutex<Vec<BearerToken>>>,
    counts: Arc<RouteCounts>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let token = {
            let routes = routes.lock().unwrap();
            routes[i % routes.len()].clone()
        };
        i += 1;
        counts.lookups.fetch_add(1, Ordering::Relaxed);
        let lookup =
            tokio::time::timeout(CALL_TIMEOUT, db.backend().route_info_for_token(&token)).await;
        match lookup {
            Ok(Ok(RouteInfoResult::Available(_))) => {}
            Ok(Ok(other)) => {
                counts.wrong.fetch_add(1, Ordering::Relaxed);
                eprintln!("route lookup: expected available, got {other:?}");
            }
            _ => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A backend created under `key` and made ready (retrying through a failover); its token.
async fn ready_backend(db: &PlaneDatabase, key: &str) -> BearerToken {
    let deadline = Instant::now() + PATRONI_WAIT;
    let response = loop {
        match tokio::time::timeout(CALL_TIMEOUT, db.connect(&request(key))).await {
            Ok(Ok(response)) => break response,
            other => {
                assert!(Instant::now() < deadline, "connect {key}: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for status in [
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
    ] {
        let mut failed = false;
        loop {
            let state = state_for(status);
            let update = tokio::time::timeout(
                CALL_TIMEOUT,
                db.backend().update_state(&response.backend_id, &state),
            )
            .await;
            match update {
                Ok(Ok(accepted)) if accepted || failed => break,
                other => {
                    failed = true;
                    assert!(Instant::now() < deadline, "{key}: {status:?}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    response.token
}

/// Keeps the controller and its drone eligible through failovers (errors are expected
/// while there is no primary).
async fn heartbeat(
    db: PlaneDatabase,
    controller: ControllerName,
    drone: NodeId,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = tokio::time::timeout(
            CALL_TIMEOUT,
            db.controller().heartbeat(&controller, true, "0.1.0", "ha"),
        )
        .await;
        let _ = tokio::time::timeout(
            CALL_TIMEOUT,
            db.drone().heartbeat(drone, chrono::Utc::now()),
        )
        .await;
    }
}

/// p50 and max of `values`, in seconds.
pub fn p50_max(mut values: Vec<Duration>) -> String {
    values.sort();
    match (values.get(values.len() / 2), values.last()) {
        (Some(p50), Some(max)) => format!("{:.1}/{:.1}", p50.as_secs_f64(), max.as_secs_f64()),
        _ => "-".to_string(),
    }
}

/// Prints a run's figures as one `FIGURES` line.
pub fn print(name: &str, run: &RunFigures) {
    let pick = |f: fn(&FaultFigures) -> Option<Duration>| {
        p50_max(run.faults.iter().filter_map(f).collect())
    };
    println!(
        "FIGURES {name}: faults={} acked={} acked_lost={} events={} events_lost={} \
         events_twice={} delivered_not_stored={} lagged_reports={} write_retries={} refused={} \
         promoted_s={} first_write_s={} first_event_s={} write_gap_s={} event_gap_s={} \
         rejoin_s={} reinits={} restarted_in_place={} route_lookups={} route_errors={} \
         route_wrong={}",
        run.faults.len(),
        run.acked,
        run.acked_lost,
        run.events_stored,
        run.events_lost,
        run.events_twice,
        run.delivered_not_stored,
        run.lagged_reports,
        run.write_errors,
        run.refused,
        pick(|f| f.promoted),
        pick(|f| Some(f.first_write)),
        pick(|f| Some(f.first_event)),
        pick(|f| Some(f.write_gap)),
        pick(|f| Some(f.event_gap)),
        pick(|f| f.rejoin),
        run.reinits,
        run.restarted_in_place,
        run.route_lookups,
        run.route_errors,
        run.route_wrong,
    );
    for f in &run.faults {
        println!(
            "  {:?}: promoted {:?}, first write {:.1} s, first event {:.1} s, longest gaps {:.1} s \
             (writes) {:.1} s (deliveries), route errors {}, rejoined {:?}",
            f.fault,
            f.promoted.map(|d| format!("{:.1} s", d.as_secs_f64())),
            f.first_write.as_secs_f64(),
            f.first_event.as_secs_f64(),
            f.write_gap.as_secs_f64(),
            f.event_gap.as_secs_f64(),
            f.route_errors,
            f.rejoin.map(|d| format!("{:.1} s", d.as_secs_f64())),
        );
    }
}

/// The number of failovers of each kind a run makes: `PLANE_HA_FAILOVERS` (10 for the
/// figures in RELIABILITY.md), 1 by default.
pub fn failovers() -> usize {
    std::env::var("PLANE_HA_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// A status as events and state rows spell it (`"ready"`…).
fn status_name(status: BackendStatus) -> String {
    match serde_json::to_value(status) {
        Ok(serde_json::Value::String(name)) => name,
        other => panic!("a status serializes to a string, not {other:?}"),
    }
}

/// One cluster at a time in this binary: three nodes failing over take most of the two
/// cores these tests are measured on, and a second cluster would bend the other's figures.
pub static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn faults_of_each_kind() -> Vec<Fault> {
    let n = failovers();
    let mut faults = vec![Fault::Kill; n];
    faults.extend(vec![Fault::Pause; n]);
    faults.push(Fault::Switchover);
    faults
}

fn assert_exact(name: &str, run: &RunFigures) {
    assert!(run.acked > 0, "{name}: nothing was written");
    assert_eq!(
        run.acked_lost, 0,
        "{name}: acknowledged writes lost: {run:?}"
    );
    assert_eq!(run.events_lost, 0, "{name}: events lost: {run:?}");
    assert_eq!(
        run.events_twice, 0,
        "{name}: events delivered twice: {run:?}"
    );
    assert_eq!(run.delivered_not_stored, 0, "{name}: {run:?}");
    assert_eq!(run.route_wrong, 0, "{name}: wrong route answers: {run:?}");
    assert_eq!(run.refused, 0, "{name}: updates refused: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_through_haproxy() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let run = run(Client::HaProxy, true, &faults_of_each_kind()).await;
    print("ha_haproxy_sync", &run);
    assert_exact("through HAProxy", &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_with_a_multi_host_url() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let run = run(Client::MultiHost, true, &faults_of_each_kind()).await;
    print("ha_multi_host_sync", &run);
    assert_exact("with a multi-host URL", &run);
}

/// Asynchronous replication: a failover may lose acknowledged writes (the standby had not
/// received them). What the bus promises still holds for what the new primary has: every
/// event stored there is delivered once. Events delivered before the failover whose rows
/// the new primary lacks are counted, not hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_failover_reports_what_it_loses() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    // One kill in the suite; every kind of fault when figures are asked for.
    let faults = if std::env::var_os("PLANE_HA_FAILOVERS").is_some() {
        faults_of_each_kind()
    } else {
        vec![Fault::Kill]
    };
    let run = run(Client::HaProxy, false, &faults).await;
    print("ha_haproxy_async", &run);
    assert!(run.acked > 0);
    assert_eq!(
        run.events_lost, 0,
        "events stored on the new primary lost: {run:?}"
    );
    assert_eq!(run.events_twice, 0, "events delivered twice: {run:?}");
    assert_eq!(run.route_wrong, 0, "wrong route answers: {run:?}");
}
