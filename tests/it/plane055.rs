//! Moving from Plane 0.5.5: a database that Plane 0.5.5 migrated and wrote to, converted in
//! place by `open_and_migrate` (and `plane_db::migrate`, and `plane-db migrate`).
//!
//! Plane 0.5.5's migrations come from its published crate, fetched by cargo when the tests
//! run (nothing of Plane's is copied into this repository); a failure to get them fails the
//! tests. The rows are written with the statements Plane 0.5.5 runs (its
//! `src/database/*.rs`), with the values and JSON shapes it writes.
//!
//! Backends that the library reads here have `ba-` names (Plane accepts any well-formed
//! name). One backend has a Plane-made name without a prefix (`PREFIXLESS`): it is checked
//! with SQL only, so that these tests hold whether or not the library reads such names.

use crate::common::*;
use plane_db::connect::ConnectRequest;
use plane_db::error::{PlaneConversionError, SchemaError};
use plane_db::testing::{create_database, TestDatabase};
use plane_db::types::{
    BackendAction, BackendName, BackendState, BackendStatus, BearerToken, ClusterName,
    DronePoolName, KeyConfig, NodeId, NodeKind,
};
use plane_db::{Error, PlaneDatabase};
use serde_json::{json, Value};
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Row};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// Plane 0.5.5's migrations, in order.
const PLANE_VERSIONS: [i64; 13] = [
    20231027092522,
    20240105213756,
    20240124120935,
    20240127170332,
    20240206210023,
    20240207171651,
    20240209001513,
    20240315193812,
    20240319133519,
    20240320144840,
    20240320175958,
    20240625170232,
    20240709213841,
];

/// A backend name as Plane 0.5.5 makes them (14 random lowercase letters and digits, no
/// prefix).
const PREFIXLESS: &str = "x7kq2m9v4n1p3z";

// ---------------------------------------------------------------------------------------
// Plane 0.5.5's migrations, from its published crate.

/// The directory of Plane 0.5.5's migrations (`plane-0.5.5/schema/migrations` in cargo's
/// registry), fetched once per test process.
fn plane_migrations() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(fetch_plane_migrations)
}

