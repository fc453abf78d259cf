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
//! This module is only compiled with the `testing` cargo feature and only works on Unix.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection};

/// The environment variable naming an existing server to use instead of a throwaway one.
const DATABASE_URL_VAR: &str = "DATABASE_URL";
/// Superuser created by `initdb` for the throwaway server.
const SUPERUSER: &str = "postgres";
/// Maintenance database of the throwaway server.
const MAINTENANCE_DB: &str = "postgres";
/// How long to wait for the throwaway server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a fast shutdown before killing the server.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many lines of `postgres.log` to put into errors.
const LOG_TAIL_LINES: usize = 25;
/// Attempts at starting the throwaway server on a fresh port when the port was taken.
const PORT_ATTEMPTS: usize = 3;

const NO_POSTGRES_MESSAGE: &str = "no PostgreSQL server found: set DATABASE_URL to a server \
where tests may create databases (e.g. `docker compose up -d` then \
DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres), or install the \
PostgreSQL server binaries (initdb, postgres; e.g. `apt install postgresql`)";

/// Errors of the test harness.
///
/// `Debug` prints the same text as `Display`, so that `.unwrap()` in a test shows a readable
/// message.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// `DATABASE_URL` is unset and no PostgreSQL server binaries were found.
    #[error("{}", NO_POSTGRES_MESSAGE)]
    NoPostgres,
    /// `DATABASE_URL` is set but is not a `postgres://` or `postgresql://` URL.
    #[error(
        "DATABASE_URL must be a postgres:// or postgresql:// URL, \
         e.g. postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    InvalidDatabaseUrl,
    /// Running as root, and no unprivileged user exists to run the throwaway server as.
    #[error(
        "running as root, but neither a `postgres` nor a `nobody` user exists in /etc/passwd \
         to run the throwaway PostgreSQL server as (initdb and postgres refuse to run as \
         root); create one or set DATABASE_URL"
    )]
    NoUnprivilegedUser,
    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command (such as `initdb`) failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command that was run.
        command: String,
        /// How it exited.
        status: String,
        /// Its standard output and standard error.
        output: String,
    },
    /// The throwaway server exited while it was starting.
    #[error(
        "the throwaway PostgreSQL server exited during startup ({status}); last lines of {}:\n{log_tail}",
        log.display()
    )]
    ServerExited {
        /// How it exited.
        status: String,
        /// Path of the server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The throwaway server did not accept connections in time.
    #[error(
        "the throwaway PostgreSQL server did not accept connections within {timeout:?} \
         (last attempt: {last_error}); last lines of {}:\n{log_tail}",
        log.display()
    )]
    NotReady {
        /// How long was waited.
        timeout: Duration,
        /// Why the last connection attempt failed.
        last_error: String,
        /// Path of the server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The throwaway server did not shut down in time and was killed.
    #[error("the throwaway PostgreSQL server did not shut down within {0:?} and was killed")]
    StopTimeout(Duration),
    /// [`TestServer::stop`] or [`TestServer::start`] was called on the `DATABASE_URL` server.
    #[error(
        "stop() and start() only work on the throwaway PostgreSQL server, \
         not on the server named by DATABASE_URL"
    )]
    NotEmbedded,
    /// No `pgbouncer` binary was found for [`TestServer::pgbouncer`].
    #[error("{}", NO_PGBOUNCER_MESSAGE)]
    NoPgBouncer,
    /// The test PgBouncer exited while starting, or did not accept connections in time.
    #[error("the test PgBouncer {what}; last lines of {}:\n{log_tail}", log.display())]
    PgBouncer {
        /// What went wrong.
        what: String,
        /// Path of its log.
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The operating system's random number generator failed.
    #[error("could not get random bytes: {0}")]
    Random(String),
    /// A statement on the test server failed (or connecting to it failed).
    #[error("{context}: {source}")]
    Database {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
    /// Setting up the server failed on an earlier call in this process (the message is that
    /// failure); it is not retried.
    #[error("the test PostgreSQL server could not be set up earlier in this process: {0}")]
    EarlierFailure(String),
    /// [`private_tls_server`] needs the `openssl` command to make its certificates, and it
    /// is not on `PATH`.
    #[error(
        "the `openssl` command was not found on PATH: the TLS test server's CA and \
         certificates are made with it (install it, e.g. `apt install openssl`)"
    )]
    NoOpenssl,
    /// The server configured by [`private_tls_server`] does not offer TLS.
    #[error(
        "the TLS test server does not offer TLS ({reason}); last lines of {}:\n{log_tail}",
        log.display()
    )]
    TlsNotOffered {
        /// What the server answered to an `SSLRequest`.
        reason: String,
        /// Path of the server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
}

impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl HarnessError {
    /// [`HarnessError::CommandFailed`] for `command`, which exited with `output`.
    fn command_failed(command: &Command, output: &std::process::Output) -> HarnessError {
        HarnessError::CommandFailed {
            command: format!("{command:?}"),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }

    /// The error to hand out again for a setup failure cached in [`SERVER`].
    fn replay(&self) -> HarnessError {
        match self {
            HarnessError::NoPostgres => HarnessError::NoPostgres,
            HarnessError::InvalidDatabaseUrl => HarnessError::InvalidDatabaseUrl,
            HarnessError::NoUnprivilegedUser => HarnessError::NoUnprivilegedUser,
            HarnessError::EarlierFailure(message) => HarnessError::EarlierFailure(message.clone()),
            other => HarnessError::EarlierFailure(other.to_string()),
        }
    }
}

/// The PostgreSQL server the tests of this process use: either the one named by
/// `DATABASE_URL` or a throwaway one started by this process.
///
/// Get it with [`server`].
#[derive(Debug)]
pub struct TestServer {
    /// URL of the database used to create and drop test databases.
    maintenance_url: String,
    /// `None` for the `DATABASE_URL` server.
    embedded: Option<Embedded>,
}

/// A throwaway server started by this process.
#[derive(Debug)]
struct Embedded {
    /// The temporary directory holding everything below.
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// Directory holding `initdb` and `postgres`.
    bin_dir: PathBuf,
    port: u16,
    /// `(uid, gid)` to run PostgreSQL as, when this process runs as root.
    run_as: Option<(u32, u32)>,
    /// The running postmaster, if any.
    postmaster: Mutex<Option<Child>>,
    /// The shell process that removes everything once this process has exited.
    reaper: Mutex<Option<Child>>,
}

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

impl TestServer {
    fn from_environment() -> Result<TestServer, HarnessError> {
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
    fn start_embedded() -> Result<TestServer, HarnessError> {
        let started = Instant::now();
        let bin_dir = find_bin_dir().ok_or(HarnessError::NoPostgres)?;
        let run_as = match effective_uid() {
            Some(0) => Some(unprivileged_user()?),
            _ => None,
        };

        let root = create_temp_root()?;
        // If this process exits while the server exists, the reaper stops it and removes
        // `root`; if setting up fails below, dropping `embedded` does that right away.
        let reaper = spawn_reaper(&root).inspect_err(|_| {
            let _ = fs::remove_dir_all(&root);
        })?;
        let mut embedded = Embedded {
            data_dir: root.join("data"),
            socket_dir: root.join("socket"),
            log_path: root.join("postgres.log"),
            root,
            bin_dir,
            port: 0,
            run_as,
            postmaster: Mutex::new(None),
            reaper: Mutex::new(Some(reaper)),
        };
        embedded.prepare_directories()?;
        embedded.initdb()?;

        embedded.launch_on_free_port()?;

        tracing::info!(
            port = embedded.port,
            dir = %embedded.root.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "started throwaway PostgreSQL server for tests"
        );
        Ok(TestServer {
            maintenance_url: format!(
                "postgres://{SUPERUSER}@127.0.0.1:{}/{MAINTENANCE_DB}",
                embedded.port
            ),
            embedded: Some(embedded),
        })
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
        let embedded = self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;
        let mut postmaster = lock(&embedded.postmaster);
        match postmaster.take() {
            Some(mut child) => embedded.shutdown(&mut child),
            None => Ok(()),
        }
    }

    /// Starts the embedded server again on the same port and data dir and waits until it
    /// accepts connections.
    ///
    /// Blocks the calling thread. Starting a running server does nothing; error if external.
    pub fn start(&self) -> Result<(), HarnessError> {
        let embedded = self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;
        let mut postmaster = lock(&embedded.postmaster);
        if let Some(child) = postmaster.as_mut() {
            let exited = child.try_wait().map_err(HarnessError::io(
                "could not check the PostgreSQL server process",
            ))?;
            if exited.is_none() {
                return Ok(());
            }
        }
        *postmaster = Some(embedded.launch()?);
        Ok(())
    }

    /// Starts a streaming replica of this (embedded, running) server: a new throwaway server
    /// whose data directory is a base backup of this one (`pg_basebackup -R`), following it
    /// as a hot standby on a port of its own. Dropping it stops it and deletes its files.
    /// Blocks; error if external.
    pub fn replica(&self) -> Result<TestServer, HarnessError> {
        let primary = self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;
        let root = create_temp_root()?;
        let reaper = spawn_reaper(&root).inspect_err(|_| {
            let _ = fs::remove_dir_all(&root);
        })?;
        let mut embedded = Embedded {
            data_dir: root.join("data"),
            socket_dir: root.join("socket"),
            log_path: root.join("postgres.log"),
            root,
            bin_dir: primary.bin_dir.clone(),
            port: 0,
            run_as: primary.run_as,
            postmaster: Mutex::new(None),
            reaper: Mutex::new(Some(reaper)),
        };
        embedded.prepare_directories()?;
        let mut command = embedded.command("pg_basebackup");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
            .arg(&embedded.data_dir);
        let output = command
            .output()
            .map_err(HarnessError::io(embedded.run_context("pg_basebackup")))?;
        if !output.status.success() {
            return Err(HarnessError::command_failed(&command, &output));
        }
        embedded.launch_on_free_port()?;
        Ok(TestServer {
            maintenance_url: format!(
                "postgres://{SUPERUSER}@127.0.0.1:{}/{MAINTENANCE_DB}",
                embedded.port
            ),
            embedded: Some(embedded),
        })
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
        let embedded = self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;
        let mut command = embedded.command(program);
        command.args(args).arg("-D").arg(&embedded.data_dir);
        let output = command
            .output()
            .map_err(HarnessError::io(embedded.run_context(program)))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(HarnessError::CommandFailed {
                command: format!("{command:?}"),
                status: output.status.to_string(),
                output: text,
            })
        }
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

impl Embedded {
    fn prepare_directories(&self) -> Result<(), HarnessError> {
        for dir in [&self.data_dir, &self.socket_dir] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(HarnessError::io(format!(
                    "could not create {}",
                    dir.display()
                )))?;
        }
        File::create(&self.log_path).map_err(HarnessError::io(format!(
            "could not create {}",
            self.log_path.display()
        )))?;
        if let Some((uid, gid)) = self.run_as {
            for path in [&self.root, &self.data_dir, &self.socket_dir, &self.log_path] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(HarnessError::io(
                    format!(
                        "could not change the owner of {} to uid {uid}",
                        path.display()
                    ),
                ))?;
            }
        }
        Ok(())
    }

    /// A command running one of the PostgreSQL binaries, as the unprivileged user if needed.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.program_path(program));
        // The unprivileged user may not be allowed into the current directory.
        command.current_dir(&self.root).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Picks a free port and starts the postmaster on it (retrying if another process took
    /// the port first).
    fn launch_on_free_port(&mut self) -> Result<(), HarnessError> {
        let mut attempt = 1;
        let child = loop {
            self.port = free_port()?;
            match self.launch() {
                Ok(child) => break child,
                // Another process took the port between choosing and binding it.
                Err(HarnessError::ServerExited { ref log_tail, .. })
                    if attempt < PORT_ATTEMPTS && log_tail.contains("could not bind") =>
                {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        *lock(&self.postmaster) = Some(child);
        Ok(())
    }

    /// Where `program` is: in the binary directory, or else beside the real `postgres`
    /// binary (the directory on `PATH` may hold links to only a few of them).
    fn program_path(&self, program: &str) -> PathBuf {
        let direct = self.bin_dir.join(program);
        if is_executable(&direct) {
            return direct;
        }
        fs::canonicalize(self.bin_dir.join("postgres"))
            .ok()
            .and_then(|postgres| Some(postgres.parent()?.join(program)))
            .filter(|beside| is_executable(beside))
            .unwrap_or(direct)
    }

    /// Error context for failing to run one of the PostgreSQL binaries.
    fn run_context(&self, program: &str) -> String {
        let program = self.program_path(program);
        match self.run_as {
            Some((uid, _)) => format!(
                "could not run {} as uid {uid} in {} (that user needs access to the temporary \
                 directory and the PostgreSQL binaries)",
                program.display(),
                self.root.display()
            ),
            None => format!("could not run {}", program.display()),
        }
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        let output = command
            .output()
            .map_err(HarnessError::io(self.run_context("initdb")))?;
        if output.status.success() {
            return Ok(());
        }
        Err(HarnessError::command_failed(&command, &output))
    }

    /// Starts the postmaster and waits until it accepts connections.
    fn launch(&self) -> Result<Child, HarnessError> {
        let log_context = || format!("could not open {}", self.log_path.display());
        let log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .map_err(HarnessError::io(log_context()))?;
        let log_err = log.try_clone().map_err(HarnessError::io(log_context()))?;

        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=500"])
            .args(["-c", "shared_buffers=128MB"])
            .stdout(log)
            .stderr(log_err)
            // Not in the test run's process group: a Ctrl-C of the tests leaves the server to
            // the reaper instead of killing it halfway.
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(HarnessError::io(self.run_context("postgres")))?;
        match self.wait_until_ready(&mut child) {
            Ok(()) => Ok(child),
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(error)
            }
        }
    }

    fn wait_until_ready(&self, child: &mut Child) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = child.try_wait().map_err(HarnessError::io(
                "could not check the PostgreSQL server process",
            ))?;
            if let Some(status) = exited {
                return Err(HarnessError::ServerExited {
                    status: status.to_string(),
                    log: self.log_path.clone(),
                    log_tail: log_tail(&self.log_path),
                });
            }
            let last_error = match probe(self.port) {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    timeout: READY_TIMEOUT,
                    last_error,
                    log: self.log_path.clone(),
                    log_tail: log_tail(&self.log_path),
                });
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Fast shutdown: SIGINT, then wait (and SIGKILL after [`STOP_TIMEOUT`]).
    fn shutdown(&self, child: &mut Child) -> Result<(), HarnessError> {
        let exited = child.try_wait().map_err(HarnessError::io(
            "could not check the PostgreSQL server process",
        ))?;
        if exited.is_some() {
            return Ok(());
        }
        send_signal(child.id(), "INT")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let exited = child
                .try_wait()
                .map_err(HarnessError::io("could not wait for the PostgreSQL server"))?;
            if exited.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::StopTimeout(STOP_TIMEOUT));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Embedded {
    // Only runs for servers other than the process-wide one (statics are never dropped);
    // the process-wide server is cleaned up by the reaper.
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.postmaster).take() {
            let _ = self.shutdown(&mut child);
        }
        if let Some(mut reaper) = lock(&self.reaper).take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
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

impl TestServer {
    /// Like [`create_database`], on this server rather than the process-wide one.
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
        server()?
            .execute_maintenance(
                &format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_identifier(&self.name)
                ),
                format!("could not drop test database {}", self.name),
            )
            .await
    }
}

/// The command that makes the TLS test server's certificates.
const OPENSSL: &str = "openssl";
/// How long the test certificates are valid, in days.
const CERT_DAYS: u32 = 2;
/// The `openssl` configuration of the test certificates: extensions for a CA, and for a
/// server certificate valid for the host name `localhost` only (no IP address, so that
/// `127.0.0.1` with `sslmode=verify-full` is a host-name mismatch).
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = subject
prompt = no

[subject]
CN = plane-db test

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throwaway server with TLS on, made by [`private_tls_server`], and the CA files a
/// client needs to verify it.
///
/// Its certificate is signed by [`ca_cert`](Self::ca_cert) and valid for the host name
/// `localhost` only. The server accepts both TLS and plain connections (as a server with
/// `ssl = on` and the default `host` lines of `pg_hba.conf` does), on `127.0.0.1` only; a
/// client connecting to `localhost` reaches it there. Dropping it stops the server and
/// deletes its files, certificates included.
#[derive(Debug)]
pub struct TlsTestServer {
    server: TestServer,
    ca_cert: PathBuf,
    unrelated_ca_cert: PathBuf,
}

/// Starts a private throwaway server (as [`private_server`]) with TLS on: makes a CA and a
/// server certificate for `localhost` signed by it with the `openssl` command, plus a
/// second, unrelated CA (for tests of a wrong `sslrootcert`), and turns on `ssl` with them.
///
/// Blocks for a few seconds. [`HarnessError::NoOpenssl`] if `openssl` is not installed,
/// [`HarnessError::NoPostgres`] if the server binaries are not.
pub fn private_tls_server() -> Result<TlsTestServer, HarnessError> {
    // Before initdb, so that a missing openssl is reported at once.
    run_openssl(Path::new("/"), "version", &[])?;
    let server = TestServer::start_embedded()?;
    let embedded = server.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;

    let dir = embedded.root.join("tls");
    // Readable by the server's user (which may not be this process's).
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .map_err(HarnessError::io(format!(
            "could not create {}",
            dir.display()
        )))?;
    let config = dir.join("openssl.cnf");
    fs::write(&config, OPENSSL_CONFIG).map_err(HarnessError::io(format!(
        "could not write {}",
        config.display()
    )))?;
    let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for (name, subject) in [
        ("ca", "/CN=plane-db test CA"),
        ("unrelated-ca", "/CN=plane-db unrelated test CA"),
    ] {
        run_openssl(
            &dir,
            &format!(
                "req -x509 -new {new_key} -keyout {name}.key -out {name}.crt -days {CERT_DAYS} \
                 -config openssl.cnf -extensions ca_ext"
            ),
            &["-subj", subject],
        )?;
    }
    run_openssl(
        &dir,
        &format!("req -new {new_key} -keyout server.key -out server.csr -config openssl.cnf"),
        &["-subj", "/CN=localhost"],
    )?;
    run_openssl(
        &dir,
        &format!(
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
             -out server.crt -days {CERT_DAYS} -extfile openssl.cnf -extensions server_ext"
        ),
        &[],
    )?;

    // PostgreSQL refuses a key file that others can read, or that belongs to another user
    // (root apart).
    let (server_cert, server_key) = (dir.join("server.crt"), dir.join("server.key"));
    fs::set_permissions(&server_key, fs::Permissions::from_mode(0o600)).map_err(
        HarnessError::io(format!("could not make {} private", server_key.display())),
    )?;
    if let Some((uid, gid)) = embedded.run_as {
        for path in [&server_cert, &server_key] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(HarnessError::io(
                format!(
                    "could not change the owner of {} to uid {uid}",
                    path.display()
                ),
            ))?;
        }
    }

    // The settings go into postgresql.conf (later lines win), read at the restart.
    server.stop()?;
    let conf_path = embedded.data_dir.join("postgresql.conf");
    let mut conf = OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .map_err(HarnessError::io(format!(
            "could not open {}",
            conf_path.display()
        )))?;
    let setting = |path: &Path| path.display().to_string().replace('\'', "''");
    writeln!(
        conf,
        "\n# TLS for the plane-db tests\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
        setting(&server_cert),
        setting(&server_key)
    )
    .map_err(HarnessError::io(format!(
        "could not write {}",
        conf_path.display()
    )))?;
    drop(conf);
    server.start()?;

    // The server must now answer an SSLRequest with 'S'.
    if let Err(reason) = offers_tls(embedded.port) {
        return Err(HarnessError::TlsNotOffered {
            reason,
            log: embedded.log_path.clone(),
            log_tail: log_tail(&embedded.log_path),
        });
    }
    Ok(TlsTestServer {
        ca_cert: dir.join("ca.crt"),
        unrelated_ca_cert: dir.join("unrelated-ca.crt"),
        server,
    })
}

impl TlsTestServer {
    /// The server, e.g. to [`stop`](TestServer::stop) and [`start`](TestServer::start) it.
    /// Its [`url_for`](TestServer::url_for) URLs name `127.0.0.1` without an `sslmode`
    /// (sqlx's default, `prefer`, encrypts without verifying).
    pub fn server(&self) -> &TestServer {
        &self.server
    }

    /// The port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.server.port().unwrap_or_default()
    }

    /// The PEM file of the CA that signed the server's certificate: the `sslrootcert` that
    /// verifies it.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The PEM file of a CA that has nothing to do with the server: an `sslrootcert` that
    /// must not verify it.
    pub fn unrelated_ca_cert(&self) -> &Path {
        &self.unrelated_ca_cert
    }

    /// `postgres://postgres@{host}:{port}/{database}?{params}`, the parameters
    /// percent-encoded, e.g. `url("localhost", "db", &[("sslmode", "verify-full"),
    /// ("sslrootcert", path)])`.
    pub fn url(&self, host: &str, database: &str, params: &[(&str, &str)]) -> String {
        let mut url = format!(
            "postgres://{SUPERUSER}@{host}:{}/{}",
            self.port(),
            percent_encode(database)
        );
        for (i, (key, value)) in params.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&percent_encode(key));
            url.push('=');
            url.push_str(&percent_encode(value));
        }
        url
    }

    /// The URL of `database` as a careful client names it: host `localhost`,
    /// `sslmode=verify-full`, `sslrootcert` the [`ca_cert`](Self::ca_cert).
    pub fn verify_full_url(&self, database: &str) -> String {
        let ca = self.ca_cert.to_string_lossy();
        self.url(
            "localhost",
            database,
            &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
        )
    }

    /// Like [`create_database`], on this server. Its `url` is the
    /// [`verify_full_url`](Self::verify_full_url).
    pub async fn create_database(&self) -> Result<TestDatabase, HarnessError> {
        let database = self.server.create_database().await?;
        Ok(TestDatabase {
            url: self.verify_full_url(&database.name),
            name: database.name,
        })
    }
}

