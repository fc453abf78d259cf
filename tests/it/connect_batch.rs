//! Group commit of `connect` (`Config::write_batching`): concurrent calls that create
//! backends share one statement and one transaction, and each caller gets exactly the
//! answer it would have got alone.
//!
//! To form a batch deterministically, two calls are held first, each on the row lock of an
//! expired key it takes over ([`held_keys`]): the first writes alone, the second is a batch
//! of its own, the one batch in flight. The calls under test start only then; they queue
//! behind that batch and are written together once the locks are released.

use crate::common::*;
use futures_util::future::join_all;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::{ConnectRequest, ConnectResponse};
use plane_db::events::NotificationPayload;
use plane_db::types::{BackendActionMessage, BackendName, ClusterName, DronePoolName};
use plane_db::{Config, ConnectError, PlaneDatabase, WriteBatchConfig};
use std::collections::BTreeSet;
use std::time::Duration;

/// How long the calls under test have to queue before the held calls are released.
const HOLD: Duration = Duration::from_millis(300);

fn one_alone() -> Config {
    Config {
        write_batching: WriteBatchConfig {
            max_alone: 1,
            ..WriteBatchConfig::default()
        },
        ..Config::default()
    }
}

/// Two keys whose backends exist but whose leases expired, their rows locked by an open
/// transaction: a connect for either waits for the lock (then takes the key over).
async fn held_keys(
    db: &PlaneDatabase,
) -> ([String; 2], sqlx::Transaction<'static, sqlx::Postgres>) {
    let keys = [0, 1].map(|i| format!("held-{i}-{}", BackendName::new_random()));
    let mut old = Vec::new();
    for key in &keys {
        old.push(
            db.connect(&request(key))
                .await
                .unwrap()
                .backend_id
                .to_string(),
        );
    }
    sqlx::query(
        "update backend_key set expires_at = now() - interval '1 second' where id = any($1)",
    )
    .bind(&old)
    .execute(db.pool())
    .await
    .unwrap();
    let mut txn = db.pool().begin().await.unwrap();
    sqlx::query("select 1 from backend_key where id = any($1) for update")
        .bind(&old)
        .execute(&mut *txn)
        .await
        .unwrap();
    (keys, txn)
}

/// Runs the two held calls, then `requests` once both are blocked, and releases them after
/// [`HOLD`]. Returns the held calls' responses (with their keys) and the answers to
/// `requests`, in order.
async fn in_one_batch(
    db: &PlaneDatabase,
    requests: &[ConnectRequest],
) -> (
    Vec<(ConnectResponse, String)>,
    Vec<Result<ConnectResponse, ConnectError>>,
) {
    let (keys, txn) = held_keys(db).await;
    let held = [request(&keys[0]), request(&keys[1])];
    let first = db.connect(&held[0]);
    let second = async {
        wait_for_lock_waiters(db, 1).await;
        db.connect(&held[1]).await
    };
    let rest = async {
        wait_for_lock_waiters(db, 2).await;
        let calls = join_all(requests.iter().map(|r| db.connect(r)));
        let release = async move {
            tokio::time::sleep(HOLD).await;
            txn.rollback().await.unwrap();
        };
        tokio::join!(calls, release).0
    };
    let (first, second, answers) = tokio::join!(first, second, rest);
    let [k0, k1] = keys;
    (vec![(first.unwrap(), k0), (second.unwrap(), k1)], answers)
}

