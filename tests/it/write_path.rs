//! The one event write path: every writing operation wakes readers after its commit (one
//! coalesced NOTIFY carrying the writing bus's id), never with a NOTIFY inside its own
//! transaction, which would take Postgres's commit-time notification lock.

use crate::common::*;
use plane_db::events::emit;
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendName, BackendState, ControllerName, DroneName, NodeKind, TerminationKind,
    TerminationReason,
};
use sqlx::postgres::PgListener;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// Collects what arrived on `plane_events` until nothing has for a while: the payloads.
async fn drain(listener: &mut PgListener) -> Vec<String> {
    let mut payloads = Vec::new();
    while let Ok(n) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        match n {
            Ok(n) => payloads.push(n.payload().to_string()),
            Err(error) => panic!("listener failed: {error}"),
        }
    }
    payloads
}

/// The kinds of the events stored so far, in id order.
async fn event_kinds(db: &plane_db::PlaneDatabase) -> Vec<String> {
    db.get_events_since(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writing_path_notifies_inside_its_transaction() {
    with_db_url(plane_db::Config::default(), |db, url| async move {
        let mut listener = PgListener::connect(&url).await.unwrap();
        listener.listen("plane_events").await.unwrap();

        // Every operation that writes an event: node registration (via `drone`), connect,
        // state updates, a termination request, marking backends lost one by one and by
        // drone, and marking a node offline.
        let d = drone(&db).await;
        let spawned = spawn(&db).await;
        for state in lifecycle().into_iter().take(3) {
            assert!(db
                .backend()
                .update_state(&spawned.backend_id, &state)
                .await
                .unwrap());
        }
        db.backend_action()
            .request_termination(
                &spawned.backend_id,
                TerminationKind::Soft,
                TerminationReason::External,
            )
            .await
            .unwrap();
        let lost = spawn(&db).await;
        assert_eq!(
            db.backend()
                .mark_lost(std::slice::from_ref(&lost.backend_id))
                .await
                .unwrap(),
            vec![lost.backend_id.clone()]
        );
        let by_drone = spawn(&db).await;
        let mut marked = db.backend().mark_drone_lost(d.id).await.unwrap();
        marked.sort();
        let mut expected = vec![spawned.backend_id.clone(), by_drone.backend_id.clone()];
        expected.sort();
        assert_eq!(marked, expected);
        let controller = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, "0.1.0", "abc")
            .await
            .unwrap();
        let other = db
            .node()
            .register(&NodeRegistration {
                controller: &controller,
                kind: NodeKind::Drone,
                name: DroneName::new_random().as_str(),
                cluster: Some(&cluster()),
                plane_version: "0.1.0",
                plane_hash: "abc",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await
            .unwrap();
        assert!(db.node().mark_offline(other, &controller).await.unwrap());

        let kinds = event_kinds(&db).await;
        for kind in ["node_connection", "backend_state", "backend_action"] {
            assert!(
                kinds.iter().any(|k| k == kind),
                "no {kind} event: {kinds:?}"
            );
        }
        let connections = kinds.iter().filter(|k| *k == "node_connection").count();
        assert_eq!(
            connections, 3,
            "two registrations and one offline: {kinds:?}"
        );

        let payloads = drain(&mut listener).await;
        assert!(
            !payloads.is_empty(),
            "the coalesced wake-ups after the commits must arrive"
        );
        let in_transaction = payloads.iter().filter(|p| p.is_empty()).count();
        assert_eq!(
            in_transaction,
            0,
            "{in_transaction} of {} wake-ups came from a NOTIFY inside a writer's transaction",
            payloads.len()
        );

        // The check can fail: an event written in a caller's own transaction (whose commit
        // the crate does not see) is woken by the trigger, inside that transaction.
        let mut txn = db.pool().begin().await.unwrap();
        let key: BackendName = "caller-own".parse().unwrap();
        emit(&mut txn, Some(&key), &BackendState::Loading)
            .await
            .unwrap();
        txn.commit().await.unwrap();
        let payloads = drain(&mut listener).await;
        assert_eq!(payloads, vec![String::new()]);
    })
    .await
}