/// `cargo fetch` of a throwaway project that depends on `plane = "=0.5.5"`, then the crate's
/// unpacked sources in `$CARGO_HOME/registry/src/*/plane-0.5.5`. Panics (never skips) when
/// they cannot be had.
fn fetch_plane_migrations() -> PathBuf {
    let project = std::env::temp_dir().join(format!(
        "plane-db-plane055-fetch-{}",
        BackendName::new_random()
    ));
    std::fs::create_dir_all(project.join("src")).expect("create the fetch project");
    std::fs::write(
        project.join("Cargo.toml"),
        "[package]\nname = \"plane055-migrations\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[dependencies]\nplane = \"=0.5.5\"\n\n[workspace]\n",
    )
    .expect("write the fetch project's manifest");
    std::fs::write(project.join("src/lib.rs"), "").expect("write the fetch project's lib.rs");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let fetch = |offline: bool| {
        let mut command = Command::new(&cargo);
        command.arg("fetch").current_dir(&project);
        if offline {
            command.arg("--offline");
        }
        command.output()
    };
    let mut failures = Vec::new();
    let mut fetched = false;
    // Online first (CI starts with an empty registry); offline if the registry cannot be
    // reached but the crate is already in the local cache.
    for offline in [false, true] {
        match fetch(offline) {
            Ok(output) if output.status.success() => {
                fetched = true;
                break;
            }
            Ok(output) => failures.push(format!(
                "cargo fetch{} exited with {}: {}",
                if offline { " --offline" } else { "" },
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(error) => failures.push(format!("cannot run {cargo:?}: {error}")),
        }
    }
    let _ = std::fs::remove_dir_all(&project);
    assert!(
        fetched,
        "could not fetch the plane 0.5.5 crate (its migrations are needed to build a Plane \
         database): {}",
        failures.join("; ")
    );
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("CARGO_HOME or HOME is set");
    let registry = cargo_home.join("registry/src");
    let found = std::fs::read_dir(&registry)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", registry.display()))
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("plane-0.5.5/schema/migrations"))
        .find(|dir| dir.is_dir());
    let dir = found.unwrap_or_else(|| {
        panic!(
            "cargo fetched plane 0.5.5 but {}/*/plane-0.5.5/schema/migrations does not exist",
            registry.display()
        )
    });
    let versions = migration_versions(&dir);
    assert_eq!(
        versions,
        PLANE_VERSIONS,
        "Plane 0.5.5's migrations in {}",
        dir.display()
    );
    dir
}

/// The versions of the `.sql` files in `dir`, sorted.
fn migration_versions(dir: &Path) -> Vec<i64> {
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .expect("read a migrations directory")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_suffix(".sql")?.split('_').next()?.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// A copy of Plane's migrations, edited, in a directory removed on drop.
struct EditedMigrations {
    dir: PathBuf,
}

impl EditedMigrations {
    /// Plane's first `keep` migrations, plus `extra` files (name, text).
    fn new(keep: usize, extra: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "plane-db-plane055-edited-{}",
            BackendName::new_random()
        ));
        std::fs::create_dir_all(&dir).expect("create the migrations directory");
        let mut files: Vec<PathBuf> = std::fs::read_dir(plane_migrations())
            .expect("read Plane's migrations")
            .map(|entry| entry.expect("a migrations entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        for path in files.iter().take(keep) {
            std::fs::copy(path, dir.join(path.file_name().expect("a file name")))
                .expect("copy a migration");
        }
        for (name, text) in extra {
            std::fs::write(dir.join(name), text).expect("write an extra migration");
        }
        EditedMigrations { dir }
    }
}

impl Drop for EditedMigrations {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh database migrated by Plane's migrations in `dir` (as Plane 0.5.5 does it:
/// `sqlx::migrate!` and `run`), and a pool on it.
async fn plane_database(dir: &Path) -> (TestDatabase, PgPool) {
    let database = create_database().await.expect("create a test database");
    let pool = PgPool::connect(&database.url)
        .await
        .expect("connect to the test database");
    let migrator = Migrator::new(dir.to_path_buf())
        .await
        .expect("read Plane's migrations");
    migrator.run(&pool).await.expect("Plane's migrations apply");
    (database, pool)
}

async fn finish(database: TestDatabase, pools: &[&PgPool]) {
    for pool in pools {
        pool.close().await;
    }
    database.drop_database().await.expect("drop the database");
}

async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("select version from _sqlx_migrations order by version")
        .fetch_all(pool)
        .await
        .expect("read _sqlx_migrations")
}

fn our_versions() -> Vec<i64> {
    plane_db::MIGRATOR.iter().map(|m| m.version).collect()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Whether the database still looks as Plane left it: Plane's migrations, Plane's token
/// table (tokens in clear), nothing of the conversion's.
async fn assert_untouched_plane(pool: &PgPool, versions: &[i64]) {
    assert_eq!(applied_versions(pool).await, versions);
    assert_eq!(
        count(
            pool,
            "select count(*) from information_schema.columns \
             where table_schema = current_schema() and table_name = 'token' \
               and column_name = 'token'"
        )
        .await,
        1,
        "Plane's token table"
    );
    assert_eq!(
        count(
            pool,
            "select count(*) from pg_class where relname like 'plane055%'"
        )
        .await,
        0,
        "nothing set aside"
    );
    assert_eq!(
        count(
            pool,
            "select count(*) from pg_proc where proname = 'plane_event_wake'"
        )
        .await,
        0,
        "nothing of plane-db's schema"
    );
}

// ---------------------------------------------------------------------------------------
// Rows as Plane 0.5.5 writes them.

/// A token as Plane makes them (`random_token`: 32 random bytes, base64url without padding,
/// 43 characters), made of `seed`.
fn plane_token(seed: char) -> String {
    let mut token = seed.to_string().repeat(20);
    token.push_str("-_Az09");
    token.push_str(&"q".repeat(43 - token.len()));
    token
}

/// What the fixture wrote, to check the conversion against.
#[derive(Debug, Clone)]
struct PlaneFixture {
    cluster: ClusterName,
    controller: String,
    drone_alpha: i32,
    drone_beta: i32,
    proxy: i32,
    dns_old: i32,
    dns_new: i32,
    /// ba-ready's token (Plane: clear in `token`).
    ready_token: String,
    ready_secret: String,
    ready_fencing_token: i64,
    static_token: String,
    prefixless_token: String,
    expired_token: String,
    /// The spawn action of ba-loading, not acknowledged.
    pending_action: String,
    /// A termination of ba-ready, not acknowledged (queued after `pending_action`).
    pending_terminate: String,
    /// The spawn action of ba-ready, acknowledged.
    acked_action: String,
    max_event_id: i64,
    /// Where Plane's event id sequence stood: past `max_event_id` (ids taken by inserts
    /// that rolled back).
    event_sequence: i64,
    max_state_id: i64,
    max_node_id: i32,
    events: i64,
    states: i64,
    tokens: i64,
    actions: i64,
}

/// Plane's `ControllerDatabase::heartbeat`.
async fn plane_controller_heartbeat(pool: &PgPool, name: &str) {
    sqlx::query(
        "insert into controller (id, is_online, plane_version, plane_hash, last_heartbeat, ip)
         values ($1, $2, $3, $4, now(), inet_client_addr())
         on conflict (id) do update set
             is_online = $2, plane_version = $3, plane_hash = $4, last_heartbeat = now(),
             ip = inet_client_addr()",
    )
    .bind(name)
    .bind(true)
    .bind("0.5.5")
    .bind("1a2b3c4")
    .execute(pool)
    .await
    .expect("Plane: controller heartbeat");
}

/// Plane's `emit_impl`: the row and the NOTIFY with the whole notification.
async fn plane_emit(conn: &mut sqlx::PgConnection, kind: &str, key: Option<&str>, data: &Value) {
    sqlx::query(
        "with message_insert as (
             insert into event (kind, key, created_at, data)
             values ($1, $2, now(), $3)
             returning id
         )
         select pg_notify($4, json_build_object(
             'payload', $3::jsonb, 'timestamp', now(), 'id', id, 'kind', $1, 'key', $2
         )::text) from message_insert",
    )
    .bind(kind)
    .bind(key)
    .bind(data)
    .bind("plane_events")
    .execute(conn)
    .await
    .expect("Plane: emit");
}

/// Plane's `NodeDatabase::register` (with its `node_connection` event).
async fn plane_register_node(
    pool: &PgPool,
    cluster: Option<&str>,
    name: &str,
    kind: &str,
    controller: &str,
) -> i32 {
    let mut tx = pool.begin().await.expect("begin");
    let id: i32 = sqlx::query_scalar(
        "insert into node (cluster, name, controller, plane_version, plane_hash, kind, ip,
                           last_connection_start_time)
         values ($1, $2, $3, $4, $5, $6, '10.1.2.3', now())
         on conflict (cluster, name) do update set
             controller = $3, plane_version = $4, plane_hash = $5, ip = '10.1.2.3',
             last_connection_start_time = now()
         returning id",
    )
    .bind(cluster)
    .bind(name)
    .bind(controller)
    .bind("0.5.5")
    .bind("1a2b3c4")
    .bind(kind)
    .fetch_one(&mut *tx)
    .await
    .expect("Plane: register node");
    plane_emit(
        &mut tx,
        "node_connection",
        None,
        &json!({"node_id": id, "connected": true}),
    )
    .await;
    tx.commit().await.expect("commit");
    id
}

/// Plane's `DroneDatabase::register_drone` and `heartbeat`.
async fn plane_register_drone(pool: &PgPool, id: i32, pool_name: &str) {
    sqlx::query(
        "insert into drone (id, draining, ready, pool) values ($1, false, $2, $3)
         on conflict (id) do update set ready = $2",
    )
    .bind(id)
    .bind(true)
    .bind(pool_name)
    .execute(pool)
    .await
    .expect("Plane: register drone");
    sqlx::query("update drone set last_heartbeat = now(), last_local_time = $2 where id = $1")
        .bind(id)
        .bind(chrono::Utc::now())
        .execute(pool)
        .await
        .expect("Plane: drone heartbeat");
}

