//! Cost curves (issue 23 item 5): the hot operations' p50 and p99 with 10^4, 10^5, 10^6
//! (and, with `--growth-max 7`, 10^7) rows in each history table, every size in a database
//! of its own, the calls going round-robin over the sizes so that all see the same machine.
//! Prints a table and writes a plot (`docs/growth.svg`; `--quick` writes it under `target/`).

use crate::common::*;
use crate::hot::insert_tokens;
use crate::retention::{insert_events, insert_old_backends};
use futures_util::StreamExt;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::{ConnectRequest, SpawnConfig};
use plane_db::testing::bench as hooks;
use plane_db::types::{BackendName, BackendState, BearerToken, DronePoolName, KeyConfig};
use plane_db::CleanupConfig;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

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
    })
}

/// One call of each operation on `size`; records the durations if `keep`.
async fn round(size: &mut Size, k: usize, seed: &mut u64, keep: bool) -> R<()> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let env = &size.env;
    let mut took = [Duration::ZERO; OPS.len()];
    // Keep the controller and the drones alive (loading the largest size takes minutes),
    // outside what is timed.
    if k % 20 == 0 {
        env.db
            .controller()
            .heartbeat(&env.controller, true, "bench", "bench")
            .await?;
        for (id, _) in &env.drones {
            env.db.drone().heartbeat(*id, chrono::Utc::now()).await?;
        }
    }

    // update_state: the writer's next transition.
    let (i, s) = size.writer;
    let name = BackendName::try_from(format!("ba-wr-{i}"))?;
    let states = lifecycle();
    let t = Instant::now();
    env.db.backend().update_state(&name, &states[s]).await?;
    took[0] = t.elapsed();
    size.writer = if s + 1 == states.len() {
        (i + 1, 0)
    } else {
        (i, s + 1)
    };

    // connect: a new backend for a new key.
    let request = ConnectRequest {
        key: Some(KeyConfig {
            name: format!("gk-{k}"),
            ..KeyConfig::default()
        }),
        spawn_config: Some(SpawnConfig {
            id: None,
            cluster: Some(env.cluster.clone()),
            pool: DronePoolName::default(),
            executable: serde_json::json!({ "image": "bench" }),
            lifetime_limit_seconds: None,
            max_idle_seconds: Some(300),
            use_static_token: false,
            subdomain: None,
        }),
        user: Some("bench".into()),
        auth: serde_json::Map::new(),
    };
    let t = Instant::now();
    let response = env.db.connect(&request).await?;
    took[1] = t.elapsed();
    if !response.spawned {
        return Err("connect did not spawn".into());
    }

    // Route lookup of a live token.
    let token = BearerToken::from(format!("rt-{}", next() % 50 + 1));
    let t = Instant::now();
    let route = env.db.backend().route_info_for_token(&token).await?;
    took[2] = t.elapsed();
    if !matches!(route, RouteInfoResult::Available(_)) {
        return Err(format!("route lookup gave {route:?}").into());
    }

    // A status stream of a terminated backend with history: its history, then the end.
    let chunk = (next() % size.chunks.len() as u64) as usize;
    let backend = (next() % size.chunks[chunk] as u64) as i64 + 1;
    let name = BackendName::try_from(format!("ba-h{chunk}-{backend}"))?;
    let t = Instant::now();
    let stream = env.db.backend().status_stream(&name).await?;
    let entries: Vec<_> = stream.collect().await;
    took[3] = t.elapsed();
    if entries.len() != HISTORY_PER_BACKEND as usize {
        return Err(format!("status stream of {name} gave {} entries", entries.len()).into());
    }

    // The bus's read of one new event (its own statement, on a connection of its own).
    let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(&env.pool)
        .await?;
    let id: i64 = sqlx::query_scalar(
        "insert into event (kind, key, data) values ('bench', 'growth', '{}') returning id",
    )
    .fetch_one(&env.pool)
    .await?;
    let t = Instant::now();
    let ids = hooks::bus_read(&mut size.bus, &prev, 1000).await?;
    took[4] = t.elapsed();
    if ids != [id] {
        return Err(format!("bus read returned {ids:?}, expected [{id}]").into());
    }

    let t = Instant::now();
    let candidates = env
        .db
        .backend()
        .termination_candidates(env.drones[0].0)
        .await?;
    took[5] = t.elapsed();
    if candidates.len() != 50 {
        return Err(format!("expected 50 candidates, got {}", candidates.len()).into());
    }

    let t = Instant::now();
    let summary = env.db.run_cleanup(&CleanupConfig::default()).await?;
    took[6] = t.elapsed();
    if summary.backends.backends != 0 || summary.events != 0 {
        return Err(format!("cleanup found something due: {summary:?}").into());
    }

    if keep {
        for (op, d) in took.into_iter().enumerate() {
            size.samples[op].push(d);
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
    let mut loaded = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        loaded.push(load(n, (rounds + warm) as i64 / 6 + 2).await?);
        println!(
            "   loaded {} rows in each history table in {:.1} s",
            count(n as u64),
            t.elapsed().as_secs_f64()
        );
    }
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for k in 0..(rounds + warm) {
        for size in &mut loaded {
            round(size, k, &mut seed, k >= warm).await?;
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
    // The bus read's statement under the settings its plan depends on, at the smallest and
    // the largest size: each variant on a connection of its own that set them before its
    // first use (a cached plan keeps the settings it was planned with), interleaved.
    const VARIANTS: [(&str, &[&str]); 3] = [
        ("default settings", &[]),
        ("jit = off", &["set jit = off"]),
        (
            "jit = off, max_parallel_workers_per_gather = 0",
            &["set jit = off", "set max_parallel_workers_per_gather = 0"],
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
    // Plans of the operations that grew past the target, where the library has a hook.
    for (op, name) in OPS.iter().enumerate() {
        let r50 = p50[op][last].as_secs_f64() / p50[op][0].as_secs_f64();
        if !is_hot(op) || r50 <= 1.5 {
            continue;
        }
        let size = &loaded[last];
        println!("   {name} is {r50:.2}x at N = {}:", sz(size.n));
        match op {
            5 => {
                for line in
                    hooks::explain_termination_candidates(&size.env.pool, size.env.drones[0].0)
                        .await?
                {
                    println!("     {line}");
                }
            }
            4 => {
                let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                    .fetch_one(&size.env.pool)
                    .await?;
                sqlx::query("insert into event (kind, key, data) values ('bench', 'growth', '{}')")
                    .execute(&size.env.pool)
                    .await?;
                let target: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                    .fetch_one(&size.env.pool)
                    .await?;
                for mode in [hooks::PlanMode::Custom, hooks::PlanMode::Generic] {
                    let (plan, _) =
                        hooks::explain_bus_read_page(&size.env.pool, mode, &prev, &target, 0, 1000)
                            .await?;
                    let top = &plan[0];
                    println!(
                        "     {mode:?} plan: planning {} ms, execution {} ms, JIT: {}",
                        top["Planning Time"],
                        top["Execution Time"],
                        if top["JIT"].is_null() {
                            "none".to_string()
                        } else {
                            format!(
                                "{} functions, {} ms",
                                top["JIT"]["Functions"], top["JIT"]["Timing"]["Total"]
                            )
                        }
                    );
                    plan_lines(&plan[0]["Plan"], 3, &mut |line| println!("{line}"));
                }
            }
            _ => println!("     (no plan hook for this call; see BENCHMARKS.md)"),
        }
    }
    let path = if bench.quick {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/growth-quick.svg")
    } else {
        concat!(env!("CARGO_MANIFEST_DIR"), "/docs/growth.svg")
    };
    std::fs::write(path, svg(&sizes, &p50, &p99))?;
    println!("   plot written to {path}");
    for size in loaded {
        drop(size.bus);
        size.env.finish().await?;
    }
    Ok(())
}

/// One line per node of an `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` plan: node type,
/// relation or index, actual rows and loops, shared buffers.
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
    if !s("Filter").is_empty() {
        write!(line, " filter: {}", s("Filter")).ok();
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
