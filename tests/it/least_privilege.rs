//! The roles of `docs/least-privilege.sql`: the migration role migrates, and a controller
//! does its everyday work, and the event bus delivers, as the application role, which is
//! not a superuser and cannot create anything.

use crate::common::*;
use plane_db::testing::create_database;
use plane_db::types::{BackendName, BackendState};
use plane_db::PlaneDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Postgres' `insufficient_privilege` error code.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// A random lowercase suffix: roles are cluster-wide, and the test server is shared by
/// every test of the process.
fn suffix() -> String {
    BackendName::new_random()
        .as_str()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Runs `sql` and asserts that Postgres refuses it for want of a privilege.
async fn refused(pool: &PgPool, sql: &str) {
    match sqlx::query(sql).execute(pool).await {
        Err(sqlx::Error::Database(error)) => assert_eq!(
            error.code().as_deref(),
            Some(INSUFFICIENT_PRIVILEGE),
            "{sql}: {error}"
        ),
        other => panic!("{sql} should be refused for want of a privilege, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_works_as_the_application_role() {
    let database = create_database().await.expect("create a test database");
    let admin = PgPool::connect(&database.url)
        .await
        .expect("connect as the harness' superuser");
    let suffix = suffix();
    let migrator = format!("plane_migrator_{suffix}");
    let app = format!("plane_app_{suffix}");
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/least-privilege.sql"
    ))
    .expect("read docs/least-privilege.sql")
    .replace("plane_migrator", &migrator)
    .replace("plane_app", &app);
    let (as_superuser, as_migrator) = sql
        .split_once("\n-- Part 2:")
        .map(|(one, two)| (one.to_string(), format!("-- Part 2:{two}")))
        .expect("the file has a part 2");

    sqlx::raw_sql(&as_superuser)
        .execute(&admin)
        .await
        .expect("part 1 (roles, schema, default privileges), as a superuser");
    // The throwaway server trusts local logins; a password as well lets the test run on a
    // DATABASE_URL server that asks for one.
    let password = suffix.clone();
    for role in [&migrator, &app] {
        sqlx::raw_sql(&format!("alter role {role} password '{password}'"))
            .execute(&admin)
            .await
            .expect("set a password");
    }
    let base: PgConnectOptions = database.url.parse().expect("the test database URL");
    let as_role = |role: &str| base.clone().username(role).password(&password);

    let migrator_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(as_role(&migrator))
        .await
        .expect("connect as the migration role");
    let report = plane_db::migrate(&migrator_pool)
        .await
        .expect("the migration role migrates");
    assert_eq!(report.applied.len(), plane_db::MIGRATOR.iter().count());
    sqlx::raw_sql(&as_migrator)
        .execute(&migrator_pool)
        .await
        .expect("part 2, as the migration role");

    // A hardened server, as some managed services are: the bus must not need these.
    sqlx::raw_sql(
        "revoke execute on function pg_control_checkpoint() from public;
         revoke execute on function pg_walfile_name(pg_lsn) from public;",
    )
    .execute(&admin)
    .await
    .expect("revoke the server-state functions");

    let app_pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(as_role(&app))
        .await
        .expect("connect as the application role");

    // What the application role is not.
    let (is_superuser, can_create): (bool, bool) = sqlx::query_as(
        "select rolsuper, has_schema_privilege(current_user, 'public', 'create')
         from pg_roles where rolname = current_user",
    )
    .fetch_one(&app_pool)
    .await
    .expect("read the role");
    assert!(!is_superuser, "the application role is no superuser");
    assert!(
        !can_create,
        "the application role cannot create in the schema"
    );
    refused(&app_pool, "create table intruder (id integer)").await;
    refused(&app_pool, "create temporary table scratch (id integer)").await;
    refused(
        &app_pool,
        "create function intruder() returns int language sql as 'select 1'",
    )
    .await;
    refused(&app_pool, "delete from _sqlx_migrations").await;
    refused(&app_pool, "truncate event").await;
    refused(&app_pool, "select pg_control_checkpoint()").await;
    refused(&app_pool, "select pg_walfile_name('0/0')").await;
    let (app_runs_it, public_runs_it): (bool, bool) = sqlx::query_as(
        "select has_function_privilege(current_user, 'plane_event_wake()', 'execute'),
                has_function_privilege('public', 'plane_event_wake()', 'execute')",
    )
    .fetch_one(&app_pool)
    .await
    .expect("read function privileges");
    assert!(app_runs_it && !public_runs_it);

    // A controller's start-up check needs no DDL when the schema is up to date.
    let report = plane_db::migrate(&app_pool)
        .await
        .expect("the application role checks the schema");
    assert!(report.applied.is_empty() && report.newer_unknown.is_empty());

    let db = PlaneDatabase::new(app_pool.clone());
    tokio::time::timeout(TEST_TIMEOUT, async {
        everyday_work(&db).await;
        bus_delivers_each_event_once(&db, 8).await;
        // An event emitted in the caller's own transaction wakes the listeners from the
        // trigger (plane_event_wake, as the application role).
        let mut all = db.subscribe_all_events().await.expect("subscribe");
        let mut txn = db.pool().begin().await.expect("begin");
        let id = plane_db::events::emit(
            &mut txn,
            Some(&"own-transaction".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .expect("emit");
        txn.commit().await.expect("commit");
        let event = all.next().await.expect("bus open").expect("not lagged");
        assert_eq!(
            (event.id, event.key.as_deref()),
            (Some(id), Some("own-transaction"))
        );
        cleanup_without_ddl_rights(&db, &migrator_pool).await;
    })
    .await
    .expect("test timed out");

    drop(db);
    app_pool.close().await;
    migrator_pool.close().await;
    // Roles belong to the whole server: remove them (and what they own here) before the
    // database goes.
    sqlx::raw_sql(&format!(
        // One role at a time: a default privilege of one role for the other would be
        // dropped twice ("could not find tuple for default ACL").
        "drop owned by {app}; drop owned by {migrator}; drop role {app}; drop role {migrator};"
    ))
    .execute(&admin)
    .await
    .expect("drop the roles");
    admin.close().await;
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

/// Cleanup as the application role when a partition is due to be dropped: the role may not
/// (it does not own the tables), so cleanup says so and deletes the old events row by row
/// instead of failing, and writes go on.
async fn cleanup_without_ddl_rights(db: &PlaneDatabase, migrator: &PgPool) {
    // As the owner: every id of the first event partition handed out, and every event so
    // far a month old, so that the first partition is due to be dropped.
    sqlx::raw_sql(
        r"select setval('event_id_seq',
                 (regexp_match(pg_get_expr(relpartbound, oid), 'TO \(''(\d+)''\)'))[1]::bigint - 1)
          from pg_class where relname = 'event_p0';
          update event set created_at = now() - interval '30 days';",
    )
    .execute(migrator)
    .await
    .expect("age the first partition");
    let old: i64 = sqlx::query_scalar("select count(*) from event")
        .fetch_one(migrator)
        .await
        .unwrap();
    assert!(old > 0);
    let summary = db
        .run_cleanup(&plane_db::CleanupConfig::default())
        .await
        .expect("cleanup as the application role");
    assert!(summary.partitions.ddl_refused, "{summary:?}");
    assert_eq!(summary.partitions.event_partitions_dropped, 0);
    assert_eq!(summary.events, old as u64, "{summary:?}");
    let left: i64 = sqlx::query_scalar("select count(*) from event")
        .fetch_one(migrator)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Writes go on, into the next partition.
    let mut conn = db.pool().acquire().await.unwrap();
    plane_db::events::emit(
        &mut conn,
        Some(&"after".parse().unwrap()),
        &BackendState::Loading,
    )
    .await
    .expect("an event after cleanup");
}
