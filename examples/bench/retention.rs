//! Retention by partitions (issue 23 item 4): a writer's `update_state` tail while
//! `run_cleanup` drops history partitions and deletes the remaining rows, on the throwaway
//! server and on a durable one; one partition of old events detached and dropped against
//! deleting the same number of events row by row; and (section `first-run`, outside
//! `--quick`) the first cleanup of a database that was never cleaned, 10M history rows.

use crate::common::*;
use crate::hot::insert_tokens;
use plane_db::testing::bench::{drop_history_partition, HistoryTable};
use plane_db::testing::TestServer;
use plane_db::types::{BackendName, BackendState};
use plane_db::CleanupPhase;
use plane_db::{CleanupConfig, CleanupSummary, Config, PlaneDatabase};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the first partitions above the migration's end: a fresh database's sequences start
/// below 2,000,000, so the migration made `[MINVALUE, 2M)`, `[2M, 3M)`, `[3M, 4M)` and an
/// open-ended `[4M, MAXVALUE)`.
const FIRST_FREE: i64 = 4_000_000;

/// One `update_state` call: when it started and how long it took.
pub type Sample = (Instant, Duration);

/// One writer moving backends `{prefix}{1..=max}` through their lifecycle, one call at a
/// time, until `stop` is set or `limit` has passed. Returns its samples in call order.
pub fn spawn_writer(
    db: &PlaneDatabase,
    prefix: &'static str,
    next: &Arc<AtomicI64>,
    max: i64,
    stop: Arc<AtomicBool>,
    limit: Option<Duration>,
) -> tokio::task::JoinHandle<R<Vec<Sample>>> {
    let db = db.clone();
    let next = next.clone();
    tokio::spawn(async move {
        let states = lifecycle();
        let start = Instant::now();
        let mut samples = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed) + 1;
            if i > max {
                return Err("the writer ran out of backends".into());
            }
            let name = BackendName::try_from(format!("{prefix}{i}"))?;
            for state in &states {
                if stop.load(Ordering::Relaxed) || limit.is_some_and(|l| start.elapsed() >= l) {
                    return Ok(samples);
                }
                let t = Instant::now();
                db.backend().update_state(&name, state).await?;
                samples.push((t, t.elapsed()));
            }
        }
    })
}

/// Keeps one server process busy with work that touches no table (no lock, no I/O, no WAL)
/// until `burning` is cleared: what sharing the two cores alone does to a writer's tail.
pub fn spawn_burner(pool: &PgPool, burning: Arc<AtomicBool>) -> tokio::task::JoinHandle<R<()>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        while burning.load(Ordering::Relaxed) {
            sqlx::query("select sum(x) from generate_series(1, 2000000) x")
                .execute(&pool)
                .await?;
        }
        Ok(())
    })
}

/// The latencies of `samples`, sorted.
fn sorted(samples: &[Sample]) -> Vec<Duration> {
    let mut d: Vec<Duration> = samples.iter().map(|(_, d)| *d).collect();
    d.sort();
    d
}

/// The samples whose call started in `[from, to)`, sorted.
fn between(samples: &[Sample], from: Instant, to: Instant) -> Vec<Duration> {
    let within: Vec<Sample> = samples
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .copied()
        .collect();
    sorted(&within)
}

async fn setval(pool: &PgPool, sequence: &str, value: i64) -> R<()> {
    sqlx::query("select setval($1::text::regclass, $2)")
        .bind(sequence)
        .bind(value)
        .execute(pool)
        .await?;
    Ok(())
}

async fn last_value(pool: &PgPool, sequence: &str) -> R<i64> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("select pg_sequence_last_value($1::text::regclass)")
            .bind(sequence)
            .fetch_one(pool)
            .await?
            .unwrap_or(0),
    )
}

