//! The parent side of a worker: the OS process (this test binary again, running only the
//! `worker` test), its commands and its reports.

use crate::protocol::{Command, Report, WorkerSpec, MARKER, WORKER_ENV, WORKER_TEST};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// How long the parent waits for any one report before failing.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// A running worker process. Dropping it kills the process (SIGKILL) if it still runs, so a
/// failing test leaves none behind.
pub struct Worker {
    /// Its number.
    pub index: usize,
    /// Its process id.
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    reports: UnboundedReceiver<Report>,
}

impl Worker {
    /// Starts the worker: `current_exe() --exact worker --nocapture`, with its spec in the
    /// environment. Its reports are read by a thread of their own; the harness's other
    /// lines are passed on to stderr.
    pub fn spawn(spec: &WorkerSpec) -> Worker {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = std::process::Command::new(exe)
            .args(["--exact", WORKER_TEST, "--nocapture", "--test-threads=1"])
            .env(
                WORKER_ENV,
                serde_json::to_string(spec).expect("a spec serialises"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker process");
        let stdout = child.stdout.take().expect("the worker's stdout");
        let stdin = child.stdin.take();
        let (tx, reports) = unbounded_channel();
        let index = spec.index;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line.find(MARKER) {
                    Some(at) => match serde_json::from_str::<Report>(&line[at + MARKER.len()..]) {
                        Ok(report) => {
                            if tx.send(report).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("[worker {index}] unreadable report ({e}): {line}"),
                    },
                    None if line.trim().is_empty() => {}
                    None => eprintln!("[worker {index}] {line}"),
                }
            }
        });
        Worker {
            index,
            pid: child.id(),
            child,
            stdin,
            reports,
        }
    }

    /// Sends a command.
    pub fn send(&mut self, command: &Command) {
        let line = serde_json::to_string(command).expect("a command serialises");
        let stdin = self.stdin.as_mut().expect("the worker's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("worker {}: cannot send {line}: {e}", self.index));
    }

    /// The next report; fails on [`Report::Failed`], on a worker that ended, and after
    /// [`REPORT_TIMEOUT`] of silence.
    pub async fn next(&mut self) -> Report {
        match tokio::time::timeout(REPORT_TIMEOUT, self.reports.recv()).await {
            Ok(Some(Report::Failed { error })) => panic!("worker {} failed: {error}", self.index),
            Ok(Some(report)) => report,
            Ok(None) => panic!(
                "worker {} ended without a report (exit: {:?})",
                self.index,
                self.child.try_wait()
            ),
            Err(_) => panic!("worker {} sent nothing for {REPORT_TIMEOUT:?}", self.index),
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the worker");
        self.child.wait().expect("reap the killed worker")
    }

    /// The reports it wrote before it ended (after [`kill`](Self::kill)): everything its
    /// stdout still held.
    pub async fn remaining_reports(&mut self) -> Vec<Report> {
        let mut reports = Vec::new();
        while let Ok(Some(report)) = tokio::time::timeout(REPORT_TIMEOUT, self.reports.recv()).await
        {
            reports.push(report);
        }
        reports
    }

    /// Asks the worker to end, and checks that its test passed.
    pub async fn exit(mut self) {
        self.send(&Command::Exit);
        match self.next().await {
            Report::Bye => {}
            other => panic!("worker {}: expected bye, got {other:?}", self.index),
        }
        let started = Instant::now();
        loop {
            match self.child.try_wait().expect("the worker's status") {
                Some(status) => {
                    assert!(
                        status.success(),
                        "worker {} ended with {status}",
                        self.index
                    );
                    return;
                }
                None if started.elapsed() > REPORT_TIMEOUT => {
                    panic!("worker {} did not end after its bye", self.index)
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
