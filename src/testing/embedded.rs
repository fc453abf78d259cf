//! A throwaway PostgreSQL server run by this process, and the one way to build one: a
//! private directory watched by a [`Reaper`], a data directory filled by a seed (`initdb`
//! for a new server, a base backup for a replica), the postmaster on a free port of
//! `127.0.0.1`. Also how to stop and start it again and run its other programs on it.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::host::{self, UserIds};
use super::process::{self, lock, log_tail, NotReady, STOP_TIMEOUT};
use super::reaper::Reaper;
use super::{HarnessError, SUPERUSER};

/// How long to wait for the throwaway server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The local PostgreSQL server binaries, and the user that runs them.
#[derive(Debug, Clone)]
pub(super) struct Binaries {
    /// Directory holding `initdb` and `postgres`.
    dir: PathBuf,
    /// `(uid, gid)` to run PostgreSQL as, when this process runs as root.
    run_as: Option<UserIds>,
}

impl Binaries {
    /// The binaries found on this machine ([`HarnessError::NoPostgres`] if none), run as
    /// an unprivileged user when this process runs as root.
    pub(super) fn find() -> Result<Binaries, HarnessError> {
        let dir = host::find_bin_dir().ok_or(HarnessError::NoPostgres)?;
        let run_as = host::server_user()?;
        Ok(Binaries { dir, run_as })
    }

