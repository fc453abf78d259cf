//! Backend actions (termination requests, pending actions, acks) and marking backends lost.

use crate::common::*;
use plane_db::actions::TerminationRequest;
use plane_db::types::{
    BackendAction, BackendActionMessage, BackendActionName, BackendName, BackendState,
    BackendStatus, KeyConfig, NodeId, TerminationKind, TerminationReason,
};
use plane_db::Error;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_request_is_queued_and_emitted_for_the_drone() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let mut for_drone = db
            .subscribe_with_key::<BackendActionMessage>(&d.id)
            .await
            .unwrap();

        let request = db
            .backend_action()
            .request_termination(&backend, TerminationKind::Hard, TerminationReason::External)
            .await
            .unwrap();
        let TerminationRequest::Requested { action_id, drone } = request else {
            panic!("expected a request, got {request:?}");
        };
        assert_eq!(drone, d.id);

        let event = for_drone.next().await.expect("open").expect("not lagged");
        assert_eq!(event.payload.action_id, action_id);
        assert_eq!(event.payload.backend_id, backend);
        assert_eq!(event.payload.drone_id, d.id);
        assert_eq!(
            event.payload.action,
            BackendAction::Terminate {
                kind: TerminationKind::Hard,
                reason: TerminationReason::External
            }
        );

        // Pending: the spawn first, then the termination, both as the event said.
        let pending = db.backend_action().pending(d.id, 10).await.unwrap();
        assert_eq!(pending.len(), 2);
        assert!(matches!(pending[0].action, BackendAction::Spawn { .. }));
        assert_eq!(pending[1], event.payload);

        // A terminated backend gets no more actions; an unknown one is an error.
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        assert_eq!(
            db.backend_action()
                .request_termination(&backend, TerminationKind::Soft, TerminationReason::Swept)
                .await
                .unwrap(),
            TerminationRequest::AlreadyTerminated
        );
        assert!(matches!(
            db.backend_action()
                .request_termination(
                    &BackendName::new_random(),
                    TerminationKind::Soft,
                    TerminationReason::Swept
                )
                .await,
            Err(Error::NotFound {
                what: "backend",
                ..
            })
        ));
        assert_eq!(count(&db, "backend_action").await, 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_actions_come_in_order_and_again_until_acked() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let mut backends = Vec::new();
        for _ in 0..3 {
            backends.push(spawn(&db).await.backend_id);
        }
        let pending = db.backend_action().pending(d.id, 10).await.unwrap();
        let order: Vec<&BackendName> = pending.iter().map(|a| &a.backend_id).collect();
        assert_eq!(order, backends.iter().collect::<Vec<_>>(), "creation order");
        assert_eq!(db.backend_action().pending(d.id, 2).await.unwrap().len(), 2);
        assert!(db
            .backend_action()
            .pending(d.id, 0)
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            db.backend_action().pending(d.id, -1).await,
            Err(Error::InvalidArgument {
                argument: "limit",
                ..
            })
        ));

        // Not acked: delivered again on the next request.
        let again = db.backend_action().pending(d.id, 10).await.unwrap();
        assert_eq!(again, pending);

        // Another drone cannot ack them.
        let other = drone(&db).await;
        assert!(!db
            .backend_action()
            .ack(&pending[0].action_id, other.id)
            .await
            .unwrap());
        assert_eq!(
            db.backend_action().pending(d.id, 10).await.unwrap().len(),
            3
        );

        assert!(db
            .backend_action()
            .ack(&pending[0].action_id, d.id)
            .await
            .unwrap());
        assert!(
            !db.backend_action()
                .ack(&pending[0].action_id, d.id)
                .await
                .unwrap(),
            "already acked"
        );
        assert!(!db
            .backend_action()
            .ack(&BackendActionName::new_random(), d.id)
            .await
            .unwrap());
        let rest = db.backend_action().pending(d.id, 10).await.unwrap();
        assert_eq!(rest, pending[1..]);
        assert!(db
            .backend_action()
            .pending(NodeId::from(987_654), 10)
            .await
            .unwrap()
            .is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_action_is_skipped() {
    with_db(|db| async move {
        let d = drone(&db).await;
        spawn(&db).await;
        spawn(&db).await;
        exec(
            &db,
            "update backend_action set action = '{\"Explode\": 1}'
             where id = (select id from backend_action order by created_at limit 1)",
        )
        .await;
        assert_eq!(
            db.backend_action().pending(d.id, 10).await.unwrap().len(),
            1
        );
    })
    .await
}

async fn status_of(db: &plane_db::PlaneDatabase, backend: &BackendName) -> BackendState {
    db.backend()
        .backend(backend)
        .await
        .unwrap()
        .expect("row")
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_backends_lost_terminates_them_like_update_state() {
    with_db(|db| async move {
        drone(&db).await;
        let ready = db.connect(&request("lost-ready")).await.unwrap().backend_id;
        let terminating = spawn(&db).await.backend_id;
        let done = spawn(&db).await.backend_id;
        let states = lifecycle();
        for state in &states[..4] {
            db.backend().update_state(&ready, state).await.unwrap();
            db.backend().update_state(&terminating, state).await.unwrap();
        }
        db.backend()
            .update_state(&terminating, &states[4])
            .await
            .unwrap();
        for state in &states {
            db.backend().update_state(&done, state).await.unwrap();
        }
        let mut stream_events = db
            .subscribe_with_key::<BackendState>(&ready)
            .await
            .unwrap();

        let mut marked = db
            .backend()
            .mark_lost(&[
                ready.clone(),
                terminating.clone(),
                done.clone(),
                BackendName::new_random(),
            ])
            .await
            .unwrap();
        marked.sort();
        let mut expected = vec![ready.clone(), terminating.clone()];
        expected.sort();
        assert_eq!(marked, expected, "unknown and terminated backends are left alone");

        let lost = BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: None,
            reason: Some(TerminationReason::Lost),
            exit_code: None,
        };
        assert_eq!(status_of(&db, &ready).await, lost);
        // A termination in progress keeps its last status and kind.
        assert_eq!(
            status_of(&db, &terminating).await,
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Soft),
                reason: Some(TerminationReason::Lost),
                exit_code: None,
            }
        );
        assert_eq!(status_of(&db, &done).await, states[5]);

        // History, event and key release, as update_state records a termination.
        let event = stream_events.next().await.expect("open").expect("not lagged");
        assert_eq!(event.payload, lost);
        let history: i64 = sqlx::query_scalar(
            "select count(*) from backend_state where backend_id = $1 and state->>'reason' = 'lost'",
        )
        .bind(ready.as_str())
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(history, 1);
        let key = KeyConfig {
            name: "lost-ready".into(),
            namespace: "ns".into(),
            tag: String::new(),
        };
        assert_eq!(db.key().lookup(&key).await.unwrap(), None);
        // Already terminated: nothing more to mark.
        assert!(db.backend().mark_lost(&[ready]).await.unwrap().is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_a_drone_lost_terminates_only_its_alive_backends() {
    with_db(|db| async move {
        let a = drone(&db).await;
        let mut on_a = Vec::new();
        for _ in 0..3 {
            on_a.push(spawn(&db).await.backend_id);
        }
        db.drone().drain(a.id).await.unwrap();
        let b = drone(&db).await;
        let on_b = spawn(&db).await;
        assert_eq!(on_b.drone.as_ref(), Some(&b.name));
        for state in lifecycle() {
            db.backend().update_state(&on_a[0], &state).await.unwrap();
        }

        let mut marked = db.backend().mark_drone_lost(a.id).await.unwrap();
        marked.sort();
        let mut expected = on_a[1..].to_vec();
        expected.sort();
        assert_eq!(marked, expected);
        assert!(db
            .backend()
            .list_alive_backends_for_drone(a.id)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            db.backend()
                .list_alive_backends_for_drone(b.id)
                .await
                .unwrap()
                .len(),
            1
        );
        // An unknown drone has no backends.
        assert!(db
            .backend()
            .mark_drone_lost(plane_db::types::NodeId::from(i32::MAX))
            .await
            .unwrap()
            .is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_request_racing_the_termination_queues_nothing() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        // The drone's report of the termination, left uncommitted while a request arrives.
        let mut tx = db.pool().begin().await.unwrap();
        sqlx::query(
            "update backend set last_status = 'terminated', last_status_number = 70 where id = $1",
        )
        .bind(backend.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
        let request = tokio::spawn({
            let db = db.clone();
            let backend = backend.clone();
            async move {
                db.backend_action()
                    .request_termination(
                        &backend,
                        TerminationKind::Soft,
                        TerminationReason::External,
                    )
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!request.is_finished(), "the request waits for the row");
        tx.commit().await.unwrap();
        assert_eq!(
            request.await.unwrap().unwrap(),
            TerminationRequest::AlreadyTerminated
        );
        assert_eq!(count(&db, "backend_action").await, 1, "only the spawn");
    })
    .await
}