/// Runs `openssl` in `dir` with the words of `args`, then `extra` (arguments that hold
/// spaces); [`HarnessError::NoOpenssl`] if it is not installed.
fn run_openssl(dir: &Path, args: &str, extra: &[&str]) -> Result<(), HarnessError> {
    let mut command = Command::new(OPENSSL);
    command
        .args(args.split_whitespace())
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null());
    let output = command.output().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => HarnessError::NoOpenssl,
        _ => HarnessError::Io {
            context: format!("could not run {OPENSSL}"),
            source,
        },
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(HarnessError::command_failed(&command, &output))
}

/// Whether the server on `127.0.0.1:port` answers an `SSLRequest` with `S` (willing to
/// start TLS). Std only, like [`probe`]; the connection is closed without a handshake.
fn offers_tls(port: u16) -> Result<(), String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|error| format!("connecting to {address}: {error}"))?;
    let io_error = |error: io::Error| format!("talking to {address}: {error}");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_error)?;
    // SSLRequest: length 8, then the code 80877103.
    let mut request = 8_u32.to_be_bytes().to_vec();
    request.extend_from_slice(&80_877_103_u32.to_be_bytes());
    stream.write_all(&request).map_err(io_error)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).map_err(io_error)?;
    match answer[0] {
        b'S' => Ok(()),
        b'N' => Err("it answered N to an SSLRequest".to_owned()),
        other => Err(format!("it answered {other:#04x} to an SSLRequest")),
    }
}

