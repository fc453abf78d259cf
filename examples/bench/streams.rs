//! Commit-to-`status_stream` delivery latency, beside a plain LISTEN connection receiving the
//! seed's NOTIFY.

use crate::common::*;
use crate::writers::seed_update_state;
use futures_util::StreamExt;
use plane_db::types::{BackendName, BackendState, BackendStatus};
use plane_db::PlaneDatabase;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a stream consumer reports: (backend index, status, when it was received).
pub type Receipt = (u32, i32, Instant);

/// Opens `backend`'s status stream and spawns a task that consumes it (as an SSE handler
/// would), reporting every entry. Returns once the stream is open.
pub async fn open_stream(
    db: &PlaneDatabase,
    backend: &BackendName,
    index: u32,
    tx: mpsc::UnboundedSender<Receipt>,
) -> R<()> {
    let stream = db.backend().status_stream(backend).await?;
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(entry) = stream.next().await {
            if tx
                .send((index, entry.status.as_int(), Instant::now()))
                .is_err()
            {
                break;
            }
        }
    });
    Ok(())
}

/// One change to make and time: (backend index, backend, new state).
pub type Change = (u32, BackendName, BackendState);

/// How to apply the changes.
#[derive(Clone, Copy)]
pub enum Pace {
    /// One at a time, each waiting for its delivery before the next (one writer, idle bus).
    Sequential,
    /// Started at this many per second, whatever the previous ones are doing.
    PerSecond(f64),
}

/// Applies the changes with `write` and returns, for each, the time from the write's return
/// (its commit, as the writer sees it) to the receipt. A receipt that arrived before the
/// write returned counts as zero.
pub async fn timed_changes<F, Fut>(
    changes: Vec<Change>,
    pace: Pace,
    rx: &mut mpsc::UnboundedReceiver<Receipt>,
    write: F,
) -> R<Vec<Duration>>
where
    F: Fn(Change) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R<()>> + Send + 'static,
{
    let n = changes.len();
    let committed: Arc<Mutex<HashMap<(u32, i32), Instant>>> = Arc::default();
    let mut received: HashMap<(u32, i32), Instant> = HashMap::new();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, change) in changes.into_iter().enumerate() {
        let key = (change.0, change.2.status().as_int());
        match pace {
            Pace::Sequential => {
                write(change).await?;
                committed
                    .lock()
                    .map_err(|_| "poisoned")?
                    .insert(key, Instant::now());
                while !received.contains_key(&key) {
                    let (i, s, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                        .await?
                        .ok_or("streams ended")?;
                    received.insert((i, s), at);
                }
            }
            Pace::PerSecond(rate) => {
                tokio::time::sleep_until((start + Duration::from_secs_f64(k as f64 / rate)).into())
                    .await;
                let write = write.clone();
                let committed = committed.clone();
                tasks.push(tokio::spawn(async move {
                    write(change).await?;
                    committed
                        .lock()
                        .map_err(|_| "poisoned")?
                        .insert(key, Instant::now());
                    R::Ok(())
                }));
                while let Ok((i, s, at)) = rx.try_recv() {
                    received.insert((i, s), at);
                }
            }
        }
    }
    for t in tasks {
        t.await??;
    }
    let wait_until = Instant::now() + Duration::from_secs(20);
    while received.len() < n {
        let left = wait_until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((i, s, at))) => {
                received.insert((i, s), at);
            }
            _ => break,
        }
    }
    let committed = committed.lock().map_err(|_| "poisoned")?;
    let mut latencies = Vec::with_capacity(n);
    let mut missing = 0;
    for (key, at) in committed.iter() {
        match received.get(key) {
            Some(got) => latencies.push(got.saturating_duration_since(*at)),
            None => missing += 1,
        }
    }
    if missing > 0 {
        return Err(format!("{missing} of {n} changes were not delivered within 20 s").into());
    }
    latencies.sort();
    Ok(latencies)
}

