//! A row lock held elsewhere holds back the write to that row only (issue 21, item 4).
//!
//! A side session holds `SELECT … FOR UPDATE` on backend A for [`HOLD`] while 32 tasks move
//! 32 other backends through their lives with `update_state`, and one call moves A to
//! ready. A's change is in a batch (not written alone): a lone call on another backend,
//! held by a short lock of its own, keeps the one place for lone calls taken while A's
//! call queues. Before group commit skipped locked rows, that batch waited for A's lock
//! and every later call waited behind it (all 8 s). Now the 32 finish at about their idle
//! latency, measured in the same run with no lock, and A's change is written once the lock
//! is released.

use crate::common::drone;
use crate::common::request;
use crate::common::wait_for_lock_waiters;
use crate::support::*;
use plane_db::types::{BackendName, BackendStatus};
use plane_db::{Config, PlaneDatabase};
use std::time::{Duration, Instant};

const HOLD: Duration = Duration::from_secs(8);
const WRITERS: usize = 32;

/// Moves each backend through its life, one task per backend, all at once; returns every
/// call's latency.
async fn run_writers(db: &PlaneDatabase, backends: &[BackendName]) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for backend in backends {
        let backend = backend.clone();
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for status in full_life() {
                let started = Instant::now();
                let applied = db
                    .backend()
                    .update_state(&backend, &state_for(status))
                    .await
                    .expect("update_state");
                latencies.push(started.elapsed());
                assert!(applied, "{backend} {status}");
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Milliseconds with a tenth: idle latencies are a few ms.
fn ms_f(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let i = (v.len() * 99).div_ceil(100).saturating_sub(1);
    v[i.min(v.len() - 1)]
}

/// A transaction holding `backend`'s row locked.
async fn lock_row(
    db: &PlaneDatabase,
    backend: &BackendName,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut txn = db.pool().begin().await.unwrap();
    sqlx::query("select 1 from backend where id = $1 for update")
        .bind(backend.as_str())
        .execute(&mut *txn)
        .await
        .unwrap();
    txn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_backend_row_holds_back_only_its_own_write() {
    with_url(|url| async move {
        let db = open(&url, 48, Config::default()).await;
        drone(&db).await;
        let mut backends = Vec::new();
        for i in 0..2 * WRITERS + 2 {
            backends.push(
                db.connect(&request(&format!("lock-{i}")))
                    .await
                    .expect("connect")
                    .backend_id,
            );
        }
        let a = backends.pop().unwrap();
        let lone = backends.pop().unwrap();
        let (idle_backends, locked_backends) = backends.split_at(WRITERS);

        // Idle: no lock anywhere.
        let idle = run_writers(&db, idle_backends).await;

        // A locked for HOLD; the lone call's row for a moment.
        let a_lock = lock_row(&db, &a).await;
        let lone_lock = lock_row(&db, &lone).await;
        let ready = state_for(BackendStatus::Ready);
        let lone_call = {
            let db = db.clone();
            let state = state_for(BackendStatus::Loading);
            tokio::spawn(async move { db.backend().update_state(&lone, &state).await })
        };
        wait_for_lock_waiters(&db, 1).await;
        let a_started = Instant::now();
        let a_call = {
            let db = db.clone();
            let a = a.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let applied = db.backend().update_state(&a, &ready).await;
                (applied, Instant::now())
            })
        };
        // A's change waits for its lock (in the batch before the fix, alone since).
        wait_for_lock_waiters(&db, 2).await;
        let released_at = {
            let release = async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                lone_lock.rollback().await.unwrap();
                tokio::time::sleep(HOLD.saturating_sub(a_started.elapsed())).await;
                a_lock.rollback().await.unwrap();
                Instant::now()
            };
            let (locked, released_at) = tokio::join!(run_writers(&db, locked_backends), release);
            let locked_p99 = p99(locked.clone());
            let locked_max = locked.iter().max().copied().unwrap_or_default();
            let idle_p99 = p99(idle.clone());
            figures(
                "row_lock",
                &[
                    ("hold_ms", ms(HOLD)),
                    ("calls", locked.len().to_string()),
                    ("idle_p99_ms", ms_f(idle_p99)),
                    ("locked_p99_ms", ms_f(locked_p99)),
                    ("locked_max_ms", ms_f(locked_max)),
                    (
                        "ratio",
                        format!(
                            "{:.2}",
                            locked_p99.as_secs_f64() / idle_p99.as_secs_f64().max(1e-6)
                        ),
                    ),
                ],
            );
            assert!(
                locked_p99 < HOLD / 8,
                "the other backends' calls waited for A's lock: p99 {locked_p99:?} (idle {idle_p99:?})"
            );
            released_at
        };
        assert!(lone_call.await.unwrap().unwrap(), "the lone call's change");

        // A's change: applied once its lock was released, with its history row and event.
        let (applied, a_done) = a_call.await.unwrap();
        assert!(applied.expect("A's update_state"), "A's change applied");
        assert!(a_done >= released_at - Duration::from_millis(50));
        println!(
            "A answered {} ms after it called, {} ms after the release",
            ms(a_done - a_started),
            ms(a_done.saturating_duration_since(released_at))
        );
        let history: Vec<String> = sqlx::query_scalar(
            "select state->>'status' from backend_state where backend_id = $1 order by id",
        )
        .bind(a.as_str())
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(history, vec!["scheduled", "ready"]);
        let events: Vec<String> = sqlx::query_scalar(
            "select data->>'status' from event
             where kind = 'backend_state' and key = $1 order by id",
        )
        .bind(a.as_str())
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(events, vec!["scheduled", "ready"]);
        let status: String = sqlx::query_scalar("select last_status from backend where id = $1")
            .bind(a.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(status, "ready");
    })
    .await
}
