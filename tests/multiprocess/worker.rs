//! The worker side: one controller process. It connects to the shared database with a pool
//! of its own, registers a drone and keeps it (and its controller) heartbeating, holds two
//! subscribers (`subscribe::<BackendState>()` and `subscribe_all_events()`), and obeys the
//! parent's commands from stdin, reporting on stdout (see `protocol`).

use crate::protocol::{
    Command, Delivered, RaceAnswer, Report, Work, WorkerSpec, MARKER, RETRY_FOR, WORKER_ENV,
};
use plane_db::connect::{ConnectRequest, SpawnConfig};
use plane_db::events::NotificationPayload;
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendAddr, BackendName, BackendState, BackendStatus, ClusterName, ControllerName, DroneName,
    DronePoolName, KeyConfig, NodeId, NodeKind, TerminationReason,
};
use plane_db::{OpenOptions, PlaneDatabase};
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a collection waits after the last expected event, so that a duplicate
/// delivered late is caught.
const QUIET: Duration = Duration::from_millis(500);
/// How often the worker's controller and drone heartbeat (the scheduler's timeout is 30 s).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A writer that keeps failing stops after this many errors.
const MAX_ERRORS: usize = 20;
/// The pause before a failed write is retried ([`Work::retry`]).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The namespace of every key the workers use.
pub const NAMESPACE: &str = "mp";

/// Runs the worker if [`WORKER_ENV`] says this process is one; returns at once otherwise.
pub fn run_if_worker() {
    let Some(spec) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    let spec: WorkerSpec = serde_json::from_str(&spec.to_string_lossy())
        .unwrap_or_else(|e| fail(format!("{WORKER_ENV} is not a worker spec: {e}")));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("runtime: {e}")));
    if let Err(error) = runtime.block_on(serve(spec)) {
        fail(error);
    }
}

/// Reports the failure to the parent and fails the worker test.
fn fail(error: String) -> ! {
    report(&Report::Failed {
        error: error.clone(),
    });
    panic!("worker failed: {error}");
}

/// Writes one report line to stdout (whole lines: the lock is held for the line).
pub fn report(report: &Report) {
    let line = serde_json::to_string(report).expect("a report serialises");
    let mut out = std::io::stdout().lock();
    // A parent that went away cannot be told anything; the stdin thread ends the process.
    let _ = writeln!(out, "{MARKER}{line}");
    let _ = out.flush();
}

/// What the two subscribers received, in delivery order, and how much was reported.
#[derive(Default)]
struct Inbox {
    states: Vec<Delivered>,
    all: Vec<Delivered>,
    lagged: u64,
    states_reported: usize,
    all_reported: usize,
}

async fn serve(spec: WorkerSpec) -> Result<(), String> {
    let db = OpenOptions::new(&spec.url)
        .map_err(|e| format!("options: {e}"))?
        .application_name(&spec.application_name())
        .max_connections(spec.pool_size)
        .open()
        .await
        .map_err(|e| format!("open: {e}"))?;
    let (controller, drone) = register_drone(&db).await?;
    let heartbeat = tokio::spawn(heartbeat(db.clone(), controller, drone));

    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let mut states = db
        .subscribe::<BackendState>()
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut all = db
        .subscribe_all_events()
        .await
        .map_err(|e| format!("subscribe_all_events: {e}"))?;
    let typed_inbox = inbox.clone();
    let typed = tokio::spawn(async move {
        while let Some(next) = states.next().await {
            let mut inbox = typed_inbox.lock().expect("inbox lock");
            match next {
                Ok(n) => inbox.states.push(Delivered {
                    id: n.id.unwrap_or(-1),
                    kind: BackendState::kind().to_string(),
                    key: n.key,
                    status: Some(n.payload.status().as_int()),
                    at_us: now_us(),
                }),
                Err(_) => inbox.lagged += 1,
            }
        }
    });
    let all_inbox = inbox.clone();
    let untyped = tokio::spawn(async move {
        while let Some(next) = all.next().await {
            let mut inbox = all_inbox.lock().expect("inbox lock");
            match next {
                Ok(event) => inbox.all.push(Delivered {
                    id: event.id.unwrap_or(-1),
                    kind: event.kind.clone(),
                    key: event.key.clone(),
                    status: event
                        .data
                        .get("status")
                        .and_then(|s| s.as_str())
                        .and_then(|s| s.parse::<BackendStatus>().ok())
                        .map(BackendStatus::as_int),
                    at_us: now_us(),
                }),
                Err(_) => inbox.lagged += 1,
            }
        }
    });
    report(&Report::Ready {
        pid: std::process::id(),
    });

    let mut commands = commands();
    while let Some(command) = commands.recv().await {
        match command {
            Command::Run(work) => report(&run(&db, spec.index, work).await),
            Command::Collect {
                floor,
                states,
                all,
                timeout_ms,
            } => {
                report(&collect(&inbox, floor, states, all, timeout_ms).await);
            }
            Command::Exit => {
                report(&Report::Bye);
                break;
            }
        }
    }
    heartbeat.abort();
    typed.abort();
    untyped.abort();
    db.pool().close().await;
    Ok(())
}

