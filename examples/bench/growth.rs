//! Cost curves (issue 23 item 5): the hot operations' p50 and p99 with 10^4, 10^5, 10^6
//! (and, with `--growth-max 7`, 10^7) rows in each history table, every size in a database
//! of its own, the calls going round-robin over the sizes so that all see the same machine.
//! Prints a table and writes a plot (`docs/growth.svg`; `--quick` writes it under `target/`).

use crate::common::*;
use crate::hot::insert_tokens;
use crate::retention::{insert_events, insert_old_backends};
use futures_util::StreamExt;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectRequest;
use plane_db::testing::bench as hooks;
use plane_db::types::{BackendName, BackendState, BearerToken, KeyConfig};
use plane_db::CleanupConfig;
use plane_db::{Config, PlaneDatabase};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgConnection, Postgres};
use std::fmt::{self, Write as _};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::subscriber::Interest;
use tracing_subscriber::layer::Context;

/// The operations measured, in the order of the table and the plot.
const OPS: [&str; 7] = [
    "update_state",
    "connect",
    "route lookup (route_info_for_token)",
    "status stream's history read",
    "bus read of one new event",
    "termination_candidates",
    "cleanup (run_cleanup, nothing due)",
];

/// Operations on a request's or a write's path, judged against the 1.5x target; cleanup runs
/// in the background on one controller (its cost is shown, not judged).
fn is_hot(op: usize) -> bool {
    op < 6
}

/// Terminated backends each with this many history rows (and as many events).
const HISTORY_PER_BACKEND: i64 = 7;

/// Rows loaded per chunk: partitions are maintained between chunks, as the cleanup loop of a
/// running fleet keeps them.
const CHUNK: i64 = 1_000_000;

struct Size {
    n: i64,
    env: Env,
    /// Terminated backends with history: `ba-h{chunk}-{i}`, `(chunk, count)`.
    chunks: Vec<i64>,
    bus: PoolConnection<Postgres>,
    writer: (i64, usize),
    samples: Vec<Vec<Duration>>,
    /// The calls of the settled rounds (see [`SETTLE`]).
    settled: Vec<Vec<Duration>>,
}

async fn load(n: i64, writers: i64) -> R<Size> {
    let mut env = Env::new(1).await?;
    // A second drone for the backends the writer and connect create, so that the measured
    // drone's termination candidates stay the same 50.
    env.add_drone().await?;
    let config = CleanupConfig::default();
    let mut chunks = Vec::new();
    let mut loaded = 0;
    while loaded < n {
        let rows = CHUNK.min(n - loaded);
        let backends = (rows / HISTORY_PER_BACKEND).max(1);
        let prefix = format!("ba-h{}-", chunks.len());
        insert_old_backends(&env, &prefix, backends, 3600.0, false).await?;
        insert_tokens(
            &env,
            &format!("tok-h{}-", chunks.len()),
            &prefix,
            backends,
            86_400.0,
        )
        .await?;
        insert_events(&env.pool, rows, 3600.0).await?;
        env.db.maintain_partitions(&config).await?;
        chunks.push(backends);
        loaded += rows;
    }
    // The measured drone: 50 live backends idle past their allowance (termination
    // candidates) and 50 fresh ones whose tokens route.
    let drone = env.drones[0].0;
    for (prefix, age) in [("ba-idle-", 3600.0), ("ba-fresh-", 0.0)] {
        BulkBackends {
            prefix,
            n: 50,
            drone,
            state: BackendState::Ready { address: address() },
            age_secs: age,
            key_expires_in_secs: None,
            allowed_idle_seconds: Some(600),
        }
        .insert(&env)
        .await?;
    }
    insert_tokens(&env, "rt-", "ba-fresh-", 50, 86_400.0).await?;
    BulkBackends {
        prefix: "ba-wr-",
        n: writers,
        drone: env.drones[1].0,
        state: BackendState::Scheduled,
        age_secs: 0.0,
        key_expires_in_secs: None,
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    analyze(&env.pool).await?;
    sqlx::query("checkpoint").execute(&env.pool).await?;
    let bus = env.pool.acquire().await?;
    Ok(Size {
        n,
        env,
        chunks,
        bus,
        writer: (1, 0),
        samples: vec![Vec::new(); OPS.len()],
        settled: vec![Vec::new(); OPS.len()],
    })
}

/// What the calls of a size change as they go: the writer's next transition, the keys of
/// `connect`, the random picks.
struct Cursor<'a> {
    writer: &'a mut (i64, usize),
    chunks: &'a [i64],
    seed: &'a mut u64,
    k: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> u64 {
        *self.seed ^= *self.seed << 13;
        *self.seed ^= *self.seed >> 7;
        *self.seed ^= *self.seed << 17;
        *self.seed
    }
}

