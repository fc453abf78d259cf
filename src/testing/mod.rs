//! Fresh PostgreSQL databases for tests, examples and doctests.
//!
//! [`create_database`] creates an empty database with a random name (`plane_test_…`) and
//! returns its URL; [`TestDatabase::drop_database`] removes it again. Nothing is migrated.
//!
//! Which server the databases live on:
//!
//! * If the `DATABASE_URL` environment variable is set (and not empty), it names a server on
//!   which the tests may create and drop databases, e.g.
//!   `postgres://postgres:postgres@127.0.0.1:5432/postgres`. The harness connects to the
//!   database in that URL to run `CREATE DATABASE` / `DROP DATABASE`, and the URLs it hands
//!   out are that URL with the database name replaced (user, password, host, port and query
//!   parameters are kept).
//! * Otherwise, the first call in the process starts a throwaway server from the local
//!   PostgreSQL binaries (`initdb` and `postgres`, found on `PATH` or under
//!   `/usr/lib/postgresql/<version>/bin`) in a temporary directory, listening on
//!   `127.0.0.1` on a free port. It is tuned for speed, not durability (`fsync=off`), and is
//!   stopped and deleted shortly after the process exits. When running as root, the server
//!   runs as the `postgres` (or else `nobody`) user, because PostgreSQL refuses to run as
//!   root.
//!
//! Tests that stop, restart, replicate or put a pooler in front of a server use one of
//! their own: [`private_server`] (with [`TestServer::replica`] and [`TestServer::pgbouncer`])
//! and [`private_tls_server`]. Failover tests against a real high-availability set-up start
//! a [`TestPatroniCluster`] (etcd, PostgreSQL nodes managed by Patroni, HAProxy).
//!
//! This module is only compiled with the `testing` cargo feature and only works on Unix.

// One idea per file:
// - this file: the process-wide server and the public entry points;
// - `test_server`: `TestServer`, the handle the tests hold (DATABASE_URL's server or a throwaway
//   one), creating and dropping databases on it;
// - `embedded`: the throwaway server process, and the one way to build one (used for the
//   process-wide server, private ones, replicas and the TLS server);
// - `replica`, `tls`, `pgbouncer`: what some tests put around a private server;
// - `patroni`: a Patroni cluster of its own (etcd, nodes, HAProxy) for the failover tests;
// - `reaper`: the process that cleans up after a test process that died;
// - `process`, `wire`, `host`, `url`: running programs, probing a server with std only, the
//   machine (binaries, users, temporary directories), URLs;
// - `error`: `HarnessError`;
// - `bench` (hidden): the library's own statements, run where the bench measures them;
// - `statements` (hidden): group commit's lone and batch statements, run directly, for the
//   tests that compare the rows they write.

#[doc(hidden)]
pub mod bench;
mod embedded;
mod error;
mod host;
mod patroni;
mod pgbouncer;
mod process;
mod reaper;
mod replica;
#[doc(hidden)]
pub mod statements;
mod test_server;
mod tls;
mod url;
mod wire;

use std::sync::OnceLock;

pub use error::HarnessError;
pub use patroni::{PatroniOptions, TestPatroniCluster, TimelineSwitch};
pub use pgbouncer::{PgBouncerMode, PgBouncerOptions, TestPgBouncer};
pub use test_server::TestServer;
pub use tls::{private_tls_server, TlsTestServer};

/// Superuser created by `initdb` for the throwaway server.
const SUPERUSER: &str = "postgres";
/// Maintenance database of the throwaway server.
const MAINTENANCE_DB: &str = "postgres";

static SERVER: OnceLock<Result<TestServer, HarnessError>> = OnceLock::new();

