//! Backlog reads (issue 21 item 3): N events committed in one transaction, delivered to a
//! subscriber, at a rate that should not fall as N grows; beside a plain streamed select of
//! the same rows, the rate at the smallest N, and the rows and buffers each of the reader's
//! statements touches (from `EXPLAIN (ANALYZE, BUFFERS)` of the library's own prepared
//! statements, through `plane_db::testing::bench`).

use crate::common::*;
use futures_util::TryStreamExt;
use plane_db::events::BusConfig;
use plane_db::testing::bench::{
    explain_bus_page_by_ids, explain_bus_read_page, explain_bus_span_ids, PlanMode,
};
use plane_db::Config;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What one size measured.
struct Run {
    n: usize,
    /// Events per second, commit to the last one received.
    rate: f64,
    /// Events per second of a plain `select … where id > $1 order by id`, streamed.
    plain_rate: f64,
    /// Whether every event arrived exactly once.
    once: bool,
    problem: String,
    /// (statement, mode) → what its plan touched.
    plans: Vec<(Statement, PlanMode, Touched)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Statement {
    FirstPage,
    SpanIds,
    PageByIds,
}

impl Statement {
    fn name(self) -> &'static str {
        match self {
            Statement::FirstPage => "first page (read statement)",
            Statement::SpanIds => "id listing of the rest",
            Statement::PageByIds => "one page by ids",
        }
    }
}

/// What one `EXPLAIN (ANALYZE, BUFFERS)` reports.
#[derive(Clone, Debug, Default, PartialEq)]
struct Touched {
    /// Rows the table scans produced or filtered out, over all their loops.
    rows: f64,
    /// Rows the statement returned.
    returned: f64,
    /// Shared buffers hit or read.
    buffers: u64,
    execution_ms: f64,
    /// The table scans, e.g. `Index Scan using event_pkey`.
    scans: Vec<String>,
}

pub async fn backlog(bench: &mut Bench) -> R<()> {
    let sizes: Vec<usize> = bench.pick(vec![10_000, 100_000, 200_000], vec![1_000, 10_000]);
    let batch = BusConfig::default().fetch_batch_size;
    // Rounds interleaved over the sizes (this machine's noise moves a single run's rates by
    // tens of percent); the plans are taken in the first round.
    let rounds = bench.pick(3, 1);
    let mut all: Vec<Vec<Run>> = sizes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, &n) in sizes.iter().enumerate() {
            let run = run_one(n, batch, round == 0).await?;
            println!(
                "   round {}, N = {}: {:.0} events/s delivered, plain select {:.0} rows/s{}",
                round + 1,
                count(n as u64),
                run.rate,
                run.plain_rate,
                if run.once {
                    String::new()
                } else {
                    format!(" ({})", run.problem)
                }
            );
            all[i].push(run);
        }
    }
    let runs: Vec<Run> = all.into_iter().map(median_run).collect::<R<_>>()?;

    bench.heading(&format!(
        "backlog: N events in one transaction, commit to all delivered (fetch_batch_size {})",
        count(batch as u64)
    ));
    let first = &runs[0];
    for run in &runs {
        bench.row(
            format!(
                "{} events, commit to all delivered (median of {rounds})",
                count(run.n as u64)
            ),
            per_s(run.rate),
            "plain select where id > $1 order by id, streamed",
            per_s(run.plain_rate),
            ratio(run.rate, run.plain_rate),
            Check::Always {
                target: "each event once".into(),
                ok: run.once,
            },
        );
    }
    for run in &runs[1..] {
        bench.row(
            format!(
                "{} events: rate against the smallest backlog",
                count(run.n as u64)
            ),
            per_s(run.rate),
            format!("same, {} events", count(first.n as u64)),
            per_s(first.rate),
            ratio(run.rate, first.rate),
            Check::Target {
                target: ">= 0.8x (does not fall)".into(),
                ok: run.rate >= 0.8 * first.rate,
            },
        );
    }

    bench.heading("backlog: what each reader statement touches (EXPLAIN ANALYZE, BUFFERS)");
    for run in &runs {
        for (statement, mode, touched) in &run.plans {
            let base = first
                .plans
                .iter()
                .find(|(s, m, _)| s == statement && m == mode)
                .map(|(_, _, t)| t)
                .ok_or("no plan at the smallest size")?;
            // A page touches about `batch` rows; the first page and the listing evaluate the
            // span (N rows) once each.
            let (target, limit) = match statement {
                Statement::PageByIds => ("<= 2 x batch rows".to_string(), 2.0 * batch as f64),
                _ => ("<= 2 x N rows".to_string(), 2.0 * run.n as f64),
            };
            bench.row(
                format!(
                    "{} events: {}, {} plan",
                    count(run.n as u64),
                    statement.name(),
                    mode_name(*mode)
                ),
                touched_text(touched),
                format!("same, {} events", count(first.n as u64)),
                touched_text(base),
                ratio(touched.rows, base.rows),
                Check::Target {
                    target,
                    ok: touched.rows <= limit,
                },
            );
        }
    }
    if runs.iter().any(|r| !r.once) {
        eprintln!("   backlog: an event was lost or delivered twice");
    }
    Ok(())
}

