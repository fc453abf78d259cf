//! Events from another cluster: a restored dump or a logical copy carries `event.xid`
//! verbatim, so its rows may have transaction ids this server has not handed out yet. Once
//! the server's counter passed them, a reader keyed on transaction ids would take them for
//! new and deliver another cluster's past again. Simulated by inserting rows with ids ahead
//! of the counter (what `COPY` of a dump does), then burning ids past them.
//!
//! Two moments: rows already there when a bus starts (a controller started on a restored
//! database), and rows that appear while a bus runs, followed by a server restart (the
//! endpoint moved to a restored copy).

use crate::support::*;
use plane_db::events::Lagged;
use plane_db::Config;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const FOREIGN: i64 = 200;
/// How far ahead of the counter the foreign ids lie.
const AHEAD: i64 = 1_000;
const NEW: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_another_cluster_are_history() {
    with_private_server("restore", scenario).await;
}

/// Inserts `FOREIGN` rows under keys `{prefix}-N` with transaction ids `AHEAD` and more
/// beyond the server's counter, as a restore would.
async fn insert_foreign(db: &plane_db::PlaneDatabase, prefix: &str) {
    sqlx::query(
        "insert into event (kind, key, data, xid)
         select 'backend_state', $1 || '-' || i, '{\"status\": \"loading\"}',
                (pg_current_xact_id()::text::bigint + $2 + i)::text::xid8
         from generate_series(1, $3) i",
    )
    .bind(prefix)
    .bind(AHEAD)
    .bind(FOREIGN)
    .execute(db.pool())
    .await
    .unwrap();
}

/// Moves the server's counter past every foreign id.
async fn burn_past_foreign(db: &plane_db::PlaneDatabase) {
    for _ in 0..(AHEAD + FOREIGN + 50) {
        next_xid(db.pool()).await;
    }
}

/// Writes `NEW` events under keys `{prefix}-N` and returns every key delivered until the
/// subscription has been quiet for 1.5 s after the last of them.
async fn write_and_collect(
    writer: &plane_db::PlaneDatabase,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, Lagged>>,
    prefix: &str,
) -> (HashMap<String, u32>, u64) {
    for i in 0..NEW {
        emit_retrying(writer, &format!("{prefix}-{i}")).await;
    }
    let mut delivered: HashMap<String, u32> = HashMap::new();
    let mut lagged = 0;
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(1_500), rx.recv()).await {
        match next {
            Ok(key) => *delivered.entry(key).or_default() += 1,
            Err(Lagged { missed }) => lagged += missed,
        }
    }
    (delivered, lagged)
}

async fn scenario(server: Arc<plane_db::testing::TestServer>, url: String) {
    let db = open(&url, 4, Config::default()).await;
    let writer = open(&url, 2, Config::default()).await;

    // 1. A bus starts on a database that holds another cluster's events.
    insert_foreign(&writer, "restored").await;
    let mut sub = db.subscribe_all_events().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(next) = sub.next().await {
            let _ = tx.send(next.map(|e| e.key.clone().unwrap_or_default()));
        }
    });
    burn_past_foreign(&writer).await;
    let (first, lagged_first) = write_and_collect(&writer, &mut rx, "new").await;

    // 2. While the bus runs, the rows of another cluster appear and the server restarts
    //    (the endpoint moved to a restored copy).
    insert_foreign(&writer, "copied").await;
    restart_server(&server).await;
    burn_past_foreign(&writer).await;
    let (second, lagged_second) = write_and_collect(&writer, &mut rx, "after").await;

    let foreign_delivered = first
        .keys()
        .chain(second.keys())
        .filter(|k| k.starts_with("restored-") || k.starts_with("copied-"))
        .count();
    let new_received = first.keys().filter(|k| k.starts_with("new-")).count();
    let after_received = second.keys().filter(|k| k.starts_with("after-")).count();
    let duplicated: u32 = first.values().chain(second.values()).map(|n| n - 1).sum();
    let fenced: i64 = sqlx::query_scalar("select count(*) from event where xid = '2'::xid8")
        .fetch_one(writer.pool())
        .await
        .unwrap();
    figures(
        "restore",
        &[
            ("foreign_rows", (2 * FOREIGN).to_string()),
            ("ids_ahead", AHEAD.to_string()),
            ("foreign_delivered", foreign_delivered.to_string()),
            ("foreign_made_history", fenced.to_string()),
            ("new_at_start_received", format!("{new_received}/{NEW}")),
            (
                "new_after_restart_received",
                format!("{after_received}/{NEW}"),
            ),
            ("duplicated", duplicated.to_string()),
            ("lagged", (lagged_first + lagged_second).to_string()),
        ],
    );
    assert_eq!(foreign_delivered, 0, "another cluster's events delivered");
    assert_eq!(new_received, NEW);
    assert_eq!(after_received, NEW);
    assert_eq!(duplicated, 0);
    assert_eq!(lagged_first + lagged_second, 0);
    assert_eq!(fenced, 2 * FOREIGN);
}