/// Locks a mutex, ignoring poisoning (the data stays consistent across panics here).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Splits a `postgres://` / `postgresql://` URL into everything before its path
/// (`scheme://authority`) and everything after it (`?query#fragment`, possibly empty).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return None;
    }
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(&['/', '?', '#'][..])
        .map_or(url.len(), |i| authority_start + i);
    let rest = &url[authority_end..];
    let tail_start = rest.find(&['?', '#'][..]).unwrap_or(rest.len());
    Some((&url[..authority_end], &rest[tail_start..]))
}

/// `url` with its database (path) replaced by `database`.
fn with_database(url: &str, database: &str) -> Option<String> {
    let (head, tail) = split_url(url)?;
    Some(format!("{head}/{}{tail}", percent_encode(database)))
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `url` with the password (if any) replaced by `***`, for error messages.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(&['/', '?', '#'][..])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..authority_start],
        &authority[..colon],
        &url[authority_start + at..]
    )
}

/// Quotes an SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `len` random letters `a`–`z`.
fn random_lowercase(len: usize) -> Result<String, HarnessError> {
    let mut out = String::with_capacity(len);
    let mut bytes = [0u8; 32];
    while out.len() < len {
        getrandom::fill(&mut bytes).map_err(|error| HarnessError::Random(error.to_string()))?;
        // 234 = 9 * 26: rejecting larger bytes keeps the letters uniform.
        for byte in bytes.iter().filter(|&&byte| byte < 234) {
            if out.len() < len {
                out.push(char::from(b'a' + byte % 26));
            }
        }
    }
    Ok(out)
}