/// One call of operation `op` (an index into [`OPS`]) through `db`, the bus read on `bus`;
/// returns how long it took. `env`'s pool (never `db`'s) prepares what is not measured.
async fn call(
    op: usize,
    env: &Env,
    db: &PlaneDatabase,
    bus: &mut PgConnection,
    cur: &mut Cursor<'_>,
) -> R<Duration> {
    let t;
    match op {
        // update_state: the writer's next transition.
        0 => {
            let (i, s) = *cur.writer;
            let name = BackendName::try_from(format!("ba-wr-{i}"))?;
            let states = lifecycle();
            t = Instant::now();
            db.backend().update_state(&name, &states[s]).await?;
            *cur.writer = if s + 1 == states.len() {
                (i + 1, 0)
            } else {
                (i, s + 1)
            };
        }
        // connect: a new backend for a new key.
        1 => {
            let request = ConnectRequest {
                key: Some(KeyConfig {
                    name: format!("gk-{}", cur.k),
                    ..KeyConfig::default()
                }),
                spawn_config: Some(env.spawn_config()),
                user: Some("bench".into()),
                auth: serde_json::Map::new(),
            };
            t = Instant::now();
            let response = db.connect(&request).await?;
            if !response.spawned {
                return Err("connect did not spawn".into());
            }
        }
        // Route lookup of a live token.
        2 => {
            let token = BearerToken::from(format!("rt-{}", cur.next() % 50 + 1));
            t = Instant::now();
            let route = db.backend().route_info_for_token(&token).await?;
            if !matches!(route, RouteInfoResult::Available(_)) {
                return Err(format!("route lookup gave {route:?}").into());
            }
        }
        // A status stream of a terminated backend with history: its history, then the end.
        3 => {
            let chunk = (cur.next() % cur.chunks.len() as u64) as usize;
            let backend = (cur.next() % cur.chunks[chunk] as u64) as i64 + 1;
            let name = BackendName::try_from(format!("ba-h{chunk}-{backend}"))?;
            t = Instant::now();
            let stream = db.backend().status_stream(&name).await?;
            let entries: Vec<_> = stream.collect().await;
            if entries.len() != HISTORY_PER_BACKEND as usize {
                return Err(
                    format!("status stream of {name} gave {} entries", entries.len()).into(),
                );
            }
        }
        // The bus's read of one new event (its own statement, on a connection of its own).
        4 => {
            let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                .fetch_one(&env.pool)
                .await?;
            let id: i64 = sqlx::query_scalar(
                "insert into event (kind, key, data) values ('bench', 'growth', '{}') returning id",
            )
            .fetch_one(&env.pool)
            .await?;
            t = Instant::now();
            let ids = hooks::bus_read(bus, &prev, 1000).await?;
            if ids != [id] {
                return Err(format!("bus read returned {ids:?}, expected [{id}]").into());
            }
        }
        5 => {
            t = Instant::now();
            let candidates = db.backend().termination_candidates(env.drones[0].0).await?;
            if candidates.len() != 50 {
                return Err(format!("expected 50 candidates, got {}", candidates.len()).into());
            }
        }
        _ => {
            t = Instant::now();
            let summary = db.run_cleanup(&CleanupConfig::default()).await?;
            if summary.backends.backends != 0 || summary.events != 0 {
                return Err(format!("cleanup found something due: {summary:?}").into());
            }
        }
    }
    Ok(t.elapsed())
}

/// The pause before each call of the settled rounds: time for what the previous call set off
/// in the background to finish (the library's event bus reads each event written, on the
/// same pool, as soon as it is notified), so that a call does not share the machine with it.
const SETTLE: Duration = Duration::from_millis(10);

