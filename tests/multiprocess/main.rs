//! Many controller processes on one Postgres (issue 15, item 1): real OS processes, each a
//! controller with a pool and an event bus of its own, sharing one database.
//!
//! The test re-executes its own binary for each worker (`current_exe() --exact worker
//! --nocapture`, its role in [`protocol::WORKER_ENV`]); the `worker` test returns at once
//! when that variable is absent. On a fresh database of its own:
//!
//! 1. Four controller processes, 32 writers spread over them (8 each) taking backends
//!    through their whole lives with `update_state`, while every process races `connect`
//!    for the same 100 keys; two subscribers in every process (`subscribe::<BackendState>()`
//!    and `subscribe_all_events()`). Every subscriber must receive every stored event of its
//!    kinds exactly once, compared by id with the `event` table (not by count), each
//!    backend's events in the order they were written; every race key must end with one
//!    backend, the one every caller was told, with one spawn action.
//! 2. One process killed with SIGKILL while its 8 writers run (and the other three keep
//!    writing): every write it had been told was committed is in the database, the other
//!    processes' subscribers receive everything that committed (its writes included), and
//!    the SQL invariants hold (no key without its backend, no backend without its history,
//!    event and spawn action, no event without its change).
//!
//! 3. A switchover under them (`failover.rs`, a server of its own with a streaming
//!    replica): the replica, caught up, is promoted and the address the processes connect
//!    through moves to it; their writers go on, and every event before and after reaches
//!    every process exactly once.
//!
//! Prints one `FIGURES` line per phase (`cargo test --test multiprocess -- --nocapture`);
//! RELIABILITY.md records them.

mod check;
mod failover;
mod forwarder;
mod process;
mod protocol;
mod sql;
mod verify;
mod worker;

use plane_db::PlaneDatabase;
use process::Worker;
use protocol::{application_name, Command, Report, Work, WorkerSpec};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use verify::{
    check_race, collect, figures, first, invariants, latencies, load_average, percentiles, verify,
    writers_of,
};

/// Controller processes.
const PROCESSES: usize = 4;
/// Writers in each process (32 in all).
const WRITERS_PER_PROCESS: usize = 8;
/// Backends each writer takes through their lives in the first phase.
const BACKENDS_PER_WRITER: usize = 8;
/// Keys every process races `connect` for.
const RACE_KEYS: usize = 100;
/// Concurrent connects per race key from each process.
const RACE_ATTEMPTS: usize = 2;
/// Each worker's pool.
const POOL_SIZE: u32 = 12;
/// The process that is killed in the second phase.
const VICTIM: usize = PROCESSES - 1;
/// Writes the victim must have had acknowledged before it is killed.
const KILL_AFTER_ACKS: usize = 300;
/// Backends per writer of the other processes in the second phase.
const SURVIVOR_BACKENDS_PER_WRITER: usize = 3;
/// How long a worker waits for its subscribers to hold every stored event.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound on the whole scenario.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);

/// The worker processes' entry point: returns at once in the parent.
#[test]
fn worker() {
    worker::run_if_worker();
}

