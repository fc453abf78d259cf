//! Running the programs the harness starts (PostgreSQL's, PgBouncer, `openssl`): a command
//! to completion, or a server on a free port that is waited for until it accepts
//! connections, and stopped with a signal. Standard library only (no libc).

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::error::output_text;
use super::{wire, HarnessError};

/// How many lines of a log to put into errors.
const LOG_TAIL_LINES: usize = 25;
/// How long to wait for a server to shut down before killing it.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting a server on a fresh port when the port was taken.
const PORT_ATTEMPTS: usize = 3;

/// Runs `command` to the end and returns what it printed;
/// [`HarnessError::CommandFailed`] if it failed, `could_not_run` if it could not be run.
pub(super) fn run(
    command: &mut Command,
    could_not_run: impl FnOnce(io::Error) -> HarnessError,
) -> Result<String, HarnessError> {
    let output = command.output().map_err(could_not_run)?;
    if output.status.success() {
        Ok(output_text(&output))
    } else {
        Err(HarnessError::command_failed(command, &output))
    }
}

/// Runs `start` on a port that was free a moment ago, and on another one (up to
/// [`PORT_ATTEMPTS`] in all) while `taken` says its error is another process having taken
/// the port between choosing and binding it. Returns the port and what `start` returned.
pub(super) fn on_free_port<T>(
    mut start: impl FnMut(u16) -> Result<T, HarnessError>,
    taken: impl Fn(&HarnessError) -> bool,
) -> Result<(u16, T), HarnessError> {
    let mut attempt = 1;
    loop {
        let port = free_port()?;
        match start(port) {
            Ok(started) => return Ok((port, started)),
            Err(error) if attempt < PORT_ATTEMPTS && taken(&error) => attempt += 1,
            Err(error) => return Err(error),
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

/// Starts `command` with its standard output and error appended to `log`, in a process
/// group of its own: a Ctrl-C of the tests leaves it to the reaper instead of killing it
/// halfway.
pub(super) fn spawn_logged(
    command: &mut Command,
    log: &Path,
    could_not_run: impl FnOnce(io::Error) -> HarnessError,
) -> Result<Child, HarnessError> {
    let could_not_open = || HarnessError::io(format!("could not open {}", log.display()));
    let stdout = OpenOptions::new()
        .append(true)
        .open(log)
        .map_err(could_not_open())?;
    let stderr = stdout.try_clone().map_err(could_not_open())?;
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(could_not_run)
}

/// Why a server started with [`spawn_logged`] is not ready (see [`wait_until_ready`]).
pub(super) enum NotReady {
    /// It exited.
    Exited(ExitStatus),
    /// Whether it still runs could not be checked.
    Unchecked(io::Error),
    /// It did not accept connections in time; why the last attempt failed.
    TimedOut(String),
}

/// Waits until the server `child` accepts connections on `127.0.0.1:port` (see
/// [`wire::probe`]), for `timeout` at most. If it does not, it is killed (and reaped).
pub(super) fn wait_until_ready(
    child: &mut Child,
    port: u16,
    timeout: Duration,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    let not_ready = loop {
        match child.try_wait() {
            Ok(Some(status)) => break NotReady::Exited(status),
            Ok(None) => {}
            Err(error) => break NotReady::Unchecked(error),
        }
        let last_error = match wire::probe(port) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            break NotReady::TimedOut(last_error);
        }
        thread::sleep(Duration::from_millis(25));
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(not_ready)
}

/// Asks `child` to stop with `signal` (unless it has exited) and waits for it, for
/// `timeout` at most; kills it if it is still running then. Whether it stopped in time.
pub(super) fn stop(
    child: &mut Child,
    signal: &str,
    timeout: Duration,
) -> Result<bool, HarnessError> {
    let pid = child.id();
    let check = || HarnessError::io(format!("could not check process {pid}"));
    if child.try_wait().map_err(check())?.is_some() {
        return Ok(true);
    }
    send_signal(pid, signal)?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().map_err(check())?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal (`"INT"`, `"KILL"`, …) to a process, without libc.
pub(super) fn send_signal(pid: u32, signal: &str) -> Result<(), HarnessError> {
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
pub(super) fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(could not read the log: {error})"),
    }
}

/// Locks a mutex, ignoring poisoning (the data stays consistent across panics here).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
