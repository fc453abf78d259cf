//! The bus run by an unprivileged application role, on a server where `pg_control_checkpoint()`
//! and `pg_walfile_name()` are revoked from PUBLIC (as hardened and managed servers may do),
//! through a clean restart and through transaction ids going back with a checkpoint taken
//! before the bus's first read on the new server.
//!
//! The second fault is the one a checkpoint-based floor got wrong: a floor taken from the
//! *latest* checkpoint lies above ids that the server reused before that checkpoint, and rows
//! written with them were skipped. The bus's floor now comes from what it has seen (see
//! `restart_floor` in `src/events/reader.rs`), so both must lose nothing and repeat nothing.

use crate::common::{drone, request};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::events::Lagged;
use plane_db::types::{BackendState, BackendStatus};
use plane_db::Config;
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Transaction ids burnt before the events, so that the counter can be moved back into them
/// without reusing the ids of the schema's own rows.
const BURN: usize = 1_500;
const BATCH: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_role_through_restart_and_reused_ids() {
    with_private_server("least_privilege", scenario).await;
}

/// A `backend_state` event for `key`; returns its id and transaction id.
const INSERT_EVENT: &str = "insert into event (kind, key, data)
    values ('backend_state', $1, '{\"status\":\"loading\"}')
    returning id, xid::text::bigint";

async fn insert_event(pool: &sqlx::PgPool, key: &str) -> i64 {
    let (id, _): (i64, i64) = sqlx::query_as(INSERT_EVENT)
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap();
    id
}

/// Collects the ids of every `backend_state` event the subscription delivers.
fn collect(mut sub: plane_db::events::Subscription<BackendState>) -> Arc<Mutex<(Vec<i64>, u64)>> {
    let got = Arc::new(Mutex::new((Vec::new(), 0)));
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            let mut g = g.lock().unwrap();
            match item {
                Ok(n) => g.0.push(n.id.unwrap()),
                Err(Lagged { missed }) => g.1 += missed,
            }
        }
    });
    got
}

/// Waits until every id in `expected` was delivered (or 30 s), then a little longer for
/// duplicates; returns (lost, duplicated, lagged).
async fn settle(got: &Mutex<(Vec<i64>, u64)>, expected: &[i64]) -> (usize, u32, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let count = |g: &(Vec<i64>, u64)| {
        let mut by_id: HashMap<i64, u32> = HashMap::new();
        for id in &g.0 {
            *by_id.entry(*id).or_default() += 1;
        }
        let lost = expected.iter().filter(|id| !by_id.contains_key(id)).count();
        let extra = g.0.iter().filter(|id| !expected.contains(id)).count() as u32;
        let duplicated = by_id.values().map(|n| n - 1).sum::<u32>() + extra;
        (lost, duplicated, g.1)
    };
    while Instant::now() < deadline && count(&got.lock().unwrap()).0 > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = count(&got.lock().unwrap());
    got.lock().unwrap().0.clear();
    result
}