    /// A command running `program` in `dir`, as the unprivileged user if needed.
    fn command(&self, program: &str, dir: &Path) -> Command {
        let mut command = Command::new(self.program_path(program));
        // The unprivileged user may not be allowed into the current directory.
        command.current_dir(dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Where `program` is: in the binary directory, or else beside the real `postgres`
    /// binary (the directory on `PATH` may hold links to only a few of them).
    fn program_path(&self, program: &str) -> PathBuf {
        let direct = self.dir.join(program);
        if host::is_executable(&direct) {
            return direct;
        }
        fs::canonicalize(self.dir.join("postgres"))
            .ok()
            .and_then(|postgres| Some(postgres.parent()?.join(program)))
            .filter(|beside| host::is_executable(beside))
            .unwrap_or(direct)
    }

    /// The error for failing to run `command` (made by [`command`](Self::command)) in `dir`.
    fn could_not_run(
        &self,
        command: &Command,
        dir: &Path,
    ) -> impl FnOnce(io::Error) -> HarnessError {
        let program = Path::new(command.get_program()).display();
        HarnessError::io(match self.run_as {
            Some((uid, _)) => format!(
                "could not run {program} as uid {uid} in {} (that user needs access to the \
                 temporary directory and the PostgreSQL binaries)",
                dir.display()
            ),
            None => format!("could not run {program}"),
        })
    }
}

/// A throwaway server started by this process.
#[derive(Debug)]
pub(super) struct Embedded {
    /// The temporary directory holding everything below.
    pub(super) root: PathBuf,
    pub(super) data_dir: PathBuf,
    socket_dir: PathBuf,
    pub(super) log_path: PathBuf,
    pub(super) binaries: Binaries,
    pub(super) port: u16,
    /// Whether the server keeps what it acknowledged through a crash (`fsync`, full page
    /// writes and synchronous commit on, as Postgres's defaults have them). The others are
    /// tuned for speed instead.
    durable: bool,
    /// The running postmaster, if any.
    postmaster: Mutex<Option<Child>>,
    /// Stops the server and removes `root` once this process has exited (the process-wide
    /// server is never dropped); dropping the server does so at once.
    _reaper: Reaper,
}

impl Embedded {
    /// Builds and starts a throwaway server of `binaries`: a new private directory, its
    /// data directory filled by `seed` (which may run the server's programs), the
    /// postmaster on a free port. Blocks until it accepts connections.
    pub(super) fn start(
        binaries: Binaries,
        seed: impl FnOnce(&Embedded) -> Result<(), HarnessError>,
    ) -> Result<Embedded, HarnessError> {
        Self::start_with(binaries, seed, false)
    }

    /// [`start`](Self::start), durable or tuned for speed (see the `durable` field).
    pub(super) fn start_with(
        binaries: Binaries,
        seed: impl FnOnce(&Embedded) -> Result<(), HarnessError>,
        durable: bool,
    ) -> Result<Embedded, HarnessError> {
        let root = host::create_temp_root()?;
        // If this process exits while the server exists, the reaper stops it and removes
        // `root`; if setting up fails below, dropping `embedded` does that right away.
        let reaper = Reaper::for_postgres(&root).inspect_err(|_| {
            let _ = fs::remove_dir_all(&root);
        })?;
        let mut embedded = Embedded {
            data_dir: root.join("data"),
            socket_dir: root.join("socket"),
            log_path: root.join("postgres.log"),
            root,
            binaries,
            port: 0,
            durable,
            postmaster: Mutex::new(None),
            _reaper: reaper,
        };
        embedded.prepare_directories()?;
        seed(&embedded)?;
        let (port, postmaster) = process::on_free_port(
            |port| embedded.launch(port),
            |error| {
                matches!(error, HarnessError::ServerExited { log_tail, .. }
                    if log_tail.contains("could not bind"))
            },
        )?;
        embedded.port = port;
        *lock(&embedded.postmaster) = Some(postmaster);
        Ok(embedded)
    }

    /// The seed of a new server: `initdb` (superuser `postgres`, trust authentication).
    pub(super) fn initdb(&self) -> Result<(), HarnessError> {
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        self.run(command).map(drop)
    }

    /// Who runs the server's programs (`None`: this process's user).
    pub(super) fn run_as(&self) -> Option<UserIds> {
        self.binaries.run_as
    }

    /// A command running one of the PostgreSQL binaries in the server's directory, as the
    /// unprivileged user if needed.
    pub(super) fn command(&self, program: &str) -> Command {
        self.binaries.command(program, &self.root)
    }

    /// Runs `command` (made by [`command`](Self::command)) to the end and returns what it
    /// printed.
    pub(super) fn run(&self, mut command: Command) -> Result<String, HarnessError> {
        let could_not_run = self.binaries.could_not_run(&command, &self.root);
        process::run(&mut command, could_not_run)
    }

    /// Fast shutdown of the postmaster, waiting until it is down. Stopping a stopped server
    /// does nothing.
    pub(super) fn stop(&self) -> Result<(), HarnessError> {
        match lock(&self.postmaster).take() {
            Some(mut postmaster) => shutdown(&mut postmaster),
            None => Ok(()),
        }
    }

    /// Kills the postmaster with SIGKILL, as a crash of the machine's server would, and
    /// waits for it to exit. Its server processes notice and exit by themselves; the next
    /// [`restart`](Self::restart) runs crash recovery. Killing a stopped server does nothing.
    pub(super) fn kill_postmaster(&self) -> Result<(), HarnessError> {
        match lock(&self.postmaster).take() {
            Some(mut postmaster) => process::stop(&mut postmaster, "KILL", STOP_TIMEOUT).map(drop),
            None => Ok(()),
        }
    }

    /// Starts the postmaster again on the same port and data directory, waiting until it
    /// accepts connections. Starting a running server does nothing.
    pub(super) fn restart(&self) -> Result<(), HarnessError> {
        let mut postmaster = lock(&self.postmaster);
        if let Some(child) = postmaster.as_mut() {
            let exited = child.try_wait().map_err(HarnessError::io(
                "could not check the PostgreSQL server process",
            ))?;
            if exited.is_none() {
                return Ok(());
            }
        }
        *postmaster = Some(self.launch(self.port)?);
        Ok(())
    }

    fn prepare_directories(&self) -> Result<(), HarnessError> {
        host::create_dir(&self.data_dir, 0o700)?;
        host::create_dir(&self.socket_dir, 0o700)?;
        File::create(&self.log_path).map_err(HarnessError::io(format!(
            "could not create {}",
            self.log_path.display()
        )))?;
        host::chown_all(
            &[&self.root, &self.data_dir, &self.socket_dir, &self.log_path],
            self.run_as(),
        )
    }

    /// Starts the postmaster on `port` and waits until it accepts connections.
    fn launch(&self, port: u16) -> Result<Child, HarnessError> {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"]);
        if !self.durable {
            command
                .args(["-c", "fsync=off"])
                .args(["-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        command
            .args(["-c", "max_connections=500"])
            // Prepared transactions allowed, so that tests can leave one open.
            .args(["-c", "max_prepared_transactions=10"])
            .args(["-c", "shared_buffers=128MB"]);
        let could_not_run = self.binaries.could_not_run(&command, &self.root);
        let mut child = process::spawn_logged(&mut command, &self.log_path, could_not_run)?;
        match process::wait_until_ready(&mut child, port, READY_TIMEOUT) {
            Ok(()) => Ok(child),
            Err(NotReady::Exited(status)) => Err(HarnessError::ServerExited {
                status: status.to_string(),
                log: self.log_path.clone(),
                log_tail: log_tail(&self.log_path),
            }),
            Err(NotReady::Unchecked(source)) => Err(HarnessError::Io {
                context: "could not check the PostgreSQL server process".to_owned(),
                source,
            }),
            Err(NotReady::TimedOut(last_error)) => Err(HarnessError::NotReady {
                timeout: READY_TIMEOUT,
                last_error,
                log: self.log_path.clone(),
                log_tail: log_tail(&self.log_path),
            }),
        }
    }
}

/// Fast shutdown: SIGINT, then wait (and SIGKILL after [`STOP_TIMEOUT`]).
fn shutdown(postmaster: &mut Child) -> Result<(), HarnessError> {
    if process::stop(postmaster, "INT", STOP_TIMEOUT)? {
        Ok(())
    } else {
        Err(HarnessError::StopTimeout(STOP_TIMEOUT))
    }
}

impl Drop for Embedded {
    // Only runs for servers other than the process-wide one (statics are never dropped);
    // the process-wide server is cleaned up by the reaper.
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}
