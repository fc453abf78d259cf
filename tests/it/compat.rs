//! Compatibility with Plane 0.5.5: a backend whose name Plane made (no `ba-` prefix) goes
//! through every path a controller uses; and two differences COMPATIBILITY.md lists, as
//! Plane's controller and its clients see them (an unknown backend's status stream, a
//! termination request for a terminated backend).

use crate::common::*;
use futures_util::StreamExt;
use plane_db::actions::TerminationRequest;
use plane_db::backend::RouteInfoResult;
use plane_db::keys::KeyRenewal;
use plane_db::types::{
    BackendAction, BackendActionMessage, BackendMetricsMessage, BackendState, BackendStatus,
    KeyConfig, TerminationKind, TerminationReason,
};
use std::future::IntoFuture;
use std::time::Duration;

async fn next<T>(sub: &mut plane_db::events::Subscription<T>) -> plane_db::events::Notification<T>
where
    T: plane_db::events::NotificationPayload,
{
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a message before the timeout")
        .expect("bus open")
        .expect("not lagged")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_made_backend_name_goes_through_every_path() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let mut actions = db
            .subscribe_with_key::<BackendActionMessage>(&d.id)
            .await
            .unwrap();
        let id = plane_made_name();
        let mut metrics = db
            .subscribe_with_key::<BackendMetricsMessage>(&id)
            .await
            .unwrap();

        // connect, then connect by key.
        let first = db.connect(&request_named("plane-key", &id)).await.unwrap();
        assert!(first.spawned);
        assert_eq!(first.backend_id, id);
        let mut statuses = Box::pin(db.backend().status_stream(&id).await.unwrap());
        let again = db.connect(&request("plane-key")).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, id);

        // The drone's spawn action, live and pending (and its JSON, read back).
        let spawn = next(&mut actions).await.payload;
        assert_eq!(spawn.backend_id, id);
        assert!(matches!(spawn.action, BackendAction::Spawn { .. }));
        let pending = db.backend_action().pending(d.id, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].backend_id, id);
        assert!(db
            .backend_action()
            .ack(&pending[0].action_id, d.id)
            .await
            .unwrap());

        // Routes: pending, then available.
        for token in [&first.token, &again.token] {
            match db.backend().route_info_for_token(token).await.unwrap() {
                RouteInfoResult::Pending(partial) => assert_eq!(partial.backend_id, id),
                other => panic!("expected a pending route, got {other:?}"),
            }
        }
        let lifecycle = lifecycle();
        for state in &lifecycle[..4] {
            assert!(db.backend().update_state(&id, state).await.unwrap());
        }
        match db
            .backend()
            .route_info_for_token(&again.token)
            .await
            .unwrap()
        {
            RouteInfoResult::Available(route) => {
                assert_eq!(route.route.backend_id, id);
                // The route's JSON, as a proxy reads it, carries the name unchanged.
                let json = serde_json::to_value(&route).unwrap();
                assert_eq!(json["backend_id"], id.as_str());
            }
            other => panic!("expected an available route, got {other:?}"),
        }

        // Keepalive, metrics, listings, the key's renewal and lookup.
        assert!(db.backend().update_keepalive(&id).await.unwrap());
        let sample = BackendMetricsMessage {
            backend_id: id.clone(),
            mem_used: 1,
            mem_total: 2,
            mem_active: 3,
            mem_inactive: 4,
            mem_unevictable: 5,
            mem_limit: 6,
            cpu_used: 7,
            sys_cpu: 8,
        };
        db.backend().publish_metrics(&sample).await.unwrap();
        assert_eq!(next(&mut metrics).await.payload, sample);
        let listed = db.backend().list_backends().await.unwrap();
        assert!(listed.iter().any(|b| b.id == id));
        let alive = db
            .backend()
            .list_alive_backends_for_drone(d.id)
            .await
            .unwrap();
        assert_eq!(alive.iter().map(|b| &b.id).collect::<Vec<_>>(), [&id]);
        assert!(matches!(
            db.key().renew(&id, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::Renewed(_)
        ));
        let key = KeyConfig {
            name: "plane-key".into(),
            namespace: "ns".into(),
            tag: String::new(),
        };
        assert_eq!(db.key().lookup(&key).await.unwrap().unwrap().backend_id, id);
        assert_eq!(db.backend().state_history(&id).await.unwrap().len(), 5);
        exec(
            &db,
            &format!(
                "update backend set allowed_idle_seconds = 1,
                     last_keepalive = now() - interval '1 hour' where id = '{id}'"
            ),
        )
        .await;
        let candidates = db.backend().termination_candidates(d.id).await.unwrap();
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].backend_id, id);

        // Termination: the request reaches the drone, the states follow.
        match db
            .backend_action()
            .request_termination(&id, TerminationKind::Soft, TerminationReason::Swept)
            .await
            .unwrap()
        {
            TerminationRequest::Requested { drone, .. } => assert_eq!(drone, d.id),
            other => panic!("expected a queued termination, got {other:?}"),
        }
        let terminate = next(&mut actions).await.payload;
        assert_eq!(terminate.backend_id, id);
        assert!(matches!(terminate.action, BackendAction::Terminate { .. }));
        for state in &lifecycle[4..] {
            assert!(db.backend().update_state(&id, state).await.unwrap());
        }
        assert_eq!(
            db.backend()
                .route_info_for_token(&again.token)
                .await
                .unwrap(),
            RouteInfoResult::NotFound
        );

        // The status stream: every status in order, then it ends.
        let mut seen = Vec::new();
        while let Some(entry) = tokio::time::timeout(Duration::from_secs(30), statuses.next())
            .await
            .expect("the status stream moves on")
        {
            seen.push(entry.status);
        }
        let expected: Vec<BackendStatus> = std::iter::once(BackendState::Scheduled)
            .chain(lifecycle)
            .map(|state| state.status())
            .collect();
        assert_eq!(seen, expected);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_routes_to_a_plane_made_name_and_lost_backends_are_marked() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let id = plane_made_name();
        let mut req = request_named("static", &id);
        req.spawn_config.as_mut().unwrap().use_static_token = true;
        let response = db.connect(&req).await.unwrap();
        assert!(response.token.is_static());
        match db
            .backend()
            .route_info_for_static_token(&response.token)
            .await
            .unwrap()
        {
            RouteInfoResult::Pending(partial) => assert_eq!(partial.backend_id, id),
            other => panic!("expected a pending route, got {other:?}"),
        }
        // Names Plane accepts though it would not make them: a leading dash, 45 characters.
        let odd: plane_db::types::BackendName = "-starts-with-a-dash".parse().unwrap();
        let long: plane_db::types::BackendName = "9".repeat(45).parse().unwrap();
        for name in [&odd, &long] {
            let r = db
                .connect(&request_named(&format!("k{}", name.as_str().len()), name))
                .await
                .unwrap();
            assert_eq!(&r.backend_id, name);
        }
        let mut marked = db
            .backend()
            .mark_lost(&[id.clone(), odd.clone()])
            .await
            .unwrap();
        marked.sort();
        let mut expected = vec![id.clone(), odd.clone()];
        expected.sort();
        assert_eq!(marked, expected);
        let lost = db.backend().mark_drone_lost(d.id).await.unwrap();
        assert_eq!(lost, vec![long.clone()], "the one left alive");
        for name in [&id, &odd, &long] {
            let row = db.backend().backend(name).await.unwrap().expect("stored");
            assert_eq!(row.state.status(), BackendStatus::Terminated, "{name}");
        }
    })
    .await
}

