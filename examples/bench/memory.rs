//! Memory added by live status streams, and their delivery p99, beside the seed's
//! subscription (a 1,000-slot broadcast channel per key) measured in a child process.

use crate::common::*;
use crate::streams::{open_stream, raw_listener, timed_changes, via_seed, via_update_state, Pace};
use plane_db::events::Notification;
use plane_db::types::{BackendName, BackendState};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Child mode: allocate `n` seed-style subscriptions (Plane 0.5.5 gave each keyed
/// subscription a `broadcast` channel of 1,000 `Notification`s) and print the RSS they add.
pub fn seed_subscriptions_child(n: usize) -> R<()> {
    let before = rss_bytes()?;
    let mut keep = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = tokio::sync::broadcast::channel::<Notification<BackendState>>(1000);
        keep.push((tx, rx));
    }
    let after = rss_bytes()?;
    println!("{}", after.saturating_sub(before));
    drop(keep);
    Ok(())
}

/// Per-subscription bytes of the seed's design, from a child process.
fn seed_bytes_per_subscription(n: usize) -> R<f64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--seed-subscriptions", &n.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "seed-subscription child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let bytes: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
    Ok(bytes / n as f64)
}

pub async fn run(bench: &mut Bench) -> R<()> {
    let env = Env::new(1).await?;
    let drone = env.drones[0].0;
    let steps: [usize; 2] = bench.pick([10_000, 100_000], [1_000, 5_000]);
    let (first, total) = (steps[0], steps[1]);
    let sample = bench.pick(1000_usize, 100);
    BulkBackends {
        prefix: "ba-m-",
        n: total as i64,
        drone,
        state: BackendState::Scheduled,
        age_secs: 0.0,
        key_expires_in_secs: None,
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    // Backends for the raw-LISTEN baseline's changes.
    BulkBackends {
        prefix: "ba-mraw-",
        n: (2 * sample) as i64,
        drone,
        state: BackendState::Scheduled,
        age_secs: 0.0,
        key_expires_in_secs: None,
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    analyze(&env.pool).await?;
    // Start the bus and warm the pool before the first RSS reading.
    drop(env.db.subscribe_all_events().await?);
    let mut raw_rx = raw_listener(&env, "bench_raw_mem").await?;
    crate::streams::warm_up(&env).await?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let baseline_rss = rss_bytes()?;
    let mut opened = 0_usize;
    let seed_per_sub = seed_bytes_per_subscription(bench.pick(1000, 200))?;
    bench.heading("live status streams in one process (each consumed by its own task)");
    for (step, target_mb) in [(first, 20.0), (total, 200.0)] {
        let t = Instant::now();
        // Open streams concurrently, 32 at a time, as many clients connecting at once.
        let mut tasks = Vec::new();
        let workers = 32;
        for w in 0..workers {
            let db = env.db.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = opened + 1 + w;
                while i <= step {
                    let name = BackendName::try_from(format!("ba-m-{i}"))?;
                    open_stream(&db, &name, i as u32, tx.clone()).await?;
                    i += workers;
                }
                R::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        // Every new stream has delivered its history (`scheduled`): all are live.
        for _ in opened..step {
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await?
                .ok_or("streams ended")?;
        }
        println!(
            "   opened {} streams in {:.1} s",
            step - opened,
            t.elapsed().as_secs_f64()
        );
        opened = step;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let added = rss_bytes()?.saturating_sub(baseline_rss) as f64;
        bench.row(
            format!("memory added by {} status streams", count(step as u64)),
            mb(added),
            "seed: 1,000-slot channel per subscription",
            mb(seed_per_sub * step as f64),
            ratio(added, seed_per_sub * step as f64),
            Check::Target {
                target: format!("<= {target_mb:.0} MB"),
                ok: added <= target_mb * 1e6,
            },
        );
        bench.row(
            format!("  per stream, {} streams", count(step as u64)),
            format!("{:.0} B", added / step as f64),
            "seed, per subscription (child process)",
            format!("{seed_per_sub:.0} B"),
            ratio(added / step as f64, seed_per_sub),
            Check::None,
        );

        // Delivery with this many streams open: `sample` changes at 1,000/s to streams
        // spread over all of them, beside the same through a plain LISTEN.
        let stride = (step / sample).max(1);
        let status = if step == first {
            BackendState::Loading
        } else {
            BackendState::Starting
        };
        let changes = (0..sample)
            .map(|k| {
                let i = 1 + k * stride;
                Ok((
                    i as u32,
                    BackendName::try_from(format!("ba-m-{i}"))?,
                    status.clone(),
                ))
            })
            .collect::<R<Vec<_>>>()?;
        let ours = timed_changes(
            changes,
            Pace::PerSecond(1000.0),
            &mut rx,
            via_update_state(env.db.clone()),
        )
        .await?;
        let offset = if step == first { 0 } else { sample };
        let changes = (0..sample)
            .map(|k| {
                let i = 1 + k + offset;
                Ok((
                    i as u32,
                    BackendName::try_from(format!("ba-mraw-{i}"))?,
                    BackendState::Loading,
                ))
            })
            .collect::<R<Vec<_>>>()?;
        let raw = timed_changes(
            changes,
            Pace::PerSecond(1000.0),
            &mut raw_rx,
            via_seed(&env, "bench_raw_mem"),
        )
        .await?;
        let (a, b) = (pct(&ours, 0.99), pct(&raw, 0.99));
        bench.row(
            format!(
                "  delivery p99 with {} streams open (1,000 changes/s)",
                count(step as u64)
            ),
            ms(a),
            "plain LISTEN, seed NOTIFY",
            ms(b),
            ratio(a.as_secs_f64(), b.as_secs_f64()),
            Check::Target {
                target: "<= 5 ms".into(),
                ok: a <= Duration::from_millis(5),
            },
        );
    }
    drop(tx);
    drop(rx);
    env.finish().await
}
