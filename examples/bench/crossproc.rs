//! Cross-process delivery: from a commit in this process (A) to a status stream in another
//! process (B), beside a status stream in A following the same backends, for the same
//! changes, in the same run.
//!
//! B is the bench itself, re-executed with the hidden argument [`WORKER_ARG`]: it opens its
//! own `PlaneDatabase` on the section's database (its own pool and listening connection, as
//! a second controller would) and takes its commands on stdin and sends its reports on
//! stdout, one JSON object a line. It is given the database URL on stdin, not on its command
//! line, where other users could read it.
//!
//! Clocks. Each process stamps what it receives with its own monotonic clock (`Instant`).
//! B's stamps are read in A's clock through the offset between the two clocks, bounded by
//! pings over the pipes (Cristian's method): a ping written at `a0` (A's clock), stamped
//! `b` by B as it reads it and read back at `a1` says the offset `b - a` lies in
//! `[b - a1, b - a0]`. The bench intersects these intervals over the pings sent before and
//! after the measured changes and uses the middle, so each cross-process latency is exact to
//! within half the intersection's width, which the table prints (an empty intersection
//! would mean clocks running at different rates, and fails the section). As a cross-check
//! that uses A's clock alone, it also prints the time from the commit to B's report being
//! read in A: one pipe hop longer than the true figure.
//!
//! Correctness: each process also holds a `subscribe::<BackendState>()` subscription whose
//! event ids are compared with the event table (`delivered.rs`), and every change must
//! reach the status stream of its backend in each process exactly once.

use crate::common::*;
use crate::delivered::{highest_event_id, written_since, Received};
use crate::streams::{
    lifecycle_changes, open_stream, via_update_state, warm_up, BoxFut, Change, Pace, Receipt,
};
use futures_util::StreamExt;
use plane_db::types::{BackendName, BackendState, BackendStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The hidden argument that makes the bench run as process B.
pub const WORKER_ARG: &str = "--crossproc-worker";

/// Backend indexes of different sets of streams are kept apart by this stride.
const STRIDE: u32 = 1_000_000;

/// Pings sent before, and again after, the measured changes.
const PINGS: u32 = 200;

/// How long A waits for any one answer of B's, or for a change to be delivered.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A to B, on B's stdin.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Command {
    /// Connect to this database (the first command).
    Start { url: String },
    /// Follow the status streams of backends `{prefix}{1..=n}`, reporting them under the
    /// indexes `set * STRIDE + i`.
    Watch { set: u32, prefix: String, n: u32 },
    /// Answer with B's clock at once.
    Ping { k: u32 },
    /// Say goodbye and end.
    Exit,
}

/// B to A, on B's stdout. Times are nanoseconds of B's monotonic clock since B started.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    /// Connected, and the `BackendState` subscription is live.
    Ready,
    /// The streams of a `Watch` are open.
    Watching {
        set: u32,
    },
    Pong {
        k: u32,
        t: u64,
    },
    /// A status-stream entry, stamped as B's consumer received it.
    Entry {
        index: u32,
        status: i32,
        t: u64,
    },
    /// An event received by the `BackendState` subscription.
    Event {
        id: Option<i64>,
    },
    /// The subscription lagged (events were dropped).
    Lagged {
        missed: u64,
    },
    Failed {
        error: String,
    },
    Bye,
}

/// A status-stream entry B reported: (index, status, B's stamp, when A read the report).
type Entry = (u32, i32, u64, Instant);

/// Records ids into a [`Received`] only above a threshold (nothing until it is set): the
/// events written before the measurement are not compared. Counts the events a lagging
/// subscription dropped.
#[derive(Clone)]
struct IdGate {
    above: Arc<AtomicI64>,
    received: Received,
    lagged: Arc<AtomicU64>,
}

impl IdGate {
    fn new() -> Self {
        Self {
            above: Arc::new(AtomicI64::new(i64::MAX)),
            received: Received::default(),
            lagged: Arc::default(),
        }
    }

    fn lagged(&self, missed: u64) {
        self.lagged.fetch_add(missed, Ordering::SeqCst);
    }