/// Plane's `create_backend_with_key` (backend, key with its fencing token, first state, its
/// event, the spawn action and its event), and `create_token` unless `static_token`.
/// Returns the fencing token and the spawn action's id.
async fn plane_create_backend(
    pool: &PgPool,
    backend: &str,
    cluster: &str,
    drone: i32,
    key: &str,
    static_token: Option<&str>,
    subdomain: Option<&str>,
) -> (i64, String) {
    let mut tx = pool.begin().await.expect("begin");
    let scheduled = json!({"status": "scheduled"});
    let fencing_token: i64 = sqlx::query_scalar(
        "with backend_insert as (
             insert into backend (id, cluster, last_status, last_status_time, last_status_number,
                                  drone_id, expiration_time, allowed_idle_seconds, last_keepalive,
                                  state, static_token, subdomain)
             values ($1, $2, $3, now(), $4, $5, now() + interval '2 hours', $6, now(), $7, $8, $9)
             returning id
         )
         insert into backend_key (id, key_name, namespace, tag, expires_at, fencing_token)
         select $1, $10, $11, $12, now() + interval '60 seconds', extract(epoch from now()) * 1000
         from backend_insert
         returning fencing_token",
    )
    .bind(backend)
    .bind(cluster)
    .bind("scheduled")
    .bind(10)
    .bind(drone)
    .bind(300)
    .bind(&scheduled)
    .bind(static_token)
    .bind(subdomain)
    .bind(key)
    .bind("")
    .bind("")
    .fetch_one(&mut *tx)
    .await
    .expect("Plane: create backend with key");
    plane_state_change(&mut tx, backend, &scheduled).await;
    let now = chrono::Utc::now().timestamp_millis();
    let spawn = json!({"Spawn": {
        "executable": {"image": "ghcr.io/example/app:1", "env": {"A": "1"}},
        "key": {
            "key": {"name": key, "namespace": "", "tag": ""},
            "deadlines": {
                "renew_at": now + 30_000,
                "soft_terminate_at": now + 40_000,
                "hard_terminate_at": now + 40_000,
            },
            "token": fencing_token,
        },
        "static_token": static_token,
    }});
    let action_id = plane_create_pending_action(&mut tx, backend, drone, spawn).await;
    tx.commit().await.expect("commit");
    (fencing_token, action_id)
}

/// Plane's `create_pending_action`: the action, as a whole BackendActionMessage, and its
/// event (keyed by the drone). Returns the action's id.
async fn plane_create_pending_action(
    conn: &mut sqlx::PgConnection,
    backend: &str,
    drone: i32,
    action: Value,
) -> String {
    let action_id = format!("ak-{}", &BackendName::new_random().as_str()[3..]);
    let message = json!({
        "action_id": action_id,
        "backend_id": backend,
        "drone_id": drone,
        "action": action,
    });
    plane_emit(conn, "backend_action", Some(&drone.to_string()), &message).await;
    sqlx::query(
        r#"insert into "backend_action" ("id", "action", "drone_id", "backend_id")
           values ($1, $2, $3, $4)"#,
    )
    .bind(&action_id)
    .bind(&message)
    .bind(drone)
    .bind(backend)
    .execute(&mut *conn)
    .await
    .expect("Plane: create pending action");
    action_id
}

/// Plane's `emit_state_change`: the history row and its event.
async fn plane_state_change(conn: &mut sqlx::PgConnection, backend: &str, state: &Value) {
    sqlx::query("insert into backend_state (backend_id, state) values ($1, $2)")
        .bind(backend)
        .bind(state)
        .execute(&mut *conn)
        .await
        .expect("Plane: backend state");
    plane_emit(conn, "backend_state", Some(backend), state).await;
}

/// Plane's `BackendDatabase::update_state`.
async fn plane_update_state(pool: &PgPool, backend: &str, state: Value) {
    let status = state["status"].as_str().expect("a status").to_string();
    let number = match status.as_str() {
        "scheduled" => 10,
        "loading" => 20,
        "starting" => 30,
        "waiting" => 40,
        "ready" => 50,
        "terminating" => 60,
        "hard-terminating" => 65,
        "terminated" => 70,
        other => panic!("not a Plane status: {other}"),
    };
    let mut tx = pool.begin().await.expect("begin");
    let updated = sqlx::query(
        "update backend set last_status = $2, last_status_time = now(),
             last_status_number = $3, cluster_address = $4, state = $5
         where id = $1 and (last_status_number < $3 or last_status_number is null)",
    )
    .bind(backend)
    .bind(&status)
    .bind(number)
    .bind(state.get("address").and_then(Value::as_str))
    .bind(&state)
    .execute(&mut *tx)
    .await
    .expect("Plane: update state")
    .rows_affected();
    assert_eq!(updated, 1, "Plane moves {backend} to {status}");
    if status == "terminated" {
        sqlx::query("delete from backend_key where id = $1")
            .bind(backend)
            .execute(&mut *tx)
            .await
            .expect("Plane: release the key");
    }
    plane_state_change(&mut tx, backend, &state).await;
    tx.commit().await.expect("commit");
}

/// Plane's `create_token` (lifetime 1 hour), or an expired one.
async fn plane_create_token(
    pool: &PgPool,
    backend: &str,
    token: &str,
    user: &str,
    secret: &str,
    expired: bool,
) {
    sqlx::query(
        "insert into token (token, backend_id, username, auth, secret_token, expiration_time)
         values ($1, $2, $3, $4, $5, now() + $6 * interval '1 second')",
    )
    .bind(token)
    .bind(backend)
    .bind(user)
    .bind(json!({"role": "editor", "team": 7}))
    .bind(secret)
    .bind(if expired { -60.0 } else { 3600.0 })
    .execute(pool)
    .await
    .expect("Plane: create token");
}

/// Plane's `ack_pending_action`.
async fn plane_ack(pool: &PgPool, action: &str, drone: i32) {
    sqlx::query(
        r#"update "backend_action" set acked_at = now() where "id" = $1 and "drone_id" = $2"#,
    )
    .bind(action)
    .bind(drone)
    .execute(pool)
    .await
    .expect("Plane: ack");
}

