//! status_stream: history then live, in order, without duplicates, never ending early.

use crate::common::*;
use futures_util::StreamExt;
use plane_db::events::BusConfig;
use plane_db::types::{BackendName, BackendStatus};
use plane_db::{Config, Error};
use std::time::Duration;

fn all_statuses() -> Vec<BackendStatus> {
    let mut v = vec![BackendStatus::Scheduled];
    v.extend(lifecycle().iter().map(|s| s.status()));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_then_live_then_end() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let states = lifecycle();
        for state in &states[..2] {
            db.backend().update_state(&backend, state).await.unwrap();
        }
        let stream = db.backend().status_stream(&backend).await.unwrap();
        let mut stream = Box::pin(stream);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(stream.next().await.unwrap());
        }
        for state in &states[2..] {
            db.backend().update_state(&backend, state).await.unwrap();
        }
        while let Some(entry) = stream.next().await {
            got.push(entry);
        }
        let statuses: Vec<BackendStatus> = got.iter().map(|e| e.status).collect();
        assert_eq!(
            statuses,
            all_statuses(),
            "complete, in order, then the stream ends"
        );
        let last = got.last().unwrap();
        assert_eq!(last.exit_error, Some(false));
        assert!(got.windows(2).all(|w| w[0].time <= w[1].time));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_during_updates_are_complete_and_unique() {
    with_db(|db| async move {
        drone(&db).await;
        for _ in 0..10 {
            let backend = spawn(&db).await.backend_id;
            let writer = {
                let db = db.clone();
                let backend = backend.clone();
                tokio::spawn(async move {
                    for state in lifecycle() {
                        db.backend().update_state(&backend, &state).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            };
            let stream = db.backend().status_stream(&backend).await.unwrap();
            let statuses: Vec<BackendStatus> = stream.map(|e| e.status).collect().await;
            writer.await.unwrap();
            assert_eq!(statuses, all_statuses());
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backends_stream_is_its_history() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        let stream = db.backend().status_stream(&backend).await.unwrap();
        let statuses: Vec<BackendStatus> =
            tokio::time::timeout(Duration::from_secs(5), stream.map(|e| e.status).collect())
                .await
                .expect("ends by itself");
        assert_eq!(statuses, all_statuses());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_stream_is_not_found() {
    with_db(|db| async move {
        match db.backend().status_stream(&BackendName::new_random()).await {
            Err(Error::NotFound {
                what: "backend", ..
            }) => {}
            Err(other) => panic!("expected NotFound, got {other:?}"),
            Ok(_) => panic!("expected NotFound, got a stream"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_stream_resyncs_instead_of_ending() {
    let config = Config {
        bus: BusConfig {
            max_pending_per_subscription: 2,
            ..BusConfig::default()
        },
        ..Config::default()
    };
    with_db_config(config, |db| async move {
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let stream = db.backend().status_stream(&backend).await.unwrap();
        // Every transition commits before the stream is polled at all.
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let statuses: Vec<BackendStatus> = stream.map(|e| e.status).collect().await;
        assert_eq!(statuses, all_statuses());
    })
    .await
}
