//! A transaction left open in another session.
//!
//! What the bus does: nothing waits for it. The bus reads rows by transaction visibility,
//! so events of transactions that commit while another one is open are read at once; the
//! open transaction's own events are read when (and only if) it commits, however long that
//! takes. The bound tested here: while a transaction (one that wrote an event, and one that
//! only holds a snapshot) stays open for 3 s, every other event is delivered within
//! 1 s of its commit (the bus's poll interval, the bound even if a wake-up were lost; wake-ups
//! make it milliseconds), the same as before it opened; the open transaction's event is
//! delivered once, within that bound of its commit; a rolled-back one never.

use crate::support::*;
use plane_db::events::emit;
use plane_db::types::BackendState;
use plane_db::Config;
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_secs(1);
const HOLD: Duration = Duration::from_secs(3);
const EVENTS: usize = 60;
const GAP: Duration = Duration::from_millis(25);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_elsewhere_is_bounded() {
    with_url(|url| async move {
        let db = open(&url, 8, Config::default()).await;
        assert!(BOUND >= db.config().bus.poll_interval);
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let receiver = tokio::spawn(async move {
            while let Some(Ok(n)) = sub.next().await {
                if tx.send((n.key.unwrap(), Instant::now())).is_err() {
                    break;
                }
            }
        });
        let mut conn = db.pool().acquire().await.unwrap();
        // Baseline: nothing open.
        let baseline = commit_events(&mut conn, "base").await;

        // Open elsewhere: one transaction that wrote an event (holds an xid), one that
        // rolls back, one that only holds a snapshot.
        let mut writer_txn = PgConnection::connect(&url).await.unwrap();
        let mut aborted_txn = PgConnection::connect(&url).await.unwrap();
        let mut reader_txn = PgConnection::connect(&url).await.unwrap();
        sqlx::query("begin").execute(&mut writer_txn).await.unwrap();
        emit(
            &mut writer_txn,
            Some(&"held".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        sqlx::query("begin")
            .execute(&mut aborted_txn)
            .await
            .unwrap();
        emit(
            &mut aborted_txn,
            Some(&"aborted".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        sqlx::query("begin isolation level repeatable read")
            .execute(&mut reader_txn)
            .await
            .unwrap();
        sqlx::query("select count(*) from event")
            .execute(&mut reader_txn)
            .await
            .unwrap();
        let opened = Instant::now();

        let during = commit_events(&mut conn, "open").await;
        let remaining = HOLD.saturating_sub(opened.elapsed());
        tokio::time::sleep(remaining).await;
        sqlx::query("rollback")
            .execute(&mut aborted_txn)
            .await
            .unwrap();
        sqlx::query("commit")
            .execute(&mut writer_txn)
            .await
            .unwrap();
        let held_committed = Instant::now();
        let held_open_for = opened.elapsed();
        sqlx::query("commit")
            .execute(&mut reader_txn)
            .await
            .unwrap();
        let after = commit_events(&mut conn, "after").await;

        // Gather deliveries until quiet.
        let mut delivered: HashMap<String, Vec<Instant>> = HashMap::new();
        while let Ok(Some((key, at))) =
            tokio::time::timeout(Duration::from_secs(2), rx.recv()).await
        {
            delivered.entry(key).or_default().push(at);
        }
        drop(rx);
        receiver.abort();

        let latencies = |committed: &HashMap<String, Instant>| -> Vec<Duration> {
            committed
                .iter()
                .filter_map(|(k, at)| {
                    delivered
                        .get(k)
                        .map(|d| d[0].saturating_duration_since(*at))
                })
                .collect()
        };
        let (base_p50, base_max) = p50_max(latencies(&baseline));
        let (open_p50, open_max) = p50_max(latencies(&during));
        let (after_p50, after_max) = p50_max(latencies(&after));
        let held = delivered.get("held").cloned().unwrap_or_default();
        let held_latency = held
            .first()
            .map(|at| at.saturating_duration_since(held_committed));
        let duplicates = delivered.values().filter(|d| d.len() > 1).count();

        figures(
            "open_transaction",
            &[
                ("held_open_ms", ms(held_open_for)),
                ("events_while_open", during.len().to_string()),
                ("latency_baseline_p50_ms", base_p50),
                ("latency_baseline_max_ms", base_max),
                ("latency_while_open_p50_ms", open_p50),
                ("latency_while_open_max_ms", open_max.clone()),
                ("latency_after_p50_ms", after_p50),
                ("latency_after_max_ms", after_max),
                ("held_event_deliveries", held.len().to_string()),
                (
                    "held_event_latency_ms",
                    held_latency.map_or("never".into(), ms),
                ),
                (
                    "rolled_back_deliveries",
                    delivered.get("aborted").map_or(0, Vec::len).to_string(),
                ),
                ("duplicated", duplicates.to_string()),
            ],
        );

        for (phase, committed) in [
            ("baseline", &baseline),
            ("while open", &during),
            ("after", &after),
        ] {
            for (key, at) in committed {
                let got = delivered
                    .get(key)
                    .unwrap_or_else(|| panic!("{phase}: {key} lost"));
                let latency = got[0].saturating_duration_since(*at);
                assert!(latency < BOUND, "{phase}: {key} took {latency:?}");
            }
        }
        assert_eq!(
            held.len(),
            1,
            "the open transaction's event, once, after it commits"
        );
        assert!(held_latency.unwrap() < BOUND);
        assert!(
            !delivered.contains_key("aborted"),
            "a rolled-back event was delivered"
        );
        assert_eq!(duplicates, 0);
        assert_eq!(delivered.len(), 3 * EVENTS + 1);
    })
    .await
}

/// Commits one event per key (`prefix-0`…) and notes when each commit returned.
async fn commit_events(conn: &mut PgConnection, prefix: &str) -> HashMap<String, Instant> {
    let mut committed = HashMap::new();
    for i in 0..EVENTS {
        let key = format!("{prefix}-{i}");
        emit(conn, Some(&key.parse().unwrap()), &BackendState::Loading)
            .await
            .unwrap();
        committed.insert(key, Instant::now());
        tokio::time::sleep(GAP).await;
    }
    committed
}

/// Events written in savepoints: the bus delivers exactly those whose savepoint was kept and
/// whose transaction committed, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_deliver_exactly_what_commits() {
    with_url(|url| async move {
        let db = open(&url, 4, Config::default()).await;
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let steps = [
            "begin",
            "emit top",
            "savepoint a",
            "emit kept",
            "release savepoint a",
            "savepoint b",
            "emit dropped",
            "rollback to savepoint b",
            "savepoint c",
            "savepoint d",
            "emit nested",
            "release savepoint d",
            "release savepoint c",
            "commit",
            "begin",
            "savepoint e",
            "emit aborted",
            "release savepoint e",
            "rollback",
            // The transaction's first write is in a savepoint.
            "begin",
            "savepoint f",
            "emit first-in-savepoint",
            "release savepoint f",
            "commit",
        ];
        for step in steps {
            match step.strip_prefix("emit ") {
                Some(key) => {
                    emit(
                        &mut conn,
                        Some(&key.parse().unwrap()),
                        &BackendState::Loading,
                    )
                    .await
                    .unwrap();
                }
                None => {
                    sqlx::query(step).execute(&mut conn).await.unwrap();
                }
            }
        }
        let mut got = Vec::new();
        while let Ok(Some(Ok(n))) =
            tokio::time::timeout(Duration::from_millis(1_500), sub.next()).await
        {
            got.push(n.key.unwrap());
        }
        got.sort();
        figures("savepoints", &[("delivered", format!("{got:?}"))]);
        assert_eq!(got, ["first-in-savepoint", "kept", "nested", "top"]);
    })
    .await
}