async fn scenario(server: Arc<plane_db::testing::TestServer>, url: String) {
    // The schema belongs to the superuser that migrated it; the application role gets only
    // the rights it needs, and two functions are revoked from everyone.
    create_app_role(&url).await;
    let db = open(&app_url(&url), 8, Config::default()).await;
    let is_superuser: bool =
        sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        !is_superuser,
        "the application role must not be a superuser"
    );
    for function in [
        "pg_control_checkpoint()",
        "pg_walfile_name(pg_current_wal_lsn())",
    ] {
        let denied = sqlx::query(&format!("select {function}"))
            .execute(db.pool())
            .await
            .expect_err("the function is revoked");
        assert!(
            denied.to_string().contains("permission denied"),
            "{function}: {denied}"
        );
    }

    // A backend's life, written by the application role, watched on its status stream.
    drone(&db).await;
    let backend = db.connect(&request("lp")).await.unwrap().backend_id;
    let stream = db.backend().status_stream(&backend).await.unwrap();
    let stream = tokio::spawn(stream.map(|e| e.status).collect::<Vec<_>>());
    let got = collect(db.subscribe::<BackendState>().await.unwrap());

    let life = full_life();
    let (first_half, second_half) = life.split_at(3);
    // Events written by the application role, one transaction each; their ids.
    let write = |keys: Vec<String>| {
        let db = db.clone();
        async move {
            let mut ids = Vec::new();
            for key in keys {
                ids.push(insert_event(db.pool(), &key).await);
            }
            ids
        }
    };
    let keys = |prefix: &str| {
        (0..BATCH)
            .map(|i| format!("{prefix}-{i}"))
            .collect::<Vec<_>>()
    };

    let mut expected = Vec::new();
    for status in first_half {
        assert!(db
            .backend()
            .update_state(&backend, &state_for(*status))
            .await
            .unwrap());
    }
    expected.extend(
        table_event_ids(&db, "backend_state", Some(backend.as_str()))
            .await
            .into_iter()
            .skip(1),
    );
    expected.extend(write(keys("before")).await);
    let (lost_before, dup_before, lag_before) = settle(&got, &expected).await;

    // Fault 1: a clean restart.
    restart_server(&server).await;
    let mut expected = Vec::new();
    loop {
        // The pool reconnects by itself; retry until it answers.
        if db.health_check().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expected.extend(write(keys("restart")).await);
    let (lost_restart, dup_restart, lag_restart) = settle(&got, &expected).await;

    // Fault 2: transaction ids go back (ids the bus's cursor counts as finished are handed
    // out again, as crash recovery does with ids that left no trace in the WAL), and a
    // checkpoint is taken before the bus's first read on the new server. The application role
    // cannot log in meanwhile, so the bus's first read comes after both.
    // (Before the burn: a catalogue row written with an id that is reused would hide.)
    as_superuser(&url, &format!("alter role {APP_ROLE} nologin")).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let burn_start = next_xid(&mut conn).await;
    for _ in 0..BURN {
        next_xid(&mut conn).await;
    }
    conn.close().await.ok();
    // Let the bus take a snapshot past the burnt ids (it polls every second; its pooled
    // connections stay logged in).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let counter_before = next_xid(&mut conn).await;
    conn.close().await.ok();
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
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut reused = Vec::new();
    let mut reused_xids = Vec::new();
    for key in keys("reused") {
        let (id, xid): (i64, i64) = sqlx::query_as(INSERT_EVENT)
            .bind(&key)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        reused.push(id);
        reused_xids.push(xid);
    }
    sqlx::raw_sql("checkpoint")
        .execute(&mut conn)
        .await
        .unwrap();
    let checkpoint_next_xid: i64 = sqlx::query_scalar(
        "select (split_part(next_xid, ':', 1)::bigint << 32) + split_part(next_xid, ':', 2)::bigint
         from pg_control_checkpoint()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.ok();
    let max_reused = *reused_xids.iter().max().unwrap();
    assert!(
        max_reused < counter_before,
        "the ids were reused ({max_reused} >= {counter_before})"
    );
    assert!(
        checkpoint_next_xid > max_reused,
        "the checkpoint lies above the reused ids ({checkpoint_next_xid} <= {max_reused})"
    );
    as_superuser(&url, &format!("alter role {APP_ROLE} login")).await;
    let mut expected = reused.clone();
    // The rest of the backend's life, after the bus is back.
    let deadline = Instant::now() + Duration::from_secs(30);
    for status in second_half {
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                db.backend().update_state(&backend, &state_for(*status)),
            )
            .await;
            let Ok(attempt) = attempt else {
                panic!("update_state hung");
            };
            match attempt {
                Ok(accepted) => {
                    assert!(accepted, "{status} refused");
                    break;
                }
                Err(error) => {
                    assert!(Instant::now() < deadline, "{status}: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    }
    let after: Vec<i64> = table_event_ids(&db, "backend_state", Some(backend.as_str())).await;
    expected.extend(after.iter().rev().take(second_half.len()));
    let (lost_reused, dup_reused, lag_reused) = settle(&got, &expected).await;
    let statuses = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("the status stream ended")
        .unwrap();

    figures(
        "least_privilege",
        &[
            ("role_superuser", is_superuser.to_string()),
            ("before", format!("lost={lost_before} dup={dup_before}")),
            ("restart", format!("lost={lost_restart} dup={dup_restart}")),
            ("reused_ids_written", reused.len().to_string()),
            ("xid_went_back_by", (counter_before - reset_to).to_string()),
            (
                "checkpoint_above_reused_by",
                (checkpoint_next_xid - max_reused).to_string(),
            ),
            ("reused", format!("lost={lost_reused} dup={dup_reused}")),
            (
                "lagged",
                (lag_before + lag_restart + lag_reused).to_string(),
            ),
            ("status_stream", format!("{}/8", statuses.len())),
        ],
    );
    assert_eq!((lost_before, dup_before), (0, 0), "before any fault");
    assert_eq!((lost_restart, dup_restart), (0, 0), "across the restart");
    assert_eq!((lost_reused, dup_reused), (0, 0), "across the reused ids");
    assert_eq!(lag_before + lag_restart + lag_reused, 0);
    assert_eq!(
        statuses,
        BackendStatus::ALL.to_vec(),
        "status stream complete, in order"
    );
    db.pool().close().await;
}
