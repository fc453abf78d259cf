//! Shared pieces: the result table, a fresh database per section, bulk loading, statistics.

use plane_db::node::NodeRegistration;
use plane_db::testing::TestDatabase;
use plane_db::types::{
    BackendAddr, BackendState, BackendStatus, ClusterName, ControllerName, DroneName,
    DronePoolName, NodeId, NodeKind, TerminationKind, TerminationReason,
};
use plane_db::{Config, PlaneDatabase};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// What runs on each new connection of the bench's pools: the settings the pools the library
/// opens (`plane_db::open`) run on theirs. A pool handed to `PlaneDatabase::with_config`, as
/// here, is used as it is, so the bench applies them itself.
pub const POOL_SETTINGS: &str = "SET jit = off; SET max_parallel_workers_per_gather = 0;";

/// One line of the result table.
pub struct Row {
    pub what: String,
    pub value: String,
    pub baseline_name: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub result: String,
}

/// Collects the table; prints each row as it is measured.
pub struct Bench {
    pub quick: bool,
    /// The largest history size of the `growth` section, as a power of ten (`--growth-max`;
    /// 6 unless asked; `--quick` ignores it).
    pub growth_max: u32,
    /// The `growth` section leaves its databases for inspection instead of dropping them
    /// (`--growth-keep`; meant for a `DATABASE_URL` server, as a throwaway one goes when the
    /// run ends).
    pub growth_keep: bool,
    rows: Vec<Row>,
    /// Correctness checks that failed ([`Check::Always`]): the run fails at the end.
    failed: Vec<String>,
}

/// How a figure compares with its target.
pub enum Check {
    /// No target for this row.
    None,
    /// A speed target: met when `ok`; `target` says what was required. Not judged in quick
    /// mode, which measures too little.
    Target { target: String, ok: bool },
    /// A correctness check (nothing lost, nothing twice): judged in quick mode too, and a
    /// miss fails the run once the table is printed.
    Always { target: String, ok: bool },
}

impl Bench {
    pub fn new(quick: bool) -> Self {
        Self {
            quick,
            growth_max: 6,
            growth_keep: false,
            rows: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// The correctness checks that failed, by row.
    pub fn failed(&self) -> &[String] {
        &self.failed
    }

    /// Sizes and durations: the full value, or the quick one with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    pub fn row(
        &mut self,
        what: impl Into<String>,
        value: impl Into<String>,
        baseline_name: impl Into<String>,
        baseline: impl Into<String>,
        ratio: impl Into<String>,
        check: Check,
    ) {
        let (target, result) = match check {
            Check::None => (String::new(), String::new()),
            // Quick mode measures too little to judge: no speed verdicts.
            Check::Target { target, .. } if self.quick => (target, "(quick)".into()),
            Check::Target { target, ok } => (target, if ok { "met" } else { "MISSED" }.to_string()),
            Check::Always { target, ok } => (target, if ok { "met" } else { "FAILED" }.to_string()),
        };
        let row = Row {
            what: what.into(),
            value: value.into(),
            baseline_name: baseline_name.into(),
            baseline: baseline.into(),
            ratio: ratio.into(),
            target,
            result,
        };
        println!(
            "   {:<58} {:>14}  | {:<40} {:>14}  | {:>8} {} {}",
            row.what, row.value, row.baseline_name, row.baseline, row.ratio, row.target, row.result
        );
        if row.result == "FAILED" {
            self.failed.push(row.what.clone());
        }
        self.rows.push(row);
    }

    /// A section heading inside the table.
    pub fn heading(&mut self, title: &str) {
        self.rows.push(Row {
            what: format!("**{title}**"),
            value: String::new(),
            baseline_name: String::new(),
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
            result: String::new(),
        });
    }

    pub fn print_table(&self, elapsed: Duration) {
        println!(
            "\n| Measurement | plane-db | Baseline (same run) | Baseline | Ratio | Target | Result |"
        );
        println!("|---|---:|---|---:|---:|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.what, r.value, r.baseline_name, r.baseline, r.ratio, r.target, r.result
            );
        }
        println!("\ntotal time: {:.0} s", elapsed.as_secs_f64());
    }
}

