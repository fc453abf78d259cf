//! [`HarnessError`]: every way the test harness can fail.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

const NO_POSTGRES_MESSAGE: &str = "no PostgreSQL server found: set DATABASE_URL to a server \
where tests may create databases (e.g. `docker compose up -d` then \
DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres), or install the \
PostgreSQL server binaries (initdb, postgres; e.g. `apt install postgresql`)";

const NO_PGBOUNCER_MESSAGE: &str = "no pgbouncer binary found (looked on PATH and in \
/usr/sbin, /usr/local/sbin, /usr/local/bin): install it (e.g. `apt-get install pgbouncer`) \
to run the tests of running behind PgBouncer";

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
    ///
    /// [`TestServer::stop`]: crate::testing::TestServer::stop
    /// [`TestServer::start`]: crate::testing::TestServer::start
    #[error(
        "stop() and start() only work on the throwaway PostgreSQL server, \
         not on the server named by DATABASE_URL"
    )]
    NotEmbedded,
    /// No `pgbouncer` binary was found for [`TestServer::pgbouncer`].
    ///
    /// [`TestServer::pgbouncer`]: crate::testing::TestServer::pgbouncer
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
    /// A program of the Patroni test cluster ([`TestPatroniCluster`]) is not installed.
    ///
    /// [`TestPatroniCluster`]: crate::testing::TestPatroniCluster
    #[error(
        "no `{program}` binary found (looked on PATH and in {looked_in}): install it \
         (e.g. `apt-get install {package}`) to run the tests of a Patroni cluster"
    )]
    NoClusterComponent {
        /// The missing program.
        program: &'static str,
        /// The directories searched besides `PATH`.
        looked_in: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The Patroni test cluster did not start, or did not do what was asked of it in time.
    #[error("the Patroni test cluster{what}{log_tails}")]
    PatroniCluster {
        /// What went wrong, worded to follow "the Patroni test cluster" (it starts with a
        /// space or with `'s`).
        what: String,
        /// The last lines of the logs that say why (each under a heading with its path),
        /// empty when none helps.
        log_tails: String,
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
    ///
    /// [`private_tls_server`]: crate::testing::private_tls_server
    #[error(
        "the `openssl` command was not found on PATH: the TLS test server's CA and \
         certificates are made with it (install it, e.g. `apt install openssl`)"
    )]
    NoOpenssl,
    /// The server configured by [`private_tls_server`] does not offer TLS.
    ///
    /// [`private_tls_server`]: crate::testing::private_tls_server
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
    pub(super) fn command_failed(command: &Command, output: &Output) -> HarnessError {
        HarnessError::CommandFailed {
            command: format!("{command:?}"),
            status: output.status.to_string(),
            output: output_text(output),
        }
    }

    /// Turns an [`io::Error`] into [`HarnessError::Io`] saying what was being done.
    pub(super) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }

    /// The error to hand out again for a setup failure that the process-wide server
    /// remembers (see [`server`](crate::testing::server)).
    pub(super) fn replay(&self) -> HarnessError {
        match self {
            HarnessError::NoPostgres => HarnessError::NoPostgres,
            HarnessError::InvalidDatabaseUrl => HarnessError::InvalidDatabaseUrl,
            HarnessError::NoUnprivilegedUser => HarnessError::NoUnprivilegedUser,
            HarnessError::EarlierFailure(message) => HarnessError::EarlierFailure(message.clone()),
            other => HarnessError::EarlierFailure(other.to_string()),
        }
    }
}

/// What a finished command printed: its standard output, then its standard error.
pub(super) fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
