//! Connect: new backends per second against the seed's sequence of statements.

use crate::common::*;
use crate::writers::{interleaved, seed_emit, seed_listener, unbatched_db};
use plane_db::connect::ConnectRequest;
use plane_db::types::{
    BackendActionName, BackendName, BackendState, BearerToken, ClusterName, DronePoolName,
    KeyConfig, SecretToken,
};
use plane_db::PlaneDatabase;
use sqlx::PgPool;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Connector {
    /// Only the drone pick that both sequences start with.
    PickOnly,
    Seed,
    /// `connect` as before both optimisations: NOTIFY in every commit, one transaction per
    /// call.
    TriggerNotify,
    /// With coalesced wake-ups, one transaction per call (group commit off).
    Unbatched,
    /// As shipped: coalesced wake-ups and group commit.
    Batched,
}

impl Connector {
    fn name(self) -> &'static str {
        match self {
            Connector::PickOnly => "the drone pick alone (in both)",
            Connector::Seed => "seed's sequence of statements",
            Connector::TriggerNotify => "connect, NOTIFY in every commit",
            Connector::Unbatched => "connect, one transaction per call",
            Connector::Batched => "connect (group commit)",
        }
    }
}

/// The drone pick both sequences start with: the library's own (`pick_for_spawn`). The seed's
/// pick differed; using the same one on both sides keeps the comparison about the rest.
async fn pick_drone(db: &PlaneDatabase, cluster: &ClusterName) -> R<i32> {
    let picked = db
        .drone()
        .pick_for_spawn(cluster, &DronePoolName::default())
        .await?
        .ok_or("no drone")?;
    Ok(picked.id.as_i32())
}

/// The seed's (Plane 0.5.5) statements for a connect that creates a backend: check the key;
/// pick a drone; in one transaction insert the backend and key, the history row and its
/// event (+ NOTIFY), the spawn action and its event (+ NOTIFY); then insert the token.
async fn seed_connect(
    db: &PlaneDatabase,
    pool: &PgPool,
    cluster: &ClusterName,
    key: &str,
) -> R<()> {
    sqlx::query(
        r#"
        select k.id, k.tag, k.expires_at > now() as live, b.last_status, b.cluster,
               b.subdomain, b.static_token
        from backend_key k left join backend b on b.id = k.id
        where k.namespace = $1 and k.key_name = $2
        "#,
    )
    .bind("")
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let drone = pick_drone(db, cluster).await?;
    let backend = BackendName::new_random();
    let scheduled = serde_json::to_value(BackendState::Scheduled)?;
    let mut txn = pool.begin().await?;
    sqlx::query(
        r#"
        with backend_insert as (
            insert into backend (id, cluster, last_status, last_status_time, last_status_number,
                                 drone_id, expiration_time, allowed_idle_seconds, last_keepalive,
                                 state, static_token, subdomain)
            values ($1, $2, 'scheduled', now(), 10, $3, null, 300, now(), $4, null, null)
            returning id
        )
        insert into backend_key (id, key_name, namespace, tag, expires_at, fencing_token)
        select $1, $5, '', '', now() + interval '50 seconds',
               (extract(epoch from now()) * 1000)::bigint
        from backend_insert
        returning fencing_token
        "#,
    )
    .bind(backend.as_str())
    .bind(cluster.as_str())
    .bind(drone)
    .bind(&scheduled)
    .bind(key)
    .fetch_one(&mut *txn)
    .await?;
    sqlx::query("insert into backend_state (backend_id, state) values ($1, $2)")
        .bind(backend.as_str())
        .bind(&scheduled)
        .execute(&mut *txn)
        .await?;
    seed_emit(
        &mut txn,
        "backend_state",
        backend.as_str(),
        &scheduled,
        Some("plane_seed_events"),
    )
    .await?;
    let action_id = BackendActionName::new_random();
    let action = serde_json::json!({ "Spawn": { "executable": { "image": "bench" },
        "key": { "key": { "name": key, "namespace": "", "tag": "" }, "token": 1 } } });
    sqlx::query(
        "insert into backend_action (id, backend_id, drone_id, action) values ($1, $2, $3, $4)",
    )
    .bind(action_id.as_str())
    .bind(backend.as_str())
    .bind(drone)
    .bind(&action)
    .execute(&mut *txn)
    .await?;
    let message = serde_json::json!({ "action_id": action_id.as_str(),
        "backend_id": backend.as_str(), "drone_id": drone, "action": action });
    seed_emit(
        &mut txn,
        "backend_action",
        &drone.to_string(),
        &message,
        Some("plane_seed_events"),
    )
    .await?;
    txn.commit().await?;
    let token = BearerToken::new_random();
    sqlx::query(
        r#"
        insert into token (token_digest, backend_id, username, auth, secret_token, expiration_time)
        values ($1, $2, $3, $4, $5, now() + interval '1 hour')
        "#,
    )
    .bind(token.digest())
    .bind(backend.as_str())
    .bind("bench")
    .bind(serde_json::json!({}))
    .bind(SecretToken::new_random().as_str())
    .execute(pool)
    .await?;
    Ok(())
}

