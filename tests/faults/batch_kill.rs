//! Group commit under fire: 32 writers move backends through their lives while the
//! connections running a batch of state changes are terminated again and again. Callers get
//! errors (and retry, as a drone reporting its state does), never a wrong answer; nothing is
//! half-written, nothing reported as applied is lost, every event is delivered once.

use crate::common::drone;
use crate::common::request;
use crate::support::*;
use plane_db::events::Lagged;
use plane_db::types::{BackendName, BackendStatus};
use plane_db::Config;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 32;
const BACKENDS_PER_WRITER: usize = 12;
/// `scheduled` (from `connect`) and the seven updates of a full life.
const CHANGES_PER_BACKEND: usize = 8;
/// How often one change is tried before the scenario gives up on it.
const MAX_TRIES: usize = 50;

/// What the writers saw.
#[derive(Default, Debug)]
struct Answers {
    /// Calls that returned an error (each retried).
    errors: u64,
    /// Changes applied on their first try.
    first_try: u64,
    /// Changes that succeeded after an error: true (not written before), false (the failed
    /// try had committed; its outcome was unknown, so it was an error, not a false).
    retried_true: u64,
    retried_false: u64,
    /// A `false` without an error before it: a wrong answer.
    wrong: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_connections_killed_mid_write() {
    with_url(|url| async move {
        let db = open(&url, 40, Config::default()).await;
        let killer = open(&url, 2, Config::default()).await;
        drone(&db).await;

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut backends = Vec::new();
            for b in 0..BACKENDS_PER_WRITER {
                let response = db
                    .connect(&request(&format!("kill-{w}-{b}")))
                    .await
                    .expect("connect");
                backends.push(response.backend_id);
            }
            writers.push(backends);
        }
        let all: Vec<BackendName> = writers.iter().flatten().cloned().collect();
        let total = all.len() * CHANGES_PER_BACKEND;

        // A subscriber, live before the first update, counting deliveries by event id.
        let mut sub = db.subscribe_all_events().await.unwrap();
        let receiver = tokio::spawn(async move {
            let mut by_id: HashMap<i64, u32> = HashMap::new();
            let mut lagged = 0;
            let expected = WRITERS * BACKENDS_PER_WRITER * (CHANGES_PER_BACKEND - 1);
            while by_id.len() < expected {
                match tokio::time::timeout(Duration::from_secs(15), sub.next()).await {
                    Ok(Some(Ok(e))) if e.kind == "backend_state" => {
                        *by_id.entry(e.id.expect("stored")).or_default() += 1;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(Lagged { missed }))) => lagged += missed,
                    Ok(None) | Err(_) => break,
                }
            }
            (by_id, lagged)
        });

        // The killer: terminates every connection running the batch statement, every few ms.
        let done = Arc::new(AtomicBool::new(false));
        let kills = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut kills = 0_u64;
                let mut round = 0_u64;
                while !done.load(Ordering::Relaxed) {
                    let killed: Vec<bool> = sqlx::query_scalar(
                        "select pg_terminate_backend(pid) from pg_stat_activity
                         where datname = current_database() and pid <> pg_backend_pid()
                           and state = 'active' and query ilike '%with input as%'",
                    )
                    .fetch_all(killer.pool())
                    .await
                    .unwrap_or_default();
                    kills += killed.into_iter().filter(|k| *k).count() as u64;
                    round += 1;
                    tokio::time::sleep(Duration::from_millis(2 + round % 7)).await;
                }
                kills
            })
        };

        let started = Instant::now();
        let mut tasks = Vec::new();
        for backends in writers.clone() {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut answers = Answers::default();
                for status in full_life() {
                    let state = state_for(status);
                    for backend in &backends {
                        let mut failed = false;
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            assert!(tries <= MAX_TRIES, "{backend} {status}: too many errors");
                            match db.backend().update_state(backend, &state).await {
                                Ok(true) if failed => answers.retried_true += 1,
                                Ok(true) => answers.first_try += 1,
                                Ok(false) if failed => answers.retried_false += 1,
                                Ok(false) => answers.wrong += 1,
                                Err(_) => {
                                    answers.errors += 1;
                                    failed = true;
                                    continue;
                                }
                            }
                            break;
                        }
                    }
                }
                answers
            }));
        }
        let mut answers = Answers::default();
        for t in tasks {
            let a = t.await.unwrap();
            answers.errors += a.errors;
            answers.first_try += a.first_try;
            answers.retried_true += a.retried_true;
            answers.retried_false += a.retried_false;
            answers.wrong += a.wrong;
        }
        let elapsed = started.elapsed();
        done.store(true, Ordering::Relaxed);
        let kills = kills.await.unwrap();
        let (received, lagged) = receiver.await.unwrap();

        // Nothing half-written and nothing lost: every backend's history, events and final
        // row are its whole life, each status once and in order; its key is released.
        let life: Vec<String> = std::iter::once(BackendStatus::Scheduled)
            .chain(full_life())
            .map(|s| s.to_string())
            .collect();
        let keys: Vec<&str> = all.iter().map(|b| b.as_str()).collect();
        let histories: Vec<(String, Vec<String>)> = sqlx::query_as(
            "select backend_id, array_agg(state->>'status' order by id) from backend_state
             where backend_id = any($1) group by backend_id",
        )
        .bind(&keys)
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(histories.len(), all.len());
        for (backend, history) in &histories {
            assert_eq!(history, &life, "history of {backend}");
        }
        let events: Vec<(String, Vec<String>)> = sqlx::query_as(
            "select key, array_agg(data->>'status' order by id) from event
             where kind = 'backend_state' and key = any($1) group by key",
        )
        .bind(&keys)
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(events.len(), all.len());
        for (backend, statuses) in &events {
            assert_eq!(statuses, &life, "events of {backend}");
        }
        let (terminated, key_rows): (i64, i64) = sqlx::query_as(
            "select (select count(*) from backend where id = any($1) and last_status = 'terminated'),
                    (select count(*) from backend_key where id = any($1))",
        )
        .bind(&keys)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(terminated as usize, all.len());
        assert_eq!(key_rows, 0);
        let transactions: i64 = sqlx::query_scalar(
            "select count(distinct xid) from event
             where kind = 'backend_state' and key = any($1) and data->>'status' <> 'scheduled'",
        )
        .bind(&keys)
        .fetch_one(db.pool())
        .await
        .unwrap();

        // Every event delivered once.
        let updates = all.len() * (CHANGES_PER_BACKEND - 1);
        let duplicated: u32 = received.values().map(|n| n - 1).sum();
        assert_eq!(received.len(), updates, "delivered");
        assert_eq!(duplicated, 0, "duplicated");
        assert_eq!(lagged, 0);

        assert_eq!(answers.wrong, 0, "a false without an error before it");
        assert_eq!(
            (answers.first_try + answers.retried_true + answers.retried_false) as usize,
            updates
        );
        assert!(kills > 0, "the scenario killed no batch connection");
        figures(
            "batch_kill",
            &[
                ("state_changes", total.to_string()),
                ("updates", updates.to_string()),
                ("transactions", transactions.to_string()),
                ("kills", kills.to_string()),
                ("errors", answers.errors.to_string()),
                ("first_try", answers.first_try.to_string()),
                ("retried_true", answers.retried_true.to_string()),
                ("retried_false", answers.retried_false.to_string()),
                ("wrong", answers.wrong.to_string()),
                ("delivered", received.len().to_string()),
                ("duplicated", duplicated.to_string()),
                ("ms", ms(elapsed)),
            ],
        );
    })
    .await
}