/// One call of each operation on `size`, in the order of [`OPS`]; records the durations if
/// `keep`, in `size.settled` rather than `size.samples` if `settle` (each call then after a
/// pause of [`SETTLE`]).
async fn round(size: &mut Size, k: usize, seed: &mut u64, keep: bool, settle: bool) -> R<()> {
    let env = &size.env;
    // Keep the controller and the drones alive (loading the largest size takes minutes),
    // outside what is timed.
    if k % 20 == 0 {
        env.heartbeat_all().await?;
    }
    let mut cur = Cursor {
        writer: &mut size.writer,
        chunks: &size.chunks,
        seed,
        k,
    };
    for op in 0..OPS.len() {
        if settle {
            tokio::time::sleep(SETTLE).await;
        }
        let took = call(op, env, &env.db, &mut size.bus, &mut cur).await?;
        match (keep, settle) {
            (true, false) => size.samples[op].push(took),
            (true, true) => size.settled[op].push(took),
            _ => {}
        }
    }
    Ok(())
}

pub async fn growth(bench: &mut Bench) -> R<()> {
    let sizes: Vec<i64> = if bench.quick {
        vec![1_000, 10_000]
    } else {
        (4..=bench.growth_max.max(4))
            .map(|e| 10_i64.pow(e))
            .collect()
    };
    let rounds = bench.pick(300, 20);
    let warm = bench.pick(30, 5);
    let settled = bench.pick(100, 10);
    let mut loaded = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        loaded.push(load(n, (rounds + warm + settled + EXPLAIN_RUNS) as i64 / 6 + 2).await?);
        println!(
            "   loaded {} rows in each history table in {:.1} s",
            count(n as u64),
            t.elapsed().as_secs_f64()
        );
    }
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for k in 0..(rounds + warm) {
        for size in &mut loaded {
            round(size, k, &mut seed, k >= warm, false).await?;
        }
    }
    // The same calls, each after a pause (see `SETTLE`): what the calls cost when nothing the
    // previous one set off still runs.
    for k in 0..settled {
        for size in &mut loaded {
            round(size, 2_000_000 + k, &mut seed, true, true).await?;
        }
    }
    // p50 and p99 per operation per size.
    let mut p50 = vec![vec![Duration::ZERO; sizes.len()]; OPS.len()];
    let mut p99 = p50.clone();
    for (s, size) in loaded.iter_mut().enumerate() {
        for (op, samples) in size.samples.iter_mut().enumerate() {
            samples.sort();
            p50[op][s] = pct(samples, 0.5);
            p99[op][s] = pct(samples, 0.99);
        }
    }
    let last = sizes.len() - 1;
    bench.heading(&format!(
        "cost curves: p50 / p99 of {rounds} calls per operation, round-robin over {} databases; N rows in event and in backend_state (N / 7 terminated backends with 7 history rows and a token each), partitions of 1,000,000 maintained while loading, analyzed",
        sizes.len()
    ));
    let sz = |n: i64| format!("10^{}", (n as f64).log10().round());
    for (op, name) in OPS.iter().enumerate() {
        for (s, &n) in sizes.iter().enumerate() {
            let r50 = p50[op][s].as_secs_f64() / p50[op][0].as_secs_f64();
            bench.row(
                format!("{name}, N = {}", sz(n)),
                format!("{:.3} / {:.3} ms", ms_f(p50[op][s]), ms_f(p99[op][s])),
                format!("same at N = {}", sz(sizes[0])),
                format!("{:.3} / {:.3} ms", ms_f(p50[op][0]), ms_f(p99[op][0])),
                format!(
                    "{} / {}",
                    ratio(p50[op][s].as_secs_f64(), p50[op][0].as_secs_f64()),
                    ratio(p99[op][s].as_secs_f64(), p99[op][0].as_secs_f64())
                ),
                if s == last && is_hot(op) {
                    Check::Target {
                        target: "p50 <= 1.5x".into(),
                        ok: r50 <= 1.5,
                    }
                } else {
                    Check::None
                },
            );
        }
    }
    for (op, name) in OPS.iter().enumerate() {
        let [a, b] = [0, last].map(|s| {
            let mut d = loaded[s].settled[op].clone();
            d.sort();
            (pct(&d, 0.5), pct(&d, 0.99))
        });
        bench.row(
            format!(
                "  {name}, each call after {} ms idle ({settled} calls), N = {}",
                SETTLE.as_millis(),
                sz(sizes[last])
            ),
            format!("{:.3} / {:.3} ms", ms_f(b.0), ms_f(b.1)),
            format!("same at N = {}", sz(sizes[0])),
            format!("{:.3} / {:.3} ms", ms_f(a.0), ms_f(a.1)),
            format!(
                "{} / {}",
                ratio(b.0.as_secs_f64(), a.0.as_secs_f64()),
                ratio(b.1.as_secs_f64(), a.1.as_secs_f64())
            ),
            Check::None,
        );
    }
    // The bus read's statement under the settings its plan depends on, at the smallest and
    // the largest size: each variant on a connection of its own (from the pool, so with the
    // library's settings unless it resets them) that set them before its first use (a cached
    // plan keeps the settings it was planned with), interleaved.
    const VARIANTS: [(&str, &[&str]); 3] = [
        (
            "Postgres's defaults (jit, parallel workers)",
            &["reset jit", "reset max_parallel_workers_per_gather"],
        ),
        (
            "jit = off, parallel workers as by default",
            &["reset max_parallel_workers_per_gather"],
        ),
        (
            "the library's settings (jit = off, max_parallel_workers_per_gather = 0)",
            &[],
        ),
    ];
    let diag_calls = bench.pick(100, 10);
    let mut diag = vec![vec![Vec::new(); VARIANTS.len()]; 2];
    for (d, s) in [0, last].into_iter().enumerate() {
        let size = &loaded[s];
        let mut conns = Vec::new();
        for (_, settings) in VARIANTS {
            let mut conn = size.env.pool.acquire().await?;
            for setting in settings {
                sqlx::query(setting).execute(&mut *conn).await?;
            }
            conns.push(conn);
        }
        for k in 0..(diag_calls + 10) {
            for (v, conn) in conns.iter_mut().enumerate() {
                let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                    .fetch_one(&size.env.pool)
                    .await?;
                let id: i64 = sqlx::query_scalar(
                    "insert into event (kind, key, data) values ('bench', 'growth', '{}') returning id",
                )
                .fetch_one(&size.env.pool)
                .await?;
                let t = Instant::now();
                let ids = hooks::bus_read(conn, &prev, 1000).await?;
                let took = t.elapsed();
                if ids != [id] {
                    return Err(format!("bus read returned {ids:?}, expected [{id}]").into());
                }
                if k >= 10 {
                    diag[d][v].push(took);
                }
            }
        }
        for (conn, (_, settings)) in conns.into_iter().zip(VARIANTS) {
            if settings.is_empty() {
                drop(conn);
            } else {
                // Settings of its own: not returned to the pool.
                conn.detach();
            }
        }
    }
    for (v, (name, _)) in VARIANTS.iter().enumerate() {
        for d in &mut diag {
            d[v].sort();
        }
        let (a50, a99) = (pct(&diag[1][v], 0.5), pct(&diag[1][v], 0.99));
        let (b50, b99) = (pct(&diag[0][v], 0.5), pct(&diag[0][v], 0.99));
        bench.row(
            format!(
                "  bus read of one new event, {name} ({diag_calls} calls), N = {}",
                sz(sizes[last])
            ),
            format!("{:.3} / {:.3} ms", ms_f(a50), ms_f(a99)),
            format!("same at N = {}", sz(sizes[0])),
            format!("{:.3} / {:.3} ms", ms_f(b50), ms_f(b99)),
            format!(
                "{} / {}",
                ratio(a50.as_secs_f64(), b50.as_secs_f64()),
                ratio(a99.as_secs_f64(), b99.as_secs_f64())
            ),
            Check::None,
        );
    }
    // The compact table for BENCHMARKS.md.
    let mut table = String::from("\n| Operation |");
    for &n in &sizes {
        write!(table, " N = {} p50 / p99 (ms) |", sz(n))?;
    }
    writeln!(
        table,
        " p50, p99 at N = {} against N = {} |",
        sz(sizes[last]),
        sz(sizes[0])
    )?;
    table.push_str("|---|");
    for _ in &sizes {
        table.push_str("---:|");
    }
    table.push_str("---:|\n");
    for (op, name) in OPS.iter().enumerate() {
        write!(table, "| {name} |")?;
        for s in 0..sizes.len() {
            write!(
                table,
                " {:.3} / {:.3} |",
                ms_f(p50[op][s]),
                ms_f(p99[op][s])
            )?;
        }
        writeln!(
            table,
            " {} , {} |",
            ratio(p50[op][last].as_secs_f64(), p50[op][0].as_secs_f64()),
            ratio(p99[op][last].as_secs_f64(), p99[op][0].as_secs_f64())
        )?;
    }
    println!("{table}");
    // The plans of what each operation runs, at the smallest and the largest size.
    let mut captured = Vec::new();
    for s in [0, last] {
        captured.push(explain_size(&mut loaded[s], &mut seed).await?);
    }
    report_plans(bench, &sizes, &captured)?;
    let path = if bench.quick {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/growth-quick.svg")
    } else {
        concat!(env!("CARGO_MANIFEST_DIR"), "/docs/growth.svg")
    };
    std::fs::write(path, svg(&sizes, &p50, &p99))?;
    println!("   plot written to {path}");
    for size in loaded {
        drop(size.bus);
        if bench.growth_keep {
            println!(
                "   kept database {} (N = {})",
                size.env.database.name,
                sz(size.n)
            );
            size.env.pool.close().await;
        } else {
            size.env.finish().await?;
        }
    }
    Ok(())
}