    fn open_above(&self, id: i64) {
        self.above.store(id, Ordering::SeqCst);
    }

    fn record(&self, id: Option<i64>) {
        let above = self.above.load(Ordering::SeqCst);
        match id {
            Some(id) if id > above => self.received.record(Some(id)),
            None if above < i64::MAX => self.received.record(None),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Process B.

/// Runs as process B until A sends `Exit` or closes B's stdin.
pub fn worker() -> R<()> {
    let started = Instant::now();
    let nanos = move || started.elapsed().as_nanos() as u64;
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Report>();
    // One thread writes the reports, flushing once nothing more is waiting, until the last
    // one (`Bye` or `Failed`): the stdin thread may still hold a sender.
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let stdout = std::io::stdout();
        while let Ok(report) = out_rx.recv() {
            let mut out = stdout.lock();
            let mut last = matches!(report, Report::Bye | Report::Failed { .. });
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
            while let (false, Ok(more)) = (last, out_rx.try_recv()) {
                last = matches!(more, Report::Bye | Report::Failed { .. });
                writeln!(out, "{}", serde_json::to_string(&more)?)?;
            }
            out.flush()?;
            if last {
                break;
            }
        }
        Ok(())
    });
    // One thread reads the commands and answers pings itself, stamping them as they are read.
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
    let pong_tx = out_tx.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let t = nanos();
            match serde_json::from_str::<Command>(&line) {
                Ok(Command::Ping { k }) => {
                    if pong_tx.send(Report::Pong { k, t }).is_err() {
                        break;
                    }
                }
                Ok(command) => {
                    if cmd_tx.send(command).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("crossproc worker: unreadable command ({e}): {line}"),
            }
        }
        // End of input: A is gone or done.
        let _ = cmd_tx.send(Command::Exit);
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(worker_loop(&mut cmd_rx, out_tx.clone(), nanos));
    if let Err(e) = &result {
        let _ = out_tx.send(Report::Failed {
            error: e.to_string(),
        });
    }
    // Dropping the runtime drops its tasks and their senders; the writer then ends.
    drop(runtime);
    drop(out_tx);
    writer.join().map_err(|_| "the report writer panicked")??;
    result
}

async fn worker_loop(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    out: std::sync::mpsc::Sender<Report>,
    nanos: impl Fn() -> u64 + Clone + Send + 'static,
) -> R<()> {
    let url = match commands.recv().await {
        Some(Command::Start { url }) => url,
        other => return Err(format!("expected start, got {other:?}").into()),
    };
    let db = plane_db::open(&url).await?;
    let mut subscription = db.subscribe::<BackendState>().await?;
    let events = out.clone();
    tokio::spawn(async move {
        while let Some(next) = subscription.next().await {
            let report = match next {
                Ok(notification) => Report::Event {
                    id: notification.id,
                },
                Err(lagged) => Report::Lagged {
                    missed: lagged.missed,
                },
            };
            if events.send(report).is_err() {
                break;
            }
        }
    });
    out.send(Report::Ready)?;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Watch { set, prefix, n } => {
                for i in 1..=n {
                    let name = BackendName::try_from(format!("{prefix}{i}"))?;
                    let stream = db.backend().status_stream(&name).await?;
                    let out = out.clone();
                    let nanos = nanos.clone();
                    let index = set * STRIDE + i;
                    tokio::spawn(async move {
                        let mut stream = std::pin::pin!(stream);
                        while let Some(entry) = stream.next().await {
                            let t = nanos();
                            let report = Report::Entry {
                                index,
                                status: entry.status.as_int(),
                                t,
                            };
                            if out.send(report).is_err() {
                                break;
                            }
                        }
                    });
                }
                out.send(Report::Watching { set })?;
            }
            Command::Exit => break,
            other => return Err(format!("unexpected command {other:?}").into()),
        }
    }
    out.send(Report::Bye)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Process A's handle on B.

/// Process B, seen from A. Dropping it kills B if it still runs.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    /// Reports other than entries, events and lags, with when A read them.
    control: mpsc::UnboundedReceiver<(Report, Instant)>,
}

