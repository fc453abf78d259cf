//! Old events in batches, `run_cleanup`, and the cleanup loop.

use crate::common::*;
use plane_db::{CleanupConfig, Error, PlaneDatabase};
use std::time::Duration;

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_deleted_in_batches() {
    with_db(|db| async move {
        exec(
            &db,
            "insert into event (kind, key, data, created_at)
             select 'test', null, '{}', now() - interval '10 days' from generate_series(1, 25)",
        )
        .await;
        exec(
            &db,
            "insert into event (kind, key, data, created_at)
             select 'test', null, '{}', now() - interval '1 day' from generate_series(1, 5)",
        )
        .await;
        assert!(matches!(
            db.cleanup_events(DAY, 0).await,
            Err(Error::InvalidArgument {
                argument: "batch_size",
                ..
            })
        ));
        assert_eq!(db.cleanup_events(7 * DAY, 10).await.unwrap(), 25);
        assert_eq!(count(&db, "event").await, 5, "recent events stay");
        assert_eq!(db.cleanup_events(7 * DAY, 10).await.unwrap(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cleanup_deletes_backends_events_and_expired_tokens() {
    with_db(|db| async move {
        drone(&db).await;
        let old = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&old, &state).await.unwrap();
        }
        // A live backend with two tokens (its first connect and a reconnect), both expired.
        let live = db.connect(&request("live-key")).await.unwrap();
        let reconnect = db.connect(&request("live-key")).await.unwrap();
        assert_eq!(reconnect.backend_id, live.backend_id);
        exec(
            &db,
            &format!(
                "update backend set last_status_time = now() - interval '30 days' where id = '{old}'"
            ),
        )
        .await;
        exec(&db, "update event set created_at = now() - interval '30 days'").await;
        exec(
            &db,
            &format!(
                "update token set expiration_time = now() - interval '1 minute'
                 where backend_id = '{}'",
                live.backend_id
            ),
        )
        .await;
        assert_eq!(count(&db, "token").await, 3);
        let events = count(&db, "event").await;
        fill_first_event_partition(&db).await;

        let summary = db.run_cleanup(&CleanupConfig::default()).await.unwrap();
        assert_eq!(summary.backends.backends, 1);
        assert_eq!(summary.backends.states, 7);
        assert_eq!(summary.backends.tokens, 1);
        assert_eq!(summary.events as i64, events);
        assert_eq!(summary.tokens, 2);
        assert_eq!(count(&db, "event").await, 0);
        assert_eq!(count(&db, "token").await, 0);
        assert_eq!(count(&db, "backend").await, 1, "the live backend stays");

        let nothing = db.run_cleanup(&CleanupConfig::default()).await.unwrap();
        assert_eq!(
            (nothing.backends.backends, nothing.events, nothing.tokens),
            (0, 0, 0)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_loop_runs_until_dropped() {
    with_db(|db| async move {
        assert!(matches!(
            db.spawn_cleanup_loop(Duration::ZERO, CleanupConfig::default()),
            Err(Error::InvalidArgument {
                argument: "interval",
                ..
            })
        ));
        let config = CleanupConfig {
            event_min_age: Duration::from_secs(60),
            ..CleanupConfig::default()
        };
        let task = db
            .spawn_cleanup_loop(Duration::from_millis(100), config)
            .unwrap();
        // Each run is recorded in cleanup_run.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count(&db, "cleanup_run").await < 1 {
            assert!(tokio::time::Instant::now() < deadline, "the loop never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // It keeps running.
        while count(&db, "cleanup_run").await < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the loop ran only once"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.stop();
        // Stopped: no more runs.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let runs = count(&db, "cleanup_run").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(count(&db, "cleanup_run").await, runs);
    })
    .await
}

/// A drone and `n` backends taken through their whole lifecycle, terminated 30 days ago.
async fn old_terminated_backends(db: &PlaneDatabase, n: usize) {
    drone(db).await;
    for _ in 0..n {
        let backend = spawn(db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&backend, &state).await.unwrap();
        }
    }
    exec(
        db,
        "update backend set last_status_time = now() - interval '30 days'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_reports_progress_after_every_batch() {
    use plane_db::{CleanupPhase, CleanupProgress};
    with_db(|db| async move {
        old_terminated_backends(&db, 5).await;
        exec(
            &db,
            "update event set created_at = now() - interval '30 days'",
        )
        .await;
        let events = count(&db, "event").await as u64;
        fill_first_event_partition(&db).await;

        let mut seen: Vec<CleanupProgress> = Vec::new();
        let config = CleanupConfig {
            batch_size: 2,
            ..CleanupConfig::default()
        };
        let summary = db
            .run_cleanup_with_progress(&config, |p| seen.push(p))
            .await
            .unwrap();
        assert_eq!(summary.backends.backends, 5);
        assert_eq!(summary.events, events);

        let phase = |phase: CleanupPhase| -> Vec<(u64, u64)> {
            seen.iter()
                .filter(|p| p.phase == phase)
                .map(|p| (p.deleted, p.batches))
                .collect()
        };
        // 5 backends in batches of 2: 2, 4, 5 (the short batch ends the phase).
        assert_eq!(phase(CleanupPhase::Backends), [(2, 1), (4, 2), (5, 3)]);
        // The events went with their partition: one step.
        assert_eq!(phase(CleanupPhase::Events), [(events, 1)]);
        assert_eq!(phase(CleanupPhase::Tokens).len(), 1, "one (empty) batch");
        // The phases come in order.
        let order: Vec<CleanupPhase> = seen.iter().map(|p| p.phase).collect();
        let mut sorted = order.clone();
        sorted.sort_by_key(|p| *p as u8);
        assert_eq!(order, sorted);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_event_id_is_the_newest_stored() {
    with_db(|db| async move {
        assert_eq!(db.latest_event_id().await.unwrap(), None);
        exec(
            &db,
            "insert into event (kind, key, data) select 'test', null, '{}' from generate_series(1, 3)",
        )
        .await;
        let newest = db
            .get_events_since(0, 10)
            .await
            .unwrap()
            .last()
            .and_then(|e| e.id);
        assert_eq!(db.latest_event_id().await.unwrap(), newest);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_cleanup_waits_between_batches_and_still_deletes_everything() {
    use plane_db::CleanupPhase;
    with_db(|db| async move {
        old_terminated_backends(&db, 3).await;
        // A share of 1/1000: after a batch that took t, it waits 999 t. Every batch is a
        // round trip to the server, well over 50 µs, so every wait is over 50 ms.
        let config = CleanupConfig {
            batch_size: 1,
            busy_share: 0.001,
            ..CleanupConfig::default()
        };
        let mut reports = Vec::new();
        let summary = db
            .run_cleanup_with_progress(&config, |p| {
                if p.phase == CleanupPhase::Backends {
                    reports.push(std::time::Instant::now());
                }
            })
            .await
            .unwrap();
        assert_eq!(summary.backends.backends, 3);
        assert_eq!(count(&db, "backend").await, 0);
        // Three full batches and the empty one that ends the phase: a wait before each of
        // the last three.
        assert_eq!(reports.len(), 4);
        for pair in reports.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= Duration::from_millis(50), "{gap:?} between batches");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_share_outside_zero_to_one_is_refused() {
    with_db(|db| async move {
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let config = CleanupConfig {
                busy_share: share,
                ..CleanupConfig::default()
            };
            match db.run_cleanup(&config).await {
                Err(plane_db::Error::InvalidArgument { argument, .. }) => {
                    assert_eq!(argument, "busy_share")
                }
                other => panic!("busy_share {share}: {other:?}"),
            }
        }
        assert_eq!(count(&db, "cleanup_run").await, 0, "nothing ran");
    })
    .await
}