/// Runs of each operation when its plans are captured, the last one's kept: enough for each
/// statement to run more than five times on the explain pool's one connection, after which
/// Postgres may keep a generic plan for a prepared statement, as on the measured pool's
/// connections after hundreds of calls.
const EXPLAIN_RUNS: usize = 14;

/// Where `auto_explain` sends its plans: as notices to the client (`auto_explain.log_level`),
/// which sqlx reports as `tracing` events of this target.
const NOTICE_TARGET: &str = "sqlx::postgres::notice";

/// The notices received while capturing (`Some`).
static CAPTURE: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// Collects the notices of [`NOTICE_TARGET`] into [`CAPTURE`]; every other callsite is
/// disabled once and for all (`Interest::never`), so the library's own spans and events
/// cost what they cost without a subscriber.
struct NoticeCapture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for NoticeCapture {
    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> Interest {
        if metadata.target() == NOTICE_TARGET {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target() == NOTICE_TARGET
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.0 = value.to_string();
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" && self.0.is_empty() {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if let Ok(mut capture) = CAPTURE.lock() {
            if let Some(notices) = capture.as_mut() {
                notices.push(message.0);
            }
        }
    }
}

fn capture(on: bool) -> Vec<String> {
    match CAPTURE.lock() {
        Ok(mut capture) if on => capture.replace(Vec::new()).unwrap_or_default(),
        Ok(mut capture) => capture.take().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// One statement the library ran, as `auto_explain` reported it.
struct Explained {
    /// The statement's `-- plane-db:` comment line, or the start of its text.
    label: String,
    /// Execution time (`auto_explain`'s duration: planning not included).
    ms: f64,
    /// Shared buffers the execution touched (found in shared buffers, read in).
    hit: f64,
    read: f64,
    /// The query text, then one line per plan node (and trigger).
    text: Vec<String>,
}

/// Every statement each operation runs (in [`OPS`] order) at `size`: `EXPLAIN (ANALYZE,
/// BUFFERS)` through `auto_explain`, loaded on the connections of a pool of the explain's
/// own, so that the plans are those of the library's statements as it runs them (prepared,
/// with its arguments), each operation called through a `PlaneDatabase` of its own on that
/// pool (its event bus stops with it, so no bus read of one lands in another's plans).
async fn explain_size(size: &mut Size, seed: &mut u64) -> R<Vec<Vec<Explained>>> {
    static SUBSCRIBER: OnceLock<bool> = OnceLock::new();
    let installed = *SUBSCRIBER.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry::Registry::default().with(NoticeCapture),
        )
        .is_ok()
    });
    if !installed {
        return Err("another tracing subscriber is installed: cannot capture plans".into());
    }
    let options = || {
        PgPoolOptions::new().after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(POOL_SETTINGS).await?;
                conn.execute(
                    "LOAD 'auto_explain';
                     SET auto_explain.log_min_duration = 0;
                     SET auto_explain.log_analyze = on;
                     SET auto_explain.log_buffers = on;
                     SET auto_explain.log_timing = on;
                     SET auto_explain.log_triggers = on;
                     SET auto_explain.log_format = json;
                     SET auto_explain.log_level = notice;",
                )
                .await?;
                Ok(())
            })
        })
    };
    let url = size.env.database.url.clone();
    let pool = options().max_connections(1).connect(&url).await?;
    let mut bus = options()
        .max_connections(1)
        .connect(&url)
        .await?
        .acquire()
        .await?;
    let mut out = Vec::new();
    for op in 0..OPS.len() {
        let db = PlaneDatabase::with_config(pool.clone(), Config::default());
        let mut notices = Vec::new();
        for r in 0..EXPLAIN_RUNS {
            let last = r + 1 == EXPLAIN_RUNS;
            capture(last);
            let mut cur = Cursor {
                writer: &mut size.writer,
                chunks: &size.chunks,
                seed: &mut *seed,
                k: 1_000_000 + r,
            };
            let result = call(op, &size.env, &db, &mut bus, &mut cur).await;
            if last {
                notices = capture(false);
            }
            result?;
        }
        drop(db);
        let mut statements = Vec::new();
        for notice in notices {
            statements.push(parse_notice(&notice)?);
        }
        out.push(statements);
    }
    drop(bus);
    pool.close().await;
    Ok(out)
}