/// The events written for `backend` (its state events and its drone's spawn action):
/// (id, kind, transaction id), in id order.
async fn events_for(db: &PlaneDatabase, backend: &BackendName) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "select id, kind, xid::text from event
         where (kind = 'backend_state' and key = $1)
            or (kind = $2 and data->>'backend_id' = $1)
         order by id",
    )
    .bind(backend.as_str())
    .bind(BackendActionMessage::kind())
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// What a spawned backend must have, exactly as a lone `connect` writes it: one history
/// row, one spawn action carrying the response's fencing token, the key, and a token that
/// routes to it. Returns its events' transaction id.
async fn check_spawned(db: &PlaneDatabase, response: &ConnectResponse, key: &str) -> String {
    let backend = &response.backend_id;
    assert!(response.spawned, "{key}: {response:?}");
    let history: i64 =
        sqlx::query_scalar("select count(*) from backend_state where backend_id = $1")
            .bind(backend.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(history, 1, "{key}: one history row");
    let action_tokens: Vec<Option<i64>> = sqlx::query_scalar(
        "select (action->'Spawn'->'key'->>'token')::bigint from backend_action where backend_id = $1",
    )
    .bind(backend.as_str())
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        action_tokens,
        vec![response.fencing_token],
        "{key}: one spawn action"
    );
    let holder: Option<String> =
        sqlx::query_scalar("select id from backend_key where namespace = 'ns' and key_name = $1")
            .bind(key)
            .fetch_optional(db.pool())
            .await
            .unwrap();
    assert_eq!(
        holder.as_deref(),
        Some(backend.as_str()),
        "{key}: holds its key"
    );
    assert!(matches!(
        db.backend()
            .route_info_for_token(&response.token)
            .await
            .unwrap(),
        RouteInfoResult::Pending(_)
    ));
    let events = events_for(db, backend).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        kinds,
        vec!["backend_state", BackendActionMessage::kind()],
        "{key}: its state event, then its spawn action's"
    );
    assert_eq!(events[0].2, events[1].2, "{key}: one transaction");
    events[0].2.clone()
}

fn tagged(key: &str, tag: &str) -> ConnectRequest {
    let mut req = request(key);
    if let Some(k) = req.key.as_mut() {
        k.tag = tag.to_string();
    }
    req
}

/// One batch holding new keys, a key held by a live backend, the same new key twice and a
/// key held under another tag: every caller gets what it would have got alone, and what the
/// batch created was written in one transaction.
#[tokio::test(flavor = "current_thread")]
async fn a_connect_batch_answers_each_caller_as_alone() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let live = db.connect(&request("live")).await.unwrap();
        let requests = [
            request("a"),
            request("b"),
            request("live"),
            request("twice"),
            request("twice"),
            tagged("live", "other-tag"),
        ];
        let (held, answers) = in_one_batch(&db, &requests).await;
        let mut held_xids = BTreeSet::new();
        for (response, key) in &held {
            held_xids.insert(check_spawned(&db, response, key).await);
        }
        let mut answers = answers.into_iter();
        let mut next = || answers.next().expect("one answer per call");
        let a = next().unwrap();
        let b = next().unwrap();
        let again = next().unwrap();
        // The same key twice: whichever reached the batch first (their drone picks ran
        // concurrently) created the backend.
        let (twice, twice_again) = match (next().unwrap(), next().unwrap()) {
            (x, y) if x.spawned => (x, y),
            (x, y) => (y, x),
        };
        let refused = next();

        // The key held by a live backend: that backend, a new token, nothing created.
        assert!(!again.spawned);
        assert_eq!(again.backend_id, live.backend_id);
        assert_eq!(again.fencing_token, None);
        assert_ne!(again.token, live.token);
        // The same key twice in one batch: one backend; the other call got it.
        assert!(!twice_again.spawned);
        assert_eq!(twice_again.backend_id, twice.backend_id);
        assert_eq!(twice_again.fencing_token, None);
        // Another tag: refused, naming the holder.
        match refused {
            Err(ConnectError::KeyHeld { backend, .. }) => assert_eq!(backend, live.backend_id),
            other => panic!("expected KeyHeld, got {other:?}"),
        }

        let mut xids = BTreeSet::new();
        for (response, key) in [(&a, "a"), (&b, "b"), (&twice, "twice")] {
            xids.insert(check_spawned(&db, response, key).await);
        }
        assert_eq!(xids.len(), 1, "the batch's backends share one transaction");
        assert_eq!(
            held_xids.len(),
            2,
            "the held calls wrote one after the other"
        );
        assert!(xids.is_disjoint(&held_xids));

        // Fencing tokens: one per acquisition, all distinct, the batch's after the held ones'.
        let tokens: BTreeSet<i64> = [&a, &b, &twice]
            .iter()
            .map(|r| r.fencing_token.expect("acquired"))
            .collect();
        assert_eq!(tokens.len(), 3);
        for (response, _) in &held {
            let token = response.fencing_token.expect("acquired");
            assert!(
                tokens.iter().all(|t| *t > token),
                "{tokens:?} after {token}"
            );
        }

        // Nothing else was created: live, the held keys' old and new backends, and the
        // three new ones.
        let backends: i64 = sqlx::query_scalar("select count(*) from backend")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(backends, 8);
        let keys: i64 = sqlx::query_scalar("select count(*) from backend_key")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(keys, 6, "live, the two held keys, a, b, twice");
    })
    .await
}