/// Moves `sequence` up to the end of the partition (of `rows` ids from [`FIRST_FREE`]) its
/// last id is in, so that every partition holding loaded rows is wholly handed out and the
/// writers' rows go to the next ones.
async fn to_partition_end(pool: &PgPool, sequence: &str, rows: i64) -> R<()> {
    let last = last_value(pool, sequence).await?;
    let used = (last + 1 - FIRST_FREE).max(0);
    let end = FIRST_FREE + (used + rows - 1) / rows * rows;
    if end - 1 > last {
        setval(pool, sequence, end - 1).await?;
    }
    Ok(())
}

/// `n` events of kind `backend_state`, keyed by backend, written `age_secs` ago, with ids
/// from the sequence, in one transaction that defers the wake-up (a bulk load, not writes to
/// deliver). Their `xid`s are spread over the transaction ids before the loading one, as
/// events written one transaction at a time would have them: with one `xid` for all, the
/// statistics would make the bus's reads of recent transactions look unselective.
pub async fn insert_events(pool: &PgPool, n: i64, age_secs: f64) -> R<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("set local plane.event_wake = 'deferred'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        r#"
        insert into event (kind, key, created_at, xid, data)
        select 'backend_state', 'ba-old-' || (i % 100000),
               now() - make_interval(secs => $2),
               (3 + (i - 1) * (pg_current_xact_id()::text::bigint - 3) / $1)::text::xid8,
               jsonb_build_object('backend', 'ba-old-' || (i % 100000),
                                  'state', '{"status": "ready", "address": "10.0.0.7:8080"}'::jsonb)
        from generate_series(1, $1::bigint) i
        "#,
    )
    .bind(n)
    .bind(age_secs)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `n` terminated backends `{prefix}{i}` whose status was set `age_secs` ago, each with 7
/// history rows (scheduled, then the six transitions of [`lifecycle`]), and optionally an
/// expired token, an acknowledged action and an expired key each.
pub async fn insert_old_backends(
    env: &Env,
    prefix: &str,
    n: i64,
    age_secs: f64,
    with_extras: bool,
) -> R<()> {
    BulkBackends {
        prefix,
        n,
        drone: env.drones[0].0,
        state: lifecycle()[5].clone(),
        age_secs,
        key_expires_in_secs: with_extras.then_some(-age_secs + 86_400.0),
        allowed_idle_seconds: None,
    }
    .insert_without_history(env)
    .await?;
    // Scheduled, then the six transitions of the lifecycle, in order (ids follow the sort).
    let mut states = vec![serde_json::to_value(BackendState::Scheduled)?];
    for state in lifecycle() {
        states.push(serde_json::to_value(state)?);
    }
    sqlx::query(
        r#"
        insert into backend_state (backend_id, state, created_at)
        select $1 || i, (($2::jsonb) -> (s - 1)::int), now() - make_interval(secs => $3)
        from generate_series(1, $4::bigint) i, generate_series(1, 7) s
        order by i, s
        "#,
    )
    .bind(prefix)
    .bind(serde_json::Value::Array(states))
    .bind(age_secs)
    .bind(n)
    .execute(&env.pool)
    .await?;
    if with_extras {
        insert_tokens(
            env,
            &format!("{prefix}tok-"),
            prefix,
            n,
            -age_secs + 86_400.0,
        )
        .await?;
        sqlx::query(
            r#"
            insert into backend_action (id, backend_id, drone_id, action, created_at, acked_at)
            select 'ak-' || $1 || i, $1 || i, $2,
                   '{"Terminate": {"kind": "soft", "reason": "swept"}}',
                   now() - make_interval(secs => $3), now() - make_interval(secs => $3)
            from generate_series(1, $4::bigint) i
            "#,
        )
        .bind(prefix)
        .bind(env.drones[0].0.as_i32())
        .bind(age_secs)
        .bind(n)
        .execute(&env.pool)
        .await?;
    }
    Ok(())
}