/// The whole life of a small Plane cluster, written as Plane 0.5.5 writes it.
async fn write_plane_rows(pool: &PgPool) -> PlaneFixture {
    let cluster = cluster();
    let c = cluster.as_str();
    let controller = "co-plane055".to_string();
    plane_controller_heartbeat(pool, &controller).await;
    let drone_alpha = plane_register_node(pool, Some(c), "dr-alpha", "Drone", &controller).await;
    plane_register_drone(pool, drone_alpha, "gpu").await;
    let drone_beta = plane_register_node(pool, Some(c), "dr-beta", "Drone", &controller).await;
    plane_register_drone(pool, drone_beta, "").await;
    let proxy = plane_register_node(pool, Some(c), "px-one", "Proxy", &controller).await;
    // A DNS server has no cluster: Plane registers it again at each connection.
    let dns_old = plane_register_node(pool, None, "ns-dns", "AcmeDnsServer", &controller).await;
    let dns_new = plane_register_node(pool, None, "ns-dns", "AcmeDnsServer", &controller).await;
    assert_ne!(dns_old, dns_new, "Plane keeps both DNS server rows");

    let address = |port: u16| format!("10.0.0.1:{port}");
    // ba-ready: its whole start-up, an acknowledged spawn action, a token and its key.
    let (ready_fencing_token, acked_action) =
        plane_create_backend(pool, "ba-ready", c, drone_alpha, "doc-1", None, None).await;
    for state in [
        json!({"status": "loading"}),
        json!({"status": "starting"}),
        json!({"status": "waiting", "address": address(8080)}),
        json!({"status": "ready", "address": address(8080)}),
    ] {
        plane_update_state(pool, "ba-ready", state).await;
    }
    plane_ack(pool, &acked_action, drone_alpha).await;
    let ready_token = plane_token('a');
    let ready_secret = "sEcReT-ready".to_string();
    plane_create_token(
        pool,
        "ba-ready",
        &ready_token,
        "alice",
        &ready_secret,
        false,
    )
    .await;

    // ba-static: a static token, a subdomain, ready.
    let static_token = format!("s.{}", plane_token('s'));
    plane_create_backend(
        pool,
        "ba-static",
        c,
        drone_beta,
        "doc-static",
        Some(&static_token),
        Some("docs"),
    )
    .await;
    plane_update_state(
        pool,
        "ba-static",
        json!({"status": "ready", "address": address(8081)}),
    )
    .await;

    // ba-loading: its spawn action not yet acknowledged.
    let (_, pending_action) = plane_create_backend(
        pool,
        "ba-loading",
        c,
        drone_alpha,
        "doc-loading",
        None,
        None,
    )
    .await;
    plane_update_state(pool, "ba-loading", json!({"status": "loading"})).await;
    // A termination requested for ba-ready, not yet acknowledged.
    let mut conn = pool.acquire().await.expect("a connection");
    let pending_terminate = plane_create_pending_action(
        &mut conn,
        "ba-ready",
        drone_alpha,
        json!({"Terminate": {"kind": "soft", "reason": "external"}}),
    )
    .await;
    drop(conn);

    // ba-gone: terminated (key released), an expired token, and a status number that is
    // missing, as on rows from before Plane's migration 20240625170232.
    plane_create_backend(pool, "ba-gone", c, drone_beta, "doc-gone", None, None).await;
    plane_update_state(
        pool,
        "ba-gone",
        json!({"status": "terminating", "last_status": "scheduled", "termination": "soft",
               "reason": "external"}),
    )
    .await;
    plane_update_state(
        pool,
        "ba-gone",
        json!({"status": "terminated", "last_status": "terminating", "termination": "soft",
               "reason": "external", "exit_code": 0}),
    )
    .await;
    let expired_token = plane_token('e');
    plane_create_token(
        pool,
        "ba-gone",
        &expired_token,
        "carol",
        "sEcReT-gone",
        true,
    )
    .await;
    sqlx::query("update backend set last_status_number = null where id = 'ba-gone'")
        .execute(pool)
        .await
        .expect("a row from before the status number");
    // ba-ancient: from before Plane's states (state '{}') and lowercase statuses.
    sqlx::query(
        "insert into backend (id, cluster, last_status, last_status_time, drone_id,
                              last_keepalive, state)
         values ('ba-ancient', $1, 'Terminated', now() - interval '400 days', $2,
                 now() - interval '400 days', '{}')",
    )
    .bind(c)
    .bind(drone_beta)
    .execute(pool)
    .await
    .expect("an ancient row");

    // A backend with Plane's own kind of name, ready, with a token.
    plane_create_backend(
        pool,
        PREFIXLESS,
        c,
        drone_beta,
        "doc-prefixless",
        None,
        None,
    )
    .await;
    plane_update_state(
        pool,
        PREFIXLESS,
        json!({"status": "ready", "address": address(8082)}),
    )
    .await;
    let prefixless_token = plane_token('p');
    plane_create_token(
        pool,
        PREFIXLESS,
        &prefixless_token,
        "dave",
        "sEcReT-p",
        false,
    )
    .await;

    // An ACME DNS-01 lease by the proxy, with its TXT value (Plane's AcmeDatabase).
    sqlx::query(
        "insert into acme_txt_entries (cluster, leased_at, leased_by) values ($1, now(), $2)
         on conflict (cluster) do update set leased_at = now(), leased_by = $2
         where (acme_txt_entries.leased_at + interval '1 minute') < now()",
    )
    .bind(c)
    .bind(proxy)
    .execute(pool)
    .await
    .expect("Plane: lease cluster dns");
    sqlx::query("update acme_txt_entries set txt_value = $3 where cluster = $1 and leased_by = $2")
        .bind(c)
        .bind(proxy)
        .bind("txt-challenge-value")
        .execute(pool)
        .await
        .expect("Plane: set cluster dns");

    // Inserts that rolled back took ids: Plane's sequence is past the largest id.
    let mut tx = pool.begin().await.expect("begin");
    for _ in 0..3 {
        plane_emit(
            &mut tx,
            "node_connection",
            None,
            &json!({"node_id": 0, "connected": false}),
        )
        .await;
    }
    tx.rollback().await.expect("roll back");
    let event_sequence: i64 = sqlx::query_scalar("select last_value::bigint from event_id_seq")
        .fetch_one(pool)
        .await
        .expect("Plane's event sequence");

    PlaneFixture {
        event_sequence,
        cluster,
        controller,
        drone_alpha,
        drone_beta,
        proxy,
        dns_old,
        dns_new,
        ready_token,
        ready_secret,
        ready_fencing_token,
        static_token,
        prefixless_token,
        expired_token,
        pending_action,
        pending_terminate,
        acked_action,
        max_event_id: i64::from(count_i32(pool, "select max(id) from event").await),
        max_state_id: i64::from(count_i32(pool, "select max(id) from backend_state").await),
        max_node_id: count_i32(pool, "select max(id) from node").await,
        events: count(pool, "select count(*) from event").await,
        states: count(pool, "select count(*) from backend_state").await,
        tokens: count(pool, "select count(*) from token").await,
        actions: count(pool, "select count(*) from backend_action").await,
    }
}

async fn count_i32(pool: &PgPool, sql: &str) -> i32 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn a_plane_055_database_is_converted_in_place_and_everything_still_works() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (database, plane_pool) = plane_database(plane_migrations()).await;
        let fx = write_plane_rows(&plane_pool).await;
        plane_pool.close().await;

        let db = plane_db::open_and_migrate(&database.url)
            .await
            .expect("open_and_migrate converts the Plane database");
        let pool = db.pool().clone();
        check_converted(&db, &pool, &fx).await;

        // Once converted, it is a plane-db database: starting again changes nothing.
        let before = snapshot(&pool).await;
        let again = plane_db::open_and_migrate(&database.url)
            .await
            .expect("a second open_and_migrate");
        let report = plane_db::migrate(&pool).await.expect("migrate again");
        assert!(report.applied.is_empty(), "{report:?}");
        assert_eq!(report.converted_from_plane, None);
        assert_eq!(
            snapshot(&pool).await,
            before,
            "the second start changed nothing"
        );
        drop(again);

        check_still_works(&db, &pool, &fx).await;
        drop(db);
        finish(database, &[&pool]).await;
    })
    .await
    .expect("test timed out");
}