fn mode_name(mode: PlanMode) -> &'static str {
    match mode {
        PlanMode::Custom => "custom",
        PlanMode::Generic => "generic",
    }
}

fn touched_text(t: &Touched) -> String {
    format!(
        "{} rows, {} buf, {:.1} ms",
        count(t.rows as u64),
        count(t.buffers),
        t.execution_ms
    )
}

/// One size: a fresh database, a subscriber, `n` events in one transaction through
/// `plane_write_events`, the time from its commit to the last event received; then the
/// plain select and the plans, on the same rows.
async fn run_one(n: usize, batch: i64, explain: bool) -> R<Run> {
    let mut config = Config::default();
    // Room for the whole backlog in the subscription, so that what is measured is the bus's
    // reads (a paused subscription catches up through another path).
    config.bus.max_pending_per_subscription = n + 1_000;
    let env = Env::with_config(0, config).await?;
    let mut sub = env.db.subscribe_all_events().await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(i64, Instant), u64>>();
    let consumer = tokio::spawn(async move {
        while let Some(event) = sub.next().await {
            let sent = match event {
                Ok(event) => match event.id {
                    Some(id) => tx.send(Ok((id, Instant::now()))),
                    None => Ok(()),
                },
                Err(lagged) => tx.send(Err(lagged.missed)),
            };
            if sent.is_err() {
                break;
            }
        }
    });

    let prev: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(&env.pool)
        .await?;
    // One transaction (one statement, autocommit) through the library's one write path.
    let ids: Vec<i64> = sqlx::query_scalar(
        "select plane_write_events(array_agg('backend_state'::text), array_agg('bl-' || i),
                                   array_agg('{\"status\": \"loading\"}'::jsonb), 'notify')
         from generate_series(1, $1) i",
    )
    .bind(n as i32)
    .fetch_one(&env.pool)
    .await?;
    let committed = Instant::now();
    if ids.len() != n {
        return Err(format!("plane_write_events returned {} ids, not {n}", ids.len()).into());
    }
    let target: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(&env.pool)
        .await?;

    // Receive until every id has arrived, then a little longer to catch any repeat.
    let mut got: HashMap<i64, u32> = ids.iter().map(|&id| (id, 0)).collect();
    let mut distinct = 0_usize;
    let mut last = committed;
    let mut lagged = 0_u64;
    let mut foreign = 0_u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settle: Option<Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline);
        match tokio::time::timeout_at(until.into(), rx.recv()).await {
            Ok(Some(Ok((id, at)))) => match got.get_mut(&id) {
                Some(c) => {
                    *c += 1;
                    if *c == 1 {
                        distinct += 1;
                        last = last.max(at);
                        if distinct == n {
                            settle = Some(Instant::now() + Duration::from_millis(300));
                        }
                    }
                }
                None => foreign += 1,
            },
            Ok(Some(Err(missed))) => lagged += missed,
            Ok(None) | Err(_) => break,
        }
    }
    consumer.abort();
    let twice = got.values().filter(|&&c| c > 1).count();
    let missing = n - distinct;
    let once = missing == 0 && twice == 0 && lagged == 0;
    let problem = format!(
        "{missing} missing, {twice} delivered more than once, {lagged} lagged, {foreign} other"
    );
    let elapsed = last.saturating_duration_since(committed);
    let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);

    // The floor: the same rows (the columns the bus reads) streamed by a plain select.
    let t = Instant::now();
    let mut rows = sqlx::query_as::<_, (i64, i64, String, Option<String>, chrono::DateTime<chrono::Utc>, Value)>(
        "select id, xid::text::bigint, kind, key, created_at, data from event where id > $1 order by id",
    )
    .bind(ids[0] - 1)
    .fetch(&env.pool);
    let mut streamed = 0_usize;
    while let Some(_row) = rows.try_next().await? {
        streamed += 1;
    }
    drop(rows);
    let plain = t.elapsed();
    if streamed != n {
        return Err(format!("the plain select streamed {streamed} rows, not {n}").into());
    }
    let plain_rate = n as f64 / plain.as_secs_f64().max(1e-9);

    // The plans of the reader's three statements for this span: the first page, the listing
    // of the rest (after the first page), one page by ids from the middle of the span.
    let batch_len = usize::try_from(batch)?.min(n);
    let rest_after = ids[batch_len - 1];
    let middle = (n / 2).min(n - batch_len);
    let page_ids = &ids[middle..middle + batch_len];
    let mut plans = Vec::new();
    let modes = if explain {
        &[PlanMode::Custom, PlanMode::Generic][..]
    } else {
        &[]
    };
    for &mode in modes {
        let (plan, read) = explain_bus_read_page(&env.pool, mode, &prev, &target, 0, batch).await?;
        expect_ids(&read, &ids[..batch_len], "first page")?;
        plans.push((
            Statement::FirstPage,
            mode,
            touched(&plan, Statement::FirstPage, mode)?,
        ));
        let (plan, read) =
            explain_bus_span_ids(&env.pool, mode, &prev, &target, rest_after).await?;
        expect_ids(&read, &ids[batch_len..], "id listing")?;
        plans.push((
            Statement::SpanIds,
            mode,
            touched(&plan, Statement::SpanIds, mode)?,
        ));
        let (plan, read) = explain_bus_page_by_ids(&env.pool, mode, &target, page_ids).await?;
        expect_ids(&read, page_ids, "page by ids")?;
        plans.push((
            Statement::PageByIds,
            mode,
            touched(&plan, Statement::PageByIds, mode)?,
        ));
    }
    for (statement, mode, t) in &plans {
        println!(
            "   N = {}, {} ({} plan): {} of {} returned; scans: {}",
            count(n as u64),
            statement.name(),
            mode_name(*mode),
            touched_text(t),
            count(t.returned as u64),
            t.scans.join(", ")
        );
    }
    env.finish().await?;
    Ok(Run {
        n,
        rate,
        plain_rate,
        once,
        problem,
        plans,
    })
}