/// Backends for the writers (`ba-wr-…`, scheduled) and live backends with live tokens and
/// keys, which cleanup must leave alone.
async fn insert_current(env: &Env, writers: i64, live: i64) -> R<()> {
    for (prefix, n, state) in [
        ("ba-wr-", writers, BackendState::Scheduled),
        ("ba-live-", live, BackendState::Ready { address: address() }),
    ] {
        BulkBackends {
            prefix,
            n,
            drone: env.drones[0].0,
            state,
            age_secs: 0.0,
            key_expires_in_secs: Some(3600.0),
            allowed_idle_seconds: None,
        }
        .insert(env)
        .await?;
    }
    insert_tokens(env, "live-tok-", "ba-live-", live, 86_400.0).await?;
    Ok(())
}

/// The events the set-up wrote (registrations, heartbeats) as old as the loaded history
/// that follows them, as in a database that has been running: otherwise these few recent
/// events, with the lowest ids, would keep the first partition from being retired.
async fn age_setup_events(env: &Env) -> R<()> {
    sqlx::query("update event set created_at = created_at - interval '10 days'")
        .execute(&env.pool)
        .await?;
    Ok(())
}

async fn checkpoint(pool: &PgPool) -> R<()> {
    sqlx::query("checkpoint").execute(pool).await?;
    Ok(())
}

pub async fn retention(bench: &mut Bench) -> R<()> {
    let t = Instant::now();
    let durable = tokio::task::spawn_blocking(plane_db::testing::private_durable_server).await??;
    println!(
        "   durable server (fsync on) started in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (label, server) in [
        ("throwaway server", None),
        ("durable server (fsync on)", Some(&durable)),
    ] {
        writers_during_retention(bench, label, server, Backlog::Full).await?;
    }
    // The same on a smaller backlog, paced: how the writer's tail follows
    // CleanupConfig::busy_share (1.0 is the unpaced run again, on this backlog). A share of
    // 0.01 takes about 30 s here.
    let shares: &[f64] = if bench.quick {
        &[0.1]
    } else {
        &[1.0, 0.1, 0.01]
    };
    for &share in shares {
        writers_during_retention(
            bench,
            "durable server (fsync on)",
            Some(&durable),
            Backlog::Paced(share),
        )
        .await?;
    }
    for (label, server) in [
        ("throwaway server", None),
        ("durable server (fsync on)", Some(&durable)),
    ] {
        partition_drop(bench, label, server).await?;
    }
    drop(durable);
    Ok(())
}

/// Section `first-run` (outside `--quick`): (c) on the throwaway server, then on a durable
/// one.
pub async fn first_runs(bench: &mut Bench) -> R<()> {
    if bench.quick {
        println!("   (skipped in --quick: 10M rows)");
        return Ok(());
    }
    first_run(bench, "throwaway server", None).await?;
    let durable = tokio::task::spawn_blocking(plane_db::testing::private_durable_server).await??;
    first_run(bench, "durable server (fsync on)", Some(&durable)).await?;
    drop(durable);
    Ok(())
}

async fn env_on(server: Option<&TestServer>) -> R<Env> {
    match server {
        Some(server) => Env::on_server(server, 1, Config::default()).await,
        None => Env::new(1).await,
    }
}

/// The writer idle, then beside a burner, then during `run`: returns the three sample sets
/// and, for the third, the progress marks and the run's result.
struct Measured {
    idle: Vec<Sample>,
    busy: Vec<Sample>,
    during: Vec<Sample>,
    marks: Vec<(Instant, CleanupPhase)>,
    started: Instant,
    took: Duration,
    summary: CleanupSummary,
    /// WAL written on the server while the run went on (the writer's included).
    wal_bytes: f64,
}