async fn run_connect(
    env: &Env,
    variants: &Variants,
    kind: Connector,
    callers: usize,
    duration: Duration,
    run: usize,
) -> R<(u64, Duration)> {
    // Every run starts with no live backends, so the drone-load count in the pick query
    // costs the same for each.
    sqlx::query("update backend set last_status_number = 70, last_status = 'terminated'")
        .execute(&env.pool)
        .await?;
    env.heartbeat_all().await?;
    let spawn = env.spawn_config();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let db = match kind {
            Connector::TriggerNotify => variants.trigger_notify.clone(),
            Connector::Unbatched => variants.unbatched.clone(),
            Connector::Batched => variants.batched.clone(),
            Connector::PickOnly | Connector::Seed => env.db.clone(),
        };
        let pool = env.pool.clone();
        let spawn = spawn.clone();
        let cluster = env.cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0_u64;
            while Instant::now() < deadline {
                let key = format!("k{run}-{c}-{done}");
                match kind {
                    Connector::PickOnly => {
                        pick_drone(&db, &cluster).await?;
                    }
                    Connector::Seed => seed_connect(&db, &pool, &cluster, &key).await?,
                    Connector::TriggerNotify | Connector::Unbatched | Connector::Batched => {
                        let response = db
                            .connect(&ConnectRequest {
                                key: Some(KeyConfig {
                                    name: key,
                                    ..KeyConfig::default()
                                }),
                                spawn_config: Some(spawn.clone()),
                                user: Some("bench".into()),
                                auth: serde_json::Map::new(),
                            })
                            .await?;
                        if !response.spawned {
                            return Err("connect did not spawn".into());
                        }
                    }
                }
                done += 1;
            }
            R::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed()))
}

/// A handle on the bench's pool for each plane-db variant. Each runs a bus with one
/// subscriber, as in a controller, so that each variant pays for reading back what it
/// wrote in the same way (a handle's own commits wake its bus at once; the others' reach
/// it by NOTIFY).
struct Variants {
    trigger_notify: PlaneDatabase,
    unbatched: PlaneDatabase,
    batched: PlaneDatabase,
}

impl Variants {
    async fn new(env: &Env) -> R<Self> {
        let variants = Variants {
            trigger_notify: unbatched_db(env, false),
            unbatched: unbatched_db(env, true),
            batched: PlaneDatabase::with_config(env.pool.clone(), plane_db::Config::default()),
        };
        for db in [
            &variants.trigger_notify,
            &variants.unbatched,
            &variants.batched,
        ] {
            let mut sub = db.subscribe_all_events().await?;
            tokio::spawn(async move { while sub.next().await.is_some() {} });
        }
        Ok(variants)
    }
}

pub async fn connect(bench: &mut Bench) -> R<()> {
    let env = Env::new(8).await?;
    let variants = Variants::new(&env).await?;
    seed_listener(&env).await?;
    let (slice, rounds) = bench.pick(
        (Duration::from_millis(500), 4),
        (Duration::from_millis(300), 1),
    );
    bench.heading(&format!(
        "connect: new backends/s (8 drones; {rounds} interleaved slices of {} ms per figure, twice as many at 1 caller)",
        slice.as_millis()
    ));
    let mut run = 0;
    let kinds = [
        Connector::PickOnly,
        Connector::Seed,
        Connector::TriggerNotify,
        Connector::Unbatched,
        Connector::Batched,
    ];
    for callers in [1_usize, 16] {
        // As in the writers section: twice the slices for the within-5% comparison.
        let rounds = if callers == 1 { 2 * rounds } else { rounds };
        let rates = interleaved(&kinds, rounds, |kind| {
            run += 1;
            run_connect(&env, &variants, kind, callers, slice, run)
        })
        .await?;
        for (kind, rate, _) in &rates {
            println!("   {callers:>2} callers, {:<40} {rate:>8.0}/s", kind.name());
        }
        let rates: Vec<(Connector, f64)> = rates.into_iter().map(|(k, r, _)| (k, r)).collect();
        let rate = |k: Connector| rates.iter().find(|(w, _)| *w == k).map_or(0.0, |r| r.1);
        let ours = rate(Connector::Batched);
        let seed = rate(Connector::Seed);
        bench.row(
            format!("connect, {}", plural(callers, "caller")),
            per_s(ours),
            Connector::Seed.name(),
            per_s(seed),
            ratio(ours, seed),
            if callers == 16 {
                Check::Target {
                    target: ">= 2x seed".into(),
                    ok: ours >= 2.0 * seed,
                }
            } else {
                Check::None
            },
        );
        let pick = rate(Connector::PickOnly);
        bench.row(
            format!(
                "  drone pick alone, {} (part of both)",
                plural(callers, "caller")
            ),
            per_s(pick),
            "",
            "",
            "",
            Check::None,
        );
        let unbatched = rate(Connector::Unbatched);
        let before = rate(Connector::TriggerNotify);
        bench.row(
            format!(
                "connect, {} (optimisation: coalesced wake-ups)",
                plural(callers, "caller")
            ),
            per_s(unbatched),
            "before: NOTIFY in every commit",
            per_s(before),
            ratio(unbatched, before),
            Check::None,
        );
        bench.row(
            format!(
                "connect, {} (optimisation: group commit)",
                plural(callers, "caller")
            ),
            per_s(ours),
            "before: one transaction per call",
            per_s(unbatched),
            ratio(ours, unbatched),
            if callers == 1 {
                Check::Target {
                    target: "not slower (within 5%)".into(),
                    ok: ours >= 0.95 * unbatched,
                }
            } else {
                Check::None
            },
        );
    }
    drop(variants);
    env.finish().await
}
