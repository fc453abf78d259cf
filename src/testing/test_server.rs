//! [`TestServer`]: a server the tests make databases on, either the one `DATABASE_URL`
//! names or a throwaway one of this process, and what a test may do with it.

use std::time::Instant;

use sqlx::{Connection, Executor, PgConnection};

use super::embedded::{Binaries, Embedded};
use super::host::random_lowercase;
use super::url::{local_url, quote_identifier, redact_password, split_url, with_database};
use super::{HarnessError, TestDatabase, MAINTENANCE_DB};

/// The environment variable naming an existing server to use instead of a throwaway one.
const DATABASE_URL_VAR: &str = "DATABASE_URL";

/// The PostgreSQL server the tests of this process use: either the one named by
/// `DATABASE_URL` or a throwaway one started by this process.
///
/// Get it with [`server`](super::server).
#[derive(Debug)]
pub struct TestServer {
    /// URL of the database used to create and drop test databases.
    pub(super) maintenance_url: String,
    /// `None` for the `DATABASE_URL` server.
    embedded: Option<Embedded>,
}

impl TestServer {
    /// The server for this process: `DATABASE_URL`'s if it is set (and not empty), else a
    /// new throwaway one.
    pub(super) fn from_environment() -> Result<TestServer, HarnessError> {
        match std::env::var(DATABASE_URL_VAR) {
            Ok(url) if !url.trim().is_empty() => TestServer::external(url.trim()),
            Err(std::env::VarError::NotUnicode(_)) => Err(HarnessError::InvalidDatabaseUrl),
            _ => TestServer::start_embedded(),
        }
    }

    fn external(url: &str) -> Result<TestServer, HarnessError> {
        if split_url(url).is_none() {
            return Err(HarnessError::InvalidDatabaseUrl);
        }
        Ok(TestServer {
            maintenance_url: url.to_owned(),
            embedded: None,
        })
    }

    /// Initialises and starts a new throwaway server (independent of the process-wide one).
    pub(super) fn start_embedded() -> Result<TestServer, HarnessError> {
        let started = Instant::now();
        let embedded = Embedded::start(Binaries::find()?, Embedded::initdb)?;
        tracing::info!(
            port = embedded.port,
            dir = %embedded.root.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "started throwaway PostgreSQL server for tests"
        );
        Ok(TestServer::embedded(embedded))
    }

    /// Initialises and starts a new throwaway server that keeps what it acknowledged
    /// through a crash (`fsync`, full page writes and synchronous commit on).
    pub(super) fn start_embedded_durable() -> Result<TestServer, HarnessError> {
        let embedded = Embedded::start_with(Binaries::find()?, Embedded::initdb, true)?;
        Ok(TestServer::embedded(embedded))
    }

    /// The handle of a throwaway server.
    pub(super) fn embedded(embedded: Embedded) -> TestServer {
        TestServer {
            maintenance_url: local_url("127.0.0.1", embedded.port, MAINTENANCE_DB),
            embedded: Some(embedded),
        }
    }