async fn measure(
    env: &Env,
    writer_backends: i64,
    config: &CleanupConfig,
    idle_for: Duration,
) -> R<Measured> {
    let next = Arc::new(AtomicI64::new(0));
    let never = || Arc::new(AtomicBool::new(false));
    let idle = spawn_writer(
        &env.db,
        "ba-wr-",
        &next,
        writer_backends,
        never(),
        Some(idle_for),
    )
    .await??;
    let burning = Arc::new(AtomicBool::new(true));
    let burner = spawn_burner(&env.pool, burning.clone());
    let busy = spawn_writer(
        &env.db,
        "ba-wr-",
        &next,
        writer_backends,
        never(),
        Some(idle_for),
    )
    .await??;
    burning.store(false, Ordering::Relaxed);
    burner.await??;

    let stop = never();
    let during = spawn_writer(
        &env.db,
        "ba-wr-",
        &next,
        writer_backends,
        stop.clone(),
        None,
    );
    let mut marks = Vec::new();
    let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&env.pool)
        .await?;
    let started = Instant::now();
    let summary = env
        .db
        .run_cleanup_with_progress(config, |p| marks.push((Instant::now(), p.phase)))
        .await?;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = during.await??;
    let wal: f64 = sqlx::query_scalar(
        "select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
    )
    .bind(&lsn)
    .fetch_one(&env.pool)
    .await?;
    Ok(Measured {
        idle,
        busy,
        during,
        marks,
        started,
        took,
        summary,
        wal_bytes: wal,
    })
}

/// The rows every writer measurement prints: the whole run and its partition-drop window
/// against idle and against one core busy.
fn writer_rows(bench: &mut Bench, m: &Measured, target: WriterTarget) {
    bench.row(
        "  WAL written during the run (the writer's included)",
        format!("{:.0} MB", m.wal_bytes / 1e6),
        "",
        "",
        format!("{:.1} MB/s", m.wal_bytes / 1e6 / m.took.as_secs_f64()),
        Check::None,
    );
    let idle = sorted(&m.idle);
    let busy = sorted(&m.busy);
    let during = sorted(&m.during);
    let (a, i, b) = (pct(&during, 0.99), pct(&idle, 0.99), pct(&busy, 0.99));
    bench.row(
        format!(
            "update_state p99 during retention ({} changes)",
            during.len()
        ),
        ms(a),
        format!("idle, just before ({} changes)", idle.len()),
        ms(i),
        ratio(a.as_secs_f64(), i.as_secs_f64()),
        match target {
            WriterTarget::Idle => Check::Target {
                target: "<= 1.2x idle".into(),
                ok: a.as_secs_f64() <= 1.2 * i.as_secs_f64(),
            },
            WriterTarget::Busy => Check::None,
        },
    );
    bench.row(
        format!(
            "  update_state p99, one core busy with a query on no table ({} changes)",
            busy.len()
        ),
        ms(b),
        "idle, just before",
        ms(i),
        ratio(b.as_secs_f64(), i.as_secs_f64()),
        Check::None,
    );
    bench.row(
        "update_state p99 during retention, against one core busy",
        ms(a),
        "one core busy with a query on no table",
        ms(b),
        ratio(a.as_secs_f64(), b.as_secs_f64()),
        match target {
            WriterTarget::Busy => Check::Target {
                target: "<= 1.5x one core busy".into(),
                ok: a.as_secs_f64() <= 1.5 * b.as_secs_f64(),
            },
            WriterTarget::Idle => Check::None,
        },
    );
    // The partition phase: from the backends phase's last batch to the last partition
    // dropped (the listing of retired partitions included).
    let backends_done = m
        .marks
        .iter()
        .filter(|(_, p)| *p == CleanupPhase::Backends)
        .map(|(at, _)| *at)
        .next_back()
        .unwrap_or(m.started);
    let drops_done = m
        .marks
        .iter()
        .filter(|(_, p)| *p == CleanupPhase::Events)
        .map(|(at, _)| *at)
        .next_back();
    if let Some(drops_done) = drops_done {
        let window = between(&m.during, backends_done, drops_done);
        let rows = between(&m.during, m.started, backends_done);
        let d = pct(&window, 0.99);
        bench.row(
            format!(
                "  update_state p99 while partitions are dropped ({:.0} ms, {} changes)",
                (drops_done - backends_done).as_secs_f64() * 1e3,
                window.len()
            ),
            ms(d),
            "idle, just before",
            ms(i),
            ratio(d.as_secs_f64(), i.as_secs_f64()),
            Check::None,
        );
        let r = pct(&rows, 0.99);
        bench.row(
            format!(
                "  update_state p99 while old backends are deleted row by row ({:.1} s, {} changes)",
                (backends_done - m.started).as_secs_f64(),
                rows.len()
            ),
            ms(r),
            "idle, just before",
            ms(i),
            ratio(r.as_secs_f64(), i.as_secs_f64()),
            Check::None,
        );
    }
    let (a, i) = (pct(&during, 0.5), pct(&idle, 0.5));
    bench.row(
        "update_state p50 during retention",
        ms(a),
        "idle, just before",
        ms(i),
        ratio(a.as_secs_f64(), i.as_secs_f64()),
        Check::None,
    );
}