/// The directory holding both `initdb` and `postgres`: the first such directory on `PATH`,
/// else the highest version under `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_binaries =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(path) = std::env::var_os("PATH") {
        let from_path = std::env::split_paths(&path)
            .filter(|dir| dir.is_absolute())
            .find(|dir| has_binaries(dir));
        if from_path.is_some() {
            return from_path;
        }
    }
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// `"15"` → `[15]`, `"9.6"` → `[9, 6]`; `None` for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The effective uid of this process, without libc: `/proc/self` belongs to it.
fn effective_uid() -> Option<u32> {
    if let Ok(meta) = fs::metadata("/proc/self") {
        return Some(meta.uid());
    }
    let output = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// `(uid, gid)` of the `postgres` user, else of `nobody`.
fn unprivileged_user() -> Result<(u32, u32), HarnessError> {
    let passwd = fs::read_to_string("/etc/passwd")
        .map_err(HarnessError::io("could not read /etc/passwd"))?;
    passwd_ids(&passwd, "postgres")
        .or_else(|| passwd_ids(&passwd, "nobody"))
        .ok_or(HarnessError::NoUnprivilegedUser)
}

/// Looks up `(uid, gid)` of `user` in the contents of an `/etc/passwd` file.
fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.trim().parse().ok()?;
        let gid = fields.next()?.trim().parse().ok()?;
        Some((uid, gid))
    })
}

/// Creates `<temp>/plane-db-pg-<pid>-<random>`.
fn create_temp_root() -> Result<PathBuf, HarnessError> {
    let temp = std::env::temp_dir();
    loop {
        let path = temp.join(format!(
            "plane-db-pg-{}-{}",
            std::process::id(),
            random_lowercase(8)?
        ));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(HarnessError::Io {
                    context: format!("could not create {}", path.display()),
                    source: error,
                })
            }
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(HarnessError::io("could not find a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(HarnessError::io("could not find a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

/// Sends a signal (`"INT"`, `"KILL"`, …) to a process, without libc.
fn send_signal(pid: u32, signal: &str) -> Result<(), HarnessError> {
    let status = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .map_err(HarnessError::io(format!(
            "could not run kill -s {signal} {pid}"
        )))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::CommandFailed {
            command: format!("kill -s {signal} {pid}"),
            status: status.to_string(),
            output: String::new(),
        })
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(could not read the log: {error})"),
    }
}

/// Checks that the server on `127.0.0.1:port` accepts connections, like `pg_isready`: opens
/// a connection as the superuser to the maintenance database and waits for `ReadyForQuery`.
/// Uses only std, so it works whether or not the caller is inside an async runtime.
fn probe(port: u16) -> Result<(), String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|error| format!("connecting to {address}: {error}"))?;
    let io_error = |error: io::Error| format!("talking to {address}: {error}");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_error)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io_error)?;

    // StartupMessage, protocol 3.0.
    let mut body = 196_608_u32.to_be_bytes().to_vec();
    for part in ["user", SUPERUSER, "database", MAINTENANCE_DB] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    stream.write_all(&message).map_err(io_error)?;

    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).map_err(io_error)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=1 << 20).contains(&length) {
            return Err(format!("malformed reply from {address}"));
        }
        let mut payload = vec![0u8; length - 4];
        stream.read_exact(&mut payload).map_err(io_error)?;
        match header[0] {
            // ReadyForQuery: the server is up; send Terminate.
            b'Z' => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                return Ok(());
            }
            // ErrorResponse, e.g. "the database system is starting up".
            b'E' => return Err(error_response_text(&payload)),
            // An authentication request other than AuthenticationOk: the server is up.
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0][..]) => return Ok(()),
            // AuthenticationOk, ParameterStatus, BackendKeyData, notices: keep reading.
            _ => {}
        }
    }
}

