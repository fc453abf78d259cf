//! Opening the database: `open`, `open_and_migrate` and `OpenOptions`, and their names before
//! 0.2.0 (`connect`, `connect_and_migrate`, `ConnectOptions` and its `connect` methods), kept
//! as deprecated aliases that open the same thing.

use crate::common::*;
use plane_db::testing::create_database;

/// `application_name` of the connection running this query.
async fn application_name(db: &plane_db::PlaneDatabase) -> String {
    sqlx::query_scalar("select current_setting('application_name')")
        .fetch_one(db.pool())
        .await
        .expect("application_name")
}

/// `max_parallel_workers_per_gather` of the connection running this query.
/// The settings every connection of the library runs with: no JIT, no parallel workers.
async fn assert_session_settings(db: &plane_db::PlaneDatabase) {
    let setting = |name: &'static str| async move {
        sqlx::query_scalar::<_, String>("select current_setting($1)")
            .bind(name)
            .fetch_one(db.pool())
            .await
            .expect(name)
    };
    assert_eq!(
        setting("jit").await,
        "off",
        "the library's connections run without JIT"
    );
    assert_eq!(
        setting("max_parallel_workers_per_gather").await,
        "0",
        "the library's statements get no parallel workers"
    );
}

#[tokio::test]
async fn open_and_migrate_then_open() {
    let database = create_database().await.expect("create a test database");
    tokio::time::timeout(TEST_TIMEOUT, async {
        let migrated = plane_db::open_and_migrate(&database.url)
            .await
            .expect("open_and_migrate");
        migrated.health_check().await.expect("health");
        assert_eq!(application_name(&migrated).await, "plane-db");
        assert_session_settings(&migrated).await;
        migrated.pool().close().await;

        let opened = plane_db::open(&database.url).await.expect("open");
        opened.health_check().await.expect("health");
        opened.pool().close().await;

        let options = plane_db::OpenOptions::new(&database.url)
            .expect("options")
            .application_name("opener")
            .max_connections(2);
        assert!(format!("{options:?}").starts_with("OpenOptions {"));
        let again = options.clone().open_and_migrate().await.expect("migrate");
        assert_eq!(application_name(&again).await, "opener");
        again.pool().close().await;
        let opened = options.open().await.expect("open");
        opened.health_check().await.expect("health");
        opened.pool().close().await;
    })
    .await
    .expect("test timed out");
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

/// The names before 0.2.0 still compile (with a deprecation warning) and open the database.
#[tokio::test]
#[allow(deprecated)]
async fn the_old_names_still_open_the_database() {
    let database = create_database().await.expect("create a test database");
    tokio::time::timeout(TEST_TIMEOUT, async {
        let migrated = plane_db::connect_and_migrate(&database.url)
            .await
            .expect("connect_and_migrate");
        migrated.health_check().await.expect("health");
        assert_eq!(application_name(&migrated).await, "plane-db");
        assert_session_settings(&migrated).await;
        migrated.pool().close().await;

        let opened = plane_db::connect(&database.url).await.expect("connect");
        opened.health_check().await.expect("health");
        opened.pool().close().await;

        let options: plane_db::ConnectOptions = plane_db::ConnectOptions::new(&database.url)
            .expect("options")
            .max_connections(2);
        let _same_type: plane_db::OpenOptions = options.clone();
        let again = options
            .clone()
            .connect_and_migrate()
            .await
            .expect("ConnectOptions::connect_and_migrate");
        again.health_check().await.expect("health");
        again.pool().close().await;
        let opened = options.connect().await.expect("ConnectOptions::connect");
        opened.health_check().await.expect("health");
        opened.pool().close().await;
    })
    .await
    .expect("test timed out");
    database
        .drop_database()
        .await
        .expect("drop the test database");
}