#[derive(Clone, Copy)]
enum WriterTarget {
    /// Durable server: at most 1.2x idle.
    Idle,
    /// Throwaway server: at most 1.5x one core busy.
    Busy,
}

impl WriterTarget {
    /// The target for a run on `server` (`None`: the throwaway server).
    fn on(server: Option<&TestServer>) -> Self {
        if server.is_some() {
            WriterTarget::Idle
        } else {
            WriterTarget::Busy
        }
    }
}

/// What [`writers_during_retention`] loads for cleanup, and how cleanup runs.
#[derive(Clone, Copy)]
enum Backlog {
    /// 100,000 old backends and 3 event partitions of 500,000 events; cleanup unpaced.
    Full,
    /// 2,000 old backends (batches of 250) and 3 event partitions of 50,000 events (about
    /// half a second of cleanup's work here), cleanup paced with this `busy_share`.
    Paced(f64),
}

/// (a): old events in whole partitions, old terminated backends whose history fills other
/// partitions; one writer idle, beside a burner, then during `run_cleanup`.
async fn writers_during_retention(
    bench: &mut Bench,
    label: &str,
    server: Option<&TestServer>,
    backlog: Backlog,
) -> R<()> {
    let (rows, old, batch_size, busy_share): (i64, i64, i32, f64) = match backlog {
        Backlog::Full => (
            bench.pick(500_000, 5_000),
            bench.pick(100_000, 1_000),
            1000,
            1.0,
        ),
        Backlog::Paced(share) => (
            bench.pick(50_000, 5_000),
            bench.pick(2_000, 500),
            250,
            share,
        ),
    };
    let event_partitions = 3;
    let writer_backends: i64 = bench.pick(40_000, 2_000);
    let live: i64 = bench.pick(10_000, 500);
    let idle_for = bench.pick(Duration::from_secs(5), Duration::from_millis(500));
    let config = CleanupConfig {
        partition_rows: rows,
        partitions_ahead: 4,
        batch_size,
        busy_share,
        ..CleanupConfig::default()
    };
    let env = env_on(server).await?;
    age_setup_events(&env).await?;
    let t = Instant::now();
    // Partitions of `rows` ids from FIRST_FREE on, the migration's first three empty and
    // wholly handed out (retention drops them too).
    for sequence in ["event_id_seq", "backend_state_id_seq"] {
        setval(&env.pool, sequence, FIRST_FREE - 1).await?;
    }
    env.db.maintain_partitions(&config).await?;
    insert_events(&env.pool, event_partitions * rows, 10.0 * 86_400.0).await?;
    insert_old_backends(&env, "ba-old-", old, 10.0 * 86_400.0, true).await?;
    for sequence in ["event_id_seq", "backend_state_id_seq"] {
        to_partition_end(&env.pool, sequence, rows).await?;
    }
    env.db.maintain_partitions(&config).await?;
    insert_current(&env, writer_backends, live).await?;
    analyze(&env.pool).await?;
    checkpoint(&env.pool).await?;
    println!("   {label}: loaded in {:.1} s", t.elapsed().as_secs_f64());

    let m = measure(&env, writer_backends, &config, idle_for).await?;
    let s = &m.summary;
    println!(
        "   {label}: retention {s:?} in {:.2} s",
        m.took.as_secs_f64()
    );
    let events = u64::try_from(event_partitions * rows)?;
    // The three full event partitions and the migration's (the first holds the set-up's
    // few events, aged with the rest); the old backends' history partitions and the
    // migration's.
    if s.partitions.events_dropped < events
        || s.partitions.event_partitions_dropped < event_partitions as u64
        || s.backends.backends != u64::try_from(old)?
        || s.partitions.state_partitions_dropped < 4
    {
        return Err(format!("retention did not do what was loaded for it: {s:?}").into());
    }
    let history = s.backends.states;
    let deleted_rows =
        s.backends.backends + history + s.backends.tokens + s.backends.actions + s.backends.keys;
    let paced = match backlog {
        Backlog::Full => String::new(),
        Backlog::Paced(share) => format!("paced with busy_share {share}, "),
    };
    bench.heading(&format!(
        "retention on the {label}, {paced}run_cleanup dropping {} event partitions of {} old events ({} events) and {} emptied backend_state partitions, after deleting {} old backends row by row ({} rows: {} history, tokens, actions, keys); one writer",
        s.partitions.event_partitions_dropped,
        count(u64::try_from(rows)?),
        count(s.partitions.events_dropped),
        s.partitions.state_partitions_dropped,
        count(s.backends.backends),
        count(deleted_rows),
        count(history),
    ));
    bench.row(
        "retention run (run_cleanup) total time",
        format!("{:.2} s", m.took.as_secs_f64()),
        "",
        "",
        "",
        Check::None,
    );
    writer_rows(bench, &m, WriterTarget::on(server));
    env.finish().await
}