/// `"<SQLSTATE>: <message>"` from the body of an ErrorResponse.
fn error_response_text(payload: &[u8]) -> String {
    let mut code = "";
    let mut message = "";
    for field in payload.split(|&byte| byte == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("");
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    format!("server said {code}: {message}")
}

/// Shell script run detached by [`spawn_reaper`] and [`spawn_pgbouncer_reaper`]: waits until
/// the test process (`$1`) is gone, then stops the process `$5` (a pid, or a file whose first
/// line is one) if it still runs with `$3` on its command line (signal `$4`, then SIGKILL
/// after 10 s), and removes `$2`.
const REAPER_SCRIPT: &str = r#"# plane-db test server reaper
owner=$1
dir=$2
marker=$3
signal=$4
target=$5
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        state=$(sed -e 's/^.*) //' -e 's/ .*$//' "/proc/$1/stat" 2>/dev/null)
        [ "$state" != Z ] || return 1
    fi
    return 0
}
ours() {
    [ -r "/proc/$1/cmdline" ] || return 0
    tr '\000' '\n' < "/proc/$1/cmdline" | grep -qxF -- "$marker"
}
while alive "$owner"; do sleep 1; done
case "$target" in
    ''|*[!0-9]*) pid=$(head -n 1 "$target" 2>/dev/null) ;;
    *) pid=$target ;;
esac
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && alive "$pid" && ours "$pid"; then
    kill -"$signal" "$pid" 2>/dev/null
    i=0
    while alive "$pid" && [ "$i" -lt 100 ]; do
        sleep 0.1 2>/dev/null || sleep 1
        i=$((i + 1))
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; sleep 1; fi
fi
rm -rf "$dir"
"#;

/// Starts the detached shell process ([`REAPER_SCRIPT`]) that, once this process has exited,
/// stops `target` (a pid or a pid file) if it runs with `marker` on its command line, and
/// removes `root`.
fn spawn_reaper_for(
    what: &str,
    root: &Path,
    marker: &Path,
    signal: &str,
    target: &std::ffi::OsStr,
) -> Result<Child, HarnessError> {
    Command::new("sh")
        .arg("-c")
        .arg(REAPER_SCRIPT)
        .arg("plane-db-reaper")
        .arg(std::process::id().to_string())
        .arg(root)
        .arg(marker)
        .arg(signal)
        .arg(target)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(HarnessError::io(format!(
            "could not start the cleanup process for {what} (sh)"
        )))
}

/// Starts the detached shell process that cleans up `root` after this process exits: the
/// postmaster in `root/data/postmaster.pid` (SIGINT, a fast shutdown), then the directory.
fn spawn_reaper(root: &Path) -> Result<Child, HarnessError> {
    let data = root.join("data");
    spawn_reaper_for(
        "the throwaway PostgreSQL server",
        root,
        &data,
        "INT",
        data.join("postmaster.pid").as_os_str(),
    )
}

// PgBouncer in front of a throwaway server, for the tests of running behind a pooler.

const NO_PGBOUNCER_MESSAGE: &str = "no pgbouncer binary found (looked on PATH and in \
/usr/sbin, /usr/local/sbin, /usr/local/bin): install it (e.g. `apt-get install pgbouncer`) \
to run the tests of running behind PgBouncer";

/// How long to wait for the test PgBouncer to accept connections.
const PGBOUNCER_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// PgBouncer's `pool_mode`: when a client's server connection goes back to PgBouncer's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgBouncerMode {
    /// When the client disconnects: a client keeps one server session, so session state
    /// (`SET`, `LISTEN`, prepared statements) works as on a direct connection.
    Session,
    /// At the end of each transaction (and after each statement outside one): session state
    /// left on a server connection is seen by whichever client gets it next.
    Transaction,
}

impl PgBouncerMode {
    fn as_str(self) -> &'static str {
        match self {
            PgBouncerMode::Session => "session",
            PgBouncerMode::Transaction => "transaction",
        }
    }
}

/// How [`TestServer::pgbouncer`] configures its PgBouncer.
#[derive(Debug, Clone)]
pub struct PgBouncerOptions {
    /// The pool mode.
    pub mode: PgBouncerMode,
    /// Server connections per database and user (`default_pool_size`). Defaults to 20
    /// (PgBouncer's own default).
    pub pool_size: u32,
    /// Further `[pgbouncer]` settings, written to its configuration file as given, e.g.
    /// `("ignore_startup_parameters", "extra_float_digits")`. None by default: the tests
    /// show what works with PgBouncer's defaults.
    pub settings: Vec<(String, String)>,
    /// Databases with settings of their own, as `(name, settings)`: e.g.
    /// `("plane", "pool_mode=session")` writes `plane = host=… port=… pool_mode=session`
    /// before the entry that passes every other name through. None by default.
    pub databases: Vec<(String, String)>,
}

