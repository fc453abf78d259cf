//! The server comes back with its transaction-id counter behind where it was: what a
//! failover to a replica that had not replayed everything looks like (and, in a narrower
//! window, crash recovery that loses an unflushed abort). Simulated on a private server:
//! stop it, move its next transaction id back with `pg_resetwal -x`, start it.
//!
//! Rows written "after" the failover reuse transaction ids that the bus's read cursor (a
//! snapshot of the old server) already counts as seen. A reader keyed on transaction ids
//! alone skips them: events committed before its first read on the new server are lost.
//! Every event committed after the failover must still be delivered, once, and nothing
//! delivered before it delivered again.

use crate::support::*;
use plane_db::events::{emit, Lagged};
use plane_db::types::BackendState;
use plane_db::Config;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BURN: usize = 1_500;
const BEFORE: usize = 20;
const AFTER: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_going_back_lose_nothing() {
    with_private_server("failover", scenario).await;
}

async fn scenario(server: Arc<plane_db::testing::TestServer>, url: String) {
    let db = open(&url, 4, Config::default()).await;
    // Transaction ids that write nothing: room to move the counter back into without
    // touching the schema's own rows.
    let burn_start = next_xid(db.pool()).await;
    for _ in 0..BURN {
        next_xid(db.pool()).await;
    }
    let mut sub = db.subscribe::<BackendState>().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match sub.next().await {
                Some(Ok(n)) => {
                    let _ = tx.send(Ok(n.key.unwrap()));
                }
                Some(Err(Lagged { missed })) => {
                    let _ = tx.send(Err(missed));
                }
                None => break,
            }
        }
    });
    let mut conn = db.pool().acquire().await.unwrap();
    for i in 0..BEFORE {
        emit(
            &mut conn,
            Some(&(format!("before-{i}")).parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
    }
    drop(conn);
    let mut delivered: HashMap<String, u32> = HashMap::new();
    let mut lag_reports = 0;
    while delivered.len() < BEFORE {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok(key))) => *delivered.entry(key).or_default() += 1,
            other => panic!("before the failover: {other:?}"),
        }
    }
    let old_next = next_xid(db.pool()).await;

    // The failover: the counter goes back ~1,000 transactions.
    let reset_to = burn_start + 500;
    let s = server.clone();
    tokio::task::spawn_blocking(move || {
        s.stop()?;
        s.run_tool("pg_resetwal", &["-x", &reset_to.to_string()])?;
        s.start()
    })
    .await
    .unwrap()
    .unwrap();
    let started = Instant::now();

    // Write at once (before the bus has read anything from the new server), then later.
    let mut written = Vec::new();
    let mut xids = Vec::new();
    for (phase, pause) in [
        ("after", Duration::ZERO),
        ("late", Duration::from_millis(1_500)),
    ] {
        tokio::time::sleep(pause).await;
        for i in 0..AFTER {
            let key = format!("{phase}-{i}");
            loop {
                let attempt = async {
                    let mut conn = db.pool().acquire().await?;
                    emit(
                        &mut conn,
                        Some(&key.parse().unwrap()),
                        &BackendState::Loading,
                    )
                    .await?;
                    Ok::<_, plane_db::Error>(())
                };
                if attempt.await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written.push(key);
        }
        xids.push(next_xid(db.pool()).await);
    }
    let after_write = started.elapsed();

    while let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        match got {
            Ok(key) => *delivered.entry(key).or_default() += 1,
            Err(_) => lag_reports += 1,
        }
    }
    let lost: Vec<&String> = written
        .iter()
        .filter(|k| !delivered.contains_key(*k))
        .collect();
    let duplicated = delivered.values().filter(|&&n| n > 1).count();
    figures(
        "xid_regression",
        &[
            ("xid_went_back_by", (old_next - reset_to).to_string()),
            ("events_before", BEFORE.to_string()),
            ("events_written_after", written.len().to_string()),
            ("received_after", (delivered.len() - BEFORE).to_string()),
            ("lost", lost.len().to_string()),
            ("duplicated", duplicated.to_string()),
            ("lag_reports", lag_reports.to_string()),
            ("write_ms", ms(after_write)),
        ],
    );
    assert!(
        xids[0] < old_next,
        "the counter went back ({} >= {old_next})",
        xids[0]
    );
    assert!(lost.is_empty(), "lost after the failover: {lost:?}");
    assert_eq!(duplicated, 0, "delivered twice");
    assert_eq!(delivered.len(), BEFORE + written.len());
}