/// The baseline: a plain LISTEN connection receiving the seed's NOTIFY (payload: the event),
/// sent by the seed's `update_state` transaction. Reports (index, status, received).
pub async fn raw_listener(env: &Env, channel: &str) -> R<mpsc::UnboundedReceiver<Receipt>> {
    let mut listener = PgListener::connect_with(&env.pool).await?;
    listener.listen(channel).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            let at = Instant::now();
            // The payload is the seed's JSON event; the bench's keys end in the index.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(n.payload()) else {
                continue;
            };
            let index = v["key"]
                .as_str()
                .and_then(|k| k.rsplit('-').next())
                .and_then(|i| i.parse::<u32>().ok());
            let status =
                serde_json::from_value::<BackendStatus>(v["payload"]["status"].clone()).ok();
            if let (Some(index), Some(status)) = (index, status) {
                if tx.send((index, status.as_int(), at)).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

/// Changes moving backends `{prefix}{1..=n}` through their lifecycle, round-robin over the
/// backends (so a stream gets at most one change per `n` changes).
pub fn lifecycle_changes(prefix: &str, n: u32) -> R<Vec<Change>> {
    let mut changes = Vec::new();
    for state in lifecycle() {
        for i in 1..=n {
            changes.push((
                i,
                BackendName::try_from(format!("{prefix}{i}"))?,
                state.clone(),
            ));
        }
    }
    Ok(changes)
}

/// Writes a change through `update_state`.
pub fn via_update_state(db: PlaneDatabase) -> impl Fn(Change) -> BoxFut + Clone + Send {
    move |(_, backend, state)| {
        let db = db.clone();
        Box::pin(async move {
            if !db.backend().update_state(&backend, &state).await? {
                return Err(format!("transition refused for {backend}").into());
            }
            Ok(())
        })
    }
}

/// Writes a change with the seed's statements and NOTIFY on `channel`.
pub fn via_seed(env: &Env, channel: &'static str) -> impl Fn(Change) -> BoxFut + Clone + Send {
    let pool = env.pool.clone();
    move |(_, backend, state)| {
        let pool = pool.clone();
        Box::pin(async move {
            if !seed_update_state(&pool, backend.as_str(), &state, Some(channel)).await? {
                return Err(format!("transition refused for {backend}").into());
            }
            Ok(())
        })
    }
}

pub type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = R<()>> + Send>>;

pub async fn delivery(bench: &mut Bench) -> R<()> {
    let env = Env::new(1).await?;
    let drone = env.drones[0].0;
    let n_seq: u32 = bench.pick(300, 20);
    let n_rate: u32 = bench.pick(500, 50);
    let rate_secs = bench.pick(3.0, 0.5);
    for (prefix, n) in [
        ("ba-seq-", n_seq),
        ("ba-seqraw-", n_seq),
        ("ba-rate-", n_rate),
        ("ba-rateraw-", n_rate),
    ] {
        BulkBackends {
            prefix,
            n: i64::from(n),
            drone,
            state: BackendState::Scheduled,
            age_secs: 0.0,
            key_expires_in_secs: None,
            allowed_idle_seconds: None,
        }
        .insert(&env)
        .await?;
    }
    analyze(&env.pool).await?;

    // Streams for the plane-db runs; the initial `scheduled` entries are drained.
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (prefix, n) in [("ba-seq-", n_seq), ("ba-rate-", n_rate)] {
        for i in 1..=n {
            let name = BackendName::try_from(format!("{prefix}{i}"))?;
            open_stream(&env.db, &name, i, tx.clone()).await?;
        }
    }
    for _ in 0..(n_seq + n_rate) {
        rx.recv().await.ok_or("streams ended")?;
    }
    let mut raw_rx = raw_listener(&env, "bench_raw").await?;
    warm_up(&env).await?;

    bench.heading("commit-to-status_stream delivery");
    // One writer, one change at a time.
    let ours = timed_changes(
        lifecycle_changes("ba-seq-", n_seq)?,
        Pace::Sequential,
        &mut rx,
        via_update_state(env.db.clone()),
    )
    .await?;
    let raw = timed_changes(
        lifecycle_changes("ba-seqraw-", n_seq)?,
        Pace::Sequential,
        &mut raw_rx,
        via_seed(&env, "bench_raw"),
    )
    .await?;
    for (q, name, target) in [(0.5, "p50", None), (0.99, "p99", Some(2.0))] {
        let (a, b) = (pct(&ours, q), pct(&raw, q));
        bench.row(
            format!("delivery {name}, 1 writer ({} changes)", ours.len()),
            ms(a),
            "plain LISTEN, seed NOTIFY",
            ms(b),
            ratio(a.as_secs_f64(), b.as_secs_f64()),
            match target {
                Some(t) => Check::Target {
                    target: format!("<= {t} ms"),
                    ok: a.as_secs_f64() * 1e3 <= t,
                },
                None => Check::None,
            },
        );
    }

    // 1,000 changes/s, spread over many streams.
    let total = (1000.0 * rate_secs) as usize;
    let mut changes = lifecycle_changes("ba-rate-", n_rate)?;
    changes.truncate(total);
    let ours = timed_changes(
        changes,
        Pace::PerSecond(1000.0),
        &mut rx,
        via_update_state(env.db.clone()),
    )
    .await?;
    let mut changes = lifecycle_changes("ba-rateraw-", n_rate)?;
    changes.truncate(total);
    let raw = timed_changes(
        changes,
        Pace::PerSecond(1000.0),
        &mut raw_rx,
        via_seed(&env, "bench_raw"),
    )
    .await?;
    for (q, name, target) in [(0.5, "p50", None), (0.99, "p99", Some(5.0))] {
        let (a, b) = (pct(&ours, q), pct(&raw, q));
        bench.row(
            format!(
                "delivery {name}, 1,000 changes/s ({} changes, {n_rate} streams)",
                ours.len()
            ),
            ms(a),
            "plain LISTEN, seed NOTIFY",
            ms(b),
            ratio(a.as_secs_f64(), b.as_secs_f64()),
            match target {
                Some(t) => Check::Target {
                    target: format!("<= {t} ms"),
                    ok: a.as_secs_f64() * 1e3 <= t,
                },
                None => Check::None,
            },
        );
    }
    drop(rx);
    env.finish().await
}

/// The baseline for the bus read: the read statement as it was before its plan was fixed,
/// frozen here to measure the fix against (not a copy kept in step: the library's current
/// statement is run through `plane_db::testing::bench::bus_read`). With `order by id …
/// limit` and an open `xid` range, the generic plan walked the primary key through the whole
/// `event` table.
const READ_BEFORE_FIX: &str = r#"
    select s.snap::text, e.id
    from (select coalesce($2::text::pg_snapshot, pg_current_snapshot()) as snap,
                 $1::text::pg_snapshot as prev) s
    left join lateral (
        select id, kind, key, created_at, data from event
        where (xid >= pg_snapshot_xmax(s.prev)
               or xid = any(array(select pg_snapshot_xip(s.prev))))
          and pg_visible_in_snapshot(xid, s.snap)
          and id > $3
        order by id
        limit $4
    ) e on true
    order by e.id
"#;

/// Which bus read statement to run.
#[derive(Clone, Copy)]
enum BusRead {
    /// The library's, through the hidden hook.
    Library,
    /// [`READ_BEFORE_FIX`].
    BeforeFix,
}

/// One bus read returning one new event, on the event table the writers filled (every
/// event from its own transaction, as in production), as a prepared statement run 30 times
/// on one connection so that Postgres chooses custom or generic plans as it does in the bus:
/// the median of the last 20 runs, the library's statement against the one before the fix.
pub async fn bus_read(bench: &mut Bench, env: &Env) -> R<()> {
    sqlx::query("analyze event").execute(&env.pool).await?;
    let events: i64 = sqlx::query_scalar("select count(*) from event")
        .fetch_one(&env.pool)
        .await?;
    let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(&env.pool)
        .await?;
    let new_id: i64 = sqlx::query_scalar(
        "insert into event (kind, key, data) values ('backend_state', 'ba-new', '{}') returning id",
    )
    .fetch_one(&env.pool)
    .await?;
    let mut medians = Vec::new();
    for statement in [BusRead::BeforeFix, BusRead::Library] {
        let mut conn = env.pool.acquire().await?;
        let mut samples = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let ids: Vec<i64> = match statement {
                BusRead::Library => {
                    plane_db::testing::bench::bus_read(&mut conn, &prev, 1000).await?
                }
                BusRead::BeforeFix => {
                    let rows: Vec<(String, Option<i64>)> = sqlx::query_as(READ_BEFORE_FIX)
                        .bind(&prev)
                        .bind(None::<String>)
                        .bind(0_i64)
                        .bind(1000_i64)
                        .fetch_all(&mut *conn)
                        .await?;
                    rows.into_iter().filter_map(|(_, id)| id).collect()
                }
            };
            samples.push(t.elapsed());
            if ids != [new_id] {
                return Err(format!("bus read returned {ids:?}, expected [{new_id}]").into());
            }
        }
        let mut last = samples.split_off(10);
        last.sort();
        medians.push(pct(&last, 0.5));
    }
    bench.row(
        format!(
            "bus read of 1 new event, {} events in the table (optimisation)",
            count(events as u64)
        ),
        ms(medians[1]),
        "before: order by id, open xid range",
        ms(medians[0]),
        ratio(medians[1].as_secs_f64(), medians[0].as_secs_f64()),
        Check::None,
    );
    Ok(())
}

/// Prepares the writers' statements on every pooled connection (as in a controller that has
/// run for a while) by running `update_state` and the seed's statements 48 at a time, so that
/// first-use statement preparation does not land in the measured tail.
pub async fn warm_up(env: &Env) -> R<()> {
    let n = 96_u32;
    for prefix in ["ba-warm-", "ba-warmraw-"] {
        BulkBackends {
            prefix,
            n: i64::from(n),
            drone: env.drones[0].0,
            state: BackendState::Scheduled,
            age_secs: 0.0,
            key_expires_in_secs: None,
            allowed_idle_seconds: None,
        }
        .insert(env)
        .await?;
    }
    for state in lifecycle() {
        let mut tasks = Vec::new();
        for i in 1..=n {
            let db = env.db.clone();
            let pool = env.pool.clone();
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                let name = BackendName::try_from(format!("ba-warm-{i}"))?;
                db.backend().update_state(&name, &state).await?;
                seed_update_state(
                    &pool,
                    &format!("ba-warmraw-{i}"),
                    &state,
                    Some("bench_warm"),
                )
                .await?;
                R::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    Ok(())
}