/// What Plane 0.5.5's controller, run on plane-db, answers for the status stream of an
/// unknown backend: its handler (`handle_backend_status_stream` in
/// `plane/src/controller/backend_status.rs`) maps every error of `status_stream` to 500
/// ("Database error"). On Plane's own database layer it got a stream that never yields, and
/// answered 200 with an SSE response that stays silent forever; plane-db's typed
/// `Error::NotFound` makes that a 500 at once, not the 404 a controller can give by
/// matching the error (as the example controller does). COMPATIBILITY.md states this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_backends_status_stream_is_a_500_from_a_plane_shaped_handler() {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::sse::{Event, Sse};
    use axum::response::IntoResponse;

    /// Plane's handler, reduced to what decides the answer: any error is a 500.
    async fn plane_status_stream(
        State(db): State<plane_db::PlaneDatabase>,
        Path(id): Path<String>,
    ) -> axum::response::Response {
        let Ok(id) = plane_db::types::BackendName::try_from(id) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        match db.backend().status_stream(&id).await {
            Ok(stream) => {
                Sse::new(stream.map(|entry| Event::default().json_data(&entry))).into_response()
            }
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Database error").into_response(),
        }
    }

    with_db(|db| async move {
        drone(&db).await;
        let known = plane_made_name();
        db.connect(&request_named("plane-stream", &known))
            .await
            .unwrap();
        let unknown = plane_made_name();

        // The library: a typed error at once for the unknown backend.
        match db.backend().status_stream(&unknown).await {
            Err(plane_db::Error::NotFound {
                what: "backend",
                id,
            }) => {
                assert_eq!(id, unknown.as_str())
            }
            Err(other) => panic!("expected NotFound, got {other:?}"),
            Ok(_) => panic!("expected NotFound, got a stream"),
        }

        // Plane's handler over it, served over HTTP.
        let app = axum::Router::new()
            .route(
                "/backend/{id}/status-stream",
                axum::routing::get(plane_status_stream),
            )
            .with_state(db.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(axum::serve(listener, app).into_future());
        let client = reqwest::Client::new();
        let get = |id: &plane_db::types::BackendName| {
            client
                .get(format!("{base}/backend/{id}/status-stream"))
                .timeout(Duration::from_secs(30))
                .send()
        };

        let response = get(&unknown).await.unwrap();
        assert_eq!(
            response.status(),
            reqwest::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(response.text().await.unwrap(), "Database error");

        // A known backend's stream, through the same handler: 200 and its first status.
        let mut response = get(&known).await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let mut text = String::new();
        while !text.contains("\n\n") {
            let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
                .await
                .expect("the first event")
                .unwrap()
                .expect("the stream stays open");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(text.contains(r#""status":"scheduled""#), "{text}");

        drop(response);
        server.abort();
        let _ = server.await;
    })
    .await
}

/// A termination request for a backend that has terminated queues nothing and answers
/// `AlreadyTerminated`, where Plane 0.5.5 queued (and sent) another Terminate action, which
/// the drone then had nothing to do for. Until then, a second request queues a second action
/// as in Plane (the first may have been lost with a drone's connection). COMPATIBILITY.md
/// states this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_termination_request_for_a_terminated_backend_queues_nothing() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let id = plane_made_name();
        db.connect(&request_named("plane-terminate", &id))
            .await
            .unwrap();
        let lifecycle = lifecycle();
        for state in &lifecycle[..4] {
            assert!(db.backend().update_state(&id, state).await.unwrap());
        }
        let terminates = || count(&db, "backend_action where action ? 'Terminate'");
        let emitted = || count(&db, "event where kind = 'backend_action'");
        let actions_db = db.backend_action();
        let request = |kind| actions_db.request_termination(&id, kind, TerminationReason::External);

        // Ready, then terminating: each request is queued, as in Plane.
        assert!(matches!(
            request(TerminationKind::Soft).await.unwrap(),
            TerminationRequest::Requested { drone, .. } if drone == d.id
        ));
        assert!(db.backend().update_state(&id, &lifecycle[4]).await.unwrap());
        assert!(matches!(
            request(TerminationKind::Hard).await.unwrap(),
            TerminationRequest::Requested { .. }
        ));
        assert_eq!(terminates().await, 2);
        let (actions, events) = (count(&db, "backend_action").await, emitted().await);
        assert_eq!(events, 3, "the spawn and both terminations were sent");

        // Terminated: a second (and third) request answers AlreadyTerminated; no action is
        // stored and none is sent to the drone.
        assert!(db.backend().update_state(&id, &lifecycle[5]).await.unwrap());
        for kind in [TerminationKind::Soft, TerminationKind::Hard] {
            assert_eq!(
                request(kind).await.unwrap(),
                TerminationRequest::AlreadyTerminated
            );
        }
        assert_eq!(count(&db, "backend_action").await, actions);
        assert_eq!(emitted().await, events);
        assert_eq!(terminates().await, 2);
    })
    .await
}
