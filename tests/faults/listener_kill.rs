//! The listening connection killed again and again while 32 writers commit 10,000 state
//! changes: every subscriber gets every event exactly once, every status stream is complete
//! and in order.

use crate::common::{drone, request};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::events::Lagged;
use plane_db::types::{BackendName, BackendState, BackendStatus};
use plane_db::{Config, PlaneDatabase};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 32;
/// Each backend goes through all 8 statuses (`scheduled` written by `connect`, 7 updates):
/// 1,250 × 8 = 10,000 state changes.
const BACKENDS: usize = 1_250;
const STATE_CHANGES: usize = BACKENDS * 8;
/// A subscriber that hears nothing for this long after the writers finished has lost events.
const IDLE: Duration = Duration::from_secs(15);

/// What one subscriber received: times each event id was delivered, and lag reports.
#[derive(Default)]
struct Received {
    by_id: HashMap<i64, u32>,
    lagged: u64,
}

impl Received {
    fn count(&mut self, id: i64) {
        *self.by_id.entry(id).or_default() += 1;
    }
    fn total(&self) -> u64 {
        self.by_id.values().map(|&n| u64::from(n)).sum()
    }
    fn duplicated(&self) -> u64 {
        self.by_id.values().map(|&n| u64::from(n - 1)).sum()
    }
    fn lost(&self, table: &[i64]) -> u64 {
        table
            .iter()
            .filter(|id| !self.by_id.contains_key(id))
            .count() as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_repeatedly_under_32_writers() {
    with_url(|url| async move {
        let db = open(&url, 40, Config::default()).await;
        drone(&db).await;
        drone(&db).await;

        // Three subscribers, all live before the first write: two typed, one untyped.
        let mut typed = Vec::new();
        for _ in 0..2 {
            let mut sub = db.subscribe::<BackendState>().await.unwrap();
            typed.push(tokio::spawn(async move {
                let mut got = Received::default();
                while got.by_id.len() < STATE_CHANGES {
                    match tokio::time::timeout(IDLE, sub.next()).await {
                        Ok(Some(Ok(n))) => got.count(n.id.expect("persisted")),
                        Ok(Some(Err(Lagged { missed }))) => got.lagged += missed,
                        Ok(None) | Err(_) => break,
                    }
                }
                got
            }));
        }
        let mut all = db.subscribe_all_events().await.unwrap();
        let untyped = tokio::spawn(async move {
            let (mut states, mut actions) = (Received::default(), Received::default());
            while states.by_id.len() < STATE_CHANGES || actions.by_id.len() < BACKENDS {
                match tokio::time::timeout(IDLE, all.next()).await {
                    Ok(Some(Ok(e))) if e.kind == "backend_state" => states.count(e.id.unwrap()),
                    Ok(Some(Ok(e))) if e.kind == "backend_action" => actions.count(e.id.unwrap()),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(Lagged { missed }))) => states.lagged += missed,
                    Ok(None) | Err(_) => break,
                }
            }
            (states, actions)
        });

        // The killer: terminates the listening connection every 20–80 ms while writers run,
        // and measures how long the bus takes to listen again.
        let done = Arc::new(AtomicBool::new(false));
        let killer = {
            let (db, done) = (db.clone(), done.clone());
            tokio::spawn(async move {
                let mut kills = 0_u64;
                let mut reconnects = Vec::new();
                let mut i = 0_u64;
                while !done.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(20 + (i * 37) % 60)).await;
                    i += 1;
                    let n = kill_listeners(&db).await;
                    if n == 0 {
                        continue;
                    }
                    kills += n;
                    let killed_at = Instant::now();
                    // A terminated backend can linger in pg_stat_activity for a moment.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    while !listener_up(&db).await && killed_at.elapsed() < Duration::from_secs(10) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    reconnects.push(killed_at.elapsed());
                }
                (kills, reconnects)
            })
        };

