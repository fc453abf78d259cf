//! Reads on hot paths (route lookups, termination candidates, a drone's live backends) as
//! tables grow, and cleanup of old rows while writers keep writing.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::testing::bench as bench_hooks;
use plane_db::types::{BackendName, BackendState, BearerToken, NodeId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Inserts `n` tokens `{prefix}{i}` for backends `{backend_prefix}{i}`, storing their
/// SHA-256 digests as the library does.
pub async fn insert_tokens(
    env: &Env,
    prefix: &str,
    backend_prefix: &str,
    n: i64,
    expires_in_secs: f64,
) -> R<()> {
    sqlx::query(
        r#"
        insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
        select sha256(convert_to($1 || i, 'UTF8')), $2 || i, now() + make_interval(secs => $3),
               'bench', '{"plan": "bench"}', 'secret-' || i
        from generate_series(1, $4::bigint) i
        "#,
    )
    .bind(prefix)
    .bind(backend_prefix)
    .bind(expires_in_secs)
    .bind(n)
    .execute(&env.pool)
    .await?;
    Ok(())
}

pub async fn route(bench: &mut Bench) -> R<()> {
    let env = Env::new(1).await?;
    let n: i64 = bench.pick(100_000, 5_000);
    let lookups = bench.pick(20_000, 1_000);
    BulkBackends {
        prefix: "ba-r-",
        n,
        drone: env.drones[0].0,
        state: BackendState::Ready { address: address() },
        age_secs: 0.0,
        key_expires_in_secs: None,
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    insert_tokens(&env, "tok-", "ba-r-", n, 86_400.0).await?;
    analyze(&env.pool).await?;
    let check = env
        .db
        .backend()
        .route_info_for_token(&BearerToken::from("tok-1".to_string()))
        .await?;
    if !matches!(check, RouteInfoResult::Available(_)) {
        return Err(format!("route lookup of a loaded token gave {check:?}").into());
    }
    const RAW: &str = r#"select token_digest, backend_id, expiration_time, username, auth, secret_token
                         from token where token_digest = $1"#;
    let mut ours = Vec::with_capacity(lookups);
    let mut raw = Vec::with_capacity(lookups);
    // Interleaved, alternating which goes first, so both see the same machine.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for k in 0..(lookups + 1000) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = seed % n as u64 + 1;
        let token = BearerToken::from(format!("tok-{i}"));
        let digest = token.digest();
        let a = async {
            let t = Instant::now();
            let r = env.db.backend().route_info_for_token(&token).await?;
            if !matches!(r, RouteInfoResult::Available(_)) {
                return Err::<Duration, Box<dyn std::error::Error + Send + Sync>>(
                    "lookup missed".into(),
                );
            }
            Ok(t.elapsed())
        };
        let b = async {
            let t = Instant::now();
            sqlx::query(RAW)
                .bind(&digest)
                .fetch_optional(&env.pool)
                .await?
                .ok_or("raw lookup missed")?;
            R::Ok(t.elapsed())
        };
        let (da, db) = if k % 2 == 0 {
            let da = a.await?;
            (da, b.await?)
        } else {
            let db = b.await?;
            (a.await?, db)
        };
        if k >= 1000 {
            ours.push(da);
            raw.push(db);
        }
    }
    ours.sort();
    raw.sort();
    bench.heading(&format!(
        "route_info_for_token, {} live tokens ({} lookups, interleaved)",
        count(n as u64),
        count(lookups as u64)
    ));
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (a, b) = (pct(&ours, q), pct(&raw, q));
        bench.row(
            format!("route lookup {name}"),
            ms(a),
            "raw primary-key select on token",
            ms(b),
            ratio(a.as_secs_f64(), b.as_secs_f64()),
            Check::Target {
                target: "<= 1.2x".into(),
                ok: a.as_secs_f64() <= 1.2 * b.as_secs_f64(),
            },
        );
    }
    env.finish().await
}

/// The two hot listings whose plans the bench shows.
#[derive(Clone, Copy)]
enum Listing {
    TerminationCandidates,
    AliveForDrone,
}

impl Listing {
    fn name(self) -> &'static str {
        match self {
            Listing::TerminationCandidates => "termination_candidates",
            Listing::AliveForDrone => "list_alive_backends_for_drone",
        }
    }
}

