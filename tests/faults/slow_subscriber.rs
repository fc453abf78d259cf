//! A slow subscriber under a burst of 10,000 events for its key: its queue overflows, the
//! bus pauses it, and once it has drained what it holds it catches up from the table exactly
//! where it stopped: every event delivered once, in order, nothing reported missed. A status
//! stream left unpolled through the burst is complete and in order too.

use crate::common::{drone, spawn};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::events::{emit, BusConfig, Lagged};
use plane_db::types::{BackendState, BackendStatus};
use plane_db::Config;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const BURST: usize = 10_000;
/// Events per transaction in the burst.
const PER_TXN: usize = 100;

/// With a 1,000-event queue the subscribers overflow many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_small_queue() {
    slow_subscriber(1_000).await
}

/// With the default queue (10,000) a subscriber that stalls through the whole burst still
/// overflows: burst plus the backend's own updates exceed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_default_queue() {
    slow_subscriber(BusConfig::default().max_pending_per_subscription).await
}

async fn slow_subscriber(max_pending: usize) {
    with_url(|url| async move {
        let config = Config {
            bus: BusConfig {
                max_pending_per_subscription: max_pending,
                ..BusConfig::default()
            },
            ..Config::default()
        };
        let db = open(&url, 8, config).await;
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        let key = backend.as_str().to_string();

        // The raw subscriber reads one event per millisecond (the burst comes much faster).
        // With the default queue it does not read at all until the burst is over.
        let stalled = max_pending >= BURST;
        let mut sub = db
            .subscribe_with_key::<BackendState>(&backend)
            .await
            .unwrap();
        // The status stream is polled once, then not again until the burst is over.
        let mut stream = Box::pin(db.backend().status_stream(&backend).await.unwrap());
        let first = stream.next().await.unwrap();
        assert_eq!(first.status, BackendStatus::Scheduled);

        let (burst_done_tx, burst_done) = tokio::sync::watch::channel(false);
        let reader = tokio::spawn(async move {
            let mut burst_done = burst_done;
            if stalled {
                burst_done.wait_for(|d| *d).await.unwrap();
            }
            let (mut ids, mut missed, mut lag_reports) = (Vec::new(), 0_u64, 0_u64);
            loop {
                match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                    Ok(Some(Ok(n))) => ids.push(n.id.unwrap()),
                    Ok(Some(Err(Lagged { missed: m }))) => {
                        missed += m;
                        lag_reports += 1;
                    }
                    Ok(None) => panic!("the subscription ended"),
                    // Quiet for 3 s after the burst: everything has been read.
                    Err(_) if *burst_done.borrow() => break,
                    Err(_) => {}
                }
                if !stalled {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            (ids, missed, lag_reports)
        });

        // The burst: 10,000 events for the key, with the backend's real updates spread
        // through it (the last one, `terminated`, comes after the burst).
        let started = Instant::now();
        let life = full_life();
        let mut conn = db.pool().acquire().await.unwrap();
        for t in 0..BURST / PER_TXN {
            let mut txn = sqlx::Connection::begin(&mut *conn).await.unwrap();
            for _ in 0..PER_TXN {
                emit(
                    &mut txn,
                    Some(&key.parse().unwrap()),
                    &BackendState::Loading,
                )
                .await
                .unwrap();
            }
            txn.commit().await.unwrap();
            if t % 16 == 15 {
                let status = life[t / 16];
                assert!(db
                    .backend()
                    .update_state(&backend, &state_for(status))
                    .await
                    .unwrap());
            }
        }
        let burst_ms = started.elapsed();
        for status in &life[BURST / PER_TXN / 16..] {
            assert!(db
                .backend()
                .update_state(&backend, &state_for(*status))
                .await
                .unwrap());
        }
        // Wait until the bus has dispatched the whole burst: it dispatches in commit order,
        // so once a later probe event arrives, everything before it has been queued.
        let mut probe = db
            .subscribe_with_key::<BackendState>(&"probe".parse().unwrap())
            .await
            .unwrap();
        emit(
            &mut conn,
            Some(&"probe".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(30), probe.next())
            .await
            .expect("the bus caught up")
            .unwrap()
            .unwrap();
        burst_done_tx.send_replace(true);

        // The status stream: complete, in order, then it ends.
        let mut statuses = vec![first.status];
        while let Some(entry) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the status stream stalled")
        {
            statuses.push(entry.status);
        }

        let (ids, missed, lag_reports) = reader.await.unwrap();
        let table = table_event_ids(&db, "backend_state", Some(&key)).await;
        // Events written after the subscription: everything but `scheduled`.
        let written = table.len() - 1;
        let got: HashSet<i64> = ids.iter().copied().collect();
        let lost = table[1..].iter().filter(|id| !got.contains(id)).count();

        figures(
            &format!("slow_subscriber(queue={max_pending})"),
            &[
                ("events_written", written.to_string()),
                ("delivered", ids.len().to_string()),
                ("reported_missed", missed.to_string()),
                ("lag_reports", lag_reports.to_string()),
                ("duplicated", (ids.len() - got.len()).to_string()),
                ("lost", lost.to_string()),
                ("status_stream", format!("{}/8 in order", statuses.len())),
                ("burst_ms", ms(burst_ms)),
            ],
        );

        assert_eq!(written, BURST + life.len());
        // The queue holds fewer events than were written, so the subscriber was paused and
        // caught up (with the default queue it read nothing during the burst).
        assert!(max_pending < written);
        assert_eq!((missed, lag_reports), (0, 0), "nothing reported missed");
        assert_eq!(lost, 0, "every event delivered");
        assert_eq!(got.len(), ids.len(), "no event delivered twice");
        // One writer: commit order is id order, and delivery keeps it.
        assert_eq!(ids, table[1..], "delivered in order");
        assert_eq!(
            statuses,
            BackendStatus::ALL,
            "the status stream is complete and in order"
        );
    })
    .await
}
