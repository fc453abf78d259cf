//! Group commit of `connect` under fire: 32 callers create backends for keys of their own
//! while the connections running a batch of new backends are terminated again and again.
//! Callers get errors (and retry with the same key, as a client does), never a wrong answer;
//! each key ends with exactly one backend and everything that goes with it (history row,
//! spawn action, both events, the key row); nothing is half-written; every event is
//! delivered once.

use crate::common::{drone, request};
use crate::support::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectResponse;
use plane_db::events::Lagged;
use plane_db::Config;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CALLERS: usize = 32;
const KEYS_PER_CALLER: usize = 12;
/// How often one key is tried before the scenario gives up on it.
const MAX_TRIES: usize = 50;

/// What a caller saw.
#[derive(Default, Debug)]
struct Answers {
    errors: u64,
    /// Keys created on the first try.
    first_try: u64,
    /// Keys tried again after an error: created by the retry, or found created (the failed
    /// try had committed; its outcome was unknown, so it was an error).
    retried_spawned: u64,
    retried_found: u64,
    /// A fresh key found already taken without an error before: a wrong answer.
    wrong: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_batch_connections_killed_mid_write() {
    with_url(|url| async move {
        let db = open(&url, 40, Config::default()).await;
        let killer = open(&url, 2, Config::default()).await;
        for _ in 0..4 {
            drone(&db).await;
        }
        let keys = CALLERS * KEYS_PER_CALLER;

        // A subscriber, live before the first connect, counting deliveries by event id.
        let mut sub = db.subscribe_all_events().await.unwrap();
        let receiver = tokio::spawn(async move {
            let mut by_id: HashMap<i64, u32> = HashMap::new();
            let mut lagged = 0;
            while by_id.len() < 2 * keys {
                match tokio::time::timeout(Duration::from_secs(15), sub.next()).await {
                    Ok(Some(Ok(e))) => {
                        *by_id.entry(e.id.expect("stored")).or_default() += 1;
                    }
                    Ok(Some(Err(Lagged { missed }))) => lagged += missed,
                    Ok(None) | Err(_) => break,
                }
            }
            (by_id, lagged)
        });

        // The killer: terminates every connection running the batch statement of new
        // backends, every few ms.
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
                           and state = 'active' and query ilike '%with input as%'
                           and query ilike '%insert into backend_key%'",
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

        let mut tasks = Vec::new();
        for c in 0..CALLERS {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut answers = Answers::default();
                let mut got: Vec<(String, ConnectResponse)> = Vec::new();
                for k in 0..KEYS_PER_CALLER {
                    let key = format!("kill-{c}-{k}");
                    let mut failed = false;
                    let mut tries = 0;
                    let response = loop {
                        tries += 1;
                        assert!(tries <= MAX_TRIES, "{key}: too many errors");
                        match db.connect(&request(&key)).await {
                            Ok(r) => break r,
                            Err(_) => {
                                answers.errors += 1;
                                failed = true;
                            }
                        }
                    };
                    match (failed, response.spawned) {
                        (false, true) => answers.first_try += 1,
                        (false, false) => answers.wrong += 1,
                        (true, true) => answers.retried_spawned += 1,
                        (true, false) => answers.retried_found += 1,
                    }
                    got.push((key, response));
                }
                (answers, got)
            }));
        }
        let mut answers = Answers::default();
        let mut responses = Vec::new();
        for t in tasks {
            let (a, got) = t.await.unwrap();
            answers.errors += a.errors;
            answers.first_try += a.first_try;
            answers.retried_spawned += a.retried_spawned;
            answers.retried_found += a.retried_found;
            answers.wrong += a.wrong;
            responses.extend(got);
        }
        done.store(true, Ordering::Relaxed);
        let kills = kills.await.unwrap();
        let (received, lagged) = receiver.await.unwrap();

        // Each key: one backend, the one its caller was told, with its key row, one history
        // row, one spawn action and both events; its token routes there.
        let mut misrouted = 0;
        for (key, response) in &responses {
            let holder: Option<String> = sqlx::query_scalar(
                "select id from backend_key where namespace = 'ns' and key_name = $1",
            )
            .bind(key)
            .fetch_optional(db.pool())
            .await
            .unwrap();
            assert_eq!(holder.as_deref(), Some(response.backend_id.as_str()), "{key}");
            match db.backend().route_info_for_token(&response.token).await.unwrap() {
                RouteInfoResult::Pending(p) if p.backend_id == response.backend_id => {}
                _ => misrouted += 1,
            }
        }
        let counts: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from backend),
                    (select count(*) from backend_key),
                    (select count(*) from backend_state),
                    (select count(*) from backend_action),
                    (select count(*) from event where kind = 'backend_state'),
                    (select count(*) from event where kind = 'backend_action')",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        let keys = keys as i64;
        assert_eq!(counts, (keys, keys, keys, keys, keys, keys), "nothing half-written");
        let orphans: i64 = sqlx::query_scalar(
            "select count(*) from backend b
             where not exists (select 1 from backend_key k where k.id = b.id)
                or not exists (select 1 from backend_action a where a.backend_id = b.id)
                or not exists (select 1 from event e where e.kind = 'backend_state' and e.key = b.id)",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(orphans, 0, "a backend without its key, spawn action or event");

        let duplicated: u32 = received.values().map(|n| n - 1).sum();
        assert_eq!(received.len() as i64, 2 * keys, "delivered");
        assert_eq!(duplicated, 0, "duplicated");
        assert_eq!(lagged, 0);
        assert_eq!(misrouted, 0);
        assert_eq!(answers.wrong, 0, "a fresh key found taken without an error before");
        assert!(kills > 0, "the scenario killed no batch connection");
        figures(
            "connect_batch_kill",
            &[
                ("keys", keys.to_string()),
                ("kills", kills.to_string()),
                ("errors", answers.errors.to_string()),
                ("first_try", answers.first_try.to_string()),
                ("retried_spawned", answers.retried_spawned.to_string()),
                ("retried_found", answers.retried_found.to_string()),
                ("events_delivered", received.len().to_string()),
            ],
        );
    })
    .await
}