/// The scenarios run one at a time: each starts four controller processes, and their
/// figures are timings.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_processes_follow_a_switchover() {
    let _serial = SERIAL.lock().await;
    failover::run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_processes_share_one_database() {
    let _serial = SERIAL.lock().await;
    let database = plane_db::testing::create_database()
        .await
        .expect("create a test database");
    let admin = plane_db::open_and_migrate(&database.url)
        .await
        .expect("migrate the test database");
    tokio::time::timeout(SCENARIO_TIMEOUT, scenario(&admin, &database.url))
        .await
        .expect("the scenario timed out");
    admin.pool().close().await;
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

async fn scenario(admin: &PlaneDatabase, url: &str) {
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
    let mut pids = Vec::new();
    for w in &mut workers {
        match w.next().await {
            Report::Ready { pid } => pids.push(pid),
            other => panic!("worker {}: expected ready, got {other:?}", w.index),
        }
    }
    let distinct_pids: HashSet<u32> = pids.iter().copied().collect();
    assert_eq!(distinct_pids.len(), PROCESSES, "one OS process per worker");
    assert!(!distinct_pids.contains(&std::process::id()));
    let ready_ms = started.elapsed().as_millis();
    // Nothing is being written now: every later event gets a larger id.
    let floor = sql::latest_event_id(admin.pool()).await;

    // Phase 1: 32 writers over 4 processes, and a connect race across them.
    let work = Work {
        prefix: "w".into(),
        writers: WRITERS_PER_PROCESS,
        backends_per_writer: Some(BACKENDS_PER_WRITER),
        race_keys: RACE_KEYS,
        race_attempts: RACE_ATTEMPTS,
        ack: false,
        retry: false,
    };
    let phase_started = Instant::now();
    for w in &mut workers {
        w.send(&Command::Run(work.clone()));
    }
    let (mut connects, mut updates, mut write_ms, mut race_ms) = (0, 0, 0, 0);
    let mut answers = Vec::new();
    for w in &mut workers {
        match w.next().await {
            Report::Done {
                connects: c,
                updates: u,
                race,
                errors,
                write_ms: wm,
                race_ms: rm,
                ..
            } => {
                connects += c;
                updates += u;
                write_ms = write_ms.max(wm);
                race_ms = race_ms.max(rm);
                answers.extend(race);
                failures.extend(
                    errors
                        .into_iter()
                        .map(|e| format!("phase 1: worker {}: {e}", w.index)),
                );
            }
            other => panic!("worker {}: expected done, got {other:?}", w.index),
        }
    }
    let written_ms = phase_started.elapsed().as_millis();
    let stored = sql::stored_events(admin.pool(), floor).await;
    let mut received = HashMap::new();
    let waited_ms = {
        let mut all: Vec<&mut Worker> = workers.iter_mut().collect();
        collect(&mut all, &mut received, floor, &stored).await
    };
    let everyone: Vec<usize> = (0..PROCESSES).collect();
    let (totals, lagged) = verify(
        "phase 1",
        &everyone,
        &received,
        floor,
        &stored,
        &mut failures,
    );
    let race = check_race(admin, &answers, &mut failures).await;
    let expected_backends = PROCESSES * WRITERS_PER_PROCESS * BACKENDS_PER_WRITER + RACE_KEYS;
    let backends = sql::count(admin.pool(), "select count(*) from backend").await;
    if backends != expected_backends as i64 {
        failures.push(format!(
            "phase 1: {backends} backends, expected {expected_backends}"
        ));
    }
    let violations = invariants("phase 1", admin, &mut failures).await;
    let writers = writers_of(admin).await;
    let (same, other) = latencies(&everyone, &received, &stored, floor, &writers);
    let mut fields = vec![
        ("processes", PROCESSES.to_string()),
        ("writers", (PROCESSES * WRITERS_PER_PROCESS).to_string()),
        ("backends", backends.to_string()),
        ("connects", connects.to_string()),
        ("state_changes", updates.to_string()),
        ("events_stored", stored.all.len().to_string()),
        ("state_events_stored", stored.states.len().to_string()),
    ];
    fields.extend(totals.fields());
    fields.push(("lagged", lagged.to_string()));
    fields.extend(race);
    fields.extend([
        ("invariant_violations", violations.to_string()),
        ("ready_ms", ready_ms.to_string()),
        ("write_ms", write_ms.to_string()),
        ("race_ms", race_ms.to_string()),
        ("written_ms", written_ms.to_string()),
        (
            "all_delivered_ms",
            (written_ms + u128::from(waited_ms)).to_string(),
        ),
        ("latency_same_process_ms_p50_p99_max", percentiles(same)),
        ("latency_other_process_ms_p50_p99_max", percentiles(other)),
    ]);
    figures("multiprocess(4 controllers)", &fields);

    // Phase 2: the victim writes until it is killed; the others write meanwhile.
    let phase_started = Instant::now();
    let phase_1_last = stored.all.keys().next_back().copied().unwrap_or(floor);
    let mut victim = workers.pop().expect("the victim is the last worker");
    assert_eq!(victim.index, VICTIM);
    let survivors: Vec<usize> = workers.iter().map(|w| w.index).collect();
    victim.send(&Command::Run(Work {
        prefix: "k".into(),
        writers: WRITERS_PER_PROCESS,
        backends_per_writer: None,
        race_keys: 0,
        race_attempts: 0,
        ack: true,
        retry: false,
    }));
    for w in &mut workers {
        w.send(&Command::Run(Work {
            prefix: "s".into(),
            writers: WRITERS_PER_PROCESS,
            backends_per_writer: Some(SURVIVOR_BACKENDS_PER_WRITER),
            race_keys: 0,
            race_attempts: 0,
            ack: false,
            retry: false,
        }));
    }
    let mut begun: HashSet<(String, i32)> = HashSet::new();
    let mut acked: HashSet<(String, i32)> = HashSet::new();
    let mut note = |report: Report, failures: &mut Vec<String>| match report {
        Report::Writing { key, status } => {
            begun.insert((key, status));
        }
        Report::Ack { key, status, .. } => {
            acked.insert((key, status));
        }
        other => failures.push(format!("the victim: unexpected {other:?}")),
    };
    let mut reports_before_kill = 0;
    while reports_before_kill < 2 * KILL_AFTER_ACKS {
        note(victim.next().await, &mut failures);
        reports_before_kill += 1;
    }
    let victim_app = application_name(VICTIM);
    let (victim_connections, _) = sql::connections(admin.pool(), &victim_app).await;
    let status = victim.kill();
    let killed_at = Instant::now();
    let killed_at_us = worker::now_us();
    for report in victim.remaining_reports().await {
        note(report, &mut failures);
    }
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the victim died of SIGKILL ({status})"
    );
    let (mut survivor_connects, mut survivor_updates) = (0, 0);
    for w in &mut workers {
        match w.next().await {
            Report::Done {
                connects,
                updates,
                errors,
                ..
            } => {
                survivor_connects += connects;
                survivor_updates += updates;
                failures.extend(
                    errors
                        .into_iter()
                        .map(|e| format!("phase 2: worker {}: {e}", w.index)),
                );
            }
            other => panic!("worker {}: expected done, got {other:?}", w.index),
        }
    }
    // Its server processes end once they notice the closed sockets; a statement running
    // at the kill may still commit until then.
    loop {
        let (left, _) = sql::connections(admin.pool(), &victim_app).await;
        if left == 0 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the victim's {left} connections outlived it by 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connections_gone_ms = killed_at.elapsed().as_millis();
    let (committed, victim_backends) =
        sql::committed_statuses(admin.pool(), &format!("k-{VICTIM}-%")).await;
    let acked_not_committed: Vec<_> = acked.difference(&committed).collect();
    let in_flight: HashSet<_> = begun.difference(&acked).cloned().collect();
    let in_flight_committed = in_flight.intersection(&committed).count();
    let committed_never_begun = committed.difference(&begun).count();
    if committed_never_begun > 0 || acked.difference(&begun).count() > 0 {
        failures.push(format!(
            "phase 2: the victim's reports are incomplete: {committed_never_begun} committed writes never begun"
        ));
    }
    if !acked_not_committed.is_empty() {
        failures.push(format!(
            "phase 2: {} acknowledged writes of the victim are not in the database: {:?}",
            acked_not_committed.len(),
            first(&acked_not_committed)
        ));
    }
    let stored = sql::stored_events(admin.pool(), floor).await;
    let waited_ms = {
        let mut alive: Vec<&mut Worker> = workers.iter_mut().collect();
        collect(&mut alive, &mut received, floor, &stored).await
    };
    let (totals, lagged) = verify(
        "phase 2",
        &survivors,
        &received,
        floor,
        &stored,
        &mut failures,
    );
    // When the survivors received the victim's last events, relative to the kill (negative:
    // before it).
    let victim_last_event_us = survivors
        .iter()
        .flat_map(|i| received[i].all.iter())
        .filter(|d| d.key.as_ref().is_some_and(|k| victim_backends.contains(k)))
        .map(|d| d.at_us - killed_at_us)
        .max()
        .unwrap_or(i64::MIN);
    let violations = invariants("phase 2", admin, &mut failures).await;
    let writers = writers_of(admin).await;
    let (same, other) = latencies(&survivors, &received, &stored, phase_1_last, &writers);
    let backends = sql::count(admin.pool(), "select count(*) from backend").await;
    for w in workers {
        w.exit().await;
    }
    let mut fields = vec![
        ("processes", PROCESSES.to_string()),
        ("killed", "1".to_string()),
        ("victim_pid", victim.pid.to_string()),
        ("victim_connections", victim_connections.to_string()),
        ("victim_writes_begun", begun.len().to_string()),
        ("victim_writes_acked", acked.len().to_string()),
        ("victim_writes_committed", committed.len().to_string()),
        ("victim_in_flight_at_kill", in_flight.len().to_string()),
        (
            "victim_in_flight_committed",
            in_flight_committed.to_string(),
        ),
        (
            "victim_acked_not_committed",
            acked_not_committed.len().to_string(),
        ),
        ("survivor_connects", survivor_connects.to_string()),
        ("survivor_state_changes", survivor_updates.to_string()),
        ("backends", backends.to_string()),
        ("events_stored", stored.all.len().to_string()),
    ];
    fields.extend(totals.fields());
    fields.push(("lagged", lagged.to_string()));
    fields.extend([
        ("invariant_violations", violations.to_string()),
        (
            "victim_connections_gone_ms",
            connections_gone_ms.to_string(),
        ),
        (
            "victim_last_event_received_after_kill_ms",
            format!("{:.1}", victim_last_event_us as f64 / 1000.0),
        ),
        ("collect_waited_ms", waited_ms.to_string()),
        ("latency_same_process_ms_p50_p99_max", percentiles(same)),
        ("latency_other_process_ms_p50_p99_max", percentiles(other)),
        ("phase_ms", phase_started.elapsed().as_millis().to_string()),
        ("total_ms", started.elapsed().as_millis().to_string()),
        ("load_1m_at_start", load_at_start),
        ("load_1m_at_end", load_average()),
    ]);
    figures("multiprocess(sigkill)", &fields);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