/// A batch the server refuses (a caller-chosen backend name that is taken) is written call
/// by call: only that call fails, with the typed error, and the others create their
/// backends.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_connect_batch_fails_only_the_bad_call() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let taken = db.connect(&request("taken")).await.unwrap().backend_id;
        let requests = [
            request("a"),
            request_named("wants-a-taken-name", &taken),
            request("b"),
        ];
        let (held, answers) = in_one_batch(&db, &requests).await;
        for (response, key) in &held {
            check_spawned(&db, response, key).await;
        }
        let mut answers = answers.into_iter();
        let mut next = || answers.next().expect("one answer per call");
        let a = next().unwrap();
        match next() {
            Err(ConnectError::BackendIdTaken { backend }) => assert_eq!(backend, taken),
            other => panic!("expected BackendIdTaken, got {other:?}"),
        }
        let b = next().unwrap();
        let a_xid = check_spawned(&db, &a, "a").await;
        let b_xid = check_spawned(&db, &b, "b").await;
        assert_ne!(
            a_xid, b_xid,
            "after the refusal each call was written alone"
        );
        let key: i64 = sqlx::query_scalar(
            "select count(*) from backend_key where key_name = 'wants-a-taken-name'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(key, 0, "nothing of the refused call was written");
        assert_eq!(
            events_for(&db, &taken).await.len(),
            2,
            "the taken backend is untouched"
        );
    })
    .await
}

fn in_pool(key: &str, pool: &str) -> ConnectRequest {
    let mut req = request(key);
    if let Some(spawn) = req.spawn_config.as_mut() {
        spawn.pool = DronePoolName::from(pool);
    }
    req
}

/// One batch spanning two pools and two clusters, with a reconnect and a pool without
/// drones: each new backend lands in its own cluster and pool, the reconnect gets its
/// backend, and the pool without drones is `NoDroneAvailable` with nothing written.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_picks_drones_per_cluster_and_pool() {
    with_db_config(one_alone(), |db| async move {
        let default_drone = drone(&db).await;
        let gpu_drone = drone_in(&db, &cluster(), &DronePoolName::from("gpu")).await;
        let other: ClusterName = "other.test".parse().unwrap();
        let other_drone = drone_in(&db, &other, &DronePoolName::default()).await;
        let live = db.connect(&request("live")).await.unwrap();
        let mut elsewhere = request("elsewhere");
        if let Some(spawn) = elsewhere.spawn_config.as_mut() {
            spawn.cluster = Some(other);
        }
        let requests = [
            request("plain"),
            in_pool("on-gpu", "gpu"),
            elsewhere,
            request("live"),
            in_pool("nowhere", "none"),
        ];
        let (_, answers) = in_one_batch(&db, &requests).await;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().expect("one answer per call");
        let plain = next().unwrap();
        let on_gpu = next().unwrap();
        let elsewhere = next().unwrap();
        let again = next().unwrap();
        assert!(matches!(next(), Err(ConnectError::NoDroneAvailable { .. })));
        assert_eq!(plain.drone, Some(default_drone.name));
        assert_eq!(on_gpu.drone, Some(gpu_drone.name));
        assert_eq!(elsewhere.drone, Some(other_drone.name));
        assert!(!again.spawned);
        assert_eq!(again.backend_id, live.backend_id);
        let mut xids = BTreeSet::new();
        for (response, key) in [
            (&plain, "plain"),
            (&on_gpu, "on-gpu"),
            (&elsewhere, "elsewhere"),
        ] {
            xids.insert(check_spawned(&db, response, key).await);
        }
        assert_eq!(xids.len(), 1, "one batch");
        let nowhere: i64 =
            sqlx::query_scalar("select count(*) from backend_key where key_name = 'nowhere'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(nowhere, 0);
    })
    .await
}

