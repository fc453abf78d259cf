//! PgBouncer in front of a throwaway server, for the tests of running behind a pooler.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::host::{self, UserIds};
use super::process::{self, NotReady, STOP_TIMEOUT};
use super::reaper::Reaper;
use super::url::local_url;
use super::{HarnessError, TestServer, SUPERUSER};

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
    /// The running PgBouncer; `None` only while it is being started.
    child: Option<Child>,
    /// Stops it and removes `root` if this process dies first.
    reaper: Option<Reaper>,
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
        let embedded = self.throwaway()?;
        let binary = host::find_pgbouncer().ok_or(HarnessError::NoPgBouncer)?;
        let run_as = embedded.run_as();
        let root = host::create_temp_root()?;
        let mut bouncer = TestPgBouncer {
            log_path: root.join("pgbouncer.log"),
            root,
            port: 0,
            mode: options.mode,
            child: None,
            reaper: None,
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
        host::chown_all(&[&bouncer.root, &auth_file, &bouncer.log_path], run_as)?;

        let config = bouncer.config_path();
        let (port, child) = process::on_free_port(
            |port| {
                let text = pgbouncer_config(options, port, embedded.port, &auth_file);
                fs::write(&config, text).map_err(HarnessError::io(format!(
                    "could not write {}",
                    config.display()
                )))?;
                bouncer.launch(&binary, run_as, port)
            },
            |error| {
                matches!(error, HarnessError::PgBouncer { log_tail, .. }
                    if log_tail.contains("in use"))
            },
        )?;
        let pid = child.id();
        bouncer.port = port;
        bouncer.child = Some(child);
        bouncer.reaper = Some(Reaper::for_pgbouncer(&bouncer.root, &config, pid)?);
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
        local_url("127.0.0.1", self.port, database)
    }

    /// A URL for its admin console (`SHOW CLIENTS`, `SHOW POOLS`, …; simple queries only,
    /// and connect without the `extra_float_digits` startup parameter).
    pub fn admin_url(&self) -> String {
        self.url_for("pgbouncer")
    }

    /// The last lines of its log, for messages of failed tests.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.log_path)
    }

    fn config_path(&self) -> PathBuf {
        self.root.join("pgbouncer.ini")
    }

    /// Starts `binary` on `port` in the foreground (logging to its log file) and waits
    /// until it accepts connections.
    fn launch(
        &self,
        binary: &Path,
        run_as: Option<UserIds>,
        port: u16,
    ) -> Result<Child, HarnessError> {
        let mut command = Command::new(binary);
        command.arg(self.config_path()).current_dir(&self.root);
        if let Some((uid, gid)) = run_as {
            command.uid(uid).gid(gid);
        }
        let could_not_run = HarnessError::io(format!(
            "could not run {}{}",
            binary.display(),
            run_as.map_or(String::new(), |(uid, _)| format!(" as uid {uid}"))
        ));
        let mut child = process::spawn_logged(&mut command, &self.log_path, could_not_run)?;
        let what = match process::wait_until_ready(&mut child, port, PGBOUNCER_READY_TIMEOUT) {
            Ok(()) => return Ok(child),
            Err(NotReady::Exited(status)) => format!("exited during startup ({status})"),
            Err(NotReady::Unchecked(error)) => format!("could not be checked: {error}"),
            Err(NotReady::TimedOut(last_error)) => format!(
                "did not accept connections within {PGBOUNCER_READY_TIMEOUT:?} (last attempt: \
                 {last_error})"
            ),
        };
        Err(HarnessError::PgBouncer {
            what,
            log: self.log_path.clone(),
            log_tail: self.log_tail(),
        })
    }
}

impl Drop for TestPgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients).
            let _ = process::stop(&mut child, "TERM", STOP_TIMEOUT);
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reaper = None;
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

#[cfg(test)]
mod tests {
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