/// Row counts and ids of every table, to tell that nothing changed.
async fn snapshot(pool: &PgPool) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for table in [
        "controller",
        "node",
        "drone",
        "backend",
        "backend_state",
        "backend_key",
        "backend_action",
        "token",
        "event",
        "acme_txt_entries",
        "_sqlx_migrations",
    ] {
        let row = sqlx::query(&format!(
            "select count(*), coalesce(md5(string_agg(t::text, '|' order by t::text)), '') \
             from {table} t"
        ))
        .fetch_one(pool)
        .await
        .expect("snapshot a table");
        out.push((table.to_string(), row.get(0), row.get(1)));
    }
    out
}

/// Everything Plane wrote is there, in plane-db's shape, and reads back through the library.
async fn check_converted(db: &PlaneDatabase, pool: &PgPool, fx: &PlaneFixture) {
    // The schema: ours, recorded as ours; nothing of Plane's left.
    assert_eq!(applied_versions(pool).await, our_versions());
    assert_eq!(
        count(
            pool,
            "select count(*) from pg_class where relname like 'plane055%'"
        )
        .await,
        0,
        "Plane's tables are dropped"
    );
    assert_eq!(
        count(
            pool,
            "select count(*) from information_schema.columns \
             where table_schema = current_schema() and table_name = 'token' \
               and column_name = 'token'"
        )
        .await,
        0,
        "no bearer tokens in clear"
    );
    // No table holds a bearer token Plane issued in clear (static tokens are stored as
    // such by design: they are handed to the drone in the spawn action).
    let tables: Vec<String> = sqlx::query_scalar(
        "select tablename::text from pg_tables where schemaname = current_schema()",
    )
    .fetch_all(pool)
    .await
    .expect("list tables");
    for table in &tables {
        for token in [&fx.ready_token, &fx.prefixless_token, &fx.expired_token] {
            let hits: i64 = sqlx::query_scalar(&format!(
                "select count(*) from {table} t where strpos(t::text, $1) > 0"
            ))
            .bind(token)
            .fetch_one(pool)
            .await
            .expect("search a table");
            assert_eq!(hits, 0, "a Plane bearer token in clear in {table}");
        }
    }

    // Tokens: Plane's routes through the library (its digest was computed).
    assert_eq!(count(pool, "select count(*) from token").await, fx.tokens);
    let route = db
        .backend()
        .route_info_for_token(&BearerToken::from(fx.ready_token.as_str()))
        .await
        .expect("route a Plane token");
    let plane_db::backend::RouteInfoResult::Available(route) = route else {
        panic!("Plane's token does not route: {route:?}");
    };
    assert_eq!(route.route.backend_id.as_str(), "ba-ready");
    assert_eq!(route.address.to_string(), "10.0.0.1:8080");
    assert_eq!(route.route.secret_token.as_str(), fx.ready_secret);
    assert_eq!(route.route.user.as_deref(), Some("alice"));
    assert_eq!(
        route.route.user_data,
        Some(json!({"role": "editor", "team": 7})),
        "auth JSON kept"
    );
    assert_eq!(route.route.cluster, fx.cluster);
    // The static token routes, with Plane's empty secret and the subdomain.
    let route = db
        .backend()
        .route_info_for_token(&BearerToken::from(fx.static_token.as_str()))
        .await
        .expect("route the static token");
    let plane_db::backend::RouteInfoResult::Available(route) = route else {
        panic!("the static token does not route: {route:?}");
    };
    assert_eq!(route.route.backend_id.as_str(), "ba-static");
    assert_eq!(route.address.to_string(), "10.0.0.1:8081");
    assert_eq!(route.route.secret_token.as_str(), "");
    assert_eq!(
        route.route.subdomain.as_ref().map(|s| s.as_str()),
        Some("docs")
    );
    // The expired token of the terminated backend does not.
    assert!(matches!(
        db.backend()
            .route_info_for_token(&BearerToken::from(fx.expired_token.as_str()))
            .await
            .expect("route an expired token"),
        plane_db::backend::RouteInfoResult::NotFound
    ));
    // The backend with Plane's own kind of name: checked with SQL only (see the module
    // docs). Its row, its token (as the digest BearerToken::digest computes), its history
    // and its key are there, name unchanged.
    let prefixless = sqlx::query(
        "select b.last_status, b.last_status_number, b.cluster_address, t.username, t.secret_token
         from token t join backend b on b.id = t.backend_id
         where t.token_digest = $1",
    )
    .bind(BearerToken::from(fx.prefixless_token.as_str()).digest())
    .fetch_one(pool)
    .await
    .expect("the prefix-less backend's token, by digest");
    assert_eq!(prefixless.get::<String, _>(0), "ready");
    assert_eq!(prefixless.get::<i32, _>(1), BackendStatus::Ready.as_int());
    assert_eq!(prefixless.get::<String, _>(2), "10.0.0.1:8082");
    assert_eq!(prefixless.get::<String, _>(3), "dave");
    assert_eq!(prefixless.get::<String, _>(4), "sEcReT-p");
    let history: i64 =
        sqlx::query_scalar("select count(*) from backend_state where backend_id = $1")
            .bind(PREFIXLESS)
            .fetch_one(pool)
            .await
            .expect("the prefix-less backend's history");
    assert_eq!(history, 2);
    let key: String = sqlx::query_scalar("select key_name from backend_key where id = $1")
        .bind(PREFIXLESS)
        .fetch_one(pool)
        .await
        .expect("the prefix-less backend's key");
    assert_eq!(key, "doc-prefixless");

    // Backends: statuses and their numbers, derived where Plane had none.
    let statuses: Vec<(String, String, i32)> =
        sqlx::query_as("select id, last_status, last_status_number from backend order by id")
            .fetch_all(pool)
            .await
            .expect("backend statuses");
    let expected: Vec<(String, String, i32)> = [
        ("ba-ancient", BackendStatus::Terminated),
        ("ba-gone", BackendStatus::Terminated),
        ("ba-loading", BackendStatus::Loading),
        ("ba-ready", BackendStatus::Ready),
        ("ba-static", BackendStatus::Ready),
        (PREFIXLESS, BackendStatus::Ready),
    ]
    .into_iter()
    .map(|(id, status)| (id.to_string(), status.to_string(), status.as_int()))
    .collect();
    assert_eq!(statuses, expected);
    assert_eq!(
        count(
            pool,
            "select count(*) from backend where id = 'ba-ancient' and state = '{}'"
        )
        .await,
        1,
        "an old row's state is kept as Plane had it"
    );
    let ready = db
        .backend()
        .backend(&"ba-ready".parse::<BackendName>().expect("a name"))
        .await
        .expect("read ba-ready")
        .expect("ba-ready exists");
    assert_eq!(ready.state.status(), BackendStatus::Ready);
    assert_eq!(ready.drone_id, NodeId::from(fx.drone_alpha));
    assert_eq!(ready.allowed_idle_seconds, Some(300));
    assert!(ready.expiration_time.is_some());

    // State history, in order, with Plane's ids.
    assert_eq!(
        count(pool, "select count(*) from backend_state").await,
        fx.states
    );
    let history = db
        .backend()
        .state_history(&"ba-ready".parse().expect("a name"))
        .await
        .expect("ba-ready's history");
    let statuses: Vec<BackendStatus> = history.iter().map(|r| r.state.status()).collect();
    assert_eq!(
        statuses,
        [
            BackendStatus::Scheduled,
            BackendStatus::Loading,
            BackendStatus::Starting,
            BackendStatus::Waiting,
            BackendStatus::Ready
        ]
    );

    // Plane's termination states read back.
    let gone = db
        .backend()
        .state_history(&"ba-gone".parse().expect("a name"))
        .await
        .expect("ba-gone's history");
    let statuses: Vec<BackendStatus> = gone.iter().map(|r| r.state.status()).collect();
    assert_eq!(
        statuses,
        [
            BackendStatus::Scheduled,
            BackendStatus::Terminating,
            BackendStatus::Terminated
        ]
    );

    // The key and its fencing token (Plane's: milliseconds since the epoch).
    let holder = db
        .key()
        .lookup(&KeyConfig {
            name: "doc-1".into(),
            ..KeyConfig::default()
        })
        .await
        .expect("look the key up")
        .expect("the key is held");
    assert_eq!(holder.backend_id.as_str(), "ba-ready");
    assert_eq!(holder.fencing_token, fx.ready_fencing_token);
    assert!(holder.is_live());
    assert!(
        count(
            pool,
            "select count(*) from backend_key where id = 'ba-gone'"
        )
        .await
            == 0,
        "Plane released the terminated backend's key"
    );

    // Pending actions: the unacknowledged spawn is delivered, decoded; the acknowledged one
    // is not.
    let pending = db
        .backend_action()
        .pending(NodeId::from(fx.drone_alpha), 100)
        .await
        .expect("pending actions");
    let ids: Vec<&str> = pending.iter().map(|a| a.action_id.as_str()).collect();
    assert_eq!(
        ids,
        [fx.pending_action.as_str(), fx.pending_terminate.as_str()]
    );
    assert!(!ids.contains(&fx.acked_action.as_str()));
    assert_eq!(pending[0].backend_id.as_str(), "ba-loading");
    assert_eq!(pending[1].backend_id.as_str(), "ba-ready");
    assert_eq!(pending[1].drone_id, NodeId::from(fx.drone_alpha));
    assert!(
        matches!(
            pending[1].action,
            BackendAction::Terminate {
                kind: plane_db::types::TerminationKind::Soft,
                reason: plane_db::types::TerminationReason::External
            }
        ),
        "{:?}",
        pending[1].action
    );
    let BackendAction::Spawn {
        key,
        executable,
        static_token,
    } = &pending[0].action
    else {
        panic!("not a spawn: {:?}", pending[0].action);
    };
    assert_eq!(key.key.name, "doc-loading");
    assert_eq!(executable["env"]["A"], "1");
    assert_eq!(*static_token, None);
    assert_eq!(
        count(pool, "select count(*) from backend_action").await,
        fx.actions
    );
    // Plane stored the whole message; plane-db stores its action (the rest is in columns).
    assert_eq!(
        count(
            pool,
            "select count(*) from backend_action \
             where action ? 'action_id' or not (action ? 'Spawn' or action ? 'Terminate')"
        )
        .await,
        0
    );

    // Nodes, drones (pools, heartbeats), the controller.
    let nodes = db.node().list().await.expect("list nodes");
    let dns: Vec<i32> = nodes
        .iter()
        .filter(|n| n.kind() == NodeKind::AcmeDnsServer)
        .map(|n| n.id.as_i32())
        .collect();
    assert_eq!(
        dns,
        [fx.dns_new],
        "Plane's DNS server rows merged into the newest"
    );
    assert_ne!(fx.dns_old, fx.dns_new);
    assert!(nodes
        .iter()
        .any(|n| n.id.as_i32() == fx.proxy && n.kind() == NodeKind::Proxy));
    assert_eq!(nodes.len(), 4);
    let picked = db
        .drone()
        .pick_for_spawn(&fx.cluster, &DronePoolName::from("gpu".to_string()))
        .await
        .expect("pick a drone")
        .expect("a drone of pool gpu");
    assert_eq!(picked.id, NodeId::from(fx.drone_alpha));
    assert_eq!(picked.name.as_str(), "dr-alpha");
    let picked = db
        .drone()
        .pick_for_spawn(&fx.cluster, &DronePoolName::default())
        .await
        .expect("pick a drone")
        .expect("a drone of the default pool");
    assert_eq!(picked.id, NodeId::from(fx.drone_beta));
    let controllers = db
        .controller()
        .online_controllers()
        .await
        .expect("online controllers");
    assert!(
        controllers.iter().any(|c| c.name.as_str() == fx.controller),
        "{controllers:?}"
    );

    // Events, with Plane's ids and payloads.
    let events = db.get_events_since(0, 1000).await.expect("read events");
    assert_eq!(events.len() as i64, fx.events);
    assert_eq!(events.last().and_then(|e| e.id), Some(fx.max_event_id));
    assert!(fx.event_sequence > fx.max_event_id, "{fx:?}");
    // Plane wrote node_connection events without a key; plane-db keys them by the node.
    assert!(events.iter().any(|e| e.kind == "node_connection"
        && e.key.as_deref() == Some(&*fx.drone_alpha.to_string())
        && e.data == json!({"node_id": fx.drone_alpha, "connected": true})));
    assert!(
        events.iter().all(|e| e.key.is_some()),
        "every event has a key"
    );
    assert!(events.iter().any(|e| e.kind == "backend_state"
        && e.key.as_deref() == Some("ba-ready")
        && e.data["status"] == "ready"));
    assert!(events
        .iter()
        .any(|e| e.kind == "backend_action"
            && e.key.as_deref() == Some(&*fx.drone_alpha.to_string())));

    // ACME.
    assert_eq!(
        db.acme()
            .txt(&fx.cluster)
            .await
            .expect("read the TXT record"),
        Some("txt-challenge-value".to_string())
    );
}

