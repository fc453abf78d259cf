//! connect: get-or-create by key, tokens, revoke.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectRequest;
use plane_db::types::{BackendAction, BackendActionMessage, BackendStatus, KeyConfig};
use plane_db::{ConnectError, Error};
use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_a_backend_with_everything_it_needs() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let mut actions = db
            .subscribe_with_key::<BackendActionMessage>(&d.id.to_string())
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
            Err(ConnectError::KeyHeld { backend, name, .. }) => {
                assert_eq!(backend, first.backend_id);
                assert_eq!(name, "k");
            }
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
        let hostile = "'; drop table backend; -- \\ \"quoted\" ünïcødé ".repeat(50);
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
        // NUL cannot be stored in Postgres text: a typed error, not a panic.
        let mut nul = request("bad\0key");
        nul.user = None;
        assert!(matches!(
            db.connect(&nul).await,
            Err(ConnectError::Other(Error::Database(_)))
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