/// A fresh, migrated database with one online controller and `drones` ready drones.
impl Env {
    /// A heartbeat of the controller and of every drone, so that the scheduler keeps
    /// picking them during a long run.
    pub async fn heartbeat_all(&self) -> R<()> {
        self.db
            .controller()
            .heartbeat(&self.controller, true, "bench", "bench")
            .await?;
        for (id, _) in &self.drones {
            self.db.drone().heartbeat(*id, chrono::Utc::now()).await?;
        }
        Ok(())
    }

    /// The spawn configuration every bench's `connect` uses: this env's cluster, the default
    /// pool, a five-minute idle allowance.
    pub fn spawn_config(&self) -> plane_db::connect::SpawnConfig {
        plane_db::connect::SpawnConfig {
            id: None,
            cluster: Some(self.cluster.clone()),
            pool: DronePoolName::default(),
            executable: serde_json::json!({ "image": "bench" }),
            lifetime_limit_seconds: None,
            max_idle_seconds: Some(300),
            use_static_token: false,
            subdomain: None,
        }
    }
}

pub struct Env {
    pub database: TestDatabase,
    pub pool: PgPool,
    pub db: PlaneDatabase,
    pub cluster: ClusterName,
    pub controller: ControllerName,
    pub drones: Vec<(NodeId, DroneName)>,
}

impl Env {
    pub async fn new(drones: usize) -> R<Self> {
        Self::with_config(drones, Config::default()).await
    }

    pub async fn with_config(drones: usize, config: Config) -> R<Self> {
        let database = plane_db::testing::create_database().await?;
        Self::in_database(database, drones, config).await
    }

    /// As [`with_config`](Self::with_config), in a fresh database on `server` rather than
    /// the process-wide one (e.g. a durable server of the section's own). [`finish`](Self::finish)
    /// leaves that database to the server: dropping the server deletes it.
    pub async fn on_server(
        server: &plane_db::testing::TestServer,
        drones: usize,
        config: Config,
    ) -> R<Self> {
        let database = server.create_database().await?;
        Self::in_database(database, drones, config).await
    }

    async fn in_database(database: TestDatabase, drones: usize, config: Config) -> R<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(48)
            .acquire_timeout(Duration::from_secs(60))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(POOL_SETTINGS).await?;
                    Ok(())
                })
            })
            .connect(&database.url)
            .await?;
        plane_db::MIGRATOR.run(&pool).await?;
        // The seed wrote its events to a table without the wake-up trigger and notified with
        // the event as payload; the baselines write here.
        sqlx::query(
            "create table seed_event (id bigserial primary key, kind text not null, key text,
             created_at timestamptz not null default now(), data jsonb not null)",
        )
        .execute(&pool)
        .await?;
        let db = PlaneDatabase::with_config(pool.clone(), config);
        let cluster: ClusterName = "bench.example:9090".parse()?;
        let controller = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, "bench", "bench")
            .await?;
        let mut env = Self {
            database,
            pool,
            db,
            cluster,
            controller,
            drones: Vec::new(),
        };
        for _ in 0..drones {
            env.add_drone().await?;
        }
        Ok(env)
    }

    pub async fn add_drone(&mut self) -> R<NodeId> {
        let name = DroneName::new_random();
        let id = self
            .db
            .node()
            .register(&NodeRegistration {
                controller: &self.controller,
                kind: NodeKind::Drone,
                name: name.as_str(),
                cluster: Some(&self.cluster),
                plane_version: "bench",
                plane_hash: "bench",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await?
            .id;
        self.db
            .drone()
            .register(id, true, &DronePoolName::default())
            .await?;
        self.drones.push((id, name));
        Ok(id)
    }

    pub async fn finish(self) -> R<()> {
        drop(self.db);
        self.pool.close().await;
        self.database.drop_database().await?;
        Ok(())
    }
}

/// Inserts `n` backends named `{prefix}{1..=n}` on `drone` in `state`, whose status was set
/// `age_secs` ago, each with one history row; optionally each holding a key (named like the
/// backend) that expires `key_expires_in_secs` from now. Returns their names.
pub struct BulkBackends<'a> {
    pub prefix: &'a str,
    pub n: i64,
    pub drone: NodeId,
    pub state: BackendState,
    pub age_secs: f64,
    pub key_expires_in_secs: Option<f64>,
    pub allowed_idle_seconds: Option<i32>,
}

