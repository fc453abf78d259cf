//! A switchover under several controller processes at once: four workers (the same
//! processes as the main scenario) connect through one address to a private server that has
//! a streaming replica. Each writes and subscribes; then the replica, having replayed
//! everything, is promoted (the old primary stopped) and the address moved to it, as
//! `tests/faults/promotion.rs` does for one process. The writers go on against the new
//! primary, each process reconnecting on its own.
//!
//! Checked: every process's two subscribers receive every event stored since the start
//! (before and after the switchover) exactly once by id, each backend's in order; every
//! write a process was told had committed is in the new primary; the SQL invariants hold.
//! Measured: how long after the promotion each process acknowledged its first write and
//! received its first event written on the new primary.

use crate::forwarder::Forwarder;
use crate::process::Worker;
use crate::protocol::{Command, Report, Work, WorkerSpec};
use crate::verify::{
    collect, figures, first, invariants, latencies, load_average, percentiles, verify, writers_of,
};
use crate::{sql, worker, PROCESSES};
use plane_db::testing::{private_server, TestServer};
use plane_db::PlaneDatabase;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Writers in each process (16 in all).
const WRITERS_PER_PROCESS: usize = 4;
/// Backends each writer takes through their lives, before and again after the switchover.
const BACKENDS_PER_WRITER: usize = 4;
/// Each worker's pool.
const POOL_SIZE: u32 = 6;
/// The login role the controllers use.
const APP_ROLE: &str = "plane_mp";
/// The bound on the whole scenario.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

/// Starts the private server and its replica (failing, not skipping, without Postgres
/// binaries), and runs the scenario.
pub async fn run() {
    let primary = match blocking(private_server).await {
        Ok(server) => Arc::new(server),
        // A scenario that did not run must not pass.
        Err(error) => panic!("could not start a private server for the switchover: {error}"),
    };
    let database = primary
        .create_database()
        .await
        .expect("create the test database");
    let admin = plane_db::open_and_migrate(&database.url)
        .await
        .expect("migrate the test database");
    sql::create_app_role(admin.pool(), &database.name, APP_ROLE).await;
    let p = primary.clone();
    let replica = match blocking(move || p.replica()).await {
        Ok(replica) => Arc::new(replica),
        Err(error) => panic!("could not start a streaming replica: {error}"),
    };
    let forwarder = Forwarder::start(primary.port().expect("a private server's port")).await;
    let url = format!(
        "postgres://{APP_ROLE}@127.0.0.1:{}/{}",
        forwarder.port(),
        database.name
    );
    tokio::time::timeout(
        SCENARIO_TIMEOUT,
        scenario(admin, &primary, &replica, &forwarder, &url, &database.name),
    )
    .await
    .expect("the switchover scenario timed out");
    drop(forwarder);
    // Dropping the servers stops them and deletes their files.
    blocking(move || drop((primary, replica))).await;
}

/// What one round of writers did in all processes.
#[derive(Default)]
struct Round {
    connects: usize,
    updates: usize,
    retries: usize,
    write_ms: u64,
    /// Each process's first acknowledged write (microseconds since the Unix epoch).
    first_ack_us: HashMap<usize, i64>,
}

/// Writes reported begun and acknowledged, by (key, status number).
#[derive(Default)]
struct Writes {
    begun: HashSet<(String, i32)>,
    acked: HashSet<(String, i32)>,
}

/// Runs `work` in every process and reads their reports until each is done.
async fn round(
    phase: &str,
    workers: &mut [Worker],
    work: &Work,
    writes: &mut Writes,
    failures: &mut Vec<String>,
) -> Round {
    for w in workers.iter_mut() {
        w.send(&Command::Run(work.clone()));
    }
    let mut round = Round::default();
    for w in workers.iter_mut() {
        loop {
            match w.next().await {
                Report::Writing { key, status } => {
                    writes.begun.insert((key, status));
                }
                Report::Ack { key, status, at_us } => {
                    writes.acked.insert((key, status));
                    let first = round.first_ack_us.entry(w.index).or_insert(at_us);
                    *first = (*first).min(at_us);
                }
                Report::Done {
                    connects,
                    updates,
                    errors,
                    write_ms,
                    retries,
                    ..
                } => {
                    round.connects += connects;
                    round.updates += updates;
                    round.retries += retries;
                    round.write_ms = round.write_ms.max(write_ms);
                    failures.extend(
                        errors
                            .into_iter()
                            .map(|e| format!("{phase}: worker {}: {e}", w.index)),
                    );
                    break;
                }
                other => panic!("worker {}: expected done, got {other:?}", w.index),
            }
        }
    }
    round
}

