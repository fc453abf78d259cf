//! Helpers shared by the fault scenarios: fixtures that hand out the database URL (several
//! scenarios build pools of their own), states by status, figures, listener kills.

use crate::common::addr;
use plane_db::testing::{create_database, private_server, TestServer};
use plane_db::types::{
    BackendAddr, BackendState, BackendStatus, TerminationKind, TerminationReason,
};
use plane_db::PlaneDatabase;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The bound on every scenario: a lost event or a hung reconnect fails the test instead of
/// hanging the suite.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `test` with the URL of a fresh, migrated database on the suite's server, bounded by
/// [`SCENARIO_TIMEOUT`]; drops the database when the test passes.
pub async fn with_url<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let database = create_database().await.expect("create a test database");
    migrate(&database.url).await;
    tokio::time::timeout(SCENARIO_TIMEOUT, test(database.url.clone()))
        .await
        .expect("scenario timed out");
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

/// Runs `scenario` on a private throwaway server of its own (one it may stop and start
/// without disturbing other tests), with the URL of a fresh, migrated database there,
/// bounded by [`SCENARIO_TIMEOUT`]. Fails where no local Postgres binaries exist.
pub async fn with_private_server<F, Fut>(what: &str, scenario: F)
where
    F: FnOnce(Arc<TestServer>, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = match tokio::task::spawn_blocking(private_server).await.unwrap() {
        Ok(server) => Arc::new(server),
        // No local Postgres binaries fails too: these scenarios need a server of their own,
        // and a scenario that did not run must not pass.
        Err(error) => panic!("could not start a private server for the {what} scenario: {error}"),
    };
    let database = server.create_database().await.unwrap();
    migrate(&database.url).await;
    tokio::time::timeout(SCENARIO_TIMEOUT, scenario(server.clone(), database.url))
        .await
        .expect("scenario timed out");
    // Dropping the server stops it and deletes its files.
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// Applies the migrations on `url` with a short-lived pool.
pub async fn migrate(url: &str) {
    let db = plane_db::open_and_migrate(url).await.expect("migrate");
    db.pool().close().await;
}

/// A pool of `size` connections on `url`, wrapped with `config`.
pub async fn open(url: &str, size: u32, config: plane_db::Config) -> PlaneDatabase {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .expect("connect");
    PlaneDatabase::with_config(pool, config)
}

/// A valid state for each status (the address and termination details are fixed).
pub fn state_for(status: BackendStatus) -> BackendState {
    let address = BackendAddr(addr(8080));
    let reason = TerminationReason::Swept;
    match status {
        BackendStatus::Scheduled => BackendState::Scheduled,
        BackendStatus::Loading => BackendState::Loading,
        BackendStatus::Starting => BackendState::Starting,
        BackendStatus::Waiting => BackendState::Waiting { address },
        BackendStatus::Ready => BackendState::Ready { address },
        BackendStatus::Terminating => BackendState::Terminating {
            last_status: BackendStatus::Ready,
            termination: TerminationKind::Soft,
            reason,
        },
        BackendStatus::HardTerminating => BackendState::HardTerminating {
            last_status: BackendStatus::Ready,
            reason,
        },
        BackendStatus::Terminated => BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: Some(TerminationKind::Hard),
            reason: Some(reason),
            exit_code: Some(0),
        },
    }
}

/// Every status after `scheduled`, in order: the seven updates of a full life.
pub fn full_life() -> Vec<BackendStatus> {
    BackendStatus::ALL[1..].to_vec()
}

/// Prints one line of figures for RELIABILITY.md (visible with `--nocapture`).
pub fn figures(scenario: &str, fields: &[(&str, String)]) {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FIGURES {scenario}: {}", fields.join(" "));
}