impl BulkBackends<'_> {
    pub async fn insert(&self, env: &Env) -> R<()> {
        self.insert_with(env, true).await
    }

    /// As [`insert`](Self::insert), without the history row: the caller writes the history.
    pub async fn insert_without_history(&self, env: &Env) -> R<()> {
        self.insert_with(env, false).await
    }

    async fn insert_with(&self, env: &Env, history: bool) -> R<()> {
        let status = self.state.status();
        let state = serde_json::to_value(&self.state)?;
        sqlx::query(
            r#"
            insert into backend (id, cluster, last_status, last_status_number, last_status_time,
                                 state, cluster_address, drone_id, allowed_idle_seconds,
                                 last_keepalive)
            select $1 || i, $2, $3, $4, now() - make_interval(secs => $5), $6, $7, $8, $9,
                   now() - make_interval(secs => $5)
            from generate_series(1, $10::bigint) i
            "#,
        )
        .bind(self.prefix)
        .bind(env.cluster.as_str())
        .bind(status.to_string())
        .bind(status.as_int())
        .bind(self.age_secs)
        .bind(&state)
        .bind(self.state.address().map(|a| a.to_string()))
        .bind(self.drone.as_i32())
        .bind(self.allowed_idle_seconds)
        .bind(self.n)
        .execute(&env.pool)
        .await?;
        if history {
            sqlx::query(
                r#"
                insert into backend_state (backend_id, state, created_at)
                select $1 || i, $2, now() - make_interval(secs => $3)
                from generate_series(1, $4::bigint) i
                "#,
            )
            .bind(self.prefix)
            .bind(&state)
            .bind(self.age_secs)
            .bind(self.n)
            .execute(&env.pool)
            .await?;
        }
        if let Some(expires) = self.key_expires_in_secs {
            sqlx::query(
                r#"
                insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                select $1 || i, '', $1 || i, '', now() + make_interval(secs => $2),
                       nextval('backend_key_fencing_token_seq')
                from generate_series(1, $3::bigint) i
                "#,
            )
            .bind(self.prefix)
            .bind(expires)
            .bind(self.n)
            .execute(&env.pool)
            .await?;
        }
        Ok(())
    }
}

pub fn address() -> BackendAddr {
    BackendAddr(SocketAddr::from(([10, 0, 0, 7], 8080)))
}

/// The six forward transitions of a backend's life after `scheduled`.
pub fn lifecycle() -> [BackendState; 6] {
    [
        BackendState::Loading,
        BackendState::Starting,
        BackendState::Waiting { address: address() },
        BackendState::Ready { address: address() },
        BackendState::Terminating {
            last_status: BackendStatus::Ready,
            termination: TerminationKind::Soft,
            reason: TerminationReason::Swept,
        },
        BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: Some(TerminationKind::Soft),
            reason: Some(TerminationReason::Swept),
            exit_code: Some(0),
        },
    ]
}

/// Percentile `q` (0..=1) of sorted samples.
pub fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "-".into()
    } else if a / b < 0.1 {
        format!("{:.4}x", a / b)
    } else {
        format!("{:.2}x", a / b)
    }
}

pub fn per_s(n: f64) -> String {
    format!("{n:.0}/s")
}

pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> R<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS line")?
        .parse()?;
    Ok(kb * 1024)
}

/// `analyze` the tables the sections load, so plans reflect the loaded sizes.
pub async fn analyze(pool: &PgPool) -> R<()> {
    sqlx::query("analyze").execute(pool).await?;
    Ok(())
}

/// "1 writer", "16 writers".
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