/// Waits until the replica has replayed everything the primary has written; returns how
/// long that took.
async fn wait_replayed(primary: &PlaneDatabase, replica_url: &str) -> u128 {
    let started = Instant::now();
    let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(primary.pool())
        .await
        .expect("the primary's WAL position");
    let replica = sqlx::PgPool::connect(replica_url)
        .await
        .expect("connect to the replica");
    loop {
        let caught_up: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&lsn)
            .fetch_one(&replica)
            .await
            .expect("the replica's replay position");
        if caught_up {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the replica did not catch up in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replica.close().await;
    started.elapsed().as_millis()
}

/// "a/b/c/d": one figure per process, in milliseconds.
fn per_process(values: &HashMap<usize, i64>) -> String {
    (0..PROCESSES)
        .map(|i| {
            values.get(&i).map_or_else(
                || "-".to_string(),
                |us| format!("{:.0}", *us as f64 / 1000.0),
            )
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn scenario(
    admin: PlaneDatabase,
    primary: &Arc<TestServer>,
    replica: &Arc<TestServer>,
    forwarder: &Forwarder,
    url: &str,
    name: &str,
) {
    let started = Instant::now();
    let load_at_start = load_average();
    let mut failures = Vec::new();
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|index| {
            Worker::spawn(&WorkerSpec {
                index,
                url: url.to_string(),
                pool_size: POOL_SIZE,
            })
        })
        .collect();
    for w in &mut workers {
        match w.next().await {
            Report::Ready { .. } => {}
            other => panic!("worker {}: expected ready, got {other:?}", w.index),
        }
    }
    // Nothing is being written now: every later event gets a larger id.
    let floor = sql::latest_event_id(admin.pool()).await;
    let everyone: Vec<usize> = (0..PROCESSES).collect();
    let mut writes = Writes::default();
    let work = |prefix: &str, retry: bool| Work {
        prefix: prefix.into(),
        writers: WRITERS_PER_PROCESS,
        backends_per_writer: Some(BACKENDS_PER_WRITER),
        race_keys: 0,
        race_attempts: 0,
        ack: true,
        retry,
    };

    // Before: every process writes and receives on the old primary.
    let before = round(
        "before",
        &mut workers,
        &work("b", false),
        &mut writes,
        &mut failures,
    )
    .await;
    let stored = sql::stored_events(admin.pool(), floor).await;
    let mut received = HashMap::new();
    {
        let mut all: Vec<&mut Worker> = workers.iter_mut().collect();
        collect(&mut all, &mut received, floor, &stored).await;
    }
    let (before_totals, _) = verify(
        "before",
        &everyone,
        &received,
        floor,
        &stored,
        &mut failures,
    );
    let events_before = stored.all.len();

    // The switchover: the replica has replayed everything; the old primary stops, the
    // replica is promoted, the address moves to it.
    let replay_ms = wait_replayed(&admin, &replica.url_for(name)).await;
    admin.pool().close().await;
    let switch_started = Instant::now();
    let p = primary.clone();
    blocking(move || p.stop())
        .await
        .expect("stop the old primary");
    let stop_ms = switch_started.elapsed().as_millis();
    let r = replica.clone();
    blocking(move || r.run_tool("pg_ctl", &["promote", "-w"]))
        .await
        .expect("promote the replica");
    forwarder.switch(replica.port().expect("the replica's port"));
    let promoted_us = worker::now_us();
    let down_ms = switch_started.elapsed().as_millis();
    let admin = plane_db::open_and_migrate(&replica.url_for(name))
        .await
        .expect("connect to the new primary");
    // Every event above this one was written on the new primary.
    let promoted_floor = sql::latest_event_id(admin.pool()).await;

    // After: the same writers go on, retrying while their process reconnects.
    let after = round(
        "after",
        &mut workers,
        &work("a", true),
        &mut writes,
        &mut failures,
    )
    .await;
    let stored = sql::stored_events(admin.pool(), floor).await;
    let waited_ms = {
        let mut all: Vec<&mut Worker> = workers.iter_mut().collect();
        collect(&mut all, &mut received, floor, &stored).await
    };
    // Every event since the start, before and after, exactly once in every process.
    let (totals, lagged) = verify("after", &everyone, &received, floor, &stored, &mut failures);

    // Nothing acknowledged is lost (read on the new primary).
    let (mut committed, _) = sql::committed_statuses(admin.pool(), "b-%").await;
    committed.extend(sql::committed_statuses(admin.pool(), "a-%").await.0);
    let acked_not_committed: Vec<_> = writes.acked.difference(&committed).collect();
    if !acked_not_committed.is_empty() {
        failures.push(format!(
            "{} acknowledged writes are not in the new primary: {:?}",
            acked_not_committed.len(),
            first(&acked_not_committed)
        ));
    }
    let committed_never_begun = committed.difference(&writes.begun).count();
    if committed_never_begun > 0 {
        failures.push(format!(
            "{committed_never_begun} committed writes were never reported begun"
        ));
    }
    let expected_writes = 2 * PROCESSES * WRITERS_PER_PROCESS * BACKENDS_PER_WRITER * 8;
    if writes.acked.len() != expected_writes {
        failures.push(format!(
            "{} writes acknowledged, expected {expected_writes}",
            writes.acked.len()
        ));
    }
    let violations = invariants("after", &admin, &mut failures).await;

    // How long after the promotion each process delivered again: its first event written
    // on the new primary, received by either subscriber.
    let mut delivered_again = HashMap::new();
    for index in &everyone {
        let r = &received[index];
        let at = r
            .all
            .iter()
            .chain(&r.states)
            .filter(|d| d.id > promoted_floor)
            .map(|d| d.at_us)
            .min();
        match at {
            Some(at) => {
                delivered_again.insert(*index, at - promoted_us);
            }
            None => failures.push(format!(
                "worker {index} received nothing written on the new primary"
            )),
        }
    }
    let first_ack: HashMap<usize, i64> = after
        .first_ack_us
        .iter()
        .map(|(i, at)| (*i, at - promoted_us))
        .collect();
    let writers = writers_of(&admin).await;
    let (same, other) = latencies(&everyone, &received, &stored, promoted_floor, &writers);
    let latency_after: Vec<i64> = same.into_iter().chain(other).collect();
    for w in workers {
        w.exit().await;
    }
    admin.pool().close().await;

    let mut fields = vec![
        ("processes", PROCESSES.to_string()),
        ("writers", (PROCESSES * WRITERS_PER_PROCESS).to_string()),
        (
            "writes_before_after",
            format!(
                "{}/{}",
                before.connects + before.updates,
                after.connects + after.updates
            ),
        ),
        ("writes_acked", writes.acked.len().to_string()),
        ("acked_not_committed", acked_not_committed.len().to_string()),
        ("retries_after", after.retries.to_string()),
        ("events_before", events_before.to_string()),
        ("events_stored", stored.all.len().to_string()),
        (
            "before_lost_duplicated",
            format!(
                "{}/{}",
                before_totals.lost_count(),
                before_totals.duplicated_count()
            ),
        ),
    ];
    fields.extend(totals.fields());
    fields.extend([
        ("lagged", lagged.to_string()),
        ("invariant_violations", violations.to_string()),
        ("replay_wait_ms", replay_ms.to_string()),
        ("stop_ms", stop_ms.to_string()),
        ("stop_to_promoted_ms", down_ms.to_string()),
        ("first_ack_after_promotion_ms", per_process(&first_ack)),
        (
            "delivered_again_after_promotion_ms",
            per_process(&delivered_again),
        ),
        ("latency_after_ms_p50_p99_max", percentiles(latency_after)),
        (
            "write_ms_before_after",
            format!("{}/{}", before.write_ms, after.write_ms),
        ),
        ("collect_waited_ms", waited_ms.to_string()),
        ("total_ms", started.elapsed().as_millis().to_string()),
        ("load_1m_at_start", load_at_start),
        ("load_1m_at_end", load_average()),
    ]);
    figures("multiprocess(switchover)", &fields);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
