//! The bus's reading connection killed in the middle of reading a backlog that takes several
//! pages (`BusConfig::fetch_batch_size`): the reader retries, and every subscriber still gets
//! each event exactly once.

use crate::support::*;
use plane_db::events::{emit, BusConfig, Lagged};
use plane_db::types::BackendState;
use plane_db::{Config, PlaneDatabase};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 12;
/// Events per round, committed in one transaction: one backlog of 20 pages.
const PER_ROUND: usize = 2_000;
const PAGE: i64 = 100;
const KILLS_PER_ROUND: u64 = 3;

/// Terminates connections running one of the bus's read statements (each reads the server's
/// incarnation marker with its rows); returns how many.
async fn kill_readers(killer: &PlaneDatabase) -> u64 {
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and state = 'active' and query ilike '%from plane_server_incarnation%'",
    )
    .fetch_all(killer.pool())
    .await
    .unwrap_or_default();
    killed.into_iter().filter(|k| *k).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_killed_mid_backlog() {
    with_url(|url| async move {
        let config = Config {
            bus: BusConfig {
                fetch_batch_size: PAGE,
                ..BusConfig::default()
            },
            ..Config::default()
        };
        let db = open(&url, 8, config).await;
        // The killer and the writer use pools of their own: only the bus's connections die.
        let killer = open(&url, 2, Config::default()).await;
        let writer = open(&url, 2, Config::default()).await;
        let mut sub = db.subscribe::<BackendState>().await.unwrap();

        let mut by_id: HashMap<i64, u32> = HashMap::new();
        let mut lagged = 0;
        let mut kills = 0;
        let started = Instant::now();
        for round in 0..ROUNDS {
            let stop = Arc::new(AtomicBool::new(false));
            let spam = {
                let (killer, stop) = (killer.clone(), stop.clone());
                tokio::spawn(async move {
                    // Up to three kills per round, 80 ms apart, so that the reader can
                    // still finish the backlog between them.
                    let mut kills = 0;
                    while !stop.load(Ordering::Acquire) && kills < KILLS_PER_ROUND {
                        let n = kill_readers(&killer).await;
                        kills += n;
                        let pause = if n > 0 { 80 } else { 2 };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    kills
                })
            };
            let mut txn = writer.pool().begin().await.unwrap();
            for i in 0..PER_ROUND {
                emit(
                    &mut txn,
                    Some(&(format!("r{round}-{i}")).parse().unwrap()),
                    &BackendState::Loading,
                )
                .await
                .unwrap();
            }
            txn.commit().await.unwrap();
            let target = (round + 1) * PER_ROUND;
            while by_id.len() < target {
                match tokio::time::timeout(Duration::from_secs(8), sub.next()).await {
                    Ok(Some(Ok(n))) => *by_id.entry(n.id.unwrap()).or_default() += 1,
                    Ok(Some(Err(Lagged { missed }))) => lagged += missed,
                    Ok(None) | Err(_) => break,
                }
                // Let the killer catch the reader between pages.
                if by_id.len() % PAGE as usize == 0 {
                    tokio::task::yield_now().await;
                }
            }
            stop.store(true, Ordering::Release);
            kills += spam.await.unwrap();
        }
        // Anything still arriving is a duplicate.
        while let Ok(Some(Ok(n))) =
            tokio::time::timeout(Duration::from_millis(1_500), sub.next()).await
        {
            *by_id.entry(n.id.unwrap()).or_default() += 1;
        }
        let table = table_event_ids(&writer, "backend_state", None).await;
        let received: u32 = by_id.values().sum();
        let duplicated: u32 = by_id.values().map(|n| n - 1).sum();
        let lost = table.iter().filter(|id| !by_id.contains_key(id)).count();
        figures(
            "reader_kill",
            &[
                ("events_written", table.len().to_string()),
                ("page_size", PAGE.to_string()),
                ("reader_kills", kills.to_string()),
                ("received", received.to_string()),
                ("lost", lost.to_string()),
                ("duplicated", duplicated.to_string()),
                ("lagged", lagged.to_string()),
                ("ms", ms(started.elapsed())),
            ],
        );
        assert_eq!(table.len(), ROUNDS * PER_ROUND);
        assert!(kills > 0, "the reader was never killed mid-read");
        assert_eq!(lagged, 0);
        assert_eq!(lost, 0, "events lost");
        assert_eq!(duplicated, 0, "events duplicated");
    })
    .await
}