        let started = Instant::now();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let db = db.clone();
                tokio::spawn(async move { write_backends(db, w).await })
            })
            .collect();
        let mut streams = Vec::new();
        for w in writers {
            streams.extend(w.await.unwrap());
        }
        let write_time = started.elapsed();
        done.store(true, Ordering::Release);
        let (kills, reconnects) = killer.await.unwrap();

        let table = table_event_ids(&db, "backend_state", None).await;
        let table_actions = table_event_ids(&db, "backend_action", None).await;
        let mut subscribers = Vec::new();
        for t in typed {
            subscribers.push(t.await.unwrap());
        }
        let (states, actions) = untyped.await.unwrap();
        subscribers.push(states);
        let delivered_in = started.elapsed();

        let mut complete = 0;
        let mut incomplete = Vec::new();
        for (backend, stream) in streams {
            let statuses = stream.await.unwrap();
            if statuses == BackendStatus::ALL {
                complete += 1;
            } else {
                incomplete.push((backend, statuses));
            }
        }

        let (reconnect_p50, reconnect_max) = p50_max(reconnects);
        figures(
            "listener_kill",
            &[
                ("writers", WRITERS.to_string()),
                ("state_changes_written", table.len().to_string()),
                ("listener_kills", kills.to_string()),
                ("reconnect_p50_ms", reconnect_p50),
                ("reconnect_max_ms", reconnect_max),
                (
                    "received",
                    format!(
                        "{:?}",
                        subscribers.iter().map(Received::total).collect::<Vec<_>>()
                    ),
                ),
                (
                    "lost",
                    format!(
                        "{:?}",
                        subscribers
                            .iter()
                            .map(|s| s.lost(&table))
                            .collect::<Vec<_>>()
                    ),
                ),
                (
                    "duplicated",
                    format!(
                        "{:?}",
                        subscribers
                            .iter()
                            .map(Received::duplicated)
                            .collect::<Vec<_>>()
                    ),
                ),
                ("actions_received", actions.total().to_string()),
                ("status_streams_complete", format!("{complete}/{BACKENDS}")),
                ("write_ms", ms(write_time)),
                ("all_delivered_ms", ms(delivered_in)),
            ],
        );

        assert_eq!(table.len(), STATE_CHANGES, "state changes committed");
        assert!(kills >= 10, "the listener was killed only {kills} times");
        for (i, s) in subscribers.iter().enumerate() {
            assert_eq!(s.lagged, 0, "subscriber {i} lagged");
            assert_eq!(s.lost(&table), 0, "subscriber {i} lost events");
            assert_eq!(s.duplicated(), 0, "subscriber {i} got duplicates");
            assert_eq!(
                s.by_id.len(),
                STATE_CHANGES,
                "subscriber {i} got foreign ids"
            );
        }
        assert_eq!(table_actions.len(), BACKENDS);
        assert_eq!(actions.lost(&table_actions), 0, "spawn actions lost");
        assert_eq!(actions.duplicated(), 0, "spawn actions duplicated");
        assert!(
            incomplete.is_empty(),
            "incomplete status streams: {incomplete:?}"
        );
    })
    .await
}

type StreamTask = (BackendName, tokio::task::JoinHandle<Vec<BackendStatus>>);

/// Writer `w`: creates its share of the backends and moves each through its whole life,
/// watching each one on a status stream opened while it is being written.
async fn write_backends(db: PlaneDatabase, w: usize) -> Vec<StreamTask> {
    let mut streams = Vec::new();
    for i in (w..BACKENDS).step_by(WRITERS) {
        let backend = db
            .connect(&request(&format!("kill-{i}")))
            .await
            .expect("connect")
            .backend_id;
        let stream = db.backend().status_stream(&backend).await.unwrap();
        streams.push((
            backend.clone(),
            tokio::spawn(async move { stream.map(|entry| entry.status).collect::<Vec<_>>().await }),
        ));
        for status in full_life() {
            let applied = db
                .backend()
                .update_state(&backend, &state_for(status))
                .await
                .expect("update_state");
            assert!(applied, "{backend} refused {status}");
        }
    }
    streams
}