/// The parent's commands, read from stdin by a thread of their own. Without a parent (stdin
/// closed while the worker runs) the process ends: a worker never outlives its test.
fn commands() -> tokio::sync::mpsc::UnboundedReceiver<Command> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(command) => {
                    if tx.send(command).is_err() {
                        return;
                    }
                }
                Err(e) => fail(format!("bad command {line:?}: {e}")),
            }
        }
        eprintln!("worker: stdin closed, exiting");
        std::process::exit(2);
    });
    rx
}

/// A controller online, and a ready drone connected to it, in the shared cluster.
async fn register_drone(db: &PlaneDatabase) -> Result<(ControllerName, NodeId), String> {
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, "0.1.0", "multiprocess")
        .await
        .map_err(|e| format!("controller heartbeat: {e}"))?;
    let name = DroneName::new_random();
    let cluster = cluster();
    let id = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: name.as_str(),
            cluster: Some(&cluster),
            plane_version: "0.1.0",
            plane_hash: "multiprocess",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .map_err(|e| format!("register node: {e}"))?
        .id;
    db.drone()
        .register(id, true, &DronePoolName::default())
        .await
        .map_err(|e| format!("register drone: {e}"))?;
    Ok((controller, id))
}

/// Keeps the controller and its drone eligible for scheduling.
async fn heartbeat(db: PlaneDatabase, controller: ControllerName, drone: NodeId) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Err(e) = db
            .controller()
            .heartbeat(&controller, true, "0.1.0", "multiprocess")
            .await
        {
            eprintln!("worker: controller heartbeat failed: {e}");
        }
        if let Err(e) = db.drone().heartbeat(drone, chrono::Utc::now()).await {
            eprintln!("worker: drone heartbeat failed: {e}");
        }
    }
}

/// The shared cluster.
pub fn cluster() -> ClusterName {
    "plane.test".parse().expect("a valid cluster name")
}

/// A connect request for `key`, by `user`.
fn request(key: &str, user: String) -> ConnectRequest {
    ConnectRequest {
        key: Some(KeyConfig {
            name: key.to_string(),
            namespace: NAMESPACE.to_string(),
            tag: String::new(),
        }),
        spawn_config: Some(SpawnConfig {
            id: None,
            cluster: Some(cluster()),
            pool: DronePoolName::default(),
            executable: serde_json::json!({"image": "ghcr.io/example/app:1"}),
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            subdomain: None,
        }),
        user: Some(user),
        auth: serde_json::Map::new(),
    }
}

/// The seven updates of a whole life after `scheduled`.
fn life() -> Vec<BackendState> {
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080);
    let loading = BackendState::Scheduled.to_loading();
    let starting = loading.to_starting();
    let waiting = starting.to_waiting(address);
    let ready = waiting.to_ready(BackendAddr(address));
    let terminating = ready.to_terminating(TerminationReason::Swept);
    let hard = terminating.to_hard_terminating(TerminationReason::Swept);
    let terminated = hard.to_terminated(Some(0));
    vec![
        loading,
        starting,
        waiting,
        ready,
        terminating,
        hard,
        terminated,
    ]
}

/// Runs the race and the writers at the same time.
async fn run(db: &PlaneDatabase, index: usize, work: Work) -> Report {
    // The race first, so that its connects leave at the same moment in every process.
    let race = tokio::spawn(race(db.clone(), index, work.race_keys, work.race_attempts));
    let started = Instant::now();
    let writers: Vec<_> = (0..work.writers)
        .map(|w| {
            tokio::spawn(writer(
                db.clone(),
                format!("{}-{index}-{w}", work.prefix),
                work.backends_per_writer,
                work.ack,
                work.retry,
            ))
        })
        .collect();
    let (mut connects, mut updates, mut errors, mut retries) = (0, 0, Vec::new(), 0);
    for w in writers {
        match w.await {
            Ok((c, u, e, r)) => {
                connects += c;
                updates += u;
                errors.extend(e);
                retries += r;
            }
            Err(e) => errors.push(format!("writer task: {e}")),
        }
    }
    let write_ms = started.elapsed().as_millis() as u64;
    let (answers, race_ms) = match race.await {
        Ok((answers, race_errors, took)) => {
            errors.extend(race_errors);
            (answers, took.as_millis() as u64)
        }
        Err(e) => {
            errors.push(format!("race task: {e}"));
            (Vec::new(), 0)
        }
    };
    Report::Done {
        connects,
        updates,
        race: answers,
        errors,
        write_ms,
        race_ms,
        retries,
    }
}

