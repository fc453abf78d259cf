//! One cleaner for the fleet, across real OS processes: four controller processes run the
//! cleanup loop on one database with a 2 s lease; the test re-executes its own binary for
//! each (`current_exe() --exact worker`, its spec in [`WORKER_ENV`]).
//!
//! 1. The leader is killed with SIGKILL: another process must lead within 2x the lease.
//! 2. The next leader is paused with SIGSTOP past its lease: another must take over within
//!    2x the lease; then the paused one is resumed with SIGCONT and must not clean up under
//!    its old term.
//! 3. The next leader shuts down (resigns): another must take over at once.
//!
//! Meanwhile expired tokens are fed in, so every leader's cleanup batches delete rows. A
//! statement trigger on `token` records every deleting batch: the deleting process (its
//! `application_name`) and the lease's term and holder as the batch saw it. The checks:
//! every batch was run by the holder of the term it ran under, terms never go back in
//! time order (no batch of an old term after a batch of a newer one), and the leadership
//! the processes themselves report (sampled every 10 ms) never overlaps between two of them.
//! Prints the measured takeover times on a `FIGURES` line
//! (`cargo test --test leader_failover -- --nocapture`).

#[allow(dead_code)]
#[path = "it/common.rs"]
mod common;

use plane_db::leader::CLEANUP_LEASE;
use plane_db::{CleanupConfig, Config, LeaderConfig, OpenOptions};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Makes the `worker` test a worker; its value is `index url`.
const WORKER_ENV: &str = "PLANE_DB_LEADER_WORKER";
const PROCESSES: usize = 4;
const LEASE: Duration = Duration::from_secs(2);
const CLEANUP_INTERVAL: Duration = Duration::from_millis(100);
/// Before each line a worker reports on stdout (the harness prints on the same stream).
const MARKER: &str = "@@leader@@ ";

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn application_name(index: usize) -> String {
    format!("leader-worker-{index}")
}

/// The worker processes' entry point: returns at once in the parent.
#[test]
fn worker() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let (index, url) = spec.split_once(' ').expect("index and url");
    let index: usize = index.parse().expect("an index");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let config = Config {
            leader: LeaderConfig::with_lease(LEASE),
            ..Config::default()
        };
        let db = OpenOptions::new(url)
            .expect("options")
            .application_name(&application_name(index))
            .max_connections(4)
            .config(config)
            .open()
            .await
            .expect("open the database");
        let cleanup = CleanupConfig {
            event_min_age: Duration::from_secs(3600),
            batch_size: 20,
            ..CleanupConfig::default()
        };
        let task = db
            .spawn_cleanup_loop(CLEANUP_INTERVAL, cleanup)
            .expect("start the cleanup loop");
        println!("{MARKER}ready {} {}", std::process::id(), task.holder());
        // Stdin closed (or "exit"): shut down, resigning.
        let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if line.map_or(true, |l| l.trim() == "exit") {
                    break;
                }
            }
            let _ = exit_tx.send(());
        });
        let mut last: Option<i64> = None;
        loop {
            // Every sample while leading (so the last one before a kill or a pause is
            // known), and the change to not leading.
            let now = task.leader_term();
            if now.is_some() || now != last {
                let term = now.map_or("-".to_string(), |t| t.to_string());
                println!("{MARKER}leads {term} {}", unix_ms());
                let _ = std::io::stdout().flush();
                last = now;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = &mut exit_rx => break,
            }
        }
        task.shutdown().await;
        println!("{MARKER}leads - {}", unix_ms());
        println!("{MARKER}bye");
    });
}

/// A worker process and what it reported.
struct Worker {
    index: usize,
    pid: u32,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn spawn(index: usize, url: &str) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = std::process::Command::new(exe)
            .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, format!("{index} {url}"))
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker");
        let stdout = child.stdout.take().expect("its stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find(MARKER) {
                    sink.lock()
                        .unwrap()
                        .push(line[at + MARKER.len()..].to_string());
                }
            }
        });
        Worker {
            index,
            pid: child.id(),
            child,
            lines,
        }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.pid);
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Its leadership intervals by its own reports: (term, first, last) in Unix ms, from
    /// the first to the last sample that saw it leading under that term (so within its
    /// true leadership, whatever happened after the last sample: a kill, a pause).
    fn intervals(&self) -> Vec<(i64, i64, i64)> {
        let mut out: Vec<(i64, i64, i64)> = Vec::new();
        let mut open = false;
        for line in self.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("leads") {
                continue;
            }
            let (Some(term), Some(at)) = (words.next(), words.next()) else {
                continue;
            };
            let at: i64 = at.parse().expect("a time");
            match term.parse::<i64>() {
                Ok(term) => match out.last_mut() {
                    Some(last) if open && last.0 == term => last.2 = at,
                    _ => {
                        out.push((term, at, at));
                        open = true;
                    }
                },
                Err(_) => open = false,
            }
        }
        out
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The active leader's (term, holder), if any.
async fn leader(pool: &sqlx::PgPool) -> Option<(i64, String)> {
    sqlx::query_as("select term, holder from leader_lease where name = $1 and expires_at > now()")
        .bind(CLEANUP_LEASE)
        .fetch_optional(pool)
        .await
        .expect("read the lease")
}