/// After the conversion, the library writes as on any plane-db database: new ids above
/// Plane's, a new key's fencing token above Plane's, the event bus delivers.
async fn check_still_works(db: &PlaneDatabase, pool: &PgPool, fx: &PlaneFixture) {
    // The event bus: subscribe, change a converted backend's state, receive it.
    let loading: BackendName = "ba-loading".parse().expect("a name");
    let mut states = db
        .subscribe_with_key::<BackendState>(&loading)
        .await
        .expect("subscribe");
    assert!(db
        .backend()
        .update_state(&loading, &BackendState::Starting)
        .await
        .expect("update a converted backend"));
    let event = tokio::time::timeout(std::time::Duration::from_secs(30), states.next())
        .await
        .expect("the event arrives")
        .expect("the subscription is open")
        .expect("not lagged");
    assert_eq!(event.payload, BackendState::Starting);
    assert!(
        event.id.expect("a stored event") > fx.event_sequence,
        "event ids continue above Plane's sequence"
    );
    let state_id: i64 = sqlx::query_scalar("select max(id) from backend_state")
        .fetch_one(pool)
        .await
        .expect("newest state");
    assert!(
        state_id > fx.max_state_id,
        "state ids continue above Plane's"
    );

    // Connecting to the key Plane's backend holds returns that backend, with a new token.
    let response = db
        .connect(&ConnectRequest {
            key: Some(KeyConfig {
                name: "doc-1".into(),
                ..KeyConfig::default()
            }),
            user: Some("bob".into()),
            ..ConnectRequest::default()
        })
        .await
        .expect("connect to Plane's backend by key");
    assert_eq!(response.backend_id.as_str(), "ba-ready");
    assert!(!response.spawned);
    assert!(matches!(
        db.backend()
            .route_info_for_token(&response.token)
            .await
            .expect("route the new token"),
        plane_db::backend::RouteInfoResult::Available(_)
    ));
    // A new backend in pool gpu lands on Plane's drone, and its fencing token is above every
    // one Plane handed out.
    let mut spawn = spawn_config();
    spawn.pool = DronePoolName::from("gpu".to_string());
    let response = db
        .connect(&ConnectRequest {
            key: Some(KeyConfig {
                name: "doc-new".into(),
                ..KeyConfig::default()
            }),
            spawn_config: Some(spawn),
            ..ConnectRequest::default()
        })
        .await
        .expect("spawn a new backend");
    assert!(response.spawned);
    assert_eq!(
        response.drone.as_ref().map(|d| d.as_str()),
        Some("dr-alpha")
    );
    let fencing = response.fencing_token.expect("a fencing token");
    assert!(
        fencing > fx.ready_fencing_token,
        "new fencing token {fencing} above Plane's {}",
        fx.ready_fencing_token
    );
    // A node registering now gets an id above Plane's.
    let node = db
        .node()
        .register(&plane_db::node::NodeRegistration {
            controller: &fx.controller.parse().expect("a controller name"),
            kind: NodeKind::Proxy,
            name: "px-two",
            cluster: Some(&fx.cluster),
            plane_version: "0.1.0",
            plane_hash: "abc",
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        })
        .await
        .expect("register a node");
    assert!(node.id.as_i32() > fx.max_node_id);
}