/// One writer: creates backends under its own keys and takes each through its whole life,
/// one write at a time. Returns the backends created, the updates accepted, the errors and
/// the failed attempts retried ([`Work::retry`]).
async fn writer(
    db: PlaneDatabase,
    prefix: String,
    backends: Option<usize>,
    ack: bool,
    retry: bool,
) -> (usize, usize, Vec<String>, usize) {
    let (mut connects, mut updates, mut errors, mut retries) = (0, 0, Vec::new(), 0);
    let mut n = 0;
    while backends.is_none_or(|b| n < b) && errors.len() < MAX_ERRORS {
        let key = format!("{prefix}-{n}");
        n += 1;
        if ack {
            writing(&key, BackendStatus::Scheduled);
        }
        let started = Instant::now();
        let mut failed = false;
        let response = loop {
            match db.connect(&request(&key, prefix.clone())).await {
                Ok(response) => break Some(response),
                Err(_) if retry && started.elapsed() < RETRY_FOR => {
                    failed = true;
                    retries += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => {
                    errors.push(format!("connect {key}: {e}"));
                    break None;
                }
            }
        };
        let Some(response) = response else {
            continue;
        };
        // A retried connect may find the backend its failed attempt created.
        if !response.spawned && !failed {
            errors.push(format!("connect {key}: a fresh key was not spawned"));
        }
        connects += 1;
        let backend: BackendName = response.backend_id;
        if ack {
            acked(&key, BackendStatus::Scheduled);
        }
        for state in life() {
            if ack {
                writing(&key, state.status());
            }
            let started = Instant::now();
            let mut failed = false;
            loop {
                match db.backend().update_state(&backend, &state).await {
                    // After a failed attempt, a refusal means that attempt had committed.
                    Ok(accepted) if accepted || failed => {
                        updates += 1;
                        if ack {
                            acked(&key, state.status());
                        }
                        break;
                    }
                    Ok(_) => {
                        errors.push(format!("{backend}: {} refused", state.status()));
                        break;
                    }
                    Err(_) if retry && started.elapsed() < RETRY_FOR => {
                        failed = true;
                        retries += 1;
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err(e) => {
                        errors.push(format!("{backend}: {}: {e}", state.status()));
                        break;
                    }
                }
            }
        }
    }
    (connects, updates, errors, retries)
}

fn writing(key: &str, status: BackendStatus) {
    report(&Report::Writing {
        key: key.to_string(),
        status: status.as_int(),
    });
}

fn acked(key: &str, status: BackendStatus) {
    report(&Report::Ack {
        key: key.to_string(),
        status: status.as_int(),
        at_us: now_us(),
    });
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `attempts` concurrent connects for each of `keys` shared keys.
async fn race(
    db: PlaneDatabase,
    index: usize,
    keys: usize,
    attempts: usize,
) -> (Vec<RaceAnswer>, Vec<String>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..keys {
        for a in 0..attempts {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("race-{k}");
                let result = db.connect(&request(&key, format!("w{index}-a{a}"))).await;
                (key, result)
            }));
        }
    }
    let (mut answers, mut errors) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await {
            Ok((key, Ok(r))) => answers.push(RaceAnswer {
                key,
                backend: r.backend_id.to_string(),
                spawned: r.spawned,
                token: r.token.as_str().to_string(),
            }),
            Ok((key, Err(e))) => errors.push(format!("race connect {key}: {e}")),
            Err(e) => errors.push(format!("race task: {e}")),
        }
    }
    (answers, errors, started.elapsed())
}

/// Waits until each subscriber holds the expected number of events above `floor` (or the
/// timeout passes), waits [`QUIET`] more, and returns what they received since the previous
/// collection.
async fn collect(
    inbox: &Mutex<Inbox>,
    floor: i64,
    states: usize,
    all: usize,
    timeout_ms: u64,
) -> Report {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(timeout_ms);
    let above = |v: &[Delivered]| v.iter().filter(|d| d.id > floor).count();
    loop {
        {
            let inbox = inbox.lock().expect("inbox lock");
            if above(&inbox.states) >= states && above(&inbox.all) >= all {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited_ms = started.elapsed().as_millis() as u64;
    tokio::time::sleep(QUIET).await;
    let mut inbox = inbox.lock().expect("inbox lock");
    let new_states = inbox.states[inbox.states_reported..].to_vec();
    let new_all = inbox.all[inbox.all_reported..].to_vec();
    inbox.states_reported = inbox.states.len();
    inbox.all_reported = inbox.all.len();
    Report::Events {
        states: new_states,
        all: new_all,
        lagged: inbox.lagged,
        waited_ms,
    }
}
