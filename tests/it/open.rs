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
async fn parallel_workers(db: &plane_db::PlaneDatabase) -> String {
    sqlx::query_scalar("select current_setting('max_parallel_workers_per_gather')")
        .fetch_one(db.pool())
        .await
        .expect("max_parallel_workers_per_gather")
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
        let jit: String = sqlx::query_scalar("select current_setting('jit')")
            .fetch_one(migrated.pool())
            .await
            .expect("jit");
        assert_eq!(jit, "off", "the library's connections run without JIT");
        assert_eq!(
            parallel_workers(&migrated).await,
            "0",
            "the library's statements get no parallel workers"
        );
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
        let jit: String = sqlx::query_scalar("select current_setting('jit')")
            .fetch_one(migrated.pool())
            .await
            .expect("jit");
        assert_eq!(jit, "off", "the library's connections run without JIT");
        assert_eq!(
            parallel_workers(&migrated).await,
            "0",
            "the library's statements get no parallel workers"
        );
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
