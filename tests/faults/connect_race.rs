//! Four controllers (four `PlaneDatabase`s with pools of their own) race `connect` for 200
//! keys, 8 attempts per key: exactly one backend, one key row and one spawn action per key,
//! and every caller gets that backend. Then every key's lease expires and they race again
//! to take the keys over: again exactly one new backend per key, with a larger fencing token.

use crate::common::{drone, request};
use crate::support::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectResponse;
use plane_db::{Config, PlaneDatabase};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const CONTROLLERS: usize = 4;
const KEYS: usize = 200;
const ATTEMPTS: usize = 8;

/// Every attempt for every key, all at once, spread over the controllers.
async fn race(
    controllers: &[PlaneDatabase],
) -> (HashMap<usize, Vec<ConnectResponse>>, Vec<String>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for key in 0..KEYS {
        for attempt in 0..ATTEMPTS {
            let db = controllers[(key + attempt) % CONTROLLERS].clone();
            tasks.push(tokio::spawn(async move {
                let mut req = request(&format!("race-{key}"));
                req.user = Some(format!("user-{attempt}"));
                (key, db.connect(&req).await)
            }));
        }
    }
    let mut by_key: HashMap<usize, Vec<_>> = HashMap::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (key, result) = t.await.unwrap();
        match result {
            Ok(response) => by_key.entry(key).or_default().push(response),
            Err(error) => errors.push(format!("{key}: {error}")),
        }
    }
    (by_key, errors, started.elapsed())
}

async fn count(db: &PlaneDatabase, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_controllers_race_connect() {
    with_url(|url| async move {
        let mut controllers = Vec::new();
        for _ in 0..CONTROLLERS {
            controllers.push(open(&url, 10, Config::default()).await);
        }
        for _ in 0..3 {
            drone(&controllers[0]).await;
        }
        let db = &controllers[0];

        let mut previous: HashMap<usize, (plane_db::types::BackendName, i64)> = HashMap::new();
        for phase in ["fresh", "takeover"] {
            if phase == "takeover" {
                count(db, "with e as (update backend_key set expires_at = now() - interval '1 second' returning 1) select count(*) from e").await;
            }
            let (by_key, errors, race_time) = race(&controllers).await;

            let mut disagreements = 0;
            let mut spawned = 0;
            let mut not_new = 0;
            let mut fencing_not_larger = 0;
            let mut tokens = HashSet::new();
            let mut winners = HashMap::new();
            for (key, responses) in &by_key {
                let backends: HashSet<_> = responses.iter().map(|r| r.backend_id.clone()).collect();
                if backends.len() != 1 {
                    disagreements += 1;
                }
                spawned += responses.iter().filter(|r| r.spawned).count();
                for r in responses {
                    tokens.insert(r.token.as_str().to_string());
                }
                if let Some(winner) = responses.iter().find(|r| r.spawned) {
                    let fencing = winner.fencing_token.unwrap();
                    if let Some((old, old_fencing)) = previous.get(key) {
                        not_new += usize::from(*old == winner.backend_id);
                        fencing_not_larger += usize::from(fencing <= *old_fencing);
                    }
                    winners.insert(*key, (winner.backend_id.clone(), fencing));
                }
            }
            // Every token a caller got routes to the backend that caller was told about.
            let mut misrouted = 0;
            for responses in by_key.values() {
                for r in responses {
                    match db.backend().route_info_for_token(&r.token).await.unwrap() {
                        RouteInfoResult::Pending(p) if p.backend_id == r.backend_id => {}
                        _ => misrouted += 1,
                    }
                }
            }
            let rounds = if phase == "fresh" { 1 } else { 2 };
            let backends = count(db, "select count(*) from backend").await;
            let keys = count(db, "select count(*) from backend_key").await;
            let mut key_rows_right = 0;
            for (key, (backend, fencing)) in &winners {
                let (holder, token): (String, i64) = sqlx::query_as(
                    "select id, fencing_token from backend_key where namespace = 'ns' and key_name = $1",
                )
                .bind(format!("race-{key}"))
                .fetch_one(db.pool())
                .await
                .unwrap();
                key_rows_right += usize::from(holder == backend.as_str() && token == *fencing);
            }
            let actions = count(db, "select count(*) from backend_action where action ? 'Spawn'").await;
            let per_backend_max = count(
                db,
                "select coalesce(max(n), 0) from (select count(*) as n from backend_action
                 group by backend_id) a",
            )
            .await;
            let token_rows = count(db, "select count(*) from token").await;
            let spawn_events = count(db, "select count(*) from event where kind = 'backend_action'").await;

            figures(
                &format!("connect_race({phase})"),
                &[
                    ("controllers", CONTROLLERS.to_string()),
                    ("keys", KEYS.to_string()),
                    ("attempts", (KEYS * ATTEMPTS).to_string()),
                    ("errors", errors.len().to_string()),
                    ("spawned", spawned.to_string()),
                    ("backends_total", backends.to_string()),
                    ("key_rows", keys.to_string()),
                    ("key_rows_on_winner", key_rows_right.to_string()),
                    ("spawn_actions_total", actions.to_string()),
                    ("spawn_events_total", spawn_events.to_string()),
                    ("tokens_total", token_rows.to_string()),
                    ("callers_disagreeing", disagreements.to_string()),
                    ("tokens_misrouted", misrouted.to_string()),
                    ("race_ms", ms(race_time)),
                ],
            );

            assert!(errors.is_empty(), "{phase}: connect failed: {errors:?}");
            assert_eq!(by_key.len(), KEYS);
            assert!(by_key.values().all(|r| r.len() == ATTEMPTS));
            assert_eq!(disagreements, 0, "{phase}: callers were told different backends");
            assert_eq!(spawned, KEYS, "{phase}: exactly one caller per key spawned");
            assert_eq!(key_rows_right, KEYS, "{phase}: each key row names the winner");
            assert_eq!(not_new, 0, "{phase}: an expired key was handed back to its old backend");
            assert_eq!(fencing_not_larger, 0, "{phase}: fencing tokens must grow");
            assert_eq!(backends, (rounds * KEYS) as i64);
            assert_eq!(keys, KEYS as i64);
            assert_eq!(actions, (rounds * KEYS) as i64);
            assert_eq!(per_backend_max, 1);
            assert_eq!(spawn_events, (rounds * KEYS) as i64);
            assert_eq!(token_rows, (rounds * KEYS * ATTEMPTS) as i64, "one token per caller");
            assert_eq!(tokens.len(), KEYS * ATTEMPTS, "tokens are distinct");
            assert_eq!(misrouted, 0);
            previous = winners;
        }
    })
    .await
}
