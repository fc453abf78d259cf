//! Crashes on a durable server (`fsync`, full page writes on), under 16 writers: one server
//! process killed with SIGKILL (what the kernel's OOM killer does: Postgres then ends every
//! session and recovers in place, keeping its start time), or the postmaster itself killed
//! and started again (crash recovery with a new start time). Each run goes through three
//! crashes, with `synchronous_commit` on and then off, and before each crash 200 transaction
//! ids are burned in transactions that roll back: no WAL records them, so the recovered
//! server hands them out again, below the bus's cursor and not in its list of running
//! transactions. A reader keyed on transaction ids alone counts the rows written with them as
//! already read.
//!
//! Every event in the table afterwards must have been delivered exactly once. With
//! `synchronous_commit = off` the server may lose commits it had acknowledged (and the bus
//! delivered): that lost tail is counted, never a loss after the recovery.

use crate::support::*;
use plane_db::events::{emit, Lagged};
use plane_db::testing::{private_durable_server, TestServer};
use plane_db::types::BackendState;
use plane_db::Config;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 16;
const CRASHES: usize = 3;
const BURNED_PER_CRASH: usize = 200;

#[derive(Clone, Copy, Debug)]
enum Crash {
    /// SIGKILL of one server process: recovery in place.
    ServerProcess,
    /// SIGKILL of the postmaster, then a start: recovery with a new start time.
    Postmaster,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_process_killed_recovery_in_place() {
    crash_scenarios(Crash::ServerProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_killed_and_restarted() {
    crash_scenarios(Crash::Postmaster).await;
}

async fn crash_scenarios(crash: Crash) {
    let server = match tokio::task::spawn_blocking(private_durable_server)
        .await
        .unwrap()
    {
        Ok(server) => Arc::new(server),
        Err(error) => panic!("could not start a durable private server: {error}"),
    };
    for synchronous_commit in [true, false] {
        let database = server.create_database().await.unwrap();
        if !synchronous_commit {
            as_superuser(
                &database.url,
                &format!(
                    "alter database {} set synchronous_commit = off",
                    database.name
                ),
            )
            .await;
        }
        migrate(&database.url).await;
        tokio::time::timeout(
            SCENARIO_TIMEOUT,
            scenario(&server, &database.url, crash, synchronous_commit),
        )
        .await
        .expect("scenario timed out");
    }
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

async fn scenario(server: &Arc<TestServer>, url: &str, crash: Crash, synchronous_commit: bool) {
    let db = open(url, 24, Config::default()).await;
    let side = open(url, 2, Config::default()).await;
    let sync: String = sqlx::query_scalar("show synchronous_commit")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        sync == "on",
        synchronous_commit,
        "synchronous_commit is {sync}"
    );

    let mut sub = db.subscribe::<BackendState>().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(next) = sub.next().await {
            let _ = tx.send(next.map(|n| n.key.unwrap_or_default()));
        }
    });

    // Writers: each event in a transaction of its own, every attempt under a key of its own
    // (an attempt that failed may or may not have committed: the table says).
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (db, stop, errors) = (db.clone(), stop.clone(), errors.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0_u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let key = format!("w{w}-{n}").parse().unwrap();
                let written = async {
                    let mut txn = db.pool().begin().await?;
                    emit(&mut txn, Some(&key), &BackendState::Loading).await?;
                    txn.commit().await?;
                    Ok::<_, plane_db::Error>(())
                }
                .await;
                if written.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    let mut delivered: HashMap<String, u32> = HashMap::new();
    let mut lagged = 0_u64;
    let mut recoveries = Vec::new();
    for _ in 0..CRASHES {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Burn transaction ids no WAL records; the writers' commits move the bus's cursor
        // past them before the crash.
        for _ in 0..BURNED_PER_CRASH {
            let mut txn = side.pool().begin().await.unwrap();
            sqlx::query("select pg_current_xact_id()")
                .execute(&mut *txn)
                .await
                .unwrap();
            txn.rollback().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain(&mut rx, &mut delivered, &mut lagged);
        let before = delivered.len();
        let crashed_at = Instant::now();
        match crash {
            Crash::ServerProcess => {
                let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
                    .fetch_one(side.pool())
                    .await
                    .unwrap();
                server
                    .kill_server_process(pid as u32)
                    .expect("kill a server process");
            }
            Crash::Postmaster => {
                let s = server.clone();
                tokio::task::spawn_blocking(move || {
                    s.kill_postmaster()?;
                    // The old server processes exit once they notice; until then the new
                    // postmaster may refuse to start.
                    let mut tries = 0;
                    loop {
                        match s.start() {
                            Ok(()) => return Ok(()),
                            Err(error) if tries >= 50 => return Err(error),
                            Err(_) => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(200));
                            }
                        }
                    }
                })
                .await
                .unwrap()
                .expect("kill and start the postmaster");
            }
        }
        // Recovered once events written after the crash arrive again.
        loop {
            drain(&mut rx, &mut delivered, &mut lagged);
            if delivered.len() > before + WRITERS {
                break;
            }
            assert!(
                crashed_at.elapsed() < Duration::from_secs(60),
                "no events delivered within 60 s of the crash"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recoveries.push(crashed_at.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.unwrap();
    }

    let table: HashSet<String> =
        sqlx::query_scalar("select key from event where kind = 'backend_state'")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        drain(&mut rx, &mut delivered, &mut lagged);
        if table.iter().all(|k| delivered.contains_key(k)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything still arriving is a duplicate.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    drain(&mut rx, &mut delivered, &mut lagged);

    let lost = table.iter().filter(|k| !delivered.contains_key(*k)).count();
    let duplicated: u32 = delivered.values().map(|n| n - 1).sum();
    let lost_tail = delivered.keys().filter(|k| !table.contains(*k)).count();
    let (recovery_p50, recovery_max) = p50_max(recoveries);
    figures(
        &format!("crash({crash:?}, synchronous_commit={synchronous_commit})"),
        &[
            ("writers", WRITERS.to_string()),
            ("crashes", CRASHES.to_string()),
            ("ids_burned_per_crash", BURNED_PER_CRASH.to_string()),
            ("events_in_table", table.len().to_string()),
            ("delivered", delivered.len().to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
            ("delivered_then_lost_by_server", lost_tail.to_string()),
            ("lagged", lagged.to_string()),
            ("writer_errors", errors.load(Ordering::Relaxed).to_string()),
            ("delivering_again_after_ms_p50", recovery_p50),
            ("delivering_again_after_ms_max", recovery_max),
        ],
    );
    assert!(table.len() > 100, "too few events written: {}", table.len());
    assert_eq!(lagged, 0);
    assert_eq!(lost, 0, "events committed and never delivered");
    assert_eq!(duplicated, 0, "events delivered twice");
    if synchronous_commit {
        assert_eq!(
            lost_tail, 0,
            "with synchronous_commit on, an event delivered was lost by the server"
        );
    }
}

/// Takes what the subscriber has received so far.
fn drain(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, Lagged>>,
    delivered: &mut HashMap<String, u32>,
    lagged: &mut u64,
) {
    while let Ok(next) = rx.try_recv() {
        match next {
            Ok(key) => *delivered.entry(key).or_default() += 1,
            Err(Lagged { missed }) => *lagged += missed,
        }
    }
}
