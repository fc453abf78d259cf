//! What the parent test and its worker processes say to each other: the worker's
//! specification in an environment variable, then one JSON object per line, commands on the
//! worker's stdin and reports on its stdout (each report after [`MARKER`], since the test
//! harness prints on the same stream).

use serde::{Deserialize, Serialize};

/// The environment variable that makes the `worker` test a worker (its value: a
/// [`WorkerSpec`] as JSON). Without it the `worker` test returns at once.
pub const WORKER_ENV: &str = "PLANE_DB_MULTIPROCESS_WORKER";

/// The name of the worker test, as the parent selects it with `--exact`.
pub const WORKER_TEST: &str = "worker";

/// What precedes each report on a worker's stdout (the harness may print `test worker ... `
/// on the same line).
pub const MARKER: &str = "@@plane-db-worker@@ ";

/// Who a worker is and where its database is.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WorkerSpec {
    /// Its number, 0-based; names its application (`mp-worker-<index>`) and its keys.
    pub index: usize,
    /// The database every process shares.
    pub url: String,
    /// The size of its pool.
    pub pool_size: u32,
}

impl WorkerSpec {
    /// The `application_name` of its pool (its listener adds `-listener`).
    pub fn application_name(&self) -> String {
        application_name(self.index)
    }
}

/// The `application_name` of worker `index`'s pool.
pub fn application_name(index: usize) -> String {
    format!("mp-worker-{index}")
}

/// A command from the parent.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Run writers and a connect race at the same time; answered by [`Report::Done`].
    Run(Work),
    /// Wait until each subscriber holds at least this many events above `floor` (or until
    /// the timeout), then a short quiet period; answered by [`Report::Events`] with what the
    /// subscribers received since the previous `Collect`.
    Collect {
        /// Events at or below this id were committed before the subscriptions.
        floor: i64,
        /// How many `backend_state` events above the floor the typed subscriber must hold.
        states: usize,
        /// How many events above the floor the all-events subscriber must hold.
        all: usize,
        /// How long to wait for them.
        timeout_ms: u64,
    },
    /// Drop everything and end the process (answered by [`Report::Bye`]).
    Exit,
}

/// Writers and a connect race.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Work {
    /// Prefix of the writers' keys (`<prefix>-<worker>-<writer>-<n>`).
    pub prefix: String,
    /// Concurrent writers, each taking its backends through their lives one after another.
    pub writers: usize,
    /// Backends per writer; `None`: until the process is killed.
    pub backends_per_writer: Option<usize>,
    /// Keys `race-<n>` that every process connects to at the same time.
    pub race_keys: usize,
    /// Concurrent connects per race key from this process.
    pub race_attempts: usize,
    /// Report every acknowledged write ([`Report::Ack`]).
    pub ack: bool,
    /// Retry a write that failed (the database unreachable during a switchover) until
    /// [`RETRY_FOR`] has passed, instead of counting it as an error. A retried `connect`
    /// may find the backend its failed attempt created, a retried update may be refused as
    /// already made: both are accepted after a failed attempt.
    #[serde(default)]
    pub retry: bool,
}

/// How long a writer in [`Work::retry`] mode retries one write.
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// A report to the parent.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Report {
    /// Connected, a drone registered and heartbeating, both subscriptions live.
    Ready {
        /// The worker's process id.
        pid: u32,
    },
    /// A write is about to start: `connect` for `key` (status 10) or the update of its
    /// backend to `status`.
    Writing {
        /// The key the backend was created under.
        key: String,
        /// The status number the write moves it to.
        status: i32,
    },
    /// The library acknowledged that write.
    Ack {
        /// The key the backend was created under.
        key: String,
        /// The status number it reached.
        status: i32,
        /// When the acknowledgement came (microseconds since the Unix epoch).
        #[serde(default)]
        at_us: i64,
    },
    /// A [`Command::Run`] finished.
    Done {
        /// Backends created by the writers.
        connects: usize,
        /// State changes accepted.
        updates: usize,
        /// Every race attempt's answer.
        race: Vec<RaceAnswer>,
        /// Every error (any is a failure).
        errors: Vec<String>,
        /// How long the writers took.
        write_ms: u64,
        /// How long the race took.
        race_ms: u64,
        /// Failed attempts that were retried ([`Work::retry`]).
        #[serde(default)]
        retries: usize,
    },
    /// What the subscribers received since the previous report.
    Events {
        /// The typed subscriber's (`subscribe::<BackendState>()`), in delivery order.
        states: Vec<Delivered>,
        /// The all-events subscriber's (`subscribe_all_events()`), in delivery order.
        all: Vec<Delivered>,
        /// `Lagged` reports received (any is a failure here).
        lagged: u64,
        /// How long the collection waited.
        waited_ms: u64,
    },
    /// The worker could not go on.
    Failed {
        /// Why.
        error: String,
    },
    /// Acknowledges [`Command::Exit`].
    Bye,
}

/// One event as a subscriber received it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The event id.
    pub id: i64,
    /// Its kind.
    pub kind: String,
    /// Its key.
    pub key: Option<String>,
    /// The status number, for `backend_state` events.
    pub status: Option<i32>,
    /// When the subscriber received it (microseconds since the Unix epoch, this machine's
    /// clock, which the database server shares).
    pub at_us: i64,
}

/// One `connect` of the race.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RaceAnswer {
    /// The key name (`race-<n>`).
    pub key: String,
    /// The backend this caller was given.
    pub backend: String,
    /// Whether this call created it.
    pub spawned: bool,
    /// The caller's token (checked for its route by the parent).
    pub token: String,
}