/// An `auto_explain` notice: `duration: 0.123 ms  plan:` and the plan as JSON.
fn parse_notice(notice: &str) -> R<Explained> {
    let Some((head, json)) = notice.split_once("plan:") else {
        return Ok(Explained {
            label: format!("(notice) {notice}"),
            ms: 0.0,
            hit: 0.0,
            read: 0.0,
            text: vec![notice.to_string()],
        });
    };
    let ms = head
        .trim()
        .trim_start_matches("duration:")
        .trim()
        .trim_end_matches("ms")
        .trim()
        .parse()
        .unwrap_or(0.0);
    let v: serde_json::Value = serde_json::from_str(json.trim())?;
    let query = v["Query Text"].as_str().unwrap_or("");
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    let label = match query
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("-- plane-db:"))
    {
        Some(line) => line.trim_start_matches("-- ").to_string(),
        None => flat.chars().take(70).collect(),
    };
    let plan = &v["Plan"];
    let n = |k: &str| plan[k].as_f64().unwrap_or(0.0);
    let mut text = vec![format!("-- {ms:.3} ms: {flat}")];
    plan_lines(plan, 1, &mut |line| text.push(line));
    for t in v["Triggers"].as_array().into_iter().flatten() {
        text.push(format!(
            "  trigger {} on {}: {} calls, {:.3} ms",
            t["Trigger Name"].as_str().unwrap_or(""),
            t["Relation"].as_str().unwrap_or(""),
            t["Calls"],
            t["Time"].as_f64().unwrap_or(0.0)
        ));
    }
    Ok(Explained {
        label,
        ms,
        hit: n("Shared Hit Blocks"),
        read: n("Shared Read Blocks"),
        text,
    })
}

