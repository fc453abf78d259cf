//! BackendDatabase: lifecycle, routes, keepalives, termination candidates, cleanup.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::types::{
    BackendAddr, BackendMetricsMessage, BackendName, BackendState, BackendStatus, BearerToken,
    TerminationReason,
};
use plane_db::Error;
use std::time::Duration;

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_state_moves_forward_only() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let states = lifecycle();

        assert!(db
            .backend()
            .update_state(&backend, &states[0])
            .await
            .unwrap());
        assert!(
            db.backend()
                .update_state(&backend, &states[2])
                .await
                .unwrap(),
            "skipping ahead is forward"
        );
        // Backwards and repeated transitions are refused and change nothing.
        assert!(!db
            .backend()
            .update_state(&backend, &states[1])
            .await
            .unwrap());
        assert!(!db
            .backend()
            .update_state(&backend, &states[2])
            .await
            .unwrap());
        assert!(!db
            .backend()
            .update_state(&backend, &BackendState::Scheduled)
            .await
            .unwrap());

        let row = db.backend().backend(&backend).await.unwrap().expect("row");
        assert_eq!(row.state, states[2]);
        let history: Vec<String> = sqlx::query_scalar(
            "select state->>'status' from backend_state where backend_id = $1 order by id",
        )
        .bind(backend.as_str())
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(history, ["scheduled", "loading", "waiting"]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_state_of_unknown_backend_is_refused() {
    with_db(|db| async move {
        let updated = db
            .backend()
            .update_state(&BackendName::new_random(), &BackendState::Loading)
            .await
            .unwrap();
        assert!(!updated);
        let events = count(&db, "event").await;
        assert_eq!(events, 0, "a refused update emits nothing");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_releases_the_key() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("k")).await.unwrap();
        for state in lifecycle() {
            assert!(db
                .backend()
                .update_state(&first.backend_id, &state)
                .await
                .unwrap());
        }
        let keys = count(&db, "backend_key").await;
        assert_eq!(keys, 0);
        let second = db.connect(&request("k")).await.unwrap();
        assert!(second.spawned);
        assert_ne!(second.backend_id, first.backend_id);
        assert!(second.fencing_token > first.fencing_token);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_lookup_and_listing() {
    with_db(|db| async move {
        let d = drone(&db).await;
        assert!(db
            .backend()
            .backend(&BackendName::new_random())
            .await
            .unwrap()
            .is_none());

        let alive = spawn(&db).await.backend_id;
        let dead = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&dead, &state).await.unwrap();
        }

        let row = db.backend().backend(&alive).await.unwrap().expect("row");
        assert_eq!(row.id, alive);
        assert_eq!(row.cluster, cluster());
        assert_eq!(row.drone_id, d.id);
        assert_eq!(row.state, BackendState::Scheduled);
        assert!(row.status_age() >= chrono::Duration::zero());

        let all: Vec<BackendName> = db
            .backend()
            .list_backends()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(all.len(), 2);
        assert!(all.contains(&alive) && all.contains(&dead));

        let live = db
            .backend()
            .list_alive_backends_for_drone(d.id)
            .await
            .unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, alive);

        assert!(db
            .backend()
            .list_alive_backends_for_drone(plane_db::types::NodeId::from(i32::MAX))
            .await
            .unwrap()
            .is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_is_pending_then_available_then_gone() {
    with_db(|db| async move {
        drone(&db).await;
        let response = spawn(&db).await;
        let backend = response.backend_id.clone();
        let backends = db.backend();
        let route = || backends.route_info_for_token(&response.token);

        match route().await.unwrap() {
            RouteInfoResult::Pending(partial) => {
                assert_eq!(partial.backend_id, backend);
                assert_eq!(partial.user.as_deref(), Some("alice"));
                assert_eq!(Some(&partial.secret_token), response.secret_token.as_ref());
            }
            other => panic!("expected Pending, got {other:?}"),
        }

        let states = lifecycle();
        for state in &states[..4] {
            db.backend().update_state(&backend, state).await.unwrap();
        }
        match route().await.unwrap() {
            RouteInfoResult::Available(info) => {
                assert_eq!(info.route.backend_id, backend);
                assert_eq!(info.address, BackendAddr(addr(8080)));
                assert_eq!(info.route.cluster, cluster());
            }
            other => panic!("expected Available, got {other:?}"),
        }

        db.backend()
            .update_state(&backend, &states[4])
            .await
            .unwrap();
        assert_eq!(
            route().await.unwrap(),
            RouteInfoResult::NotFound,
            "terminating"
        );
        db.backend()
            .update_state(&backend, &states[5])
            .await
            .unwrap();
        assert_eq!(
            route().await.unwrap(),
            RouteInfoResult::NotFound,
            "terminated"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_expired_tokens_do_not_route() {
    with_db(|db| async move {
        drone(&db).await;
        let response = spawn(&db).await;
        let unknown = BearerToken::new_random();
        assert_eq!(
            db.backend().route_info_for_token(&unknown).await.unwrap(),
            RouteInfoResult::NotFound
        );
        exec(
            &db,
            "update token set expiration_time = now() - interval '1 second'",
        )
        .await;
        assert_eq!(
            db.backend()
                .route_info_for_token(&response.token)
                .await
                .unwrap(),
            RouteInfoResult::NotFound
        );
        assert_eq!(db.cleanup_tokens().await.unwrap(), 1);
        assert_eq!(db.cleanup_tokens().await.unwrap(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_token_routes() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("static");
        if let Some(spawn) = req.spawn_config.as_mut() {
            spawn.use_static_token = true;
        }
        let response = db.connect(&req).await.unwrap();
        assert!(response.token.is_static());
        assert!(response.secret_token.is_none());
        let tokens = count(&db, "token").await;
        assert_eq!(tokens, 0, "a static backend gets no per-connect token");

        assert!(matches!(
            db.backend()
                .route_info_for_token(&response.token)
                .await
                .unwrap(),
            RouteInfoResult::Pending(_)
        ));
        for state in &lifecycle()[..4] {
            db.backend()
                .update_state(&response.backend_id, state)
                .await
                .unwrap();
        }
        match db
            .backend()
            .route_info_for_static_token(&response.token)
            .await
            .unwrap()
        {
            RouteInfoResult::Available(info) => {
                assert_eq!(info.route.backend_id, response.backend_id)
            }
            other => panic!("expected Available, got {other:?}"),
        }
        // Connecting again returns the same static token.
        let again = db.connect(&req).await.unwrap();
        assert_eq!(again.backend_id, response.backend_id);
        assert_eq!(again.token, response.token);

        let unknown = BearerToken::new_random_static();
        assert_eq!(
            db.backend().route_info_for_token(&unknown).await.unwrap(),
            RouteInfoResult::NotFound
        );
        // A non-static token is never looked up as a static one.
        assert_eq!(
            db.backend()
                .route_info_for_static_token(&BearerToken::new_random())
                .await
                .unwrap(),
            RouteInfoResult::NotFound
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_refused_for_terminated_and_unknown_backends() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let before = db
            .backend()
            .backend(&backend)
            .await
            .unwrap()
            .unwrap()
            .last_keepalive;
        assert!(db.backend().update_keepalive(&backend).await.unwrap());
        let after = db
            .backend()
            .backend(&backend)
            .await
            .unwrap()
            .unwrap()
            .last_keepalive;
        assert!(after >= before);

        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        assert!(!db.backend().update_keepalive(&backend).await.unwrap());
        assert!(!db
            .backend()
            .update_keepalive(&BackendName::new_random())
            .await
            .unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_candidates_are_idle_or_expired_started_backends() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let idle = spawn(&db).await.backend_id;
        let expired = spawn(&db).await.backend_id;
        let fresh = spawn(&db).await.backend_id;
        let scheduled_idle = spawn(&db).await.backend_id;
        let terminated_idle = spawn(&db).await.backend_id;
        for b in [&idle, &expired, &fresh] {
            db.backend().update_state(b, &BackendState::Loading).await.unwrap();
        }
        for state in lifecycle() {
            db.backend().update_state(&terminated_idle, &state).await.unwrap();
        }
        sqlx::query(
            "update backend set allowed_idle_seconds = 10, last_keepalive = now() - interval '1 minute'
             where id = any($1)",
        )
        .bind(vec![idle.to_string(), scheduled_idle.to_string(), terminated_idle.to_string()])
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query("update backend set expiration_time = now() - interval '1 second' where id = $1")
            .bind(expired.as_str())
            .execute(db.pool())
            .await
            .unwrap();
        sqlx::query("update backend set allowed_idle_seconds = 3600, expiration_time = now() + interval '1 hour' where id = $1")
            .bind(fresh.as_str())
            .execute(db.pool())
            .await
            .unwrap();

        let mut found: Vec<BackendName> = db
            .backend()
            .termination_candidates(d.id)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.backend_id)
            .collect();
        found.sort();
        let mut expected = vec![idle, expired];
        expected.sort();
        assert_eq!(found, expected);

        let other = drone(&db).await;
        assert!(db.backend().termination_candidates(other.id).await.unwrap().is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_old_terminated_backends() {
    with_db(|db| async move {
        drone(&db).await;
        let old: Vec<BackendName> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(spawn(&db).await.backend_id);
            }
            v
        };
        let recent = spawn(&db).await.backend_id;
        let alive = spawn(&db).await.backend_id;
        let old_with_live_key = spawn(&db).await.backend_id;
        for b in old.iter().chain([&recent]) {
            for state in lifecycle() {
                db.backend().update_state(b, &state).await.unwrap();
            }
        }
        // A terminated backend whose key is still held (its lease not expired) is kept.
        sqlx::query(
            "update backend set last_status = 'terminated', last_status_number = 70 where id = $1",
        )
        .bind(old_with_live_key.as_str())
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query(
            "update backend set last_status_time = now() - interval '10 days' where id = any($1)",
        )
        .bind(
            old.iter()
                .chain([&old_with_live_key])
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
        )
        .execute(db.pool())
        .await
        .unwrap();

        // Ten days ago is not older than ten and a half days (not whole days only).
        let none = db
            .backend()
            .cleanup_terminated(DAY * 21 / 2, 2)
            .await
            .unwrap();
        assert_eq!(none.backends, 0);
        let report = db.backend().cleanup_terminated(7 * DAY, 2).await.unwrap();
        assert_eq!(report.backends, 5);
        assert_eq!(report.states, 5 * 7, "scheduled + six transitions each");
        assert_eq!(report.tokens, 5);
        assert_eq!(report.actions, 5);
        assert_eq!(report.keys, 0, "terminated backends released their keys");
        assert_eq!(report.batches, 3);

        for b in &old {
            assert!(db.backend().backend(b).await.unwrap().is_none());
        }
        for b in [&recent, &alive, &old_with_live_key] {
            assert!(db.backend().backend(b).await.unwrap().is_some(), "{b} kept");
        }
        let again = db.backend().cleanup_terminated(7 * DAY, 2).await.unwrap();
        assert_eq!(again.backends, 0);

        assert!(matches!(
            db.backend().cleanup_terminated(7 * DAY, 0).await,
            Err(Error::InvalidArgument {
                argument: "batch_size",
                ..
            })
        ));
        // The deprecated form in days forwards, and refuses a negative age.
        #[allow(deprecated)]
        let in_days = db.backend().cleanup(7, 2).await.unwrap();
        assert_eq!(in_days.backends, 0);
        #[allow(deprecated)]
        let negative = db.backend().cleanup(-1, 10).await;
        assert!(matches!(
            negative,
            Err(Error::InvalidArgument {
                argument: "min_age_days",
                ..
            })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_expired_keys_of_old_backends() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        // Terminated without releasing its key (as after a crash), key long expired.
        sqlx::query(
            "update backend set last_status = 'terminated', last_status_number = 70,
             last_status_time = now() - interval '30 days' where id = $1",
        )
        .bind(backend.as_str())
        .execute(db.pool())
        .await
        .unwrap();
        exec(
            &db,
            "update backend_key set expires_at = now() - interval '1 day'",
        )
        .await;
        let report = db.backend().cleanup_terminated(7 * DAY, 100).await.unwrap();
        assert_eq!((report.backends, report.keys), (1, 1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_errors_not_panics() {
    with_db(|db| async move {
        drone(&db).await;
        let good = spawn(&db).await.backend_id;
        let bad = spawn(&db).await.backend_id;
        sqlx::query("update backend set state = '{\"status\": \"exploded\"}' where id = $1")
            .bind(bad.as_str())
            .execute(db.pool())
            .await
            .unwrap();
        match db.backend().backend(&bad).await {
            Err(Error::Decode {
                table: "backend",
                column: "state",
                ..
            }) => {}
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert!(db.backend().backend(&good).await.unwrap().is_some());
        let listed = db.backend().list_backends().await.unwrap();
        assert_eq!(
            listed.len(),
            1,
            "the bad row is skipped, the good one still listed"
        );
        assert_eq!(listed[0].id, good);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_live_subscribers() {
    with_db(|db| async move {
        let backend = BackendName::new_random();
        let mut sub = db
            .subscribe_with_key::<BackendMetricsMessage>(&backend)
            .await
            .unwrap();
        let metrics = BackendMetricsMessage {
            backend_id: backend.clone(),
            mem_used: 1,
            mem_total: 2,
            mem_active: 3,
            mem_inactive: 4,
            mem_unevictable: 5,
            mem_limit: 6,
            cpu_used: 7,
            sys_cpu: 8,
        };
        for _ in 0..100 {
            db.backend().publish_metrics(&metrics).await.unwrap();
        }
        for _ in 0..100 {
            let n = sub.next().await.expect("open").expect("not lagged");
            assert_eq!(n.payload, metrics);
            assert_eq!(n.id, None, "metrics are ephemeral");
        }
        let stored = count(&db, "event").await;
        assert_eq!(stored, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_termination_path_is_forward() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let terminating = BackendState::Loading.to_terminating(TerminationReason::External);
        let hard = terminating.to_hard_terminating(TerminationReason::External);
        assert!(db
            .backend()
            .update_state(&backend, &terminating)
            .await
            .unwrap());
        assert!(db.backend().update_state(&backend, &hard).await.unwrap());
        assert!(!db
            .backend()
            .update_state(&backend, &terminating)
            .await
            .unwrap());
        let row = db.backend().backend(&backend).await.unwrap().unwrap();
        assert_eq!(row.state.status(), BackendStatus::HardTerminating);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_listed_by_filter() {
    use plane_db::backend::BackendFilter;
    with_db(|db| async move {
        let a = drone(&db).await;
        let b = drone(&db).await;
        // Scheduling picks the drone with fewer live backends, so these alternate drones.
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(spawn(&db).await.backend_id);
        }
        db.backend()
            .update_state(&ids[0], &BackendState::Loading)
            .await
            .unwrap();
        let list = |filter: BackendFilter| {
            let db = db.clone();
            async move {
                db.backend()
                    .list(&filter)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|row| row.id)
                    .collect::<Vec<_>>()
            }
        };
        let mut all = ids.clone();
        all.sort();
        assert_eq!(list(BackendFilter::default()).await, all);
        let on_a = list(BackendFilter {
            drone: Some(a.id),
            ..BackendFilter::default()
        })
        .await;
        let on_b = list(BackendFilter {
            drone: Some(b.id),
            ..BackendFilter::default()
        })
        .await;
        assert_eq!(on_a.len() + on_b.len(), 4);
        assert!(on_a.iter().all(|id| !on_b.contains(id)));
        assert_eq!(
            list(BackendFilter {
                status: Some(BackendStatus::Loading),
                ..BackendFilter::default()
            })
            .await,
            vec![ids[0].clone()]
        );
        assert_eq!(
            list(BackendFilter {
                cluster: Some("other.test".parse().unwrap()),
                ..BackendFilter::default()
            })
            .await,
            Vec::<BackendName>::new()
        );
        assert_eq!(
            list(BackendFilter {
                cluster: Some(cluster()),
                limit: Some(2),
                ..BackendFilter::default()
            })
            .await,
            all[..2].to_vec()
        );
        assert!(matches!(
            db.backend()
                .list(&BackendFilter {
                    limit: Some(-1),
                    ..BackendFilter::default()
                })
                .await,
            Err(Error::InvalidArgument {
                argument: "limit",
                ..
            })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_history_is_every_state_in_order() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        // A refused backwards step adds nothing.
        assert!(!db
            .backend()
            .update_state(&backend, &BackendState::Loading)
            .await
            .unwrap());
        let history = db.backend().state_history(&backend).await.unwrap();
        let mut expected = vec![BackendState::Scheduled];
        expected.extend(lifecycle());
        assert_eq!(
            history.iter().map(|r| r.state.clone()).collect::<Vec<_>>(),
            expected
        );
        assert!(history.windows(2).all(|w| w[0].id < w[1].id));
        assert!(history
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at));
        assert!(db
            .backend()
            .state_history(&BackendName::new_random())
            .await
            .unwrap()
            .is_empty());
    })
    .await
}