/// The runs of one size folded into one: the median rates (each of the two on its own), every
/// problem, the first round's plans.
fn median_run(mut runs: Vec<Run>) -> R<Run> {
    if runs.is_empty() {
        return Err("no runs".into());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rate = median(runs.iter().map(|r| r.rate).collect());
    let plain_rate = median(runs.iter().map(|r| r.plain_rate).collect());
    let once = runs.iter().all(|r| r.once);
    let problem = runs
        .iter()
        .filter(|r| !r.once)
        .map(|r| r.problem.clone())
        .collect::<Vec<_>>()
        .join("; ");
    let first = runs.swap_remove(0);
    Ok(Run {
        rate,
        plain_rate,
        once,
        problem,
        ..first
    })
}

fn expect_ids(read: &[i64], expected: &[i64], what: &str) -> R<()> {
    if read != expected {
        return Err(format!(
            "{what}: the library's statement read {} ids, expected {}",
            read.len(),
            expected.len()
        )
        .into());
    }
    Ok(())
}

/// The figures of an `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` result.
fn touched(plan: &Value, statement: Statement, mode: PlanMode) -> R<Touched> {
    let top = plan
        .get(0)
        .ok_or_else(|| format!("{} ({}): no plan", statement.name(), mode_name(mode)))?;
    let root = &top["Plan"];
    let mut t = Touched {
        returned: root["Actual Rows"].as_f64().unwrap_or(0.0)
            * root["Actual Loops"].as_f64().unwrap_or(1.0),
        buffers: root["Shared Hit Blocks"].as_u64().unwrap_or(0)
            + root["Shared Read Blocks"].as_u64().unwrap_or(0),
        execution_ms: top["Execution Time"].as_f64().unwrap_or(0.0),
        ..Touched::default()
    };
    walk(root, &mut t);
    Ok(t)
}

/// Adds the rows of every table scan under `node` (returned or filtered out, per loop as
/// EXPLAIN reports them, times the loops).
fn walk(node: &Value, t: &mut Touched) {
    if let Some(relation) = node["Relation Name"].as_str() {
        let per_loop = [
            "Actual Rows",
            "Rows Removed by Filter",
            "Rows Removed by Index Recheck",
        ]
        .iter()
        .map(|k| node[*k].as_f64().unwrap_or(0.0))
        .sum::<f64>();
        t.rows += per_loop * node["Actual Loops"].as_f64().unwrap_or(1.0);
        let kind = node["Node Type"].as_str().unwrap_or("?");
        t.scans.push(match node["Index Name"].as_str() {
            Some(index) => format!("{kind} using {index}"),
            None => format!("{kind} on {relation}"),
        });
    }
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            walk(child, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_sums_table_scans_over_loops() {
        let plan = serde_json::json!([{
            "Plan": {
                "Node Type": "Nested Loop", "Actual Rows": 10, "Actual Loops": 1,
                "Shared Hit Blocks": 7, "Shared Read Blocks": 2,
                "Plans": [
                    {"Node Type": "Function Scan", "Actual Rows": 1, "Actual Loops": 1},
                    {"Node Type": "Index Scan", "Relation Name": "event",
                     "Index Name": "event_pkey", "Actual Rows": 2, "Actual Loops": 5,
                     "Rows Removed by Filter": 1}
                ]
            },
            "Execution Time": 1.5
        }]);
        let t = touched(&plan, Statement::PageByIds, PlanMode::Generic).unwrap();
        assert_eq!(t.rows, 15.0);
        assert_eq!(t.returned, 10.0);
        assert_eq!(t.buffers, 9);
        assert_eq!(t.execution_ms, 1.5);
        assert_eq!(t.scans, ["Index Scan using event_pkey"]);
    }
}