impl PgBouncerOptions {
    /// PgBouncer's defaults in the given mode.
    pub fn new(mode: PgBouncerMode) -> Self {
        Self {
            mode,
            pool_size: 20,
            settings: Vec::new(),
            databases: Vec::new(),
        }
    }
}

/// A PgBouncer started by [`TestServer::pgbouncer`], listening on `127.0.0.1` on a port of
/// its own, in front of that server (every database name is passed through). It lets the
/// server's superuser in without a password, like the server, also to its admin console
/// ([`admin_url`](Self::admin_url)). Dropping it stops it and
/// deletes its files (a cleanup process does so if the test process dies first).
#[derive(Debug)]
pub struct TestPgBouncer {
    root: PathBuf,
    log_path: PathBuf,
    port: u16,
    mode: PgBouncerMode,
    child: Mutex<Option<Child>>,
    reaper: Mutex<Option<Child>>,
}

impl TestServer {
    /// Starts a PgBouncer in front of this (embedded, running) server: configuration and
    /// auth file in a temporary directory of its own, a free port on `127.0.0.1`, run as the
    /// server's unprivileged user when this process runs as root (PgBouncer refuses root).
    /// Blocks until it accepts connections (it then has opened one server connection).
    ///
    /// [`HarnessError::NoPgBouncer`] if no `pgbouncer` binary is installed,
    /// [`HarnessError::NotEmbedded`] for the `DATABASE_URL` server.
    pub fn pgbouncer(&self, options: &PgBouncerOptions) -> Result<TestPgBouncer, HarnessError> {
        let embedded = self.embedded.as_ref().ok_or(HarnessError::NotEmbedded)?;
        let binary = find_pgbouncer().ok_or(HarnessError::NoPgBouncer)?;
        let root = create_temp_root()?;
        let mut bouncer = TestPgBouncer {
            log_path: root.join("pgbouncer.log"),
            root,
            port: 0,
            mode: options.mode,
            child: Mutex::new(None),
            reaper: Mutex::new(None),
        };
        // From here on, dropping `bouncer` removes the directory (and stops the process).
        let auth_file = bouncer.root.join("users.txt");
        fs::write(&auth_file, format!("\"{SUPERUSER}\" \"\"\n")).map_err(HarnessError::io(
            format!("could not write {}", auth_file.display()),
        ))?;
        File::create(&bouncer.log_path).map_err(HarnessError::io(format!(
            "could not create {}",
            bouncer.log_path.display()
        )))?;
        if let Some((uid, gid)) = embedded.run_as {
            for path in [&bouncer.root, &auth_file, &bouncer.log_path] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(HarnessError::io(
                    format!(
                        "could not change the owner of {} to uid {uid}",
                        path.display()
                    ),
                ))?;
            }
        }

        let mut attempt = 1;
        let child = loop {
            bouncer.port = free_port()?;
            let config = bouncer.config_path();
            let text = pgbouncer_config(options, bouncer.port, embedded.port, &auth_file);
            fs::write(&config, text).map_err(HarnessError::io(format!(
                "could not write {}",
                config.display()
            )))?;
            match bouncer.launch(&binary, embedded.run_as) {
                Ok(child) => break child,
                // Another process took the port between choosing and binding it.
                Err(HarnessError::PgBouncer { ref log_tail, .. })
                    if attempt < PORT_ATTEMPTS && log_tail.contains("in use") =>
                {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        let pid = child.id();
        *lock(&bouncer.child) = Some(child);
        *lock(&bouncer.reaper) = Some(spawn_pgbouncer_reaper(&bouncer.root, pid)?);
        tracing::info!(
            port = bouncer.port,
            mode = options.mode.as_str(),
            "started PgBouncer for tests"
        );
        Ok(bouncer)
    }
}

impl TestPgBouncer {
    /// The port it listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pool mode.
    pub fn mode(&self) -> PgBouncerMode {
        self.mode
    }

    /// A URL for `database` on the server behind it, through it.
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    /// A URL for its admin console (`SHOW CLIENTS`, `SHOW POOLS`, …; simple queries only,
    /// and connect without the `extra_float_digits` startup parameter).
    pub fn admin_url(&self) -> String {
        self.url_for("pgbouncer")
    }

    /// The last lines of its log, for messages of failed tests.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    fn config_path(&self) -> PathBuf {
        self.root.join("pgbouncer.ini")
    }

    /// Starts `pgbouncer` in the foreground (logging to its log file) and waits until it
    /// accepts connections.
    fn launch(&self, binary: &Path, run_as: Option<(u32, u32)>) -> Result<Child, HarnessError> {
        let log_context = || format!("could not open {}", self.log_path.display());
        let log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .map_err(HarnessError::io(log_context()))?;
        let log_err = log.try_clone().map_err(HarnessError::io(log_context()))?;
        let mut command = Command::new(binary);
        command
            .arg(self.config_path())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        if let Some((uid, gid)) = run_as {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(HarnessError::io(format!(
            "could not run {}{}",
            binary.display(),
            run_as.map_or(String::new(), |(uid, _)| format!(" as uid {uid}"))
        )))?;
        let failed = |what: String| HarnessError::PgBouncer {
            what,
            log: self.log_path.clone(),
            log_tail: log_tail(&self.log_path),
        };
        let deadline = Instant::now() + PGBOUNCER_READY_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(failed(format!("exited during startup ({status})")))
                }
                Ok(None) => {}
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!("could not be checked: {error}")));
                }
            }
            let last_error = match probe(self.port) {
                Ok(()) => return Ok(child),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "did not accept connections within {PGBOUNCER_READY_TIMEOUT:?} (last \
                     attempt: {last_error})"
                )));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for TestPgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            // SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients).
            if matches!(child.try_wait(), Ok(None)) && send_signal(child.id(), "TERM").is_ok() {
                let deadline = Instant::now() + STOP_TIMEOUT;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut reaper) = lock(&self.reaper).take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The text of `pgbouncer.ini`.
