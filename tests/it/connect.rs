//! connect: get-or-create by key, tokens, revoke.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectRequest;
use plane_db::connect::SpawnConfig;
use plane_db::types::{
    BackendAction, BackendActionMessage, BackendName, BackendStatus, ClusterName, KeyConfig,
};
use plane_db::{Config, ConnectError, Error};
use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_a_backend_with_everything_it_needs() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let mut actions = db
            .subscribe_with_key::<BackendActionMessage>(&d.id)
            .await
            .unwrap();
        let mut req = request("k1");
        if let Some(spawn) = req.spawn_config.as_mut() {
            spawn.lifetime_limit_seconds = Some(600);
            spawn.max_idle_seconds = Some(60);
            spawn.subdomain = Some("abc".parse().unwrap());
        }
        let response = db.connect(&req).await.unwrap();
        assert!(response.spawned);
        assert_eq!(response.status, BackendStatus::Scheduled);
        assert_eq!(response.drone.as_ref(), Some(&d.name));
        assert!(!response.token.is_static());
        assert!(response.secret_token.is_some());
        assert_eq!(response.subdomain.as_ref().map(|s| s.as_str()), Some("abc"));

        let row = db
            .backend()
            .backend(&response.backend_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.drone_id, d.id);
        assert_eq!(row.allowed_idle_seconds, Some(60));
        let lifetime = row.expiration_time.expect("expiration") - row.last_status_time;
        assert_eq!(lifetime.num_seconds(), 600);

        let (tag, fencing): (String, i64) =
            sqlx::query_as("select tag, fencing_token from backend_key where id = $1")
                .bind(response.backend_id.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(tag, "");
        assert_eq!(Some(fencing), response.fencing_token);

        // The spawn action is persisted and emitted for the drone, in Plane's format.
        let n = actions.next().await.unwrap().unwrap();
        let message = n.payload;
        assert_eq!(message.backend_id, response.backend_id);
        assert_eq!(message.drone_id, d.id);
        match &message.action {
            BackendAction::Spawn {
                executable,
                key,
                static_token,
            } => {
                assert_eq!(executable["image"], "ghcr.io/example/app:1");
                assert_eq!(key.token, fencing);
                assert_eq!(key.key.name, "k1");
                assert_eq!(key.key.namespace, "ns");
                assert!(key.deadlines.renew_at < key.deadlines.soft_terminate_at);
                assert!(key.deadlines.soft_terminate_at < key.deadlines.hard_terminate_at);
                assert!(static_token.is_none());
            }
            other => panic!("expected Spawn, got {other:?}"),
        }
        let stored: serde_json::Value =
            sqlx::query_scalar("select action from backend_action where id = $1")
                .bind(message.action_id.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(
            serde_json::from_value::<BackendAction>(stored).unwrap(),
            message.action
        );

        // The token is stored as a digest only.
        let raw: i64 = sqlx::query_scalar("select count(*) from token where token_digest = $1")
            .bind(response.token.as_str().as_bytes())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(raw, 0);
        assert!(matches!(
            db.backend()
                .route_info_for_token(&response.token)
                .await
                .unwrap(),
            RouteInfoResult::Pending(_)
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_live_key_returns_the_same_backend_with_a_new_token() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        let second = db.connect(&request("k")).await.unwrap();
        assert!(!second.spawned);
        assert_eq!(second.backend_id, first.backend_id);
        assert_ne!(second.token, first.token);
        assert_eq!(second.fencing_token, None);
        for token in [&first.token, &second.token] {
            assert!(matches!(
                db.backend().route_info_for_token(token).await.unwrap(),
                RouteInfoResult::Pending(_)
            ));
        }
        // Without a spawn config, a live backend is still returned.
        let mut no_spawn = request("k");
        no_spawn.spawn_config = None;
        assert_eq!(
            db.connect(&no_spawn).await.unwrap().backend_id,
            first.backend_id
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_another_tag_is_key_held() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        let mut other = request("k");
        if let Some(key) = other.key.as_mut() {
            key.tag = "v2".to_string();
        }
        match db.connect(&other).await {
            Err(error @ ConnectError::KeyHeld { .. }) => {
                let message = error.to_string();
                let ConnectError::KeyHeld {
                    backend,
                    name,
                    namespace,
                    key_tag,
                    request_tag,
                } = error
                else {
                    unreachable!()
                };
                assert_eq!(backend, first.backend_id);
                assert_eq!((namespace.as_str(), name.as_str()), ("ns", "k"));
                // The holder's tag, as Plane's KeyHeld carries it, and the request's.
                assert_eq!(key_tag, "");
                assert_eq!(request_tag, "v2");
                assert!(
                    message.contains("with tag \"\", not the requested \"v2\""),
                    "{message}"
                );
            }
            other => panic!("expected KeyHeld, got {other:?}"),
        }
        // And the other way round: the holder's tag is reported, whatever the request's.
        let mut tagged = request("tagged");
        tagged.key.as_mut().unwrap().tag = "blue".into();
        db.connect(&tagged).await.unwrap();
        match db.connect(&request("tagged")).await {
            Err(ConnectError::KeyHeld {
                key_tag,
                request_tag,
                ..
            }) => assert_eq!((key_tag.as_str(), request_tag.as_str()), ("blue", "")),
            other => panic!("expected KeyHeld, got {other:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_spawn_config_or_backend_is_an_error() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("nothing");
        req.spawn_config = None;
        assert!(matches!(
            db.connect(&req).await,
            Err(ConnectError::NoSpawnConfig { .. })
        ));
        let backends = count(&db, "backend").await;
        assert_eq!(backends, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_taken_over_by_a_new_backend() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        exec(
            &db,
            "update backend_key set expires_at = now() - interval '1 second'",
        )
        .await;
        // Expired and no spawn config: nothing to return.
        let mut no_spawn = request("k");
        no_spawn.spawn_config = None;
        assert!(matches!(
            db.connect(&no_spawn).await,
            Err(ConnectError::NoSpawnConfig { .. })
        ));
        let second = db.connect(&request("k")).await.unwrap();
        assert!(second.spawned);
        assert_ne!(second.backend_id, first.backend_id);
        assert!(second.fencing_token.unwrap() > first.fencing_token.unwrap());
        let holders: Vec<String> = sqlx::query_scalar("select id from backend_key")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(holders, [second.backend_id.to_string()]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_drone_is_no_drone_available() {
    with_db(|db| async move {
        match db.connect(&request("k")).await {
            Err(ConnectError::NoDroneAvailable { cluster: c, .. }) => assert_eq!(c, cluster()),
            other => panic!("expected NoDroneAvailable, got {other:?}"),
        }
        // A live backend is returned even when no drone could take a new one.
        let d = drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        db.drone().set_ready(d.id, false).await.unwrap();
        assert_eq!(
            db.connect(&request("k")).await.unwrap().backend_id,
            first.backend_id
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_for_one_key_make_one_backend() {
    with_db(|db| async move {
        drone(&db).await;
        drone(&db).await;
        for round in 0..5 {
            let key = format!("race-{round}");
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let db = db.clone();
                    let req = request(&key);
                    tokio::spawn(async move { db.connect(&req).await })
                })
                .collect();
            let mut ids = HashSet::new();
            let mut spawned = 0;
            for task in tasks {
                let response = task.await.unwrap().unwrap();
                spawned += usize::from(response.spawned);
                ids.insert(response.backend_id);
            }
            assert_eq!(ids.len(), 1, "every caller gets the same backend");
            assert_eq!(spawned, 1, "exactly one caller created it");
        }
        let (backends, keys, actions): (i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from backend), (select count(*) from backend_key),
                    (select count(*) from backend_action)",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!((backends, keys, actions), (5, 5, 5));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_key_always_spawns() {
    with_db(|db| async move {
        drone(&db).await;
        let req = ConnectRequest {
            key: None,
            spawn_config: Some(spawn_config()),
            ..ConnectRequest::default()
        };
        let a = db.connect(&req).await.unwrap();
        let b = db.connect(&req).await.unwrap();
        assert!(a.spawned && b.spawned);
        assert_ne!(a.backend_id, b.backend_id);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rejects_nonpositive_limits() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("k");
        if let Some(spawn) = req.spawn_config.as_mut() {
            spawn.max_idle_seconds = Some(0);
        }
        assert!(matches!(
            db.connect(&req).await,
            Err(ConnectError::Other(Error::InvalidArgument {
                argument: "max_idle_seconds",
                ..
            }))
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_key_strings_are_stored_verbatim() {
    with_db(|db| async move {
        drone(&db).await;
        // 490 bytes: within every key and user limit (see `limits`).
        let hostile = "'; drop table backend; -- \\ \"quoted\" ünïcødé ".repeat(10);
        let mut req = request(&hostile);
        req.key = Some(KeyConfig {
            name: hostile.clone(),
            namespace: hostile.clone(),
            tag: hostile.clone(),
        });
        req.user = Some(hostile.clone());
        let first = db.connect(&req).await.unwrap();
        let again = db.connect(&req).await.unwrap();
        assert_eq!(first.backend_id, again.backend_id);
        let name: String = sqlx::query_scalar("select key_name from backend_key")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(name, hostile);
        // NUL cannot be stored in Postgres text: a typed error, not a panic, refused before
        // the call is queued for a batch.
        let mut nul = request("bad\0key");
        nul.user = None;
        assert!(matches!(
            db.connect(&nul).await,
            Err(ConnectError::Other(Error::InvalidArgument {
                argument: "key.name",
                ..
            }))
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_removes_a_users_tokens() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        let mut bob = request("k");
        bob.user = Some("bob".to_string());
        let bobs = db.connect(&bob).await.unwrap();
        assert_eq!(db.revoke(&first.backend_id, "alice").await.unwrap(), 1);
        assert_eq!(db.revoke(&first.backend_id, "alice").await.unwrap(), 0);
        assert_eq!(
            db.backend()
                .route_info_for_token(&first.token)
                .await
                .unwrap(),
            RouteInfoResult::NotFound
        );
        assert!(matches!(
            db.backend()
                .route_info_for_token(&bobs.token)
                .await
                .unwrap(),
            RouteInfoResult::Pending(_)
        ));
    })
    .await
}

async fn table_counts(db: &plane_db::PlaneDatabase) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "select (select count(*) from backend), (select count(*) from backend_key),
                (select count(*) from backend_action), (select count(*) from token)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_may_name_the_backend() {
    with_db(|db| async move {
        drone(&db).await;
        let id = plane_made_name();
        let first = db.connect(&request_named("named", &id)).await.unwrap();
        assert!(first.spawned);
        assert_eq!(first.backend_id, id);
        let row = db.backend().backend(&id).await.unwrap().expect("stored");
        assert_eq!(row.id, id);
        // Connecting by the key again gets it (with or without the id).
        let again = db.connect(&request_named("named", &id)).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, id);
        assert_eq!(db.connect(&request("named")).await.unwrap().backend_id, id);
        // Our own generated names still start with ba-.
        let generated = db.connect(&request("unnamed")).await.unwrap().backend_id;
        assert!(generated.as_str().starts_with("ba-"), "{generated}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_name_already_taken_is_a_typed_error() {
    with_db(|db| async move {
        drone(&db).await;
        let id = plane_made_name();
        db.connect(&request_named("first-key", &id)).await.unwrap();
        let before = table_counts(&db).await;

        // Taken by a live backend holding another key.
        match db.connect(&request_named("second-key", &id)).await {
            Err(error @ ConnectError::BackendIdTaken { .. }) => {
                assert_eq!(
                    error.to_string(),
                    format!("backend name {id} is taken by an existing backend")
                );
                let ConnectError::BackendIdTaken { backend } = error else {
                    unreachable!()
                };
                assert_eq!(backend, id);
            }
            other => panic!("expected BackendIdTaken, got {other:?}"),
        }
        assert_eq!(table_counts(&db).await, before, "nothing was written");

        // Taken by a terminated backend (its row remains until cleanup), which holds no key.
        for state in lifecycle() {
            assert!(db.backend().update_state(&id, &state).await.unwrap());
        }
        assert!(matches!(
            db.connect(&request_named("third-key", &id)).await,
            Err(ConnectError::BackendIdTaken { backend }) if backend == id
        ));
        // Its own key, now free: the name is still taken.
        assert!(matches!(
            db.connect(&request_named("first-key", &id)).await,
            Err(ConnectError::BackendIdTaken { .. })
        ));

        // A backend whose key expired: the takeover under the same name is refused too.
        let other = plane_made_name();
        db.connect(&request_named("expiring", &other)).await.unwrap();
        exec(
            &db,
            &format!("update backend_key set expires_at = now() - interval '1 second' where id = '{other}'"),
        )
        .await;
        assert!(matches!(
            db.connect(&request_named("expiring", &other)).await,
            Err(ConnectError::BackendIdTaken { .. })
        ));
        // A fresh name takes the expired key over.
        assert!(db.connect(&request("expiring")).await.unwrap().spawned);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_with_one_name_make_one_backend() {
    with_db(|db| async move {
        drone(&db).await;
        drone(&db).await;
        for round in 0..5 {
            // Different keys: one wins, every other caller is told the name is taken.
            let id = plane_made_name();
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let db = db.clone();
                    let req = request_named(&format!("name-race-{round}-{i}"), &id);
                    tokio::spawn(async move { db.connect(&req).await })
                })
                .collect();
            let (mut spawned, mut taken) = (0, 0);
            for task in tasks {
                match task.await.unwrap() {
                    Ok(response) => {
                        assert!(response.spawned);
                        assert_eq!(response.backend_id, id);
                        spawned += 1;
                    }
                    Err(ConnectError::BackendIdTaken { backend }) => {
                        assert_eq!(backend, id);
                        taken += 1;
                    }
                    Err(other) => panic!("round {round}: unexpected {other:?}"),
                }
            }
            assert_eq!((spawned, taken), (1, 7), "round {round}");

            // The same key: one spawns it, the others get it.
            let id = plane_made_name();
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let db = db.clone();
                    let req = request_named(&format!("same-key-{round}"), &id);
                    tokio::spawn(async move { db.connect(&req).await })
                })
                .collect();
            let mut spawned = 0;
            for task in tasks {
                let response = task.await.unwrap().unwrap();
                assert_eq!(response.backend_id, id);
                spawned += usize::from(response.spawned);
            }
            assert_eq!(spawned, 1, "round {round}");
        }
        let (backends, keys, actions, _) = table_counts(&db).await;
        assert_eq!((backends, keys, actions), (10, 10, 10));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_config_without_a_cluster_uses_the_default_or_is_refused() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("clusterless");
        req.spawn_config.as_mut().unwrap().cluster = None;
        match db.connect(&req).await {
            Err(error @ ConnectError::NoClusterProvided) => assert_eq!(
                error.to_string(),
                "no cluster in the spawn config, and no default cluster is configured"
            ),
            other => panic!("expected NoClusterProvided, got {other:?}"),
        }
        assert_eq!(table_counts(&db).await, (0, 0, 0, 0), "nothing was written");

        // A live backend is found by its key without a cluster (as in Plane).
        let first = db.connect(&request("clusterless")).await.unwrap();
        let again = db.connect(&req).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, first.backend_id);
    })
    .await;

    let elsewhere: ClusterName = "elsewhere.test".parse().unwrap();
    let config = Config {
        default_cluster: Some(cluster()),
        ..Config::default()
    };
    with_db_config(config, |db| async move {
        let d = drone(&db).await;
        let other = drone_in(&db, &elsewhere, &Default::default()).await;
        let mut req = request("defaulted");
        req.spawn_config.as_mut().unwrap().cluster = None;
        let response = db.connect(&req).await.unwrap();
        assert!(response.spawned);
        assert_eq!(response.cluster, cluster());
        assert_eq!(response.drone, Some(d.name));
        // A cluster in the spawn config wins over the default.
        let mut req = request("explicit");
        req.spawn_config.as_mut().unwrap().cluster = Some(elsewhere.clone());
        let response = db.connect(&req).await.unwrap();
        assert_eq!(response.cluster, elsewhere);
        assert_eq!(response.drone, Some(other.name));
    })
    .await
}

#[test]
fn spawn_config_reads_plane_json() {
    // As a Plane 0.5.5 client sends it: no cluster, an id, the pool left out.
    let config: SpawnConfig = serde_json::from_value(serde_json::json!({
        "id": "5gnlc2uthninii",
        "executable": {"image": "ghcr.io/example/app:1"},
        "lifetime_limit_seconds": null,
        "max_idle_seconds": 300,
        "subdomain": null
    }))
    .unwrap();
    assert_eq!(
        config.id.as_ref().map(BackendName::as_str),
        Some("5gnlc2uthninii")
    );
    assert_eq!(config.cluster, None);
    assert!(config.pool.as_str().is_empty());
    assert!(!config.use_static_token);
    let back = serde_json::to_value(&config).unwrap();
    assert_eq!(back["id"], "5gnlc2uthninii");
    assert_eq!(back["cluster"], serde_json::Value::Null);
    // Neither field is required, and a bad name is refused with the reason.
    let minimal: SpawnConfig =
        serde_json::from_value(serde_json::json!({"executable": {}, "cluster": "plane.test"}))
            .unwrap();
    assert_eq!((minimal.id, minimal.cluster), (None, Some(cluster())));
    let error = serde_json::from_value::<SpawnConfig>(
        serde_json::json!({"executable": {}, "id": "Bad_Name"}),
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("invalid backend name: character 'B' at position 0"),
        "{error}"
    );
}
