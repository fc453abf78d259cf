//! Two-phase commit. A transaction prepared anywhere on the server stays open through a
//! restart, and is the oldest transaction running: the read after the restart must not
//! reach down to it (an earlier floor did, and delivered up to everything since again,
//! beyond the 65,536 events the bus remembers). And an event can be written in a transaction
//! that is then prepared (`emit_in_two_phase`; `emit`'s NOTIFY makes `PREPARE` fail).

use crate::support::*;
use plane_db::events::{emit, emit_in_two_phase, Lagged};
use plane_db::types::BackendState;
use plane_db::Config;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events delivered before the restart: more than the bus remembers (65,536).
const BEFORE: usize = 70_000;
const AFTER: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transaction_through_a_restart() {
    with_private_server("prepared transaction", scenario).await;
}

async fn scenario(server: Arc<plane_db::testing::TestServer>, url: String) {
    let db = open(&url, 4, Config::default()).await;
    let writer = open(&url, 2, Config::default()).await;

    // A prepared transaction that wrote something, left open through everything below.
    let mut conn = writer.pool().acquire().await.unwrap();
    sqlx::raw_sql(
        "begin; update plane_server_incarnation set created_at = created_at; \
         prepare transaction 'plane-test-held'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    let mut sub = db.subscribe::<BackendState>().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(next) = sub.next().await {
            let _ = tx.send(next.map(|n| n.key.unwrap_or_default()));
        }
    });
    // 70,000 events in 7 transactions, written by the one write path.
    for batch in 0..7 {
        sqlx::query(
            "select plane_write_events(array_agg('backend_state'::text), array_agg('b' || $1 || '-' || i),
                                       array_agg('{\"status\": \"loading\"}'::jsonb), 'notify')
             from generate_series(1, $2) i",
        )
        .bind(batch.to_string())
        .bind((BEFORE / 7) as i32)
        .execute(writer.pool())
        .await
        .unwrap();
    }
    let mut delivered: HashMap<String, u32> = HashMap::new();
    let mut lagged = 0_u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < BEFORE && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok(key))) => *delivered.entry(key).or_default() += 1,
            Ok(Some(Err(Lagged { missed }))) => lagged += missed,
            _ => break,
        }
    }
    assert_eq!(delivered.len(), BEFORE, "before the restart");

    restart_server(&server).await;

    let mut after: HashMap<String, u32> = HashMap::new();
    for i in 0..AFTER {
        emit_retrying(&writer, &format!("after-{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while after.len() < AFTER && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok(key))) => *after.entry(key).or_default() += 1,
            Ok(Some(Err(Lagged { missed }))) => lagged += missed,
            _ => break,
        }
    }
    // Anything else arriving is an old event delivered again.
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_millis(1_500), rx.recv()).await {
        match next {
            Ok(key) => *after.entry(key).or_default() += 1,
            Err(Lagged { missed }) => lagged += missed,
        }
    }
    let received_after: u32 = after.values().sum();
    let old_again = after.keys().filter(|k| !k.starts_with("after-")).count();

    // The event of a prepared transaction: delivered once, after COMMIT PREPARED only.
    let mut conn = writer.pool().acquire().await.unwrap();
    sqlx::raw_sql("begin").execute(&mut *conn).await.unwrap();
    emit_in_two_phase(
        &mut conn,
        Some(&"two-phase".parse().unwrap()),
        &BackendState::Loading,
    )
    .await
    .unwrap();
    sqlx::raw_sql("prepare transaction 'plane-test-emit'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1_500), rx.recv()).await;
    assert!(
        early.is_err(),
        "delivered before COMMIT PREPARED: {early:?}"
    );
    sqlx::raw_sql("commit prepared 'plane-test-emit'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let committed_at = Instant::now();
    let two_phase = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    let two_phase_ms = committed_at.elapsed().as_millis();
    assert!(
        matches!(&two_phase, Ok(Some(Ok(key))) if key == "two-phase"),
        "the prepared transaction's event: {two_phase:?}"
    );

    // `emit`'s wake-up cannot be prepared: the error says why.
    sqlx::raw_sql("begin").execute(&mut *conn).await.unwrap();
    emit(
        &mut conn,
        Some(&"notifying".parse().unwrap()),
        &BackendState::Loading,
    )
    .await
    .unwrap();
    let refused = sqlx::raw_sql("prepare transaction 'plane-test-notify'")
        .execute(&mut *conn)
        .await
        .expect_err("PREPARE after NOTIFY");
    assert!(refused.to_string().contains("NOTIFY"), "{refused}");
    sqlx::raw_sql("rollback").execute(&mut *conn).await.ok();

    sqlx::raw_sql("commit prepared 'plane-test-held'")
        .execute(&mut *conn)
        .await
        .unwrap();
    figures(
        "prepared_transaction",
        &[
            ("held_open_through_restart", "1".to_string()),
            ("delivered_before_restart", delivered.len().to_string()),
            ("written_after_restart", AFTER.to_string()),
            ("received_after_restart", received_after.to_string()),
            ("old_events_delivered_again", old_again.to_string()),
            ("lagged", lagged.to_string()),
            (
                "two_phase_event_delivered_ms_after_commit",
                two_phase_ms.to_string(),
            ),
        ],
    );
    assert_eq!(lagged, 0);
    assert_eq!(old_again, 0, "old events delivered again after the restart");
    assert_eq!(received_after as usize, AFTER);
}