fn pgbouncer_config(
    options: &PgBouncerOptions,
    port: u16,
    server_port: u16,
    auth_file: &Path,
) -> String {
    let mut text = String::from("[databases]\n");
    for (name, settings) in &options.databases {
        text.push_str(&format!(
            "{name} = host=127.0.0.1 port={server_port} {settings}\n"
        ));
    }
    text.push_str(&format!(
        "* = host=127.0.0.1 port={server_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {}\n\
         pool_mode = {}\n\
         default_pool_size = {}\n\
         max_client_conn = 500\n\
         server_login_retry = 1\n\
         admin_users = {SUPERUSER}\n",
        auth_file.display(),
        options.mode.as_str(),
        options.pool_size,
    ));
    for (name, value) in &options.settings {
        text.push_str(&format!("{name} = {value}\n"));
    }
    text
}

/// The `pgbouncer` binary: on `PATH`, else where distributions install it.
fn find_pgbouncer() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| is_executable(candidate))
    });
    on_path.or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"]
            .iter()
            .map(|dir| Path::new(dir).join("pgbouncer"))
            .find(|candidate| is_executable(candidate))
    })
}

/// Starts the detached shell process that stops PgBouncer `pid` (SIGTERM) and removes `root`
/// after this process exits.
fn spawn_pgbouncer_reaper(root: &Path, pid: u32) -> Result<Child, HarnessError> {
    spawn_reaper_for(
        "the test PgBouncer",
        root,
        &root.join("pgbouncer.ini"),
        "TERM",
        std::ffi::OsStr::new(&pid.to_string()),
    )
}

#[cfg(test)]
mod pgbouncer_tests {
    use super::*;

    #[test]
    fn pgbouncer_config_text() {
        let options = PgBouncerOptions {
            pool_size: 3,
            settings: vec![("ignore_startup_parameters".into(), "options".into())],
            databases: vec![("plane".into(), "pool_mode=session".into())],
            ..PgBouncerOptions::new(PgBouncerMode::Transaction)
        };
        let text = pgbouncer_config(&options, 7000, 5433, Path::new("/tmp/x/users.txt"));
        let lines: Vec<&str> = text.lines().collect();
        let plane = lines
            .iter()
            .position(|l| *l == "plane = host=127.0.0.1 port=5433 pool_mode=session");
        let rest = lines
            .iter()
            .position(|l| *l == "* = host=127.0.0.1 port=5433");
        assert!(plane.is_some() && plane < rest, "{text}");
        for line in [
            "listen_port = 7000",
            "pool_mode = transaction",
            "default_pool_size = 3",
            "auth_file = /tmp/x/users.txt",
            "ignore_startup_parameters = options",
        ] {
            assert!(lines.contains(&line), "{line} in {text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_database_is_replaced() {
        let cases = [
            (
                "postgres://postgres:secret@127.0.0.1:5432/postgres",
                "postgres://postgres:secret@127.0.0.1:5432/plane_test_x",
            ),
            (
                "postgres://u@db.example:6543/main?sslmode=disable&application_name=t",
                "postgres://u@db.example:6543/plane_test_x?sslmode=disable&application_name=t",
            ),
            ("postgres://localhost", "postgres://localhost/plane_test_x"),
            ("postgres://localhost/", "postgres://localhost/plane_test_x"),
            (
                "postgresql://localhost:5432?sslmode=require",
                "postgresql://localhost:5432/plane_test_x?sslmode=require",
            ),
            (
                "postgres:///postgres?host=/var/run/postgresql",
                "postgres:///plane_test_x?host=/var/run/postgresql",
            ),
            ("POSTGRES://h/a/b#frag", "POSTGRES://h/plane_test_x#frag"),
        ];
        for (url, expected) in cases {
            assert_eq!(
                with_database(url, "plane_test_x").as_deref(),
                Some(expected),
                "{url}"
            );
        }
    }

    #[test]
    fn url_database_name_is_encoded() {
        assert_eq!(
            with_database("postgres://h/db", "a b/c?").as_deref(),
            Some("postgres://h/a%20b%2Fc%3F")
        );
    }

    #[test]
    fn non_postgres_urls_are_rejected() {
        for url in ["mysql://h/db", "localhost:5432/db", "", "postgres:/h/db"] {
            assert_eq!(with_database(url, "x"), None, "{url}");
        }
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

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://user:secret@host:5432/db?x=1"),
            "postgres://user:***@host:5432/db?x=1"
        );
        assert_eq!(
            redact_password("postgres://user@host/db"),
            "postgres://user@host/db"
        );
        assert_eq!(redact_password("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "\
root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
# a comment
postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash
postgresql:x:7:8::/:/bin/sh
broken:x:notanumber:1::/:/bin/sh
";
        assert_eq!(passwd_ids(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_ids(passwd, "nobody"), Some((65534, 65534)));
        assert_eq!(passwd_ids(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_ids(passwd, "postgr"), None);
        assert_eq!(passwd_ids(passwd, "broken"), None);
        assert_eq!(passwd_ids("", "postgres"), None);
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("latest"), None);
        assert!(parse_version("10") > parse_version("9.6"));
    }

    #[test]
    fn random_names_are_lowercase() {
        let a = random_lowercase(16).unwrap();
        let b = random_lowercase(16).unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|byte| byte.is_ascii_lowercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("plane_test_ab"), "\"plane_test_ab\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    async fn current_database(url: &str) -> String {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        let name: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&pool)
            .await
            .expect("query");
        pool.close().await;
        name
    }

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
        let embedded = own.embedded.as_ref().unwrap();
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
}