    /// The throwaway server; [`HarnessError::NotEmbedded`] for the `DATABASE_URL` server.
    pub(super) fn throwaway(&self) -> Result<&Embedded, HarnessError> {
        self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)
    }

    /// Whether this is a throwaway server started by this process (rather than the server
    /// named by `DATABASE_URL`).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// URL of a database on this server with the given name (replaces the path of the base
    /// URL, keeps user/host/port/query).
    pub fn url_for(&self, database: &str) -> String {
        with_database(&self.maintenance_url, database)
            .expect("the server URL was validated when the server was set up")
    }

    /// Stops the embedded server (fast shutdown) and waits until it is down; error if
    /// external.
    ///
    /// Blocks the calling thread. Stopping a stopped server does nothing. Open connections
    /// are terminated, and other tests using the server at the same time will fail.
    pub fn stop(&self) -> Result<(), HarnessError> {
        self.throwaway()?.stop()
    }

    /// Starts the embedded server again on the same port and data dir and waits until it
    /// accepts connections.
    ///
    /// Blocks the calling thread. Starting a running server does nothing; error if external.
    pub fn start(&self) -> Result<(), HarnessError> {
        self.throwaway()?.restart()
    }

    /// Kills the embedded server's postmaster with SIGKILL (as a crash would) and waits
    /// for it to exit; [`start`](Self::start) then runs crash recovery. Retry `start` if it
    /// fails at once: the old server processes may take a moment to notice and exit.
    /// Error if external.
    pub fn kill_postmaster(&self) -> Result<(), HarnessError> {
        self.throwaway()?.kill_postmaster()
    }

    /// Kills one server process of the embedded server (`pid`, e.g. from
    /// `pg_backend_pid()`) with SIGKILL, as the kernel's OOM killer would: the postmaster
    /// then ends every session and recovers in place, keeping its start time. Error if
    /// external.
    pub fn kill_server_process(&self, pid: u32) -> Result<(), HarnessError> {
        self.throwaway()?;
        super::process::send_signal(pid, "KILL")
    }

    /// The port of an embedded server (`None` for the `DATABASE_URL` server).
    pub fn port(&self) -> Option<u16> {
        self.embedded.as_ref().map(|e| e.port)
    }

    /// Runs one of the server's own programs from its binary directory (e.g.
    /// `pg_resetwal`) on its data directory (`-D` is appended), as the user the server runs
    /// as, and returns what it printed. For fault tests that alter a stopped server; error if
    /// external.
    pub fn run_tool(&self, program: &str, args: &[&str]) -> Result<String, HarnessError> {
        let embedded = self.throwaway()?;
        let mut command = embedded.command(program);
        command.args(args).arg("-D").arg(&embedded.data_dir);
        embedded.run(command)
    }

    /// Like [`create_database`](super::create_database), on this server rather than the
    /// process-wide one.
    pub async fn create_database(&self) -> Result<TestDatabase, HarnessError> {
        let name = format!("plane_test_{}", random_lowercase(16)?);
        self.execute_maintenance(
            &format!("CREATE DATABASE {}", quote_identifier(&name)),
            format!("could not create test database {name}"),
        )
        .await?;
        Ok(TestDatabase {
            url: self.url_for(&name),
            name,
        })
    }

    /// `DROP DATABASE … WITH (FORCE)`; dropping a database that does not exist is not an
    /// error.
    pub(super) async fn drop_database(&self, name: &str) -> Result<(), HarnessError> {
        self.execute_maintenance(
            &format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_identifier(name)
            ),
            format!("could not drop test database {name}"),
        )
        .await
    }

    /// Runs one statement on the maintenance database.
    async fn execute_maintenance(&self, sql: &str, context: String) -> Result<(), HarnessError> {
        let mut conn = PgConnection::connect(&self.maintenance_url)
            .await
            .map_err(|source| HarnessError::Database {
                context: format!(
                    "could not connect to the test server at {}",
                    redact_password(&self.maintenance_url)
                ),
                source,
            })?;
        let result = conn.execute(sql).await;
        let _ = conn.close().await;
        result
            .map(drop)
            .map_err(|source| HarnessError::Database { context, source })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{server, wire::probe};
    use super::*;

    #[test]
    fn non_postgres_urls_are_rejected() {
        assert!(matches!(
            TestServer::external("http://example.com/"),
            Err(HarnessError::InvalidDatabaseUrl)
        ));
        let server = TestServer::external("postgres://u:p@h:1/maint?x=y").unwrap();
        assert!(!server.is_embedded());
        assert_eq!(server.url_for("d"), "postgres://u:p@h:1/d?x=y");
        assert!(matches!(server.stop(), Err(HarnessError::NotEmbedded)));
        assert!(matches!(server.start(), Err(HarnessError::NotEmbedded)));
    }

    /// Uses its own throwaway server, so that stopping it does not disturb other tests using
    /// the process-wide one.
    #[test]
    fn stop_and_start_embedded_server() {
        if !server().unwrap().is_embedded() {
            eprintln!("DATABASE_URL is set: skipping the stop/start test");
            return;
        }
        let started = Instant::now();
        let own = TestServer::start_embedded().unwrap();
        eprintln!("second server ready after {:?}", started.elapsed());
        let embedded = own.throwaway().unwrap();
        let root = embedded.root.clone();
        assert!(probe(embedded.port).is_ok());

        own.stop().unwrap();
        assert!(probe(embedded.port).is_err());
        assert!(!embedded.data_dir.join("postmaster.pid").exists());
        own.stop().unwrap(); // stopping twice is fine

        let restarted = Instant::now();
        own.start().unwrap();
        eprintln!("restarted after {:?}", restarted.elapsed());
        assert!(probe(embedded.port).is_ok());
        own.start().unwrap(); // starting a running server is fine

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = own.url_for("postgres");
        assert_eq!(runtime.block_on(current_database(&url)), "postgres");

        drop(own);
        assert!(!root.exists(), "{} was not removed", root.display());
    }

    pub(in crate::testing) async fn current_database(url: &str) -> String {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        let name: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&pool)
            .await
            .expect("query");
        pool.close().await;
        name
    }
}