/// Writes every plan to `target/growth-plans.txt`, prints a line per operation and per
/// statement (buffers and execution time at the smallest and the largest size), and adds a
/// row per operation to the table.
fn report_plans(bench: &mut Bench, sizes: &[i64], captured: &[Vec<Vec<Explained>>]) -> R<()> {
    let sz = |n: i64| format!("10^{}", (n as f64).log10().round());
    let measured = [sizes[0], sizes[sizes.len() - 1]];
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/growth-plans.txt");
    let mut file = String::from(
        "EXPLAIN (ANALYZE, BUFFERS) of every statement each operation ran (auto_explain; the \
         last of the operation's calls), per size. buf = shared buffers hit + read.\n",
    );
    let total = |st: &[Explained]| {
        (
            st.iter().map(|s| s.hit + s.read).sum::<f64>(),
            st.iter().map(|s| s.read).sum::<f64>(),
            st.iter().map(|s| s.ms).sum::<f64>(),
        )
    };
    for (s, per_op) in captured.iter().enumerate() {
        for (op, statements) in per_op.iter().enumerate() {
            let (buf, read, ms) = total(statements);
            writeln!(
                file,
                "\n== {}, N = {}: {} statements, {buf} buffers ({read} read), {ms:.3} ms executing",
                OPS[op],
                sz(measured[s]),
                statements.len()
            )?;
            for st in statements {
                for line in &st.text {
                    writeln!(file, "{line}")?;
                }
            }
        }
    }
    std::fs::write(path, file)?;
    println!("   plans (auto_explain: execution only, planning not included) written to {path}");
    let [small, large] = captured else {
        return Ok(());
    };
    for (op, name) in OPS.iter().enumerate() {
        let (a, b) = (&small[op], &large[op]);
        let ((ba, ra, ma), (bb, rb, mb)) = (total(a), total(b));
        println!(
            "   {name}: {} → {} statements, {ba} → {bb} buffers ({ra} → {rb} read), {ma:.3} → {mb:.3} ms executing",
            a.len(),
            b.len()
        );
        if a.len() == b.len() {
            for (x, y) in a.iter().zip(b) {
                println!(
                    "     {}: {} → {} buf, {:.3} → {:.3} ms",
                    x.label,
                    x.hit + x.read,
                    y.hit + y.read,
                    x.ms,
                    y.ms
                );
            }
        } else {
            for (st, n) in a
                .iter()
                .map(|x| (x, measured[0]))
                .chain(b.iter().map(|y| (y, measured[1])))
            {
                println!(
                    "     N = {}: {}: {} buf, {:.3} ms",
                    sz(n),
                    st.label,
                    st.hit + st.read,
                    st.ms
                );
            }
        }
        bench.row(
            format!(
                "  plan of {name}: shared buffers of its statements ({}), N = {}",
                b.len(),
                sz(measured[1])
            ),
            format!("{bb}"),
            format!("same at N = {}", sz(measured[0])),
            format!("{ba}"),
            ratio(bb, ba),
            Check::None,
        );
    }
    Ok(())
}