/// A call with a NUL byte in its key is refused before it is queued, with the typed error it
/// gets alone: the batch it would have joined is not refused by the server, and the other
/// calls are written together, in one transaction.
#[tokio::test(flavor = "current_thread")]
async fn an_invalid_call_fails_alone_and_the_others_stay_one_batch() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let requests = [
            request("a"),
            request("bad\0key"),
            request("b"),
            request("c"),
        ];
        let (_, answers) = in_one_batch(&db, &requests).await;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().expect("one answer per call");
        let a = next().unwrap();
        match next() {
            Err(ConnectError::Other(plane_db::Error::InvalidArgument { argument, reason })) => {
                assert_eq!(argument, "key.name");
                assert!(reason.contains("NUL"), "{reason}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        let b = next().unwrap();
        let c = next().unwrap();
        let xids: BTreeSet<String> = [
            check_spawned(&db, &a, "a").await,
            check_spawned(&db, &b, "b").await,
            check_spawned(&db, &c, "c").await,
        ]
        .into();
        assert_eq!(xids.len(), 1, "the valid calls were written as one batch");
        let bad: i64 =
            sqlx::query_scalar("select count(*) from backend_key where key_name like 'bad%'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(bad, 0);
    })
    .await
}

/// A key row locked elsewhere (a lease being renewed in a long transaction, say) holds back
/// the connect that needs it, not the batch it is in: the batch waits at most its lock
/// timeout, then its calls are written alone, concurrently, and only the blocked one waits
/// for the lock (then takes the key over, as it would alone).
#[tokio::test(flavor = "current_thread")]
async fn a_locked_key_holds_back_only_its_own_connect() {
    let config = Config {
        write_batching: WriteBatchConfig {
            max_alone: 1,
            lock_timeout: Duration::from_millis(200),
            ..WriteBatchConfig::default()
        },
        ..Config::default()
    };
    const STUCK: Duration = Duration::from_secs(3);
    with_db_config(config, |db| async move {
        drone(&db).await;
        // Both keys held for STUCK: key 0's connect writes alone (it takes the one place for
        // lone calls, so that the calls after it queue), key 1's is in the batch.
        let (keys, txn) = held_keys(&db).await;
        let db = &db;
        let lone_request = request(&keys[0]);
        let lone = db.connect(&lone_request);
        let stuck_request = request(&keys[1]);
        let rest = async {
            wait_for_lock_waiters(db, 1).await;
            let started = std::time::Instant::now();
            let stuck = async {
                let r = db.connect(&stuck_request).await;
                (r, started.elapsed())
            };
            let others = join_all(["x", "y", "z"].map(|k| async move {
                let r = db.connect(&request(k)).await;
                (r, started.elapsed())
            }));
            let release = async move {
                tokio::time::sleep(STUCK).await;
                txn.rollback().await.unwrap();
            };
            tokio::join!(stuck, others, release)
        };
        let (lone, ((stuck, stuck_took), others, ())) = tokio::join!(lone, rest);
        check_spawned(db, &lone.unwrap(), &keys[0]).await;
        for ((answer, took), key) in others.into_iter().zip(["x", "y", "z"]) {
            let response = answer.unwrap();
            check_spawned(db, &response, key).await;
            assert!(
                took < STUCK / 2,
                "{key} waited {took:?} for a key lock it does not need"
            );
        }
        check_spawned(db, &stuck.unwrap(), &keys[1]).await;
        assert!(stuck_took >= STUCK, "{stuck_took:?}");
    })
    .await
}