/// (b): partitions of `n` old events detached and dropped one after the other (the median
/// of three, with its two steps), against deleting `n` events of the same shape row by row
/// (`cleanup_events`, batches of 1,000) from a partition of their own.
async fn partition_drop(bench: &mut Bench, label: &str, server: Option<&TestServer>) -> R<()> {
    let n: i64 = bench.pick(1_000_000, 10_000);
    let drops = 3;
    let config = CleanupConfig {
        partition_rows: n,
        partitions_ahead: drops + 2,
        ..CleanupConfig::default()
    };
    let env = env_on(server).await?;
    let t = Instant::now();
    setval(&env.pool, "event_id_seq", FIRST_FREE - 1).await?;
    env.db.maintain_partitions(&config).await?;
    // [4M, 4M + 3n): 10 days old, to be dropped; the next n: 20 days old, to be deleted row
    // by row (cleanup_events with a 15-day horizon leaves the others alone).
    for _ in 0..drops {
        insert_events(&env.pool, n, 10.0 * 86_400.0).await?;
    }
    insert_events(&env.pool, n, 20.0 * 86_400.0).await?;
    env.db.maintain_partitions(&config).await?;
    analyze(&env.pool).await?;
    checkpoint(&env.pool).await?;
    println!(
        "   {label}: loaded {} events in {:.1} s",
        count((u64::from(drops) + 1) * n as u64),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let deleted = env
        .db
        .cleanup_events(Duration::from_secs(15 * 86_400), 1000)
        .await?;
    let row_by_row = t.elapsed();
    if deleted != n as u64 {
        return Err(format!("cleanup_events deleted {deleted} events, expected {n}").into());
    }
    checkpoint(&env.pool).await?;
    let mut times = Vec::new();
    for k in 0..i64::from(drops) {
        let partition = format!("event_p{}", FIRST_FREE + k * n);
        let rows: i64 = sqlx::query_scalar(&format!("select count(*) from {partition}"))
            .fetch_one(&env.pool)
            .await?;
        if rows != n {
            return Err(format!("{partition} holds {rows} events, expected {n}").into());
        }
        let (detach, drop) =
            drop_history_partition(&env.db, HistoryTable::Event, &partition).await?;
        println!(
            "   {label}: {partition}: detach {}, drop {}",
            ms(detach),
            ms(drop)
        );
        times.push((detach + drop, detach, drop));
    }
    times.sort();
    let (total, detach, drop) = times[times.len() / 2];
    bench.heading(&format!(
        "retention on the {label}: partitions of {} old events",
        count(n as u64)
    ));
    bench.row(
        format!(
            "detach (concurrently) and drop a partition of {} events (median of {drops}: {})",
            count(n as u64),
            times.iter().map(|t| ms(t.0)).collect::<Vec<_>>().join(", ")
        ),
        ms(total),
        "the same number of events deleted row by row (cleanup_events, batches of 1,000)",
        format!("{:.2} s", row_by_row.as_secs_f64()),
        ratio(total.as_secs_f64(), row_by_row.as_secs_f64()),
        Check::Target {
            target: "< 100 ms".into(),
            ok: total < Duration::from_millis(100),
        },
    );
    bench.row(
        "  of which DETACH PARTITION … CONCURRENTLY / DROP TABLE",
        format!("{} / {}", ms(detach), ms(drop)),
        "",
        "",
        "",
        Check::None,
    );
    env.finish().await
}

/// (c): the first `run_cleanup` of a database that was never cleaned and whose partitions
/// were never maintained: 5M old events and 714,286 old terminated backends with 7 history
/// rows each (10M history rows), written through the sequences as a fleet would have.
async fn first_run(bench: &mut Bench, label: &str, server: Option<&TestServer>) -> R<()> {
    let events: i64 = 5_000_000;
    let backends: i64 = 714_286;
    let writer_backends: i64 = 200_000;
    let env = env_on(server).await?;
    age_setup_events(&env).await?;
    let t = Instant::now();
    insert_events(&env.pool, events, 10.0 * 86_400.0).await?;
    insert_old_backends(&env, "ba-old-", backends, 10.0 * 86_400.0, false).await?;
    insert_current(&env, writer_backends, 10_000).await?;
    analyze(&env.pool).await?;
    checkpoint(&env.pool).await?;
    let history: i64 = sqlx::query_scalar(
        "select (select count(*) from event) + (select count(*) from backend_state)",
    )
    .fetch_one(&env.pool)
    .await?;
    println!(
        "   never cleaned: {} history rows loaded in {:.1} s",
        count(history as u64),
        t.elapsed().as_secs_f64()
    );
    let config = CleanupConfig::default();
    let m = measure(&env, writer_backends, &config, Duration::from_secs(5)).await?;
    let s = &m.summary;
    println!(
        "   never cleaned: first run {s:?} in {:.2} s",
        m.took.as_secs_f64()
    );
    let (events_left, states_left): (i64, i64) =
        sqlx::query_as("select (select count(*) from event), (select count(*) from backend_state)")
            .fetch_one(&env.pool)
            .await?;
    bench.heading(&format!(
        "first retention run on the {label}, a database never cleaned: {} history rows ({} events, {} history rows of {} old terminated backends), default CleanupConfig, partitions never maintained; one writer",
        count(history as u64),
        count(events as u64),
        count(7 * backends as u64),
        count(backends as u64),
    ));
    bench.row(
        "first run (run_cleanup) total time",
        format!("{:.1} s", m.took.as_secs_f64()),
        "",
        "",
        "",
        Check::Target {
            target: "finishes".into(),
            ok: true,
        },
    );
    bench.row(
        format!(
            "  dropped: {} event partitions ({} events), {} backend_state partitions; deleted {} backends, {} history rows; open-ended partitions split: {} (their old rows go once the split partition is wholly old)",
            s.partitions.event_partitions_dropped,
            count(s.partitions.events_dropped),
            s.partitions.state_partitions_dropped,
            count(s.backends.backends),
            count(s.backends.states),
            s.partitions.tails_split
        ),
        "",
        "left: events, history rows",
        format!("{} / {}", count(events_left as u64), count(states_left as u64)),
        "",
        Check::None,
    );
    writer_rows(bench, &m, WriterTarget::on(server));
    env.finish().await
}