/// The access path on `backend` in the plan of the library's own statement for `listing`
/// (through the hidden `testing::bench` hooks, with the arguments the call binds), and
/// whether every access to `backend` uses an index.
async fn plan(env: &Env, listing: Listing, drone: NodeId) -> R<(bool, String)> {
    let lines = match listing {
        Listing::TerminationCandidates => {
            bench_hooks::explain_termination_candidates(&env.pool, drone).await?
        }
        Listing::AliveForDrone => {
            bench_hooks::explain_list_alive_backends_for_drone(&env.pool, drone).await?
        }
    };
    let on_backend: Vec<&String> = lines.iter().filter(|l| l.contains(" on backend")).collect();
    let uses_index = !on_backend.is_empty()
        && on_backend
            .iter()
            .all(|l| l.contains("Index") && !l.contains("Seq Scan"));
    let access = on_backend
        .iter()
        .map(|l| l.trim().split("  (").next().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join("; ");
    Ok((uses_index, access))
}

/// A database holding `size` backend rows: 100 live ones on the measured drone (50 idle
/// past their allowance, so termination candidates, and 50 fresh), the rest terminated, nine
/// in ten of them on the measured drone and the rest on another.
async fn hot_env(size: i64) -> R<Env> {
    let mut env = Env::new(1).await?;
    let other = env.add_drone().await?;
    let drone = env.drones[0].0;
    for (prefix, age, n) in [("ba-idle-", 3600.0, 50), ("ba-fresh-", 0.0, 50)] {
        BulkBackends {
            prefix,
            n,
            drone,
            state: BackendState::Ready { address: address() },
            age_secs: age,
            key_expires_in_secs: None,
            allowed_idle_seconds: Some(600),
        }
        .insert(&env)
        .await?;
    }
    let add = size - 100;
    let here = add * 9 / 10;
    for (d, n, prefix) in [(drone, here, "ba-th-"), (other, add - here, "ba-to-")] {
        BulkBackends {
            prefix,
            n,
            drone: d,
            state: lifecycle()[5].clone(),
            age_secs: 7200.0,
            key_expires_in_secs: None,
            allowed_idle_seconds: Some(600),
        }
        .insert(&env)
        .await?;
    }
    analyze(&env.pool).await?;
    Ok(env)
}

pub async fn hot_queries(bench: &mut Bench) -> R<()> {
    let sizes: [i64; 3] = bench.pick([10_000, 100_000, 1_000_000], [1_000, 5_000, 20_000]);
    let calls = bench.pick(400, 40);
    // One database per size, all loaded at once; the calls then go round-robin over them,
    // so the sizes are compared at the same moments on a machine whose load drifts.
    let mut envs = Vec::new();
    for size in sizes {
        let t = Instant::now();
        envs.push(hot_env(size).await?);
        println!(
            "   loaded {} backend rows in {:.1} s",
            count(size as u64),
            t.elapsed().as_secs_f64()
        );
    }
    let mut tc: Vec<Vec<Duration>> = vec![Vec::new(); envs.len()];
    let mut la: Vec<Vec<Duration>> = vec![Vec::new(); envs.len()];
    for round in 0..(calls + calls / 5) {
        for (k, env) in envs.iter().enumerate() {
            let (drone, _) = &env.drones[0];
            let t = Instant::now();
            let c = env.db.backend().termination_candidates(*drone).await?;
            let d1 = t.elapsed();
            if c.len() != 50 {
                return Err(format!("expected 50 candidates, got {}", c.len()).into());
            }
            let t = Instant::now();
            let c = env
                .db
                .backend()
                .list_alive_backends_for_drone(*drone)
                .await?;
            let d2 = t.elapsed();
            if c.len() != 100 {
                return Err(format!("expected 100 live backends, got {}", c.len()).into());
            }
            // The first fifth warms caches and statement plans.
            if round >= calls / 5 {
                tc[k].push(d1);
                la[k].push(d2);
            }
        }
    }
    bench.heading(&format!(
        "hot queries, median of {calls} calls round-robin over three databases; a drone with 100 live backends, the rest terminated"
    ));
    for (listing, samples) in [
        (Listing::TerminationCandidates, &mut tc),
        (Listing::AliveForDrone, &mut la),
    ] {
        let name = listing.name();
        for s in samples.iter_mut() {
            s.sort();
        }
        let t0 = pct(&samples[0], 0.5);
        for (k, size) in sizes.iter().enumerate() {
            let t = pct(&samples[k], 0.5);
            let env = &envs[k];
            let (index, access) = plan(env, listing, env.drones[0].0).await?;
            println!(
                "   {name}, {} rows: {} [{access}]",
                count(*size as u64),
                ms(t)
            );
            bench.row(
                format!("{name}, {} backend rows", count(*size as u64)),
                ms(t),
                format!("same query at {} rows", count(sizes[0] as u64)),
                ms(t0),
                ratio(t.as_secs_f64(), t0.as_secs_f64()),
                if k == sizes.len() - 1 {
                    Check::Target {
                        target: format!("<= 1.5x, index used ({access})"),
                        ok: t.as_secs_f64() <= 1.5 * t0.as_secs_f64() && index,
                    }
                } else {
                    Check::None
                },
            );
        }
    }
    for env in envs {
        env.finish().await?;
    }
    Ok(())
}

pub async fn cleanup(bench: &mut Bench) -> R<()> {
    let env = Env::new(1).await?;
    let drone = env.drones[0].0;
    let old: i64 = bench.pick(100_000, 2_000);
    let live: i64 = bench.pick(100_000, 2_000);
    let batch: i32 = bench.pick(1_000, 200);
    let t = Instant::now();
    // Old terminated backends, each with 7 history rows (1 + 6 more), a token, an action
    // and an expired key.
    BulkBackends {
        prefix: "ba-old-",
        n: old,
        drone,
        state: lifecycle()[5].clone(),
        age_secs: 10.0 * 86_400.0,
        key_expires_in_secs: Some(-9.0 * 86_400.0),
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    sqlx::query(
        r#"
        insert into backend_state (backend_id, state, created_at)
        select 'ba-old-' || i, '{"status": "loading"}', now() - interval '10 days'
        from generate_series(1, $1::bigint) i, generate_series(1, 6) s
        "#,
    )
    .bind(old)
    .execute(&env.pool)
    .await?;
    insert_tokens(&env, "old-tok-", "ba-old-", old, -9.0 * 86_400.0).await?;
    sqlx::query(
        r#"
        insert into backend_action (id, backend_id, drone_id, action, created_at, acked_at)
        select 'ak-old-' || i, 'ba-old-' || i, $1, '{"Terminate": {"kind": "soft", "reason": "swept"}}',
               now() - interval '10 days', now() - interval '10 days'
        from generate_series(1, $2::bigint) i
        "#,
    )
    .bind(drone.as_i32())
    .bind(old)
    .execute(&env.pool)
    .await?;
    // Live backends with live tokens, which cleanup must leave alone.
    BulkBackends {
        prefix: "ba-live-",
        n: live,
        drone,
        state: BackendState::Ready { address: address() },
        age_secs: 0.0,
        key_expires_in_secs: Some(3600.0),
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    insert_tokens(&env, "live-tok-", "ba-live-", live, 86_400.0).await?;
    // Backends for the writer that runs beside cleanup.
    let writer_backends = bench.pick(20_000_i64, 2_000);
    BulkBackends {
        prefix: "ba-wr-",
        n: writer_backends,
        drone,
        state: BackendState::Scheduled,
        age_secs: 0.0,
        key_expires_in_secs: Some(3600.0),
        allowed_idle_seconds: None,
    }
    .insert(&env)
    .await?;
    analyze(&env.pool).await?;
    println!("   loaded in {:.1} s", t.elapsed().as_secs_f64());

    // One writer, moving its backends through their lifecycle, until told to stop.
    let states = lifecycle();
    let next = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = |stop: Arc<AtomicBool>, limit: Option<Duration>| {
        let db = env.db.clone();
        let states = states.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            'outer: loop {
                let i = next.fetch_add(1, Ordering::Relaxed) + 1;
                if i > writer_backends {
                    return Err::<Vec<Duration>, Box<dyn std::error::Error + Send + Sync>>(
                        "writer ran out of backends".into(),
                    );
                }
                let name = BackendName::try_from(format!("ba-wr-{i}"))?;
                for state in &states {
                    if stop.load(Ordering::Relaxed) || limit.is_some_and(|l| start.elapsed() >= l) {
                        break 'outer;
                    }
                    let t = Instant::now();
                    db.backend().update_state(&name, state).await?;
                    samples.push(t.elapsed());
                }
            }
            samples.sort();
            Ok(samples)
        })
    };
    let idle_for = bench.pick(Duration::from_secs(5), Duration::from_millis(500));
    let idle = writer(Arc::new(AtomicBool::new(false)), Some(idle_for)).await??;

    // The same writer while one server process keeps a core busy with work that touches
    // no table (no locks, no I/O, no WAL): what sharing the two cores alone does to the
    // writer's tail, to compare cleanup's effect with.
    let burning = Arc::new(AtomicBool::new(true));
    let burner = {
        let pool = env.pool.clone();
        let burning = burning.clone();
        tokio::spawn(async move {
            while burning.load(Ordering::Relaxed) {
                sqlx::query("select sum(x) from generate_series(1, 2000000) x")
                    .execute(&pool)
                    .await?;
            }
            R::Ok(())
        })
    };
    let busy = writer(Arc::new(AtomicBool::new(false)), Some(idle_for)).await??;
    burning.store(false, Ordering::Relaxed);
    burner.await??;

    let stop = Arc::new(AtomicBool::new(false));
    let during = writer(stop.clone(), None);
    let t = Instant::now();
    let report = env
        .db
        .backend()
        .cleanup_terminated(Duration::from_secs(24 * 3600), batch)
        .await?;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = during.await??;
    let rows = report.backends + report.states + report.tokens + report.actions + report.keys;
    println!("   cleanup: {report:?} in {:.2} s", took.as_secs_f64());
    let left: i64 = sqlx::query_scalar("select count(*) from token")
        .fetch_one(&env.pool)
        .await?;
    if rows != (old as u64) * 11 || left != live {
        return Err(format!(
            "cleanup deleted {rows} rows (expected {}), {left} tokens left (expected {live})",
            old * 11
        )
        .into());
    }
    bench.heading(&format!(
        "cleanup: {} old terminated backends with 7 history rows, a token, an action, an expired key ({} rows); {} live tokens present; batches of {batch}",
        count(old as u64),
        count(rows),
        count(live as u64)
    ));
    bench.row(
        "cleanup total time",
        format!("{:.2} s", took.as_secs_f64()),
        "",
        "",
        "",
        Check::Target {
            target: "<= 30 s".into(),
            ok: took <= Duration::from_secs(30),
        },
    );
    bench.row(
        "cleanup rows deleted per second",
        per_s(rows as f64 / took.as_secs_f64()),
        "",
        "",
        "",
        Check::None,
    );
    let (a, b) = (pct(&during, 0.99), pct(&idle, 0.99));
    bench.row(
        format!("update_state p99 during cleanup ({} changes)", during.len()),
        ms(a),
        format!("idle, just before ({} changes)", idle.len()),
        ms(b),
        ratio(a.as_secs_f64(), b.as_secs_f64()),
        Check::Target {
            target: "<= 3x idle".into(),
            ok: a.as_secs_f64() <= 3.0 * b.as_secs_f64(),
        },
    );
    let (c, b) = (pct(&busy, 0.99), pct(&idle, 0.99));
    bench.row(
        format!(
            "  update_state p99, one core busy with a query on no table ({} changes)",
            busy.len()
        ),
        ms(c),
        "idle, just before",
        ms(b),
        ratio(c.as_secs_f64(), b.as_secs_f64()),
        Check::None,
    );
    bench.row(
        "  update_state p99 during cleanup, against one core busy",
        ms(a),
        "one core busy with a query on no table",
        ms(c),
        ratio(a.as_secs_f64(), c.as_secs_f64()),
        Check::None,
    );
    let (a, b) = (pct(&during, 0.5), pct(&idle, 0.5));
    bench.row(
        "update_state p50 during cleanup",
        ms(a),
        "idle, just before",
        ms(b),
        ratio(a.as_secs_f64(), b.as_secs_f64()),
        Check::None,
    );
    env.finish().await
}