/// One line per node of an `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` plan: node type,
/// index and relation, actual rows and loops, shared buffers (hit + read), time, index
/// condition, filter, heap fetches, and the buffers read in if any.
fn plan_lines(node: &serde_json::Value, depth: usize, out: &mut dyn FnMut(String)) {
    let s = |k: &str| node[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
    let mut line = format!("{}-> {}", " ".repeat(depth * 2), s("Node Type"));
    if !s("Index Name").is_empty() {
        write!(line, " using {}", s("Index Name")).ok();
    }
    if !s("Relation Name").is_empty() {
        write!(line, " on {}", s("Relation Name")).ok();
    }
    write!(
        line,
        " (rows {} x {} loops, {} buf, {:.3} ms)",
        n("Actual Rows"),
        n("Actual Loops"),
        n("Shared Hit Blocks") + n("Shared Read Blocks"),
        n("Actual Total Time")
    )
    .ok();
    if !s("Index Cond").is_empty() {
        write!(line, " cond: {}", s("Index Cond")).ok();
    }
    if !s("Filter").is_empty() {
        write!(line, " filter: {}", s("Filter")).ok();
    }
    if n("Heap Fetches") > 0.0 {
        write!(line, " heap fetches: {}", n("Heap Fetches")).ok();
    }
    if n("Shared Read Blocks") > 0.0 {
        write!(line, " ({} read)", n("Shared Read Blocks")).ok();
    }
    out(line);
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            plan_lines(child, depth + 1, out);
        }
    }
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Two panels, p50 and p99, each operation's time at every size divided by its time at the
/// smallest, against the size, both axes on a log scale; a dashed line at the 1.5x target.
fn svg(sizes: &[i64], p50: &[Vec<Duration>], p99: &[Vec<Duration>]) -> String {
    const COLORS: [&str; 7] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f",
    ];
    const TICKS: [f64; 14] = [
        0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 10000.0,
    ];
    let (pw, ph) = (420.0, 300.0);
    let (left, top) = (60.0, 40.0);
    let gap = 80.0;
    let width = left + 2.0 * pw + gap + 30.0;
    let height = top + ph + 60.0 + 18.0 * OPS.len() as f64 + 20.0;
    let rel = |d: &[Duration], s: usize| d[s].as_secs_f64() / d[0].as_secs_f64().max(1e-9);
    let all = || {
        p50.iter()
            .chain(p99)
            .flat_map(|d| (0..sizes.len()).map(move |s| rel(d, s)))
    };
    let ymax = all().fold(4.0_f64, f64::max).log10();
    let ymin = all().fold(0.25_f64, f64::min).max(1e-3).log10();
    let lx = |n: i64| (n as f64).log10();
    let (x0, x1) = (
        lx(sizes[0]),
        lx(*sizes.last().unwrap_or(&sizes[0])).max(lx(sizes[0]) + 1.0),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (panel, (title, data)) in [("p50", p50), ("p99", p99)].into_iter().enumerate() {
        let ox = left + panel as f64 * (pw + gap);
        let px = |n: i64| ox + (lx(n) - x0) / (x1 - x0) * pw;
        let py = |r: f64| top + ph - (r.max(1e-3).log10() - ymin) / (ymax - ymin) * ph;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{title} at N / {title} at N = 10^{} (log scale)</text>"#,
            ox + pw / 2.0,
            top - 15.0,
            lx(sizes[0]).round()
        );
        let _ = writeln!(
            out,
            r#"<rect x="{ox}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        for r in TICKS
            .into_iter()
            .filter(|r| r.log10() >= ymin - 1e-9 && r.log10() <= ymax + 1e-9)
        {
            let y = py(r);
            let _ = writeln!(
                out,
                r##"<line x1="{ox}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{r}x</text>"##,
                ox + pw,
                ox - 5.0,
                y + 4.0
            );
        }
        let y = py(1.5);
        let _ = writeln!(
            out,
            r#"<line x1="{ox}" y1="{y}" x2="{}" y2="{y}" stroke="red" stroke-dasharray="6,4"/><text x="{}" y="{}" fill="red" text-anchor="end">target 1.5x</text>"#,
            ox + pw,
            ox + pw - 4.0,
            y - 4.0
        );
        for &n in sizes {
            let x = px(n);
            let _ = writeln!(
                out,
                r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="black"/><text x="{x}" y="{}" text-anchor="middle">10^{}</text>"#,
                top + ph,
                top + ph + 5.0,
                top + ph + 18.0,
                lx(n).round()
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">N (rows in event and in backend_state, log scale)</text>"#,
            ox + pw / 2.0,
            top + ph + 36.0
        );
        for (op, d) in data.iter().enumerate() {
            let points: Vec<String> = sizes
                .iter()
                .enumerate()
                .map(|(s, &n)| format!("{:.1},{:.1}", px(n), py(rel(d, s))))
                .collect();
            let dash = if is_hot(op) {
                ""
            } else {
                r#" stroke-dasharray="3,3""#
            };
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                points.join(" "),
                COLORS[op]
            );
            for p in &points {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    out,
                    r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#,
                    COLORS[op]
                );
            }
        }
    }
    // Legend, with each operation's p50 / p99 at the smallest and the largest size.
    let last = sizes.len() - 1;
    for (op, name) in OPS.iter().enumerate() {
        let y = top + ph + 60.0 + 18.0 * op as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{name}: p50 {:.3} → {:.3} ms, p99 {:.3} → {:.3} ms</text>"#,
            left + 24.0,
            COLORS[op],
            left + 30.0,
            y + 4.0,
            ms_f(p50[op][0]),
            ms_f(p50[op][last]),
            ms_f(p99[op][0]),
            ms_f(p99[op][last]),
        );
    }
    out.push_str("</svg>\n");
    out
}