/// The process id in a holder name (`host:pid:random`).
fn holder_pid(holder: &str) -> u32 {
    let parts: Vec<&str> = holder.rsplitn(3, ':').collect();
    parts[1].parse().expect("a pid in the holder name")
}

/// Waits until a leader with a term above `after` leads; its term and holder, and when it
/// was first seen.
async fn next_leader(pool: &sqlx::PgPool, after: i64, limit: Duration) -> (i64, String, Instant) {
    let started = Instant::now();
    loop {
        if let Some((term, holder)) = leader(pool).await {
            if term > after {
                return (term, holder, Instant::now());
            }
        }
        assert!(
            started.elapsed() < limit,
            "no new leader after term {after} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until a batch of `term` deleted something.
async fn batch_of(pool: &sqlx::PgPool, term: i64) {
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from cleanup_batch_log where term = $1")
            .bind(term)
            .fetch_one(pool)
            .await
            .expect("count batches");
        if n > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "term {term} never cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_cleans_up_across_kill_pause_and_resignation() {
    let database = plane_db::testing::create_database()
        .await
        .expect("a test database");
    let admin = plane_db::open_and_migrate(&database.url)
        .await
        .expect("migrate");
    let pool = admin.pool().clone();
    // Every deleting batch on `token`: who ran it, and the lease as it saw it.
    for sql in [
        "create table cleanup_batch_log (
             id bigserial primary key, app text not null, term bigint, holder text,
             deleted bigint not null, at timestamptz not null default clock_timestamp())",
        "create function log_cleanup_batch() returns trigger language plpgsql as $$
         begin
             insert into cleanup_batch_log (app, term, holder, deleted)
             select current_setting('application_name'), l.term, l.holder,
                    (select count(*) from gone)
             from (select 1) one
             left join leader_lease l on l.name = 'maintenance'
             where exists (select 1 from gone);
             return null;
         end $$",
        "create trigger token_cleanup_log after delete on token
         referencing old table as gone for each statement execute function log_cleanup_batch()",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    // Expired tokens, fed in all along, so that every leader's batches delete something.
    // (Tokens, because cleanup deletes them row by row, in batches; old events go with
    // their partitions.) They belong to one backend on one drone.
    let drone = common::drone(&admin).await;
    sqlx::query(
        "insert into backend (id, cluster, last_status, last_status_number, last_status_time,
                              state, drone_id, last_keepalive)
         values ('ba-leader-test', 'plane.test', 'scheduled', 1, now(),
                 '{\"status\": \"scheduled\"}', $1, now())",
    )
    .bind(drone.id.as_i32())
    .execute(&pool)
    .await
    .expect("a backend for the tokens");
    let feeder_pool = pool.clone();
    let feeder = tokio::spawn(async move {
        loop {
            let _ = sqlx::query(
                "insert into token (token_digest, backend_id, expiration_time, auth, secret_token)
                 select decode(md5(random()::text || clock_timestamp()::text || g::text), 'hex'),
                        'ba-leader-test', now() - interval '1 day', '{}', ''
                 from generate_series(1, 30) g",
            )
            .execute(&feeder_pool)
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|i| Worker::spawn(i, &database.url))
        .collect();
    let by_pid = |workers: &[Worker], pid: u32| -> usize {
        workers
            .iter()
            .position(|w| w.pid == pid)
            .unwrap_or_else(|| panic!("the leader {pid} is none of the workers"))
    };
    let limit = 2 * LEASE;

    // Someone leads and cleans up.
    let (first_term, holder, _) = next_leader(&pool, 0, Duration::from_secs(30)).await;
    batch_of(&pool, first_term).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. SIGKILL the leader.
    let victim = by_pid(&workers, holder_pid(&holder));
    let mut killed = workers.remove(victim);
    killed.child.kill().expect("SIGKILL");
    let kill_at = Instant::now();
    killed.child.wait().expect("reap");
    let (kill_term, holder, seen) = next_leader(&pool, first_term, limit).await;
    let kill_takeover = seen - kill_at;
    batch_of(&pool, kill_term).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. SIGSTOP the next leader past its lease, then SIGCONT it.
    let paused = by_pid(&workers, holder_pid(&holder));
    let paused_index = workers[paused].index;
    workers[paused].signal("-STOP");
    let stop_at = Instant::now();
    let (stop_term, holder, seen) = next_leader(&pool, kill_term, limit).await;
    let stop_takeover = seen - stop_at;
    batch_of(&pool, stop_term).await;
    // Paused for 1.5 leases in all, the new leader cleaning up meanwhile.
    tokio::time::sleep((LEASE * 3 / 2).saturating_sub(stop_at.elapsed())).await;
    let paused_ms = stop_at.elapsed().as_millis();
    workers[paused].signal("-CONT");
    // Let the resumed process run its loop (and try its old term) for a while.
    tokio::time::sleep(LEASE).await;
    let (term_after_pause, _) = leader(&pool).await.expect("a leader after the pause");
    assert_eq!(
        term_after_pause, stop_term,
        "the resumed process took the lease back"
    );

    // 3. The leader shuts down: it resigns and another takes over at once.
    let leaving = by_pid(&workers, holder_pid(&holder));
    let mut leaving = workers.remove(leaving);
    drop(leaving.child.stdin.take());
    let resign_at = Instant::now();
    let (resign_term, _, seen) = next_leader(&pool, stop_term, limit).await;
    let resign_takeover = seen - resign_at;
    let _ = leaving.child.wait();
    batch_of(&pool, resign_term).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    feeder.abort();

    // The batches: each by the holder of the term it ran under, and terms in time order.
    let mut everyone: Vec<&Worker> = workers.iter().collect();
    everyone.push(&killed);
    everyone.push(&leaving);
    let pid_of_app: HashMap<String, u32> = everyone
        .iter()
        .map(|w| (application_name(w.index), w.pid))
        .collect();
    let batches: Vec<(String, Option<i64>, Option<String>, i64)> =
        sqlx::query_as("select app, term, holder, deleted from cleanup_batch_log order by at, id")
            .fetch_all(&pool)
            .await
            .expect("read the batches");
    let mut failures = Vec::new();
    let mut highest = 0;
    let mut per_term: std::collections::BTreeMap<i64, (usize, i64)> = Default::default();
    for (app, term, holder, deleted) in &batches {
        let (Some(term), Some(holder)) = (term, holder) else {
            failures.push(format!("a batch by {app} without a lease"));
            continue;
        };
        match pid_of_app.get(app) {
            Some(pid) if *pid == holder_pid(holder) => {}
            _ => failures.push(format!(
                "{app} deleted {deleted} tokens under term {term}, held by {holder}"
            )),
        }
        if *term < highest {
            failures.push(format!(
                "a batch of term {term} after one of term {highest} (by {app})"
            ));
        }
        highest = highest.max(*term);
        let entry = per_term.entry(*term).or_default();
        entry.0 += 1;
        entry.1 += deleted;
    }
    // The processes' own view: no two ever led at once.
    let intervals: Vec<(usize, i64, i64, i64)> = everyone
        .iter()
        .flat_map(|w| {
            w.intervals()
                .into_iter()
                .map(move |(t, from, to)| (w.index, t, from, to))
        })
        .collect();
    for a in &intervals {
        for b in &intervals {
            if a.0 < b.0 && a.2 < b.3 && b.2 < a.3 {
                failures.push(format!("two leaders at once: {a:?} and {b:?}"));
            }
        }
    }
    let paused_terms: Vec<i64> = workers
        .iter()
        .filter(|w| w.index == paused_index)
        .flat_map(|w| w.intervals())
        .map(|(t, _, _)| t)
        .collect();
    println!(
        "FIGURES leader_failover(4 controllers, lease {} ms): kill_takeover_ms={} \
         stop_takeover_ms={} paused_ms={} resign_takeover_ms={} terms={} batches={} \
         batches_per_term={:?} paused_process_terms={:?}",
        LEASE.as_millis(),
        kill_takeover.as_millis(),
        stop_takeover.as_millis(),
        paused_ms,
        resign_takeover.as_millis(),
        per_term.len(),
        batches.len(),
        per_term,
        paused_terms,
    );
    assert!(kill_takeover < limit, "SIGKILL: {kill_takeover:?}");
    assert!(stop_takeover < limit, "SIGSTOP: {stop_takeover:?}");
    assert!(
        resign_takeover < Duration::from_secs(1),
        "resignation: {resign_takeover:?}"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(workers);
    drop(killed);
    drop(leaving);
    admin.pool().close().await;
    database.drop_database().await.expect("drop the database");
}
