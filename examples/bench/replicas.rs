//! Issue 15's figures, on a private primary with a streaming replica of it (both throwaway
//! servers on this machine):
//!
//! - `replicas`: route lookups per second from the primary alone and with the replica (the
//!   same lookups, the same concurrency, interleaved rounds), with the Postgres CPU each
//!   server spent per lookup; and `update_state` events per second with the primary's CPU
//!   per event. "Per core" figures divide by the server CPU measured, not by the machine's
//!   cores: the bench itself and both servers share them.
//!
//! The cross-process delivery figure of issue 15, item 4 is the `crossproc` section
//! (`crossproc.rs`).
//!
//! Server CPU is read from `/proc` (Linux): the postmaster's own and reaped children's
//! time, plus its live children's (backends, WAL sender, background workers), in clock
//! ticks of 10 ms.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::node::NodeRegistration;
use plane_db::testing::{private_server, TestServer};
use plane_db::types::{
    BackendName, BackendState, BearerToken, ClusterName, ControllerName, DroneName, DronePoolName,
    NodeId, NodeKind,
};
use plane_db::{Config, OpenOptions, PlaneDatabase, ReplicaConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// A private primary, a streaming replica of it, and a migrated database on both.
struct Pair {
    primary: TestServer,
    replica: TestServer,
    name: String,
    cluster: ClusterName,
}

impl Pair {
    async fn start() -> R<Self> {
        let primary = tokio::task::spawn_blocking(private_server).await??;
        let database = primary.create_database().await?;
        plane_db::open_and_migrate(&database.url)
            .await?
            .pool()
            .close()
            .await;
        let replica = tokio::task::spawn_blocking({
            // `replica` needs the server itself; hand it over and back.
            move || primary.replica().map(|replica| (primary, replica))
        })
        .await??;
        let (primary, replica) = replica;
        Ok(Self {
            primary,
            replica,
            name: database.name,
            cluster: "bench.example:9090".parse()?,
        })
    }

    fn primary_url(&self) -> String {
        self.primary.url_for(&self.name)
    }

    fn replica_url(&self) -> String {
        self.replica.url_for(&self.name)
    }

    /// The database, reading from the replica or not.
    async fn open(&self, with_replica: bool, connections: u32) -> R<PlaneDatabase> {
        let mut options = OpenOptions::new(&self.primary_url())?
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(60))
            .config(Config {
                replicas: ReplicaConfig::default(),
                ..Config::default()
            });
        if with_replica {
            options = options.replica_url(&self.replica_url())?;
        }
        let db = options.open().await?;
        if with_replica {
            let started = Instant::now();
            while !db.replicas().iter().all(|r| r.usable) {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(
                        format!("the replica never became usable: {:?}", db.replicas()).into(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(db)
    }

    /// A registered drone of an online controller.
    async fn drone(&self, db: &PlaneDatabase) -> R<NodeId> {
        let controller = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, "bench", "bench")
            .await?;
        let name = DroneName::new_random();
        let id = db
            .node()
            .register(&NodeRegistration {
                controller: &controller,
                kind: NodeKind::Drone,
                name: name.as_str(),
                cluster: Some(&self.cluster),
                plane_version: "bench",
                plane_hash: "bench",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await?
            .id;
        db.drone()
            .register(id, true, &DronePoolName::default())
            .await?;
        Ok(id)
    }

    /// Bulk-loads `n` backends `{prefix}{1..=n}` in `state` on `drone`, each with a history
    /// row, and (with `tokens`) a live token `{prefix}tok-{i}` for each.
    async fn load(
        &self,
        db: &PlaneDatabase,
        prefix: &str,
        n: i64,
        drone: NodeId,
        state: &BackendState,
        tokens: bool,
    ) -> R<()> {
        let status = state.status();
        let json = serde_json::to_value(state)?;
        sqlx::query(
            r#"
            insert into backend (id, cluster, last_status, last_status_number, last_status_time,
                                 state, cluster_address, drone_id, last_keepalive)
            select $1 || i, $2, $3, $4, now(), $5, $6, $7, now()
            from generate_series(1, $8::bigint) i
            "#,
        )
        .bind(prefix)
        .bind(self.cluster.as_str())
        .bind(status.to_string())
        .bind(status.as_int())
        .bind(&json)
        .bind(state.address().map(|a| a.to_string()))
        .bind(drone.as_i32())
        .bind(n)
        .execute(db.pool())
        .await?;
        sqlx::query(
            r#"
            insert into backend_state (backend_id, state, created_at)
            select $1 || i, $2, now() from generate_series(1, $3::bigint) i
            "#,
        )
        .bind(prefix)
        .bind(&json)
        .bind(n)
        .execute(db.pool())
        .await?;
        if tokens {
            // The library stores the SHA-256 digest of the token's text.
            sqlx::query(
                r#"
                insert into token (token_digest, backend_id, expiration_time, username, auth,
                                   secret_token)
                select sha256(convert_to($1 || 'tok-' || i, 'UTF8')), $1 || i,
                       now() + interval '1 day', 'bench', '{"plan": "bench"}', 'secret-' || i
                from generate_series(1, $2::bigint) i
                "#,
            )
            .bind(prefix)
            .bind(n)
            .execute(db.pool())
            .await?;
        }
        sqlx::query("analyze").execute(db.pool()).await?;
        Ok(())
    }

    /// Waits until the replica has replayed everything the primary has.
    async fn wait_replayed(&self) -> R<()> {
        let primary = sqlx::PgPool::connect(&self.primary_url()).await?;
        let replica = sqlx::PgPool::connect(&self.replica_url()).await?;
        let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&primary)
            .await?;
        let started = Instant::now();
        loop {
            let done: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&replica)
                .await?;
            if done {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err("the replica did not catch up".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        primary.close().await;
        replica.close().await;
        Ok(())
    }
}

/// The CPU a server's processes have used so far.
struct ServerCpu {
    postmaster: u32,
}

impl ServerCpu {
    async fn of(url: &str) -> R<Self> {
        let pool = sqlx::PgPool::connect(url).await?;
        let backend: i32 = sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
        let postmaster = proc_stat(backend as u32)?.ppid;
        pool.close().await;
        Ok(Self { postmaster })
    }

    fn seconds(&self) -> R<f64> {
        let own = proc_stat(self.postmaster)?;
        let mut ticks = own.utime + own.stime + own.cutime + own.cstime;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // A process may exit between the listing and the read.
            if let Ok(stat) = proc_stat(pid) {
                if stat.ppid == self.postmaster {
                    ticks += stat.utime + stat.stime;
                }
            }
        }
        Ok(ticks as f64 / CLOCK_TICKS_PER_SECOND)
    }
}

struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn proc_stat(pid: u32) -> R<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = text.rsplit_once(')').ok_or("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> R<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc stat")?
            .parse::<i64>()?
            .max(0) as u64)
    };
    Ok(ProcStat {
        ppid: field(1)? as u32,
        utime: field(11)?,
        stime: field(12)?,
        cutime: field(13)?,
        cstime: field(14)?,
    })
}

/// One timed run of route lookups: how many, and the CPU each server spent.
struct LookupRun {
    lookups: u64,
    seconds: f64,
    primary_cpu: f64,
    replica_cpu: f64,
    served_by_replica: u64,
}

async fn lookup_run(
    db: &PlaneDatabase,
    prefix: &str,
    n: i64,
    tasks: usize,
    duration: Duration,
    cpu: (&ServerCpu, &ServerCpu),
) -> R<LookupRun> {
    let replica_reads = || db.replicas().iter().map(|r| r.reads).sum::<u64>();
    let reads_before = replica_reads();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let missed = Arc::new(AtomicU64::new(0));
    let (p0, r0) = (cpu.0.seconds()?, cpu.1.seconds()?);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (db, stop, done, missed) = (db.clone(), stop.clone(), done.clone(), missed.clone());
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (t as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = seed % n as u64 + 1;
                let token = BearerToken::from(format!("{prefix}tok-{i}"));
                match db.backend().route_info_for_token(&token).await {
                    Ok(RouteInfoResult::Available(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => missed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (p1, r1) = (cpu.0.seconds()?, cpu.1.seconds()?);
    let missed = missed.load(Ordering::Relaxed);
    if missed > 0 {
        return Err(format!("{missed} route lookups failed or missed").into());
    }
    Ok(LookupRun {
        lookups: done.load(Ordering::Relaxed),
        seconds,
        primary_cpu: p1 - p0,
        replica_cpu: r1 - r0,
        served_by_replica: replica_reads() - reads_before,
    })
}

/// `n` per CPU-second, or what can be said when less than two clock ticks were measured.
fn per_cpu_second(n: f64, cpu_seconds: f64) -> String {
    if cpu_seconds < 2.0 / CLOCK_TICKS_PER_SECOND {
        format!("(under {:.0} ms CPU)", 2e3 / CLOCK_TICKS_PER_SECOND)
    } else {
        per_s(n / cpu_seconds)
    }
}

/// Sums of several runs.
#[derive(Default)]
struct Totals {
    lookups: u64,
    seconds: f64,
    primary_cpu: f64,
    replica_cpu: f64,
    served_by_replica: u64,
}

impl Totals {
    fn add(&mut self, run: &LookupRun) {
        self.lookups += run.lookups;
        self.seconds += run.seconds;
        self.primary_cpu += run.primary_cpu;
        self.replica_cpu += run.replica_cpu;
        self.served_by_replica += run.served_by_replica;
    }

    fn per_second(&self) -> f64 {
        self.lookups as f64 / self.seconds.max(1e-9)
    }

    /// Lookups per second of CPU of both servers.
    fn per_server_core(&self) -> String {
        per_cpu_second(self.lookups as f64, self.primary_cpu + self.replica_cpu)
    }
}

pub async fn replicas(bench: &mut Bench) -> R<()> {
    let pair = Pair::start().await?;
    let (primary_cpu, replica_cpu) = (
        ServerCpu::of(&pair.primary_url()).await?,
        ServerCpu::of(&pair.replica_url()).await?,
    );
    let cpu = (&primary_cpu, &replica_cpu);
    let tasks = 32;
    let alone = pair.open(false, tasks as u32).await?;
    let drone = pair.drone(&alone).await?;
    let n: i64 = bench.pick(100_000, 5_000);
    pair.load(
        &alone,
        "ba-rr-",
        n,
        drone,
        &BackendState::Ready { address: address() },
        true,
    )
    .await?;
    pair.wait_replayed().await?;
    let with_replica = pair.open(true, tasks as u32).await?;

    // Interleaved rounds, so both see the same machine; a warm-up round each first.
    let duration = bench.pick(Duration::from_secs(5), Duration::from_secs(1));
    let rounds = bench.pick(3, 1);
    let (mut a, mut b) = (Totals::default(), Totals::default());
    lookup_run(&alone, "ba-rr-", n, tasks, Duration::from_millis(500), cpu).await?;
    lookup_run(
        &with_replica,
        "ba-rr-",
        n,
        tasks,
        Duration::from_millis(500),
        cpu,
    )
    .await?;
    for _ in 0..rounds {
        a.add(&lookup_run(&alone, "ba-rr-", n, tasks, duration, cpu).await?);
        b.add(&lookup_run(&with_replica, "ba-rr-", n, tasks, duration, cpu).await?);
    }
    bench.heading(&format!(
        "route lookups, {} live tokens, {tasks} concurrent callers, {rounds} × {} s per setup (interleaved); both servers on this machine",
        count(n as u64),
        duration.as_secs()
    ));
    bench.row(
        "lookups/s with a replica",
        per_s(b.per_second()),
        "lookups/s from the primary alone",
        per_s(a.per_second()),
        ratio(b.per_second(), a.per_second()),
        Check::None,
    );
    bench.row(
        "share served by the replica",
        format!(
            "{:.1}%",
            100.0 * b.served_by_replica as f64 / b.lookups.max(1) as f64
        ),
        "",
        "",
        "",
        Check::None,
    );
    let cores = |cpu: f64, t: &Totals| format!("{:.2} cores", cpu / t.seconds.max(1e-9));
    bench.row(
        "primary CPU while looking up, with a replica",
        cores(b.primary_cpu, &b),
        "primary alone",
        cores(a.primary_cpu, &a),
        "",
        Check::None,
    );
    bench.row(
        "replica CPU while looking up, with a replica",
        cores(b.replica_cpu, &b),
        "primary alone (replica idle)",
        cores(a.replica_cpu, &a),
        "",
        Check::None,
    );
    bench.row(
        "lookups per server CPU-second, with a replica",
        b.per_server_core(),
        "primary alone",
        a.per_server_core(),
        "",
        Check::None,
    );

    // Events per second: `update_state` from 32 writers, each backend through its life.
    let backends: i64 = bench.pick(20_000, 2_000);
    pair.load(
        &alone,
        "ba-ev-",
        backends,
        drone,
        &BackendState::Scheduled,
        false,
    )
    .await?;
    let next = Arc::new(AtomicUsize::new(1));
    let events = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (p0, r0) = (primary_cpu.seconds()?, replica_cpu.seconds()?);
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..tasks {
        let (db, next, events, stop) = (alone.clone(), next.clone(), events.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i as i64 > backends {
                    break;
                }
                let name: BackendName = format!("ba-ev-{i}").parse()?;
                for state in lifecycle() {
                    if !db.backend().update_state(&name, &state).await? {
                        return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                            "a forward transition was refused".into(),
                        );
                    }
                    events.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (p1, r1) = (primary_cpu.seconds()?, replica_cpu.seconds()?);
    let events = events.load(Ordering::Relaxed) as f64;
    bench.heading(&format!(
        "update_state events, {tasks} writers for {} s, the replica streaming",
        duration.as_secs()
    ));
    bench.row("events/s", per_s(events / seconds), "", "", "", Check::None);
    bench.row(
        "events per primary CPU-second",
        per_cpu_second(events, p1 - p0),
        "primary CPU while writing",
        format!("{:.2} cores", (p1 - p0) / seconds),
        "",
        Check::None,
    );
    bench.row(
        "replica CPU per 1,000 events (replay)",
        format!("{:.0} ms", 1e6 * (r1 - r0) / events.max(1.0)),
        "",
        "",
        "",
        Check::None,
    );

    alone.pool().close().await;
    with_replica.pool().close().await;
    tokio::task::spawn_blocking(move || drop(pair)).await?;
    Ok(())
}
