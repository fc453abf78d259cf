//! The `plane-db` operator binary, run as a child process against a real database.

use crate::common::{
    cluster, count, drone, drone_in, exec, lifecycle, plane_made_name, request_named, spawn,
    with_db_url, Drone, TEST_TIMEOUT,
};
use plane_db::types::{BackendName, BackendState, BackendStatus, DronePoolName};
use plane_db::{Config, PlaneDatabase};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_plane-db");

/// The statuses of a backend that goes the whole way: `scheduled`, then `lifecycle()`.
fn every_status() -> Vec<&'static str> {
    std::iter::once(BackendState::Scheduled)
        .chain(lifecycle())
        .map(|state| state.status().as_str())
        .collect()
}

/// Runs the binary to completion with `DATABASE_URL=url` and stdout piped.
fn run(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .expect("run plane-db")
}

/// Runs it, asserts success, and parses stdout as JSON.
fn run_json(url: &str, args: &[&str]) -> Value {
    let output = run(url, &[args, &["--json"]].concat());
    assert!(
        output.status.success(),
        "plane-db {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8 stderr")
}

/// Asserts the run failed with `code` and exactly one line on stderr containing `needle`.
fn assert_fails(output: &Output, code: i32, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("plane-db: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

fn ids(value: &Value, field: &str) -> Vec<String> {
    let mut ids: Vec<String> = value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v[field].as_str().expect("a string id").to_string())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// A started binary, killed when dropped (so a failed assertion leaves nothing running).
struct Running {
    child: Child,
    /// Its stdout, line by line.
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// The next line (blocking the test thread, bounded).
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(TEST_TIMEOUT)
            .expect("a line from plane-db before the timeout")
    }

    /// Waits (bounded) for it to exit by itself; its exit status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + TEST_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll plane-db") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "plane-db did not exit before the timeout"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with stdout piped.
fn start(url: &str, args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start plane-db");
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines: rx }
}

async fn ready(db: &PlaneDatabase, backend: &BackendName) {
    for state in lifecycle().into_iter().take(4) {
        assert!(db.backend().update_state(backend, &state).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_listed_and_filtered() {
    with_db_url(Config::default(), |db, url| async move {
        let a = drone(&db).await;
        let other: plane_db::types::ClusterName = "other.test".parse().unwrap();
        let b = drone_in(&db, &other, &DronePoolName::default()).await;
        let first = spawn(&db).await.backend_id;
        let second = spawn(&db).await.backend_id;
        ready(&db, &second).await;
        // The third goes to the only drone of the other cluster.
        let mut request = crate::common::request("elsewhere");
        request.spawn_config.as_mut().unwrap().cluster = Some(other.clone());
        let third = db.connect(&request).await.unwrap().backend_id;

        let all = run_json(&url, &["backends"]);
        assert_eq!(
            ids(&all, "id"),
            sorted(vec![
                first.to_string(),
                second.to_string(),
                third.to_string()
            ])
        );
        let in_other = run_json(&url, &["backends", "--cluster", other.as_str()]);
        assert_eq!(ids(&in_other, "id"), vec![third.to_string()]);
        assert_eq!(in_other[0]["drone_id"], b.id.as_i32());
        let by_id = run_json(&url, &["backends", "--drone", &a.id.to_string()]);
        assert_eq!(
            ids(&by_id, "id"),
            sorted(vec![first.to_string(), second.to_string()])
        );
        let by_name = run_json(
            &url,
            &[
                "backends",
                "--drone",
                a.name.as_str(),
                "--cluster",
                cluster().as_str(),
            ],
        );
        assert_eq!(by_name, by_id);
        let ready_ones = run_json(&url, &["backends", "--status", "ready"]);
        assert_eq!(ids(&ready_ones, "id"), vec![second.to_string()]);
        assert_eq!(ready_ones[0]["status"], "ready");
        let limited = run_json(&url, &["backends", "--limit", "1"]);
        assert_eq!(limited.as_array().unwrap().len(), 1);

        // Piped text: an aligned table without colour codes.
        let text = run(&url, &["backends", "--status", "ready"]);
        assert!(text.status.success());
        let text = stdout(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("ID "), "{text}");
        assert_eq!(
            lines[0].find("STATUS"),
            lines[1].find("ready"),
            "columns align: {text}"
        );
        assert!(!text.contains('\x1b'), "no colour when piped: {text:?}");
        let coloured = stdout(&run(
            &url,
            &["backends", "--status", "ready", "--color", "always"],
        ));
        assert!(coloured.contains("\x1b[32mready\x1b[0m"), "{coloured:?}");

        // Usage mistakes are one line and exit code 2.
        assert_fails(
            &run(&url, &["backends", "--drone", a.name.as_str()]),
            2,
            "--cluster",
        );
        assert_fails(
            &run(&url, &["backends", "--status", "bogus"]),
            2,
            "invalid backend status",
        );
        assert_fails(
            &run(
                &url,
                &[
                    "backends",
                    "--drone",
                    "dr-nosuch",
                    "--cluster",
                    "plane.test",
                ],
            ),
            3,
            "not found",
        );
        assert_fails(
            &run(&url, &["backends", "--drone", "424242"]),
            3,
            "not found",
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_shows_its_history_or_is_not_found() {
    with_db_url(Config::default(), |db, url| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        let shown = run_json(&url, &["backend", backend.as_str()]);
        assert_eq!(shown["id"], backend.as_str());
        assert_eq!(shown["status"], "terminated");
        let history: Vec<&str> = shown["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"]["status"].as_str().unwrap())
            .collect();
        assert_eq!(history, every_status());

        let text = stdout(&run(&url, &["backend", backend.as_str()]));
        assert!(text.contains("address=10.0.0.1:8080"), "{text}");
        assert!(text.contains("reason=swept"), "{text}");

        assert_fails(&run(&url, &["backend", "ba-nosuch"]), 3, "not found");
        assert_fails(
            &run(&url, &["backend", "not a name"]),
            2,
            "invalid backend id",
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_show_active_ones_unless_all() {
    with_db_url(Config::default(), |db, url| async move {
        let online = drone(&db).await;
        let gone: Drone = drone(&db).await;
        db.controller()
            .heartbeat(&gone.controller, false, "0.1.0", "abc")
            .await
            .unwrap();

        let active = run_json(&url, &["nodes"]);
        assert_eq!(ids(&active, "name"), vec![online.name.to_string()]);
        assert_eq!(active[0]["kind"], "Drone");
        assert_eq!(active[0]["active"], true);
        let all = run_json(&url, &["nodes", "--all"]);
        assert_eq!(
            ids(&all, "name"),
            sorted(vec![online.name.to_string(), gone.name.to_string()])
        );
        let elsewhere = run_json(&url, &["nodes", "--all", "--cluster", "other.test"]);
        assert_eq!(elsewhere, Value::Array(vec![]));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_by_kind_and_followed_without_duplicates() {
    with_db_url(Config::default(), |db, url| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        db.backend()
            .update_state(&backend, &BackendState::Loading)
            .await
            .unwrap();

        let states = run_json(&url, &["events", "--kind", "backend_state"]);
        let states = states.as_array().unwrap();
        assert_eq!(states.len(), 2, "scheduled and loading: {states:?}");
        assert!(states.iter().all(|e| e["kind"] == "backend_state"));
        assert!(states.iter().all(|e| e["key"] == backend.as_str()));
        let first_id = states[0]["id"].as_i64().unwrap();
        let after = run_json(&url, &["events", "--since", &first_id.to_string()]);
        assert!(after
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"].as_i64().unwrap() > first_id));

        // Follow from the start: the backlog, then live events, each once. One event is
        // written before the follow starts but committed after its backlog read: it comes
        // live only, although its id is below the backlog's last.
        let mut late = db.pool().begin().await.unwrap();
        plane_db::events::emit(
            &mut late,
            Some(&"late".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        db.backend()
            .update_state(&backend, &BackendState::Starting)
            .await
            .unwrap();
        let follow = start(
            &url,
            &[
                "events",
                "--follow",
                "--json",
                "--since",
                "0",
                "--kind",
                "backend_state",
            ],
        );
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(serde_json::from_str::<Value>(&follow.next_line()).unwrap());
        }
        late.commit().await.unwrap();
        for state in lifecycle().into_iter().skip(2) {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        for _ in 0..5 {
            seen.push(serde_json::from_str::<Value>(&follow.next_line()).unwrap());
        }
        let keyed: Vec<(&str, &str)> = seen
            .iter()
            .map(|e| {
                (
                    e["key"].as_str().unwrap(),
                    e["data"]["status"].as_str().unwrap(),
                )
            })
            .collect();
        // One backend's events come in its order; the late one, from another transaction,
        // may come anywhere after the backlog (the bus orders by visibility, not by id).
        let b = backend.as_str();
        let ours: Vec<&str> = keyed
            .iter()
            .filter(|(k, _)| *k == b)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(ours, every_status());
        let late_at = keyed.iter().position(|(k, _)| *k == "late");
        assert!(late_at.is_some_and(|at| at >= 3), "{keyed:?}");
        let ids: Vec<i64> = seen.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        let late_id = seen[late_at.unwrap()]["id"].as_i64().unwrap();
        assert!(late_id < ids[2], "the late event has a smaller id: {ids:?}");
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "no event printed twice: {ids:?}");
        // Nothing beyond the eight (a duplicate would arrive right behind them).
        let extra = follow
            .lines
            .recv_timeout(std::time::Duration::from_millis(500));
        assert!(extra.is_err(), "unexpected extra event: {extra:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_events_recovers_what_a_full_queue_dropped() {
    with_db_url(Config::default(), |db, url| async move {
        // Without --since: only what is committed from now on. A queue of 10 cannot hold a
        // transaction of 500 events, so the subscription pauses and reads the rest back from
        // the table.
        db.health_check().await.unwrap();
        let mut before = db.pool().begin().await.unwrap();
        plane_db::events::emit(
            &mut before,
            Some(&"before".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        before.commit().await.unwrap();
        let mut follow = start(
            &url,
            &["events", "--follow", "--json", "--max-pending", "10"],
        );
        // It is following once a live event comes through: probe until one does (the
        // process takes a moment to start and subscribe).
        let mut probes = 0;
        let first = loop {
            let mut probe = db.pool().begin().await.unwrap();
            plane_db::events::emit(
                &mut probe,
                Some(&"probe".parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
            probe.commit().await.unwrap();
            probes += 1;
            assert!(probes < 600, "the follow never printed a probe");
            if let Ok(line) = follow
                .lines
                .recv_timeout(std::time::Duration::from_millis(200))
            {
                break serde_json::from_str::<Value>(&line).unwrap();
            }
        };
        assert_eq!(first["key"], "probe", "nothing from before the follow");

        let mut burst = db.pool().begin().await.unwrap();
        for n in 0..500 {
            plane_db::events::emit(
                &mut burst,
                Some(&(format!("burst-{n}")).parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
        }
        burst.commit().await.unwrap();
        // Probes still in flight may come first; they are not part of the count.
        let mut keys = Vec::new();
        while keys.len() < 500 {
            let event: Value = serde_json::from_str(&follow.next_line()).unwrap();
            let key = event["key"].as_str().unwrap().to_string();
            assert!(key != "before", "nothing from before the follow");
            if key != "probe" {
                keys.push(key);
            }
        }
        keys.sort();
        let mut expected: Vec<String> = (0..500).map(|n| format!("burst-{n}")).collect();
        expected.sort();
        assert_eq!(keys, expected, "every event of the burst, once");
        let extra = follow
            .lines
            .recv_timeout(std::time::Duration::from_millis(500));
        assert!(extra.is_err(), "unexpected extra event: {extra:?}");

        let _ = follow.child.kill();
        let _ = follow.wait();
        let mut stderr = String::new();
        std::io::Read::read_to_string(follow.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        // The subscription caught up by itself: nothing was reported missed.
        assert!(!stderr.contains("fell behind"), "{stderr}");
    })
    .await
}

/// The resident memory of a process in kB (Linux).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_follow_with_a_tiny_queue_prints_every_event_once_in_flat_memory() {
    with_db_url(Config::default(), |db, url| async move {
        const TOTAL: i64 = 100_000;
        const PER_TXN: i64 = 2_000;
        db.health_check().await.unwrap();
        let mut follow = start(
            &url,
            &["events", "--follow", "--json", "--max-pending", "10"],
        );
        // Following once a probe comes through.
        let mut probes = 0;
        loop {
            plane_db::events::emit(
                &mut db.pool().acquire().await.unwrap(),
                Some(&"probe".parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
            probes += 1;
            assert!(probes < 600, "the follow never printed a probe");
            if follow
                .lines
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_ok()
            {
                break;
            }
        }
        // 100,000 events in transactions of 2,000, written as fast as the database takes
        // them, while the follow (queue of 10) prints: it falls behind, pauses and catches
        // up over and over.
        let writer = {
            let pool = db.pool().clone();
            tokio::spawn(async move {
                for start in (0..TOTAL).step_by(PER_TXN as usize) {
                    sqlx::query(
                        "insert into event (kind, key, data)
                         select 'bulk', 'bulk-' || g, '{}'::jsonb
                         from generate_series($1::bigint, $2::bigint) g",
                    )
                    .bind(start)
                    .bind(start + PER_TXN - 1)
                    .execute(&pool)
                    .await
                    .unwrap();
                }
            })
        };
        let pid = follow.child.id();
        let mut seen = vec![false; TOTAL as usize];
        let (mut printed, mut repeated) = (0_i64, 0_i64);
        let mut rss_at_10k = 0;
        while printed < TOTAL {
            let event: Value = serde_json::from_str(&follow.next_line()).unwrap();
            let Some(n) = event["key"]
                .as_str()
                .and_then(|k| k.strip_prefix("bulk-"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue; // a late probe
            };
            if std::mem::replace(&mut seen[n], true) {
                repeated += 1;
            } else {
                printed += 1;
            }
            if printed == 10_000 {
                rss_at_10k = rss_kb(pid);
            }
        }
        let rss_at_end = rss_kb(pid);
        writer.await.unwrap();
        let extra = follow
            .lines
            .recv_timeout(std::time::Duration::from_millis(500));
        println!(
            "FIGURES cli_follow: events={TOTAL} queue=10 printed={printed} repeated={repeated} \
             rss_kb_at_10k={rss_at_10k} rss_kb_at_100k={rss_at_end}"
        );
        assert_eq!(repeated, 0, "no event printed twice");
        assert!(extra.is_err(), "unexpected extra event: {extra:?}");
        // Flat: what 90,000 more events may add is bounded by the queue and one catch-up page,
        // not by how many were printed (a set of printed ids alone would add megabytes).
        assert!(
            rss_at_end < rss_at_10k + 2_048,
            "memory grew from {rss_at_10k} kB to {rss_at_end} kB"
        );
        let _ = follow.child.kill();
        let _ = follow.wait();
        let mut stderr = String::new();
        std::io::Read::read_to_string(follow.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!stderr.contains("fell behind"), "{stderr}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_statuses_until_terminated() {
    with_db_url(Config::default(), |db, url| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let mut watch = start(&url, &["watch", backend.as_str(), "--json"]);
        let first: Value = serde_json::from_str(&watch.next_line()).unwrap();
        assert_eq!(first["status"], "scheduled");
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        let mut statuses = vec![first["status"].as_str().unwrap().to_string()];
        while let Ok(line) = watch.lines.recv_timeout(TEST_TIMEOUT) {
            let entry: Value = serde_json::from_str(&line).unwrap();
            statuses.push(entry["status"].as_str().unwrap().to_string());
        }
        assert!(watch.wait().success(), "watch exits 0 once terminated");
        assert_eq!(statuses, every_status());

        assert_fails(&run(&url, &["watch", "ba-nosuch"]), 3, "not found");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_candidates_prevent_renew_and_mark_lost() {
    with_db_url(Config::default(), |db, url| async move {
        let d = drone(&db).await;
        let idle = spawn(&db).await.backend_id;
        let busy = spawn(&db).await.backend_id;
        for backend in [&idle, &busy] {
            db.backend()
                .update_state(backend, &BackendState::Loading)
                .await
                .unwrap();
        }
        exec(
            &db,
            &format!(
                "update backend set allowed_idle_seconds = 1,
                     last_keepalive = now() - interval '1 hour' where id = '{idle}'"
            ),
        )
        .await;
        let candidates = run_json(
            &url,
            &[
                "termination-candidates",
                "--cluster",
                cluster().as_str(),
                "--drone",
                d.name.as_str(),
            ],
        );
        assert_eq!(ids(&candidates, "backend_id"), vec![idle.to_string()]);
        let text = stdout(&run(
            &url,
            &["termination-candidates", "--drone", &d.id.to_string()],
        ));
        assert!(
            text.contains(idle.as_str()) && text.contains("idle"),
            "{text}"
        );

        let once = run_json(&url, &["prevent-renew", idle.as_str()]);
        assert_eq!(once["prevented"], true);
        let twice = run_json(&url, &["prevent-renew", idle.as_str()]);
        assert_eq!(twice["prevented"], false);
        assert_fails(&run(&url, &["prevent-renew", "ba-nosuch"]), 3, "not found");

        let marked = run_json(&url, &["mark-lost", idle.as_str(), "ba-nosuch"]);
        assert_eq!(marked["marked"], serde_json::json!([idle.as_str()]));
        let row = db.backend().backend(&idle).await.unwrap().unwrap();
        assert_eq!(row.state.status(), BackendStatus::Terminated);

        let by_drone = run_json(
            &url,
            &[
                "mark-lost",
                "--drone",
                d.name.as_str(),
                "--cluster",
                cluster().as_str(),
            ],
        );
        assert_eq!(by_drone["marked"], serde_json::json!([busy.as_str()]));
        let again = run_json(&url, &["mark-lost", "--drone", &d.id.to_string()]);
        assert_eq!(again["marked"], serde_json::json!([]));

        // Neither ids nor a drone is a usage error from the argument parser.
        let neither = run(&url, &["mark-lost"]);
        assert_eq!(neither.status.code(), Some(2));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_reports_progress_and_a_summary() {
    with_db_url(Config::default(), |db, url| async move {
        drone(&db).await;
        let mut old = Vec::new();
        for _ in 0..3 {
            let backend = spawn(&db).await.backend_id;
            for state in lifecycle() {
                db.backend().update_state(&backend, &state).await.unwrap();
            }
            old.push(backend);
        }
        let kept = spawn(&db).await.backend_id;
        exec(
            &db,
            "update backend set last_status_time = now() - interval '30 days'
             where last_status = 'terminated'",
        )
        .await;
        exec(
            &db,
            "update event set created_at = now() - interval '30 days'",
        )
        .await;
        crate::common::fill_first_event_partition(&db).await;

        let output = run(
            &url,
            &[
                "cleanup",
                "--min-age-days",
                "7",
                "--batch-size",
                "2",
                "--json",
            ],
        );
        assert!(output.status.success(), "{}", stderr(&output));
        let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(summary["backends"], 3);
        assert_eq!(summary["backend_states"], 21);
        assert_eq!(summary["backend_batches"], 2, "{summary}");
        assert!(summary["events"].as_u64().unwrap() >= 22, "{summary}");
        let progress = stderr(&output);
        assert!(
            progress.contains("cleanup backends: 3 deleted in 2 batch(es)"),
            "{progress}"
        );
        assert!(progress.contains("cleanup events:"), "{progress}");
        assert!(db.backend().backend(&kept).await.unwrap().is_some());
        for backend in &old {
            assert!(db.backend().backend(backend).await.unwrap().is_none());
        }

        let bad = run(&url, &["cleanup", "--batch-size", "0"]);
        assert_eq!(bad.status.code(), Some(2));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_usage_errors_are_one_line() {
    // No database at all.
    let output = Command::new(BIN)
        .arg("backends")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_fails(&output, 2, "DATABASE_URL");
    // A server that refuses: the reason, not a pool timeout.
    let output = run("postgres://postgres@127.0.0.1:1/none", &["backends"]);
    assert_fails(&output, 1, "cannot connect to the database");
    assert!(stderr(&output).to_lowercase().contains("refused"));
    let output = run("not a url", &["backends"]);
    assert_fails(&output, 2, "invalid database URL");
    // Several hosts, none fitting: each host named with its reason, on one line.
    let output = run(
        "postgres://postgres@127.0.0.1:1,127.0.0.1:2/none?target_session_attrs=read-write",
        &["backends"],
    );
    assert_fails(&output, 1, "no host fits target_session_attrs=read-write");
    let text = stderr(&output);
    assert!(
        text.contains("127.0.0.1:1: ") && text.contains("127.0.0.1:2: "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_reaches_the_host_that_fits() {
    with_db_url(Config::default(), |_db, url| async move {
        // A host where nothing listens first, then the test server, which is writable.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (head, rest) = url.split_once('@').unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let separator = if path.contains('?') { '&' } else { '?' };
        let multi = format!(
            "{head}@127.0.0.1:{dead},{host}/{path}{separator}target_session_attrs=read-write"
        );
        let output = run(&multi, &["status"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let port = host.rsplit(':').next().unwrap();
        assert!(
            text.starts_with("SERVER: ") && text.lines().next().unwrap().contains(port),
            "{text}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_cannot_rewrite_the_terminal() {
    with_db_url(Config::default(), |db, url| async move {
        let controller = plane_db::types::ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, "0.1.0", "abc")
            .await
            .unwrap();
        db.node()
            .register(&plane_db::node::NodeRegistration {
                controller: &controller,
                kind: plane_db::types::NodeKind::Proxy,
                name: "px-hostile",
                cluster: Some(&cluster()),
                plane_version: "1.0\x1b[2J\nfake row",
                plane_hash: "abc",
                ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            })
            .await
            .unwrap();
        let output = run(&url, &["nodes", "--color", "always"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        assert_eq!(text.lines().count(), 2, "header and one row: {text:?}");
        assert!(text.contains("1.0\\u{1b}[2J\\nfake row"), "{text:?}");
        assert!(!text.contains("\x1b[2J"), "{text:?}");
        // JSON keeps the value as stored, escaped by JSON itself.
        let json = run_json(&url, &["nodes"]);
        assert_eq!(json[0]["plane_version"], "1.0\x1b[2J\nfake row");

        // Event keys are free text too: an older writer or manual SQL can store any key, even
        // where the crate's own writers only use backend names.
        sqlx::query("insert into event (kind, key, data) values ('backend_state', $1, $2)")
            .bind("key\x1b]0;owned\x07")
            .bind(serde_json::to_value(BackendState::Loading).unwrap())
            .execute(db.pool())
            .await
            .unwrap();
        let output = run(&url, &["events", "--kind", "backend_state"]);
        let text = stdout(&output);
        assert!(text.contains("key\\u{1b}]0;owned\\u{7}"), "{text:?}");
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
    })
    .await
}

/// Spawns a backend with a static token; the token.
async fn static_backend(db: &PlaneDatabase, key: &str) -> (BackendName, String) {
    let mut request = crate::common::request(key);
    request
        .spawn_config
        .as_mut()
        .expect("a spawn config")
        .use_static_token = true;
    let response = db.connect(&request).await.unwrap();
    let token = response.token.to_string();
    assert!(token.starts_with("s."), "a static token: {token:?}");
    (response.backend_id, token)
}

/// Asserts none of `secrets` appears in the output (stdout and stderr) of `args`.
fn assert_hidden(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} printed the secret {secret:?}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_secrets_are_redacted_unless_asked_for() {
    with_db_url(Config::default(), |db, url| async move {
        drone(&db).await;
        let (backend, token) = static_backend(&db, "static-key").await;
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        // The spawn action and its event carry the token as stored.
        let stored: String = sqlx::query_scalar(
            "select data::text from event where kind = 'backend_action' and key is not null",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert!(stored.contains(&token), "{stored}");
        // Another writer's event, with secrets under other names.
        exec(
            &db,
            &format!(
                r#"insert into event (kind, key, data) values ('custom', 'k', '{{
                    "secret_token": "sekrit-value",
                    "auth": {{"password": "hunter2-value"}},
                    "note": "copied {token} here",
                    "fencing": {{"token": 7}}}}')"#
            ),
        )
        .await;
        let secrets = [token.as_str(), &token[2..], "sekrit-value", "hunter2-value"];

        let b = backend.as_str();
        let commands: [&[&str]; 10] = [
            &["events"],
            &["events", "--json"],
            &["events", "--color", "always"],
            &["backend", b],
            &["backend", b, "--json"],
            &["backends"],
            &["backends", "--json"],
            &["watch", b],
            &["watch", b, "--json"],
            &["nodes", "--all", "--json"],
        ];
        for args in commands {
            let output = run(&url, args);
            assert!(output.status.success(), "{args:?}: {}", stderr(&output));
            let text = format!("{}{}", stdout(&output), stderr(&output));
            assert_hidden(&format!("plane-db {args:?}"), &text, &secrets);
        }
        // Redacted where they were, the rest left alone.
        let actions = run_json(&url, &["events", "--kind", "backend_action"]);
        assert_eq!(
            actions[0]["data"]["action"]["Spawn"]["static_token"],
            "s.****"
        );
        assert_eq!(actions[0]["data"]["backend_id"], b);
        assert!(actions[0]["data"]["action"]["Spawn"]["key"]["token"].is_i64());
        let custom = run_json(&url, &["events", "--kind", "custom"]);
        assert_eq!(custom[0]["data"]["secret_token"], "****");
        assert_eq!(custom[0]["data"]["auth"]["password"], "****");
        assert_eq!(custom[0]["data"]["note"], "copied s.**** here");
        assert_eq!(custom[0]["data"]["fencing"]["token"], 7);
        let table = stdout(&run(&url, &["events", "--kind", "backend_action"]));
        assert!(table.contains(r#""static_token":"s.****""#), "{table}");

        // Following: the backlog and a live event alike.
        let stored = count(&db, "event").await;
        for json in [false, true] {
            let mut args = vec!["events", "--follow", "--since", "0"];
            if json {
                args.push("--json");
            }
            let follow = start(&url, &args);
            let mut lines = Vec::new();
            for _ in 0..stored {
                lines.push(follow.next_line());
            }
            let (_, live_token) = static_backend(&db, &format!("live-{json}")).await;
            // The live backend's two events: its state, then its spawn action.
            for _ in 0..2 {
                lines.push(follow.next_line());
            }
            let text = lines.join("\n");
            assert_hidden("events --follow", &text, &secrets);
            assert_hidden("events --follow", &text, &[&live_token]);
            assert_eq!(text.matches("s.****").count(), 3, "{text}");
        }

        // --show-secrets prints them as stored.
        let shown = run_json(
            &url,
            &["events", "--kind", "backend_action", "--show-secrets"],
        );
        assert_eq!(shown[0]["data"]["action"]["Spawn"]["static_token"], *token);
        let table = stdout(&run(&url, &["events", "--show-secrets"]));
        for secret in secrets {
            assert!(table.contains(secret), "{secret:?} missing: {table}");
        }
        let latest = db.latest_event_id().await.unwrap().unwrap_or(0).to_string();
        let follow = start(
            &url,
            &["events", "--follow", "--show-secrets", "--since", &latest],
        );
        let (_, live_token) = static_backend(&db, "shown-live").await;
        let _state = follow.next_line();
        let next = follow.next_line();
        assert!(next.contains(&live_token), "{next}");
    })
    .await
}

/// Backend names as Plane 0.5.5 makes them (no prefix), and one it accepts with a leading
/// dash (given after `--`), through every command that takes or prints a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plane_made_backend_names_work_in_every_command() {
    with_db_url(Config::default(), |db, url| async move {
        let d = drone(&db).await;
        let plane = plane_made_name();
        let dashed: BackendName = "-dashed".parse().unwrap();
        for (key, id) in [("plane", &plane), ("dashed", &dashed)] {
            let response = db.connect(&request_named(key, id)).await.unwrap();
            assert_eq!(&response.backend_id, id);
        }
        ready(&db, &plane).await;

        let listed = run_json(&url, &["backends"]);
        assert_eq!(
            ids(&listed, "id"),
            sorted(vec![plane.to_string(), dashed.to_string()])
        );
        let shown = run_json(&url, &["backend", plane.as_str()]);
        assert_eq!(shown["id"], plane.as_str());
        assert_eq!(shown["status"], "ready");
        let text = stdout(&run(&url, &["backend", plane.as_str()]));
        assert!(text.contains(plane.as_str()), "{text}");
        // A name starting with '-' reads as an option unless it follows `--`.
        let dashed_shown = run(&url, &["backend", "--json", "--", dashed.as_str()]);
        assert!(dashed_shown.status.success(), "{}", stderr(&dashed_shown));
        let dashed_shown: Value = serde_json::from_slice(&dashed_shown.stdout).unwrap();
        assert_eq!(dashed_shown["id"], dashed.as_str());

        // The spawn actions' events name the backends unchanged.
        let actions = run_json(&url, &["events", "--kind", "backend_action"]);
        let named: Vec<&str> = actions
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["data"]["backend_id"].as_str().expect("a backend id"))
            .collect();
        assert!(named.contains(&plane.as_str()), "{actions}");

        exec(
            &db,
            &format!(
                "update backend set allowed_idle_seconds = 1,
                     last_keepalive = now() - interval '1 hour' where id = '{plane}'"
            ),
        )
        .await;
        let candidates = run_json(
            &url,
            &["termination-candidates", "--drone", &d.id.to_string()],
        );
        assert_eq!(ids(&candidates, "backend_id"), vec![plane.to_string()]);

        let prevented = run_json(&url, &["prevent-renew", plane.as_str()]);
        assert_eq!(prevented["prevented"], true);

        let mut watch = start(&url, &["watch", plane.as_str(), "--json"]);
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let entry: Value = serde_json::from_str(&watch.next_line()).unwrap();
            statuses.push(entry["status"].as_str().unwrap().to_string());
        }
        assert_eq!(statuses, every_status()[..5]);
        let marked = run(
            &url,
            &["mark-lost", "--json", plane.as_str(), "--", dashed.as_str()],
        );
        assert!(marked.status.success(), "{}", stderr(&marked));
        let marked: Value = serde_json::from_slice(&marked.stdout).unwrap();
        let mut marked: Vec<String> = marked["marked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        marked.sort();
        assert_eq!(marked, sorted(vec![plane.to_string(), dashed.to_string()]));
        let last: Value = serde_json::from_str(&watch.next_line()).unwrap();
        assert_eq!(last["status"], "terminated");
        assert!(watch.wait().success(), "watch ends after terminated");
    })
    .await
}

/// A connection to `url` named `application_name` that has begun a transaction and written
/// (an uncommitted event), so it holds a transaction id; and its server pid.
async fn open_writer(url: &str, application_name: &str) -> (sqlx::PgConnection, i32) {
    use sqlx::Connection;
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("test URL");
    let mut conn = sqlx::PgConnection::connect_with(&options.application_name(application_name))
        .await
        .expect("connect the writer");
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("writer pid");
    sqlx::query("begin")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query("insert into event (kind, data) values ('left_open', '{}')")
        .execute(&mut conn)
        .await
        .expect("write in the open transaction");
    (conn, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_open_transaction_and_counts_what_exists() {
    with_db_url(Config::default(), |db, url| async move {
        let a = drone(&db).await;
        let gpu = DronePoolName::from("gpu");
        let b = drone_in(&db, &cluster(), &gpu).await;
        assert!(db.drone().drain(b.id).await.unwrap());
        spawn(&db).await;
        let readied = spawn(&db).await.backend_id;
        ready(&db, &readied).await;
        let ended = spawn(&db).await.backend_id;
        for state in lifecycle() {
            assert!(db.backend().update_state(&ended, &state).await.unwrap());
        }
        let oldest_event: i64 =
            sqlx::query_scalar("select id from event order by created_at, id limit 1")
                .fetch_one(db.pool())
                .await
                .unwrap();

        let (writer, pid) = open_writer(&url, "status-test-writer").await;
        // Other tests share the server: a transaction of theirs that began before ours may
        // still be open for a moment, so ask until ours is the oldest (bounded).
        let mut status = Value::Null;
        for _ in 0..40 {
            status = run_json(&url, &["status"]);
            if status["oldest_transaction"]["pid"] == pid {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        let tx = &status["oldest_transaction"];
        assert_eq!(tx["pid"], pid, "{status:#}");
        assert_eq!(tx["application_name"], "status-test-writer", "{status:#}");
        assert_eq!(tx["state"], "idle in transaction", "{status:#}");
        assert_eq!(tx["holds_bus"], true, "{status:#}");
        assert!(tx["xid"].as_i64().is_some(), "{status:#}");
        assert!(tx["age_seconds"].as_f64().unwrap() >= 0.0, "{status:#}");

        assert_eq!(
            ids(&status["controllers"], "name"),
            sorted(vec![a.controller.to_string(), b.controller.to_string()])
        );
        let controller = &status["controllers"][0];
        assert_eq!(controller["plane_hash"], "abc", "{status:#}");
        assert!(controller["first_seen"].is_string(), "{status:#}");
        assert!(
            controller["heartbeat_age_seconds"].as_f64().is_some(),
            "{status:#}"
        );
        assert_eq!(
            status["drones"],
            serde_json::json!([
                {"cluster": cluster().as_str(), "pool": "", "state": "ready", "count": 1},
                {"cluster": cluster().as_str(), "pool": "gpu", "state": "draining", "count": 1},
            ]),
            "{status:#}"
        );
        assert_eq!(
            status["backends"],
            serde_json::json!({"scheduled": 1, "ready": 1, "terminated": 1}),
            "{status:#}"
        );
        let events = &status["events"];
        assert_eq!(events["oldest_id"], oldest_event, "{status:#}");
        assert!(events["oldest_at"].is_string(), "{status:#}");
        assert!(events["bytes"].as_i64().unwrap() > 0, "{status:#}");
        assert!(events["rows_estimate"].as_i64().is_some(), "{status:#}");
        assert_eq!(status["last_cleanup"], Value::Null, "no cleanup has run");
        // The server that answered: the primary, on the test server's port.
        let server = &status["server"];
        assert_eq!(server["in_recovery"], false, "{status:#}");
        assert!(server["started_at"].is_string(), "{status:#}");
        assert!(
            server["version"].as_str().is_some_and(|v| !v.is_empty()),
            "{status:#}"
        );

        // The table, piped: sections in order, no colour codes, the writer's pid and name.
        let text = run(&url, &["status"]);
        assert!(text.status.success(), "{}", stderr(&text));
        let text = stdout(&text);
        assert!(!text.contains('\x1b'), "{text}");
        let mut at = 0;
        for heading in [
            "SERVER: ",
            "the primary, PostgreSQL ",
            "\nCONTROLLERS ONLINE: 2\n",
            "\nDRONES: 2\n",
            "\nBACKENDS: 3\n",
            "\nOLDEST OPEN TRANSACTION\n",
            "\nEVENTS\n",
            "\nLAST CLEANUP: never (no completed run recorded)\n",
        ] {
            let found = text[at..]
                .find(heading)
                .unwrap_or_else(|| panic!("{heading:?} after byte {at}: {text}"));
            at += found + heading.len();
        }
        let backend_lines: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("BACKENDS"))
            .skip(2)
            .take(3)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            backend_lines,
            vec![
                vec!["scheduled", "1"],
                vec!["ready", "1"],
                vec!["terminated", "1"]
            ],
            "{text}"
        );
        let writer_line = text
            .lines()
            .find(|l| l.starts_with(&format!("{pid} ")))
            .unwrap_or_else(|| panic!("a line for pid {pid}: {text}"));
        assert!(writer_line.contains("status-test-writer"), "{text}");
        assert!(writer_line.contains("idle in transaction"), "{text}");

        // Once it ends (closing rolls it back), it holds nothing back any more.
        sqlx::Connection::close(writer).await.unwrap();
        let after = run_json(&url, &["status"]);
        assert_ne!(after["oldest_transaction"]["pid"], pid, "{after:#}");

        // A completed cleanup is recorded: the latest run, with what it deleted (nothing is
        // old enough here, so zeros, but a run all the same).
        let summary = db
            .run_cleanup(&plane_db::CleanupConfig::default())
            .await
            .unwrap();
        let after = run_json(&url, &["status"]);
        let last = &after["last_cleanup"];
        assert_eq!(last["backends"], summary.backends.backends, "{after:#}");
        assert_eq!(last["events"], summary.events, "{after:#}");
        assert_eq!(last["tokens"], summary.tokens, "{after:#}");
        assert!(
            last["finished_at"].is_string() && last["started_at"].is_string(),
            "{after:#}"
        );
        let text = stdout(&run(&url, &["status"]));
        let line = text
            .lines()
            .find(|l| l.starts_with("LAST CLEANUP:"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("deleted 0 backends"), "{line}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_are_recorded_and_pruned() {
    with_db_url(Config::default(), |db, _url| async move {
        for _ in 0..105 {
            db.run_cleanup(&plane_db::CleanupConfig::default())
                .await
                .unwrap();
        }
        let (count, min_id, max_id): (i64, i64, i64) =
            sqlx::query_as("select count(*), min(id), max(id) from cleanup_run")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(count, 100, "only the latest 100 runs are kept");
        assert_eq!(max_id - min_id, 99);
        let status = db.status().await.unwrap();
        let last = status.last_cleanup.expect("a run is recorded");
        assert!(last.started_at <= last.finished_at);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_who_leads_and_since_when() {
    with_db_url(Config::default(), |db, url| async move {
        let text = stdout(&run(&url, &["status"]));
        assert!(
            text.contains("\nLEADERS\nnone (no lease taken yet)\n"),
            "{text}"
        );
        let leases = db.leader_lease();
        let term = match leases
            .acquire(
                "maintenance",
                "host-a:42:00ff",
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap()
        {
            plane_db::leader::Acquired::Elected { term } => term,
            other => panic!("{other:?}"),
        };
        let json = run_json(&url, &["status"]);
        let leader = &json["leaders"][0];
        assert_eq!(leader["lease"], "maintenance", "{json:#}");
        assert_eq!(leader["holder"], "host-a:42:00ff", "{json:#}");
        assert_eq!(leader["term"], term, "{json:#}");
        assert_eq!(leader["active"], true, "{json:#}");
        assert!(leader["elected_at"].is_string(), "{json:#}");
        let text = stdout(&run(&url, &["status"]));
        let line = text
            .lines()
            .skip_while(|l| *l != "LEADERS")
            .nth(2)
            .unwrap_or_else(|| panic!("{text}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..3], ["maintenance", "host-a:42:00ff", "1"], "{text}");
        assert!(line.contains("ago)"), "since when: {line}");
        // Resigned: nobody leads; the last holder is named.
        assert!(leases
            .resign("maintenance", term, "host-a:42:00ff")
            .await
            .unwrap());
        let text = stdout(&run(&url, &["status"]));
        assert!(text.contains("none (last: host-a:42:00ff)"), "{text}");
    })
    .await;
}
