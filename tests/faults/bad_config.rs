//! Out-of-range configuration is bad input too: the bus keeps delivering with a page size of
//! zero or below (it reads at least one row per page) and a queue limit of zero.

use crate::support::*;
use plane_db::events::{emit, BusConfig};
use plane_db::types::{BackendName, BackendState};
use plane_db::Config;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_bus_config_still_delivers() {
    with_url(|url| async move {
        for (batch, pending) in [(0, 10), (-5, 10), (1, 0), (i64::MAX, usize::MAX)] {
            let config = Config {
                bus: BusConfig {
                    fetch_batch_size: batch,
                    max_pending_per_subscription: pending,
                    ..BusConfig::default()
                },
                ..Config::default()
            };
            let db = open(&url, 4, config).await;
            let key = format!("cfg-{batch}-{pending}");
            let name: BackendName = key.parse().unwrap();
            let mut sub = db.subscribe_with_key::<BackendState>(&name).await.unwrap();
            let mut conn = db.pool().acquire().await.unwrap();
            emit(
                &mut conn,
                Some(&key.parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap_or_else(|_| panic!("nothing delivered with batch {batch}, queue {pending}"))
                .unwrap();
            // A queue limit of zero behaves as one: the event arrives.
            assert!(got.is_ok(), "batch {batch}, queue {pending}: {got:?}");
            figures(
                "bad_config",
                &[
                    ("fetch_batch_size", batch.to_string()),
                    ("max_pending", pending.to_string()),
                    ("delivered", "1".into()),
                ],
            );
        }
    })
    .await
}

/// Durations too long for any clock: refused with a typed error naming the field when the
/// database opens, and never a panic when a `PlaneDatabase` is built with them anyway (the
/// waker task and the write path used to overflow on `Duration::MAX`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_any_clock_are_refused_and_never_panic() {
    with_url(|url| async move {
        let mut config = Config::default();
        config.bus.wake_interval = Duration::MAX;
        let refused = plane_db::OpenOptions::new(&url)
            .unwrap()
            .config(config.clone())
            .open()
            .await
            .expect_err("Duration::MAX accepted");
        assert!(
            matches!(&refused, plane_db::Error::InvalidArgument { argument, .. } if *argument == "bus.wake_interval"),
            "{refused}"
        );
        let mut replicas = Config::default();
        replicas.replicas.max_lag = Duration::MAX;
        assert!(replicas.validate().is_err());

        // Built without validation: every commit asks the waker task for a wake-up, which
        // waits `wake_interval` after the first; it must wait, not panic.
        let db = open(&url, 4, config).await;
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        let _drone = crate::common::drone(&db).await;
        for _ in 0..3 {
            // `connect` wakes the waker task after its commit; from the second on, the task
            // waits `wake_interval` after the previous NOTIFY: it must wait, not panic.
            let backend = crate::common::spawn(&db).await.backend_id;
            let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("nothing delivered")
                .unwrap()
                .expect("lagged");
            assert_eq!(got.key.as_deref(), Some(backend.as_str()));
        }
        // The bus still reads, and the waker task is still alive and waiting.
        db.health_check().await.unwrap();
        figures(
            "bad_config_durations",
            &[("refused", refused.to_string())],
        );
    })
    .await
}