/// Terminates the bus's listening connections on the current database; returns how many.
/// Matches the statement the listener last ran (`LISTEN "plane_events"; …`), and not pooled
/// connections that merely ran a query mentioning it (such as this one).
pub async fn kill_listeners(db: &PlaneDatabase) -> u64 {
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and query ilike 'listen %plane_events%'",
    )
    .fetch_all(db.pool())
    .await
    .expect("kill listeners");
    killed.into_iter().filter(|k| *k).count() as u64
}

/// Whether a listening connection is up on the current database.
pub async fn listener_up(db: &PlaneDatabase) -> bool {
    sqlx::query_scalar::<_, bool>(
        "select exists (select 1 from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and query ilike 'listen %plane_events%')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap_or(false)
}

/// The ids of the persisted events of `kind` (optionally with `key`), from the table.
pub async fn table_event_ids(db: &PlaneDatabase, kind: &str, key: Option<&str>) -> Vec<i64> {
    sqlx::query_scalar(
        "select id from event where kind = $1 and ($2::text is null or key = $2) order by id",
    )
    .bind(kind)
    .bind(key)
    .fetch_all(db.pool())
    .await
    .expect("read event ids")
}

/// Milliseconds of a duration, for figures.
pub fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

/// The p50 and the maximum of some durations, in milliseconds.
pub fn p50_max(mut v: Vec<Duration>) -> (String, String) {
    if v.is_empty() {
        return ("-".into(), "-".into());
    }
    v.sort();
    (ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

/// The unprivileged application role of the least-privilege scenarios.
pub const APP_ROLE: &str = "plane_app";

/// Runs statements as the superuser on `url`'s database.
pub async fn as_superuser(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("superuser connection");
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    conn.close().await.ok();
}

/// Creates [`APP_ROLE`] on `url`'s server (a private one: roles are server-wide) with only
/// row rights on `url`'s database, and revokes `pg_control_checkpoint()` and
/// `pg_walfile_name()` from PUBLIC, as hardened and managed servers may.
pub async fn create_app_role(url: &str) {
    let database = url.rsplit('/').next().expect("a database in the URL");
    as_superuser(
        url,
        &format!(
            "create role {APP_ROLE} login;
             grant connect on database \"{database}\" to {APP_ROLE};
             grant usage on schema public to {APP_ROLE};
             grant select, insert, update, delete on all tables in schema public to {APP_ROLE};
             grant usage, select on all sequences in schema public to {APP_ROLE};
             revoke execute on function pg_control_checkpoint() from public;
             revoke execute on function pg_walfile_name(pg_lsn) from public;"
        ),
    )
    .await;
}

/// `url` with [`APP_ROLE`] as its user instead of the superuser.
pub fn app_url(url: &str) -> String {
    url.replacen(
        "postgres://postgres@",
        &format!("postgres://{APP_ROLE}@"),
        1,
    )
}

/// Takes a new transaction id (the statement is its own transaction) and returns it: burns
/// ids, or reads where the server's counter stands.
pub async fn next_xid<'e>(executor: impl sqlx::PgExecutor<'e>) -> i64 {
    sqlx::query_scalar("select pg_current_xact_id()::text::bigint")
        .fetch_one(executor)
        .await
        .expect("a transaction id")
}

/// Stops a private server (fast shutdown) and starts it again, off the runtime's threads:
/// a clean restart, with a new start time and the same data.
pub async fn restart_server(server: &Arc<TestServer>) {
    let s = server.clone();
    tokio::task::spawn_blocking(move || {
        s.stop()?;
        s.start()
    })
    .await
    .unwrap()
    .expect("restart the server");
}

/// Emits one `BackendState::Loading` event under `key` on a connection of its own, retrying
/// until the server answers (its pool's connections may have died with a restart).
pub async fn emit_retrying(db: &PlaneDatabase, key: &str) {
    let key = key.parse().expect("a valid key");
    for _ in 0..100 {
        let written = async {
            let mut conn = db.pool().acquire().await?;
            plane_db::events::emit(&mut conn, Some(&key), &BackendState::Loading).await
        }
        .await;
        if written.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not take the event {key} within 100 tries");
}