#[tokio::test]
async fn controllers_converting_a_plane_database_at_once_convert_it_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Through plane_db::migrate, whose reports say who converted.
        let (database, plane_pool) = plane_database(plane_migrations()).await;
        let fx = write_plane_rows(&plane_pool).await;
        let start = Arc::new(tokio::sync::Barrier::new(5));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let url = database.url.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    let pool = PgPool::connect(&url).await.expect("connect");
                    start.wait().await;
                    let report = plane_db::migrate(&pool).await;
                    pool.close().await;
                    report
                })
            })
            .collect();
        let mut conversions = Vec::new();
        for task in tasks {
            let report = task
                .await
                .expect("task")
                .expect("every controller migrates");
            // The converter also applies our migrations newer than the conversion's schema;
            // the others find nothing to do.
            let expected = if report.converted_from_plane.is_some() {
                after_conversion_target()
            } else {
                Vec::new()
            };
            assert_eq!(report.applied, expected, "{report:?}");
            conversions.extend(report.converted_from_plane);
        }
        assert_eq!(conversions.len(), 1, "converted once: {conversions:?}");
        let report = &conversions[0];
        assert_eq!(report.backends, 6);
        assert_eq!(report.tokens as i64, fx.tokens);
        assert_eq!(report.events as i64, fx.events);
        assert_eq!(report.backend_states as i64, fx.states);
        assert_eq!(report.backend_actions as i64, fx.actions);
        assert_eq!((report.nodes, report.nodes_merged), (4, 1));
        assert_eq!((report.drones, report.controllers), (2, 1));
        assert_eq!((report.backend_keys, report.acme_txt_entries), (4, 1));
        assert_eq!(applied_versions(&plane_pool).await, our_versions());
        assert_eq!(count(&plane_pool, "select count(*) from backend").await, 6);
        assert_eq!(
            count(&plane_pool, "select count(*) from token").await,
            fx.tokens
        );
        finish(database, &[&plane_pool]).await;

        // Through open_and_migrate, as controllers start.
        let (database, plane_pool) = plane_database(plane_migrations()).await;
        let fx = write_plane_rows(&plane_pool).await;
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let url = database.url.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    plane_db::open_and_migrate(&url).await
                })
            })
            .collect();
        let mut dbs = Vec::new();
        for task in tasks {
            dbs.push(task.await.expect("task").expect("both controllers start"));
        }
        for db in &dbs {
            db.health_check().await.expect("healthy");
        }
        assert_eq!(applied_versions(&plane_pool).await, our_versions());
        assert_eq!(count(&plane_pool, "select count(*) from backend").await, 6);
        assert_eq!(
            count(&plane_pool, "select count(*) from event").await,
            fx.events
        );
        assert!(matches!(
            dbs[1]
                .backend()
                .route_info_for_token(&BearerToken::from(fx.ready_token.as_str()))
                .await
                .expect("route"),
            plane_db::backend::RouteInfoResult::Available(_)
        ));
        let pools: Vec<PgPool> = dbs.iter().map(|db| db.pool().clone()).collect();
        drop(dbs);
        let mut all: Vec<&PgPool> = pools.iter().collect();
        all.push(&plane_pool);
        finish(database, &all).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_older_plane_database_is_refused_and_left_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let older = EditedMigrations::new(12, &[]);
        let (database, pool) = plane_database(&older.dir).await;
        let error = plane_db::open_and_migrate(&database.url)
            .await
            .expect_err("an older Plane's database is refused");
        let Error::Schema(SchemaError::PlaneOlder {
            newest_applied,
            missing,
        }) = &error
        else {
            panic!("not PlaneOlder: {error:?}");
        };
        assert_eq!(*newest_applied, 20240625170232);
        assert_eq!(missing, &[20240709213841]);
        let message = format!("{error}: {}", error_source(&error));
        assert!(message.contains("older than 0.5.5"), "{message}");
        assert!(message.contains("Plane 0.5.5 controller"), "{message}");
        assert_untouched_plane(&pool, &PLANE_VERSIONS[..12]).await;

        // The CLI says so in one line and fails.
        let output = cli(&database.url, &["migrate"]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("older than 0.5.5"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert_untouched_plane(&pool, &PLANE_VERSIONS[..12]).await;
        finish(database, &[&pool]).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_plane_database_with_unknown_or_edited_migrations_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // One more migration than 0.5.5 has (a newer Plane, or a fork).
        let newer = EditedMigrations::new(
            13,
            &[(
                "20240801000000_newer-plane.sql",
                "alter table backend add column note text;",
            )],
        );
        let (database, pool) = plane_database(&newer.dir).await;
        let error = plane_db::open_and_migrate(&database.url)
            .await
            .expect_err("refused");
        assert!(
            matches!(
                &error,
                Error::Schema(SchemaError::PlaneUnrecognized { unexpected, missing, edited })
                    if unexpected == &[20240801000000] && missing.is_empty() && edited.is_empty()
            ),
            "{error:?}"
        );
        let mut versions = PLANE_VERSIONS.to_vec();
        versions.push(20240801000000);
        assert_untouched_plane(&pool, &versions).await;
        finish(database, &[&pool]).await;

        // 0.5.5's versions, one applied from another text.
        let edited = EditedMigrations::new(
            12,
            &[(
                "20240709213841_add-index-on-drone-heartbeat.sql",
                "create index idx_drone_last_heartbeat on drone(last_heartbeat, id);",
            )],
        );
        let (database, pool) = plane_database(&edited.dir).await;
        let error = plane_db::migrate(&pool).await.expect_err("refused");
        assert!(
            matches!(
                &error,
                Error::Schema(SchemaError::PlaneUnrecognized { edited, .. })
                    if edited == &[20240709213841]
            ),
            "{error:?}"
        );
        assert_untouched_plane(&pool, &PLANE_VERSIONS).await;
        finish(database, &[&pool]).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_conversion_that_fails_changes_nothing() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (database, pool) = plane_database(plane_migrations()).await;
        let fx = write_plane_rows(&pool).await;
        let before = snapshot(&pool).await;

        // A status no Plane writes: refused before anything is copied.
        sqlx::query("update backend set last_status = 'exploded' where id = 'ba-loading'")
            .execute(&pool)
            .await
            .expect("a bad status");
        let error = plane_db::open_and_migrate(&database.url)
            .await
            .expect_err("an unknown status is refused");
        assert!(
            matches!(
                &error,
                Error::PlaneConversion(PlaneConversionError::UnknownStatus { backend, status, others: 0 })
                    if backend == "ba-loading" && status == "exploded"
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        assert_untouched_plane(&pool, &PLANE_VERSIONS).await;
        sqlx::query("update backend set last_status = 'loading' where id = 'ba-loading'")
            .execute(&pool)
            .await
            .expect("repair the status");

        // An object of the operator's on Plane's token table: the conversion gets to its
        // last step, which cannot drop the table, and everything is rolled back.
        sqlx::query("create view token_report as select backend_id, username from token")
            .execute(&pool)
            .await
            .expect("create a view");
        let error = plane_db::open_and_migrate(&database.url)
            .await
            .expect_err("the view stops the conversion");
        assert!(
            matches!(
                &error,
                Error::PlaneConversion(PlaneConversionError::Step { step, .. })
                    if *step == "drop Plane's tables"
            ),
            "{error:?}"
        );
        let message = format!("{error}");
        assert!(message.contains("rolled back, nothing was changed"), "{message}");
        assert!(message.contains("depend"), "{message}");
        assert_untouched_plane(&pool, &PLANE_VERSIONS).await;
        assert_eq!(snapshot(&pool).await, before, "Plane's rows as they were");
        let through_view: i64 = sqlx::query_scalar("select count(*) from token_report")
            .fetch_one(&pool)
            .await
            .expect("the view still reads Plane's table");
        assert_eq!(through_view, fx.tokens);

        // Without it, the conversion goes through.
        sqlx::query("drop view token_report")
            .execute(&pool)
            .await
            .expect("drop the view");
        let report = plane_db::migrate(&pool).await.expect("converted");
        assert!(report.converted_from_plane.is_some(), "{report:?}");
        assert_eq!(applied_versions(&pool).await, our_versions());
        finish(database, &[&pool]).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_cli_converts_a_plane_database() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (database, pool) = plane_database(plane_migrations()).await;
        let fx = write_plane_rows(&pool).await;
        let output = cli(&database.url, &["--json", "migrate"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: Value = serde_json::from_str(stdout.trim()).expect("JSON output");
        let converted = &json["converted_from_plane"];
        assert_eq!(converted["backends"], 6, "{json}");
        assert_eq!(converted["tokens"], fx.tokens, "{json}");
        assert_eq!(converted["nodes_merged"], 1, "{json}");
        assert_eq!(json["applied"], json!(after_conversion_target()), "{json}");
        // Then it is up to date, and says nothing of Plane.
        let output = cli(&database.url, &["migrate"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.contains("schema is up to date"), "{stdout}");
        assert!(!stdout.contains("Plane"), "{stdout}");
        finish(database, &[&pool]).await;
    })
    .await
    .expect("test timed out");
}

/// Runs the CLI binary with `DATABASE_URL=url`.
fn cli(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_plane-db"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run plane-db")
}

fn error_source(error: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(&cause.to_string());
        out.push_str(": ");
        source = cause.source();
    }
    out
}

/// Our migrations newer than the schema the conversion builds (20261128200000): the
/// conversion applies them afterwards like any migration.
fn after_conversion_target() -> Vec<i64> {
    plane_db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|&v| v > 20261128200000)
        .collect()
}
