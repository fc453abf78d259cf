//! Rolling upgrades: this build (N) against a schema that a newer build (N+1) migrated,
//! controllers migrating a fresh database at once, and the histories that must stay errors.

use crate::common::*;
use plane_db::error::SchemaError;
use plane_db::testing::{create_database, TestDatabase};
use plane_db::types::{BackendName, BackendStatus};
use plane_db::{Error, PlaneDatabase};
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use std::path::PathBuf;
use std::process::Command;

/// The version of the newer build's extra migration: after every migration of ours.
const FUTURE: i64 = 29_991_231_000_000;

/// What a newer build adds, following the policy: a nullable column and a new table (with no
/// foreign key, so this build's deletes are not refused).
const FUTURE_SQL: &str = "
alter table backend add column future_note text;
create table future_audit (
    id bigserial primary key,
    backend_id text not null,
    note text not null,
    created_at timestamptz not null default now()
);
create index future_audit_backend_idx on future_audit (backend_id);
";

/// A newer build's migrations: ours, copied from `migrations/`, and one of its own, in a
/// directory removed on drop.
struct NewerBuild {
    dir: PathBuf,
}

impl NewerBuild {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "plane-db-newer-build-{}",
            BackendName::new_random()
        ));
        std::fs::create_dir_all(&dir).expect("create the migrations directory");
        let ours = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        for entry in std::fs::read_dir(ours).expect("read migrations/") {
            let path = entry.expect("a migrations/ entry").path();
            std::fs::copy(&path, dir.join(path.file_name().expect("a file name")))
                .expect("copy a migration");
        }
        std::fs::write(
            dir.join(format!("{FUTURE}_future_additive.sql")),
            FUTURE_SQL,
        )
        .expect("write the newer build's migration");
        NewerBuild { dir }
    }

    /// Migrates `pool` as the newer build would (sqlx's own runner, strict).
    async fn migrate(&self, pool: &PgPool) {
        let migrator = Migrator::new(self.dir.clone())
            .await
            .expect("read the newer build's migrations");
        assert_eq!(
            migrator.iter().count(),
            known_versions().len() + 1,
            "ours and the newer build's own"
        );
        migrator.run(pool).await.expect("the newer build migrates");
    }
}

impl Drop for NewerBuild {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn known_versions() -> Vec<i64> {
    plane_db::MIGRATOR.iter().map(|m| m.version).collect()
}

fn latest_known() -> i64 {
    *known_versions().last().expect("the crate has migrations")
}

async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("select version from _sqlx_migrations order by version")
        .fetch_all(pool)
        .await
        .expect("read _sqlx_migrations")
}

/// A fresh database, not migrated, and a pool on it.
async fn fresh() -> (TestDatabase, PgPool) {
    let database = create_database().await.expect("create a test database");
    let pool = PgPool::connect(&database.url)
        .await
        .expect("connect to the test database");
    (database, pool)
}