impl Worker {
    /// Starts B. A thread reads its reports: events and lags go to `ids`, status-stream
    /// entries to the returned channel, the rest to [`next`](Self::next), each stamped as it
    /// is read.
    fn spawn(ids: IdGate) -> R<(Self, mpsc::UnboundedReceiver<Entry>)> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg(WORKER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no pipes to the worker".into());
        };
        let (control_tx, control) = mpsc::unbounded_channel();
        let (entry_tx, entries) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                match serde_json::from_str::<Report>(&line) {
                    Ok(Report::Event { id }) => ids.record(id),
                    Ok(Report::Lagged { missed }) => ids.lagged(missed),
                    Ok(Report::Entry { index, status, t }) => {
                        if entry_tx.send((index, status, t, at)).is_err() {
                            break;
                        }
                    }
                    Ok(report) => {
                        if control_tx.send((report, at)).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("crossproc: unreadable report ({e}): {line}"),
                }
            }
        });
        Ok((
            Self {
                child,
                stdin,
                control,
            },
            entries,
        ))
    }

    fn send(&mut self, command: &Command) -> R<()> {
        writeln!(self.stdin, "{}", serde_json::to_string(command)?)?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The next control report (a `Failed` one is an error), and when A read it.
    async fn next(&mut self) -> R<(Report, Instant)> {
        match tokio::time::timeout(TIMEOUT, self.control.recv()).await {
            Ok(Some((Report::Failed { error }, _))) => Err(format!("worker: {error}").into()),
            Ok(Some(got)) => Ok(got),
            Ok(None) => Err(format!("the worker ended ({:?})", self.child.try_wait()).into()),
            Err(_) => Err(format!("the worker said nothing for {TIMEOUT:?}").into()),
        }
    }

    /// `count` pings, one at a time: (A's clock when written, B's stamp, A's clock when
    /// read back), A's times as nanoseconds since `anchor`.
    async fn pings(&mut self, count: u32, anchor: Instant) -> R<Vec<Ping>> {
        let mut pings = Vec::with_capacity(count as usize);
        for k in 0..count {
            let line = format!("{}\n", serde_json::to_string(&Command::Ping { k })?);
            let sent = Instant::now();
            self.stdin.write_all(line.as_bytes())?;
            self.stdin.flush()?;
            match self.next().await? {
                (Report::Pong { k: got, t }, read) if got == k => pings.push(Ping {
                    sent: since(anchor, sent),
                    b: i128::from(t),
                    read: since(anchor, read),
                }),
                (other, _) => return Err(format!("expected pong {k}, got {other:?}").into()),
            }
        }
        Ok(pings)
    }

    /// Asks B to end and waits for it.
    async fn exit(mut self) -> R<()> {
        self.send(&Command::Exit)?;
        match self.next().await? {
            (Report::Bye, _) => {}
            (other, _) => return Err(format!("expected bye, got {other:?}").into()),
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    return Err(format!("the worker ended with {status}").into());
                }
                return Ok(());
            }
            if started.elapsed() > TIMEOUT {
                return Err("the worker did not end after its bye".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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

fn since(anchor: Instant, at: Instant) -> i128 {
    at.saturating_duration_since(anchor).as_nanos() as i128
}

// ---------------------------------------------------------------------------------------
// The clock offset.

/// One ping: A's clock when it was written and when the answer was read (nanoseconds since
/// A's anchor), and B's stamp in between.
#[derive(Clone, Copy, Debug)]
struct Ping {
    sent: i128,
    b: i128,
    read: i128,
}

/// The offset of B's clock from A's (`b - a` for one instant), known to lie in
/// `[low, high]`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Offset {
    low: i128,
    high: i128,
}

impl Offset {
    /// The intersection of what each ping says; an error if it is empty.
    fn from_pings(pings: &[Ping]) -> R<Self> {
        let low = pings.iter().map(|p| p.b - p.read).max().ok_or("no pings")?;
        let high = pings.iter().map(|p| p.b - p.sent).min().ok_or("no pings")?;
        if low > high {
            return Err(format!(
                "the pings disagree about B's clock (offset above {low} ns and below {high} ns)"
            )
            .into());
        }
        Ok(Self { low, high })
    }

    /// How far the middle may be from the true offset.
    fn error(&self) -> Duration {
        Duration::from_nanos(((self.high - self.low) / 2) as u64)
    }

    /// B's stamp `t` in A's clock (nanoseconds since A's anchor).
    fn a_time(self, t: u64) -> i128 {
        i128::from(t) - (self.low + self.high) / 2
    }
}

// ---------------------------------------------------------------------------------------
// The measurement.

/// (backend index, status).
type Key = (u32, i32);

/// What one run of changes left: when each change's write returned, and when each process's
/// status stream received it (every receipt, to see repeats).
#[derive(Default)]
struct Phase {
    committed: HashMap<Key, Instant>,
    in_a: HashMap<Key, Vec<Instant>>,
    in_b: HashMap<Key, Vec<(u64, Instant)>>,
}

impl Phase {
    fn take_a(&mut self, (index, status, at): Receipt) {
        self.in_a.entry((index, status)).or_default().push(at);
    }

    fn take_b(&mut self, (index, status, t, read): Entry) {
        self.in_b
            .entry((index, status))
            .or_default()
            .push((t, read));
    }

    fn has_both(&self, key: &Key) -> bool {
        self.in_a.contains_key(key) && self.in_b.contains_key(key)
    }

    fn complete(&self) -> bool {
        self.committed.keys().all(|key| self.has_both(key))
    }

    /// Waits until every committed change has reached both processes (or [`TIMEOUT`]), then
    /// a little longer, so that a change delivered twice is seen twice.
    async fn collect(
        &mut self,
        a: &mut mpsc::UnboundedReceiver<Receipt>,
        b: &mut mpsc::UnboundedReceiver<Entry>,
    ) {
        let until = Instant::now() + TIMEOUT;
        while !self.complete() && Instant::now() < until {
            tokio::select! {
                Some(r) = a.recv() => self.take_a(r),
                Some(e) = b.recv() => self.take_b(e),
                () = tokio::time::sleep_until(until.into()) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(r) = a.try_recv() {
            self.take_a(r);
        }
        while let Ok(e) = b.try_recv() {
            self.take_b(e);
        }
    }

    /// Changes not delivered exactly once in A's and in B's status streams, and entries for
    /// changes never made (the `scheduled` entries of the streams' history excepted).
    fn exactness(&self) -> (usize, usize, usize) {
        let scheduled = BackendStatus::Scheduled.as_int();
        let mut wrong_a = 0;
        let mut wrong_b = 0;
        for key in self.committed.keys() {
            wrong_a += usize::from(self.in_a.get(key).map_or(0, Vec::len) != 1);
            wrong_b += usize::from(self.in_b.get(key).map_or(0, Vec::len) != 1);
        }
        let unexpected = self
            .in_a
            .keys()
            .chain(self.in_b.keys())
            .filter(|key| key.1 != scheduled && !self.committed.contains_key(key))
            .count();
        (wrong_a, wrong_b, unexpected)
    }

    /// Sorted latencies from each commit to: A's stream; B's stream (in A's clock through
    /// `offset`); B's report read in A (A's clock alone). A receipt stamped before the
    /// write returned counts as zero.
    fn latencies(&self, anchor: Instant, offset: &Offset) -> [Vec<Duration>; 3] {
        let mut same = Vec::new();
        let mut cross = Vec::new();
        let mut echo = Vec::new();
        for (key, committed) in &self.committed {
            if let Some(at) = self.in_a.get(key).and_then(|v| v.first()) {
                same.push(at.saturating_duration_since(*committed));
            }
            if let Some((t, read)) = self.in_b.get(key).and_then(|v| v.first()) {
                let ns = offset.a_time(*t) - since(anchor, *committed);
                cross.push(Duration::from_nanos(ns.max(0) as u64));
                echo.push(read.saturating_duration_since(*committed));
            }
        }
        for v in [&mut same, &mut cross, &mut echo] {
            v.sort();
        }
        [same, cross, echo]
    }
}

/// Makes `changes` with `write`, one at a time each waiting for both deliveries, or paced at
/// a rate whatever the previous ones are doing; then collects the deliveries.
async fn run_phase(
    changes: Vec<Change>,
    pace: Pace,
    write: impl Fn(Change) -> BoxFut + Clone + Send + 'static,
    a: &mut mpsc::UnboundedReceiver<Receipt>,
    b: &mut mpsc::UnboundedReceiver<Entry>,
) -> R<Phase> {
    let mut phase = Phase::default();
    let committed: Arc<Mutex<HashMap<Key, Instant>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, change) in changes.into_iter().enumerate() {
        let key = (change.0, change.2.status().as_int());
        match pace {
            Pace::Sequential => {
                write(change).await?;
                phase.committed.insert(key, Instant::now());
                let until = Instant::now() + TIMEOUT;
                while !phase.has_both(&key) {
                    tokio::select! {
                        Some(r) = a.recv() => phase.take_a(r),
                        Some(e) = b.recv() => phase.take_b(e),
                        () = tokio::time::sleep_until(until.into()) => {
                            return Err(format!("change {key:?} not delivered to both within {TIMEOUT:?}").into());
                        }
                    }
                }
            }
            Pace::PerSecond(rate) => {
                tokio::time::sleep_until((start + Duration::from_secs_f64(k as f64 / rate)).into())
                    .await;
                let write = write.clone();
                let committed = committed.clone();
                tasks.push(tokio::spawn(async move {
                    write(change).await?;
                    committed
                        .lock()
                        .map_err(|_| "poisoned")?
                        .insert(key, Instant::now());
                    R::Ok(())
                }));
            }
        }
    }
    for t in tasks {
        t.await??;
    }
    phase
        .committed
        .extend(committed.lock().map_err(|_| "poisoned")?.drain());
    phase.collect(a, b).await;
    Ok(phase)
}

/// The changes moving backends `{prefix}{1..=n}` through their lifecycle, indexed in `set`.
fn changes(set: u32, prefix: &str, n: u32) -> R<Vec<Change>> {
    Ok(lifecycle_changes(prefix, n)?
        .into_iter()
        .map(|(i, name, state)| (set * STRIDE + i, name, state))
        .collect())
}

/// The section: one writer, then 1,000 changes/s, each change followed by a status stream in
/// A and one in B; p50 and p99 of both, the id checks, the clock bound.
pub async fn crossproc(bench: &mut Bench) -> R<()> {
    let env = Env::new(1).await?;
    let drone = env.drones[0].0;
    let n_seq: u32 = bench.pick(300, 20);
    let n_rate: u32 = bench.pick(500, 50);
    let rate_secs = bench.pick(3.0, 0.5);
    let sets = [(1, "bx-seq-", n_seq), (2, "bx-rate-", n_rate)];
    for (_, prefix, n) in sets {
        BulkBackends {
            prefix,
            n: i64::from(n),
            drone,
            state: BackendState::Scheduled,
            age_secs: 0.0,
            key_expires_in_secs: None,
            allowed_idle_seconds: None,
        }
        .insert(&env)
        .await?;
    }
    analyze(&env.pool).await?;

    let anchor = Instant::now();
    let ids_b = IdGate::new();
    let (mut worker, mut in_b) = Worker::spawn(ids_b.clone())?;
    worker.send(&Command::Start {
        url: env.database.url.clone(),
    })?;
    match worker.next().await? {
        (Report::Ready, _) => {}
        (other, _) => return Err(format!("expected ready, got {other:?}").into()),
    }
    let ids_a = IdGate::new();
    let mut subscription = env.db.subscribe::<BackendState>().await?;
    {
        let ids_a = ids_a.clone();
        tokio::spawn(async move {
            while let Some(next) = subscription.next().await {
                match next {
                    Ok(notification) => ids_a.record(notification.id),
                    Err(lagged) => ids_a.lagged(lagged.missed),
                }
            }
        });
    }
    let (tx, mut in_a) = mpsc::unbounded_channel();
    for (set, prefix, n) in sets {
        for i in 1..=n {
            let name = BackendName::try_from(format!("{prefix}{i}"))?;
            open_stream(&env.db, &name, set * STRIDE + i, tx.clone()).await?;
        }
        worker.send(&Command::Watch {
            set,
            prefix: prefix.to_string(),
            n,
        })?;
        match worker.next().await? {
            (Report::Watching { set: got }, _) if got == set => {}
            (other, _) => return Err(format!("expected watching {set}, got {other:?}").into()),
        }
    }
    drop(tx);
    // Both processes' buses see these events too, and A's pool prepares its statements.
    warm_up(&env).await?;
    let mut pings = worker.pings(PINGS, anchor).await?;
    let after = highest_event_id(&env.pool).await?;
    ids_a.open_above(after);
    ids_b.open_above(after);

    let seq = run_phase(
        changes(1, "bx-seq-", n_seq)?,
        Pace::Sequential,
        via_update_state(env.db.clone()),
        &mut in_a,
        &mut in_b,
    )
    .await?;
    let total = (1000.0 * rate_secs) as usize;
    let mut rate_changes = changes(2, "bx-rate-", n_rate)?;
    rate_changes.truncate(total);
    let rate = run_phase(
        rate_changes,
        Pace::PerSecond(1000.0),
        via_update_state(env.db.clone()),
        &mut in_a,
        &mut in_b,
    )
    .await?;
    pings.extend(worker.pings(PINGS, anchor).await?);
    let offset = Offset::from_pings(&pings)?;
    let mut rtts: Vec<Duration> = pings
        .iter()
        .map(|p| Duration::from_nanos((p.read - p.sent) as u64))
        .collect();
    rtts.sort();

    let written = written_since(&env.pool, after).await?;
    let got_a = ids_a
        .received
        .wait_for(&written, TIMEOUT, Duration::from_millis(300))
        .await;
    let got_b = ids_b
        .received
        .wait_for(&written, TIMEOUT, Duration::from_millis(300))
        .await;
    worker.exit().await?;

    bench.heading(
        "cross-process delivery: commit in process A to a status stream in process B (the bench re-executed, its own PlaneDatabase), beside a status stream in A for the same changes",
    );
    for (phase, label) in [
        (&seq, format!("1 writer ({} changes)", seq.committed.len())),
        (
            &rate,
            format!(
                "1,000 changes/s ({} changes, {n_rate} streams per process)",
                rate.committed.len()
            ),
        ),
    ] {
        let [same, cross, echo] = phase.latencies(anchor, &offset);
        for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
            let (c, s) = (pct(&cross, q), pct(&same, q));
            bench.row(
                format!("cross-process delivery {name}, {label}"),
                ms(c),
                "same process (A's stream)",
                ms(s),
                ratio(c.as_secs_f64(), s.as_secs_f64()),
                Check::None,
            );
        }
        let (e50, e99) = (pct(&echo, 0.5), pct(&echo, 0.99));
        bench.row(
            format!("  check in A's clock alone: commit to B's report read in A, {label}"),
            format!("p50 {}", ms(e50)),
            "p99",
            ms(e99),
            "",
            Check::None,
        );
    }
    bench.row(
        format!(
            "  B's clock read in A's: error bound (from {} pipe round trips)",
            pings.len()
        ),
        format!("± {:.3} ms", offset.error().as_secs_f64() * 1e3),
        "pipe round trip, min / p50",
        format!("{} / {}", ms(rtts[0]), ms(pct(&rtts, 0.5))),
        "",
        Check::None,
    );
    let (seq_a, seq_b, seq_x) = seq.exactness();
    let (rate_a, rate_b, rate_x) = rate.exactness();
    let changes_made = seq.committed.len() + rate.committed.len();
    let wrong = [seq_a + rate_a, seq_b + rate_b, seq_x + rate_x];
    bench.row(
        "status streams: every change once, in A and in B",
        format!(
            "{} / {}",
            count((changes_made - wrong[0]) as u64),
            count((changes_made - wrong[1]) as u64)
        ),
        "changes made",
        count(changes_made as u64),
        "",
        Check::Always {
            target: "all, none twice".into(),
            ok: wrong == [0, 0, 0],
        },
    );
    if wrong != [0, 0, 0] {
        println!(
            "   status streams: {} changes not once in A, {} not once in B, {} entries for changes never made",
            wrong[0], wrong[1], wrong[2]
        );
    }
    for (process, got, gate) in [("A", &got_a, &ids_a), ("B", &got_b, &ids_b)] {
        let lagged = gate.lagged.load(Ordering::SeqCst);
        println!(
            "   events by id, process {process}: {}; {lagged} dropped by lag",
            got.describe()
        );
        bench.row(
            format!("events delivered by id to a subscriber in process {process}"),
            count((got.written - got.missing.len()) as u64),
            "events written",
            count(got.written as u64),
            "",
            Check::Always {
                target: "all, none twice".into(),
                ok: got.exact() && lagged == 0,
            },
        );
    }
    drop(in_a);
    env.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_intersection_of_what_the_pings_say() {
        // B's clock runs 1,000 ns ahead of A's; pings with different delays either way.
        let pings = [
            Ping {
                sent: 0,
                b: 1_000 + 30,
                read: 100,
            },
            Ping {
                sent: 500,
                b: 1_000 + 590,
                read: 620,
            },
        ];
        let offset = Offset::from_pings(&pings).unwrap();
        // First: [930, 1030]; second: [970, 1090]; together [970, 1030].
        assert_eq!(
            offset,
            Offset {
                low: 970,
                high: 1030
            }
        );
        assert_eq!(offset.error(), Duration::from_nanos(30));
        assert_eq!(offset.a_time(5_000), 4_000);
    }

    #[test]
    fn pings_that_cannot_all_be_true_fail() {
        let pings = [
            Ping {
                sent: 0,
                b: 1_000,
                read: 10,
            },
            Ping {
                sent: 100,
                b: 2_000,
                read: 110,
            },
        ];
        assert!(Offset::from_pings(&pings).is_err());
        assert!(Offset::from_pings(&[]).is_err());
    }

    #[test]
    fn commands_and_reports_are_one_line_each() {
        let line = serde_json::to_string(&Command::Watch {
            set: 2,
            prefix: "bx-".into(),
            n: 3,
        })
        .unwrap();
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<Command>(&line).unwrap(),
            Command::Watch { set: 2, n: 3, .. }
        ));
        let line = serde_json::to_string(&Report::Entry {
            index: 7,
            status: 20,
            t: 9,
        })
        .unwrap();
        assert!(matches!(
            serde_json::from_str::<Report>(&line).unwrap(),
            Report::Entry {
                index: 7,
                status: 20,
                t: 9
            }
        ));
    }

    #[test]
    fn a_change_lost_in_one_process_and_repeated_in_the_other_is_seen() {
        let now = Instant::now();
        let scheduled = BackendStatus::Scheduled.as_int();
        let loading = BackendStatus::Loading.as_int();
        let starting = BackendStatus::Starting.as_int();
        let mut phase = Phase::default();
        for index in [1, 2] {
            phase.committed.insert((index, loading), now);
        }
        // A: change 1 twice, change 2 once; B: change 1 only, plus a history entry (fine)
        // and an entry for a change never made.
        for key in [(1, loading), (1, loading), (2, loading)] {
            phase.take_a((key.0, key.1, now));
        }
        for key in [(1, loading), (2, scheduled), (2, starting)] {
            phase.take_b((key.0, key.1, 0, now));
        }
        assert!(!phase.complete());
        assert_eq!(phase.exactness(), (1, 1, 1));
        phase.take_b((2, loading, 0, now));
        assert!(phase.complete());
    }

    #[test]
    fn ids_are_recorded_only_above_the_gate() {
        let gate = IdGate::new();
        gate.record(Some(1));
        gate.record(None);
        gate.open_above(5);
        gate.record(Some(5));
        gate.record(Some(6));
        assert_eq!(gate.received.ids(), vec![Some(6)]);
    }
}
