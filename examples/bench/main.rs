//! plane-db benchmarks: every figure beside a baseline measured in the same run.
//!
//! ```text
//! cargo run --release --example bench            # the full run (about 13 minutes here)
//! cargo run --release --example bench -- --quick # small sizes, under a minute, no speed verdicts
//! cargo run --release --example bench -- --only writers,connect
//! cargo run --release --example bench -- --only crossproc  # delivery into another process
//! cargo run --release --example bench -- --only retention  # retention by partitions
//! cargo run --release --example bench -- --only first-run  # first cleanup of 10M rows, both servers
//! cargo run --release --example bench -- --only growth --growth-max 7  # cost curves to 10^7
//! DATABASE_URL=… cargo run --release --example bench -- --only growth --growth-keep  # keeps its databases
//! ```
//!
//! Runs on the server `DATABASE_URL` names, or else on a throwaway Postgres started from the
//! local binaries (tuned for speed: `fsync=off`, `synchronous_commit=off`). Each section uses a
//! fresh database, dropped at the end. Data is bulk-loaded with `generate_series`.
//!
//! What is measured is the library itself: its public calls, or, where it has no public
//! entry for what is measured (a plan, one bus read), a hidden hook in
//! `plane_db::testing::bench` that runs the library's own statement. The bench keeps no copy
//! of a library statement.
//!
//! Baselines are the same Postgres doing the least work for the same result: the seed's
//! (Plane 0.5.5) statement pattern issued directly with sqlx (the `seed_*` functions in
//! `writers.rs`), a raw primary-key select, a plain LISTEN connection, the bus's read
//! statement as it was before its plan was fixed (frozen in `streams.rs`), or the same query
//! on a smaller table. The table printed at the end is Markdown, ready for `BENCHMARKS.md`.
//!
//! Correctness checks (every event delivered once, compared by id) are judged in `--quick`
//! mode too, and a failed one makes the run fail.

mod backlog;
mod common;
mod connect;
mod crossproc;
mod delivered;
mod growth;
mod hot;
mod memory;
mod replicas;
mod retention;
mod streams;
mod writers;

use common::{Bench, R};
use std::time::Instant;

/// Sections in the order they run. `memory` runs first, in a process whose heap has not yet
/// been grown and freed by other sections, so that RSS growth is not hidden by reused memory.
const SECTIONS: &[&str] = &[
    "memory",
    "writers",
    "connect",
    "route",
    "delivery",
    "backlog",
    "crossproc",
    "hot",
    "cleanup",
    "retention",
    "first-run",
    "growth",
    "replicas",
];

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Hidden child mode: the seed-style subscription memory baseline, measured in a process
    // of its own so that no memory freed by the parent's work hides its growth.
    if let Some(pos) = args.iter().position(|a| a == "--seed-subscriptions") {
        let n: usize = args.get(pos + 1).ok_or("--seed-subscriptions N")?.parse()?;
        return memory::seed_subscriptions_child(n);
    }
    // Hidden child mode: process B of the `crossproc` section, driven over stdin/stdout.
    if args.iter().any(|a| a == crossproc::WORKER_ARG) {
        return crossproc::worker();
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .map(|pos| {
            args.get(pos + 1)
                .map(|list| list.split(',').map(str::to_string).collect())
                .ok_or("--only takes a comma-separated list of sections")
        })
        .transpose()?;
    if let Some(only) = &only {
        for name in only {
            if !SECTIONS.contains(&name.as_str()) {
                return Err(format!("unknown section {name}; sections: {SECTIONS:?}").into());
            }
        }
    }
    let growth_max: Option<u32> = args
        .iter()
        .position(|a| a == "--growth-max")
        .map(|pos| {
            args.get(pos + 1)
                .and_then(|e| e.parse().ok())
                .filter(|e| (4..=8).contains(e))
                .ok_or("--growth-max takes a power of ten from 4 to 8")
        })
        .transpose()?;
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: bench [--quick] [--only {}] [--growth-max 4..8] [--growth-keep]",
            SECTIONS.join(",")
        );
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = plane_db::testing::server()?;
        let mut bench = Bench::new(quick);
        if let Some(max) = growth_max {
            bench.growth_max = max;
        }
        bench.growth_keep = args.iter().any(|a| a == "--growth-keep");
        println!(
            "plane-db bench ({} mode) on {}; {} CPUs",
            if quick { "quick" } else { "full" },
            if server.is_embedded() {
                "a throwaway Postgres (no DATABASE_URL)"
            } else {
                "the DATABASE_URL server"
            },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        let started = Instant::now();
        for &section in SECTIONS {
            if only
                .as_ref()
                .is_some_and(|only| !only.iter().any(|s| s == section))
            {
                continue;
            }
            let t = Instant::now();
            println!("\n== {section}");
            match section {
                "memory" => memory::run(&mut bench).await?,
                "writers" => writers::update_state(&mut bench).await?,
                "connect" => connect::connect(&mut bench).await?,
                "route" => hot::route(&mut bench).await?,
                "delivery" => streams::delivery(&mut bench).await?,
                "backlog" => backlog::backlog(&mut bench).await?,
                "crossproc" => crossproc::crossproc(&mut bench).await?,
                "hot" => hot::hot_queries(&mut bench).await?,
                "cleanup" => hot::cleanup(&mut bench).await?,
                "retention" => retention::retention(&mut bench).await?,
                "first-run" => retention::first_runs(&mut bench).await?,
                "growth" => growth::growth(&mut bench).await?,
                "replicas" => replicas::replicas(&mut bench).await?,
                _ => unreachable!("checked above"),
            }
            println!("   ({section}: {:.1} s)", t.elapsed().as_secs_f64());
        }
        bench.print_table(started.elapsed());
        if !bench.failed().is_empty() {
            return Err(format!("correctness checks failed: {}", bench.failed().join("; ")).into());
        }
        Ok(())
    })
}