/// Returns the process-wide server: `DATABASE_URL`'s server, or a throwaway one started on
/// first use.
///
/// The first call may block for a few seconds while the throwaway server is initialised and
/// started (other callers wait for it); it uses only blocking standard-library code, so it
/// may be called from inside a tokio runtime. If setting up fails, the failure is remembered
/// and returned by every later call.
pub fn server() -> Result<&'static TestServer, HarnessError> {
    let mut first_error = None;
    let result = SERVER.get_or_init(|| {
        TestServer::from_environment().map_err(|error| {
            let cached = error.replay();
            first_error = Some(error);
            cached
        })
    });
    if let Some(error) = first_error {
        return Err(error);
    }
    match result {
        Ok(server) => Ok(server),
        Err(error) => Err(error.replay()),
    }
}

/// Starts a new throwaway server from the local PostgreSQL binaries that belongs to the
/// caller alone, independent of the process-wide [`server`] (even when `DATABASE_URL` is
/// set). Use it for tests that [`stop`](TestServer::stop) and [`start`](TestServer::start)
/// the server: stopping the shared one would break the tests running beside them.
///
/// Blocks for a few seconds (`initdb`). Dropping the returned server stops it and deletes
/// its files. [`HarnessError::NoPostgres`] if no server binaries are installed.
pub fn private_server() -> Result<TestServer, HarnessError> {
    TestServer::start_embedded()
}

/// Like [`private_server`], but durable: `fsync`, full page writes and synchronous commit
/// on, as Postgres's defaults have them, so that a test may crash it
/// ([`TestServer::kill_postmaster`], [`TestServer::kill_server_process`]) and count on what
/// it acknowledged. Slower to write to than the others.
pub fn private_durable_server() -> Result<TestServer, HarnessError> {
    TestServer::start_embedded_durable()
}

/// A database created by [`create_database`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDatabase {
    /// The database name, `plane_test_` followed by 16 random lowercase letters.
    pub name: String,
    /// A URL to connect to the database.
    pub url: String,
}

/// `CREATE DATABASE plane_test_<16 random lowercase chars>` on the [`server`] (connecting to
/// the server's maintenance database: `DATABASE_URL`'s own database, or `postgres` for the
/// throwaway server). Does not migrate.
///
/// The database is not dropped automatically; call [`TestDatabase::drop_database`] when
/// done (databases left on the throwaway server disappear with it).
pub async fn create_database() -> Result<TestDatabase, HarnessError> {
    server()?.create_database().await
}

impl TestDatabase {
    /// `DROP DATABASE ... WITH (FORCE)`: drops the database, terminating any connections to
    /// it. Dropping a database that no longer exists is not an error.
    pub async fn drop_database(self) -> Result<(), HarnessError> {
        server()?.drop_database(&self.name).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::test_server::tests::current_database;
    use super::*;

    async fn database_exists(name: &str) -> bool {
        let server = server().unwrap();
        let pool = sqlx::PgPool::connect(&server.maintenance_url)
            .await
            .expect("connect");
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
                .bind(name)
                .fetch_one(&pool)
                .await
                .expect("query");
        pool.close().await;
        exists
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_connect_and_drop_databases() {
        let started = Instant::now();
        let server = server().unwrap();
        eprintln!(
            "server ready after {:?} (embedded: {})",
            started.elapsed(),
            server.is_embedded()
        );

        let (first, second) = tokio::join!(create_database(), create_database());
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_ne!(first.name, second.name);
        for db in [&first, &second] {
            assert!(db.name.starts_with("plane_test_"), "{}", db.name);
            assert_eq!(db.name.len(), "plane_test_".len() + 16);
            assert_eq!(db.url, server.url_for(&db.name));
            assert_eq!(current_database(&db.url).await, db.name);
        }

        // A connection left open does not prevent dropping (WITH (FORCE)).
        let open = sqlx::PgPool::connect(&first.url).await.unwrap();
        sqlx::query("select 1").execute(&open).await.unwrap();

        let (first_name, second_name) = (first.name.clone(), second.name.clone());
        first.drop_database().await.unwrap();
        second.drop_database().await.unwrap();
        assert!(!database_exists(&first_name).await);
        assert!(!database_exists(&second_name).await);
        open.close().await;
    }
}