async fn finish(database: TestDatabase, pools: &[&PgPool]) {
    for pool in pools {
        pool.close().await;
    }
    database.drop_database().await.expect("drop the database");
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_build_works_on_a_schema_a_newer_build_migrated() {
    let (database, pool) = fresh().await;
    let newer = NewerBuild::new();
    newer.migrate(&pool).await;
    let mut expected = known_versions();
    expected.push(FUTURE);
    assert_eq!(applied_versions(&pool).await, expected);

    // sqlx's strict runner refuses this database: what an older controller used to hit. It
    // returns that error still holding its advisory lock on the connection, so it runs on a
    // pool of its own, closed (which releases the lock) before anything else migrates.
    let strict = PgPool::connect(&database.url).await.expect("connect");
    assert!(matches!(
        plane_db::MIGRATOR.run(&strict).await,
        Err(sqlx::migrate::MigrateError::VersionMissing(FUTURE))
    ));
    strict.close().await;

    // This build starts, twice (a restart), and says what it found.
    let db = tokio::time::timeout(TEST_TIMEOUT, plane_db::open_and_migrate(&database.url))
        .await
        .expect("open_and_migrate finishes")
        .expect("this build starts on the newer schema");
    let report = tokio::time::timeout(TEST_TIMEOUT, plane_db::migrate(db.pool()))
        .await
        .expect("migrate finishes")
        .expect("migrate again");
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(report.newer_unknown, vec![FUTURE]);
    assert_eq!(report.latest_known, Some(latest_known()));
    assert_eq!(
        applied_versions(db.pool()).await,
        expected,
        "nothing removed"
    );

    tokio::time::timeout(TEST_TIMEOUT, async {
        // A backend that the newer build annotates in its own column and table while this
        // build runs its lifecycle and cleans it up.
        drone(&db).await;
        let backend = spawn(&db).await.backend_id;
        exec(
            &db,
            &format!("update backend set future_note = 'from N+1' where id = '{backend}'"),
        )
        .await;
        exec(
            &db,
            &format!("insert into future_audit (backend_id, note) values ('{backend}', 'seen')"),
        )
        .await;
        for state in lifecycle() {
            assert!(db.backend().update_state(&backend, &state).await.unwrap());
        }
        let row = db.backend().backend(&backend).await.unwrap().unwrap();
        assert_eq!(row.state.status(), BackendStatus::Terminated);
        let note: Option<String> =
            sqlx::query_scalar("select future_note from backend where id = $1")
                .bind(backend.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(
            note.as_deref(),
            Some("from N+1"),
            "this build's updates keep the newer column"
        );
        // Rows this build inserts leave the new column null.
        let fresh_backend = spawn(&db).await.backend_id;
        let note: Option<String> =
            sqlx::query_scalar("select future_note from backend where id = $1")
                .bind(fresh_backend.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(note, None);

        everyday_work(&db).await;
        bus_delivers_each_event_once(&db, 4).await;
    })
    .await
    .expect("test timed out");

    // The CLI's migrate accepts the database too, and says why.
    let output = cli(&database.url, &["migrate", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["applied"], serde_json::json!([]));
    assert_eq!(json["newer_unknown"], serde_json::json!([FUTURE]));
    assert_eq!(json["schema_version"], latest_known());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&FUTURE.to_string()) && stderr.contains("newer"),
        "{stderr}"
    );

    let pool_of_db = db.pool().clone();
    drop(db);
    finish(database, &[&pool, &pool_of_db]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_migrating_a_fresh_database_at_once_apply_it_once() {
    const CONTROLLERS: usize = 4;
    const MIGRATORS: usize = 4;
    let (database, pool) = fresh().await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CONTROLLERS + MIGRATORS));
    let controllers: Vec<_> = (0..CONTROLLERS)
        .map(|_| {
            let url = database.url.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                plane_db::open_and_migrate(&url).await
            })
        })
        .collect();
    let migrators: Vec<_> = (0..MIGRATORS)
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
    let mut dbs: Vec<PlaneDatabase> = Vec::new();
    for controller in controllers {
        dbs.push(
            tokio::time::timeout(TEST_TIMEOUT, controller)
                .await
                .expect("open_and_migrate finishes")
                .expect("task")
                .expect("every controller starts"),
        );
    }
    let mut applied_by_reports = Vec::new();
    for migrator in migrators {
        let report = tokio::time::timeout(TEST_TIMEOUT, migrator)
            .await
            .expect("migrate finishes")
            .expect("task")
            .expect("every migrate succeeds");
        assert!(report.newer_unknown.is_empty());
        applied_by_reports.extend(report.applied);
    }
    assert_eq!(
        applied_versions(&pool).await,
        known_versions(),
        "each migration recorded once"
    );
    // The reports never claim a migration twice (the controllers applied the rest).
    let mut unique = applied_by_reports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        applied_by_reports.len(),
        "{applied_by_reports:?}"
    );

    // The schema works, from one of the controllers.
    let db = dbs.pop().expect("a controller");
    tokio::time::timeout(TEST_TIMEOUT, everyday_work(&db))
        .await
        .expect("test timed out");
    let pools: Vec<PgPool> = std::iter::once(db.pool().clone())
        .chain(dbs.iter().map(|db| db.pool().clone()))
        .collect();
    drop((db, dbs));
    let mut all: Vec<&PgPool> = pools.iter().collect();
    all.push(&pool);
    finish(database, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_migration_stays_an_error() {
    let (database, pool) = fresh().await;
    plane_db::migrate(&pool).await.expect("migrate");
    let first = known_versions()[0];
    sqlx::query("update _sqlx_migrations set checksum = '\\x00'::bytea where version = $1")
        .bind(first)
        .execute(&pool)
        .await
        .expect("tamper with the checksum");

    let error = tokio::time::timeout(TEST_TIMEOUT, plane_db::open_and_migrate(&database.url))
        .await
        .expect("open_and_migrate finishes")
        .expect_err("an edited migration is refused");
    match &error {
        Error::Schema(SchemaError::ChecksumMismatch { version, .. }) => {
            assert_eq!(*version, first)
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let chain = error_chain(&error);
    assert!(
        chain.contains(&format!("migration {first}")) && chain.contains("checksum mismatch"),
        "{chain}"
    );

    let output = cli(&database.url, &["migrate"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("migration failed") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    finish(database, &[&pool]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverging_histories_stay_errors() {
    // An unknown migration older than this build's newest.
    let (database, pool) = fresh().await;
    plane_db::migrate(&pool).await.expect("migrate");
    sqlx::query(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values (1, 'from another history', true, '\\x00'::bytea, 0)",
    )
    .execute(&pool)
    .await
    .expect("record a foreign migration");
    match plane_db::migrate(&pool).await {
        Err(Error::Schema(SchemaError::UnknownOlder {
            version: 1,
            latest_known: latest,
        })) => assert_eq!(latest, latest_known()),
        other => panic!("expected an unknown older migration, got {other:?}"),
    }
    let output = cli(&database.url, &["migrate"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("diverging migration histories"),
        "{}",
        text(&output.stderr)
    );
    finish(database, &[&pool]).await;

    // A newer schema that lacks one of this build's migrations.
    let (database, pool) = fresh().await;
    NewerBuild::new().migrate(&pool).await;
    sqlx::query("delete from _sqlx_migrations where version = $1")
        .bind(latest_known())
        .execute(&pool)
        .await
        .expect("forget our newest migration");
    match plane_db::migrate(&pool).await {
        Err(Error::Schema(SchemaError::MissingBeforeNewer { version, newer })) => {
            assert_eq!((version, newer), (latest_known(), FUTURE))
        }
        other => panic!("expected a missing migration under a newer one, got {other:?}"),
    }
    finish(database, &[&pool]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_migrates_a_fresh_database_and_then_finds_it_up_to_date() {
    let (database, pool) = fresh().await;
    let output = cli(&database.url, &["migrate", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["applied"], serde_json::json!(known_versions()));
    assert_eq!(json["newer_unknown"], serde_json::json!([]));
    assert_eq!(applied_versions(&pool).await, known_versions());

    let output = cli(&database.url, &["migrate"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        format!("schema is up to date (version {})\n", latest_known())
    );
    assert_eq!(text(&output.stderr), "", "no note without newer migrations");
    finish(database, &[&pool]).await;
}

/// An error and its causes, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
