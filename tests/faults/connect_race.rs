//! Four controllers (four `PlaneDatabase`s with pools of their own) race `connect` for 200
//! keys, 8 attempts per key: exactly one backend, one key row and one spawn action per key,
//! and every caller gets that backend.

use crate::common::{drone, request};
use crate::support::*;
use plane_db::backend::RouteInfoResult;
use plane_db::Config;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

const CONTROLLERS: usize = 4;
const KEYS: usize = 200;
const ATTEMPTS: usize = 8;

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
        let race_ms = started.elapsed();

        let db = &controllers[0];
        let mut disagreements = 0;
        let mut spawned = 0;
        let mut tokens = HashSet::new();
        for responses in by_key.values() {
            let backends: HashSet<_> = responses.iter().map(|r| r.backend_id.clone()).collect();
            if backends.len() != 1 {
                disagreements += 1;
            }
            spawned += responses.iter().filter(|r| r.spawned).count();
            for r in responses {
                tokens.insert(r.token.as_str().to_string());
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
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(db.pool())
                .await
                .unwrap()
        };
        let backends = count("select count(*) from backend").await;
        let keys = count("select count(*) from backend_key").await;
        let actions = count("select count(*) from backend_action where action ? 'Spawn'").await;
        let per_key_max = count(
            "select coalesce(max(n), 0) from (select count(*) as n from backend_action
             group by backend_id) a",
        )
        .await;
        let token_rows = count("select count(*) from token").await;
        let spawn_events = count("select count(*) from event where kind = 'backend_action'").await;

        figures(
            "connect_race",
            &[
                ("controllers", CONTROLLERS.to_string()),
                ("keys", KEYS.to_string()),
                ("attempts", (KEYS * ATTEMPTS).to_string()),
                ("errors", errors.len().to_string()),
                ("spawned", spawned.to_string()),
                ("backends", backends.to_string()),
                ("key_rows", keys.to_string()),
                ("spawn_actions", actions.to_string()),
                ("spawn_events", spawn_events.to_string()),
                ("tokens", token_rows.to_string()),
                ("callers_disagreeing", disagreements.to_string()),
                ("tokens_misrouted", misrouted.to_string()),
                ("race_ms", ms(race_ms)),
            ],
        );

        assert!(errors.is_empty(), "connect failed: {errors:?}");
        assert_eq!(by_key.len(), KEYS);
        assert!(by_key.values().all(|r| r.len() == ATTEMPTS));
        assert_eq!(disagreements, 0, "callers were told different backends");
        assert_eq!(spawned, KEYS, "exactly one caller per key spawned");
        assert_eq!(backends, KEYS as i64);
        assert_eq!(keys, KEYS as i64);
        assert_eq!(actions, KEYS as i64);
        assert_eq!(per_key_max, 1);
        assert_eq!(spawn_events, KEYS as i64);
        assert_eq!(token_rows, (KEYS * ATTEMPTS) as i64, "one token per caller");
        assert_eq!(tokens.len(), KEYS * ATTEMPTS, "tokens are distinct");
        assert_eq!(misrouted, 0);
    })
    .await
}
