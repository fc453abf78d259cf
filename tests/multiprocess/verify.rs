//! The parent's side of the checks: gathering what the workers' subscribers received,
//! comparing it with the database, and printing figures.

use crate::check::{check, Expected, Verdict};
use crate::process::Worker;
use crate::protocol::{Command, Delivered, RaceAnswer, Report};
use crate::{sql, worker, COLLECT_TIMEOUT, PROCESSES, RACE_ATTEMPTS, RACE_KEYS};
use plane_db::backend::RouteInfoResult;
use plane_db::types::BearerToken;
use plane_db::PlaneDatabase;
use std::collections::{HashMap, HashSet};

/// What every process's subscribers received so far, in delivery order.
#[derive(Default)]
pub struct Received {
    pub states: Vec<Delivered>,
    pub all: Vec<Delivered>,
    pub lagged: u64,
}

/// The sum of several subscribers' verdicts.
#[derive(Default)]
pub struct Totals {
    subscribers: usize,
    ids_checked: usize,
    delivered: usize,
    early: usize,
    lost: usize,
    duplicated: usize,
    unexpected: usize,
    out_of_order: usize,
}

impl Totals {
    pub fn add(&mut self, v: &Verdict) {
        self.subscribers += 1;
        self.ids_checked += v.checked;
        self.delivered += v.delivered;
        self.early += v.early;
        self.lost += v.lost.len();
        self.duplicated += v.duplicated.len();
        self.unexpected += v.unexpected.len();
        self.out_of_order += v.out_of_order.len();
    }

    /// Expected ids never delivered, over every subscriber.
    pub fn lost_count(&self) -> usize {
        self.lost
    }

    /// Ids delivered more than once, over every subscriber.
    pub fn duplicated_count(&self) -> usize {
        self.duplicated
    }

    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("subscribers", self.subscribers.to_string()),
            ("ids_checked", self.ids_checked.to_string()),
            ("delivered", self.delivered.to_string()),
            ("early", self.early.to_string()),
            ("lost", self.lost.to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("unexpected", self.unexpected.to_string()),
            ("out_of_order", self.out_of_order.to_string()),
        ]
    }
}

/// Prints one line of figures.
pub fn figures(scenario: &str, fields: &[(&str, String)]) {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FIGURES {scenario}: {}", fields.join(" "));
}

/// Asks `workers` for what their subscribers received, waiting until each holds every event
/// stored above `floor`; adds it to `received`, and returns the longest wait.
pub async fn collect(
    workers: &mut [&mut Worker],
    received: &mut HashMap<usize, Received>,
    floor: i64,
    stored: &sql::Stored,
) -> u64 {
    let command = Command::Collect {
        floor,
        states: stored.states.len(),
        all: stored.all.len(),
        timeout_ms: COLLECT_TIMEOUT.as_millis() as u64,
    };
    for w in workers.iter_mut() {
        w.send(&command);
    }
    let mut longest = 0;
    for w in workers.iter_mut() {
        match w.next().await {
            Report::Events {
                states,
                all,
                lagged,
                waited_ms,
            } => {
                let r = received.entry(w.index).or_default();
                r.states.extend(states);
                r.all.extend(all);
                r.lagged = lagged;
                longest = longest.max(waited_ms);
            }
            other => panic!("worker {}: expected events, got {other:?}", w.index),
        }
    }
    longest
}

/// Compares every listed worker's subscribers with the table; failures go to `failures`.
pub fn verify(
    phase: &str,
    indexes: &[usize],
    received: &HashMap<usize, Received>,
    floor: i64,
    stored: &sql::Stored,
    failures: &mut Vec<String>,
) -> (Totals, u64) {
    let mut totals = Totals::default();
    let mut lagged = 0;
    for index in indexes {
        let r = &received[index];
        lagged += r.lagged;
        let subscribers: [(&str, &Expected, &[Delivered]); 2] = [
            ("subscribe::<BackendState>", &stored.states, &r.states),
            ("subscribe_all_events", &stored.all, &r.all),
        ];
        for (name, expected, delivered) in subscribers {
            let verdict = check(expected, floor, delivered, "backend_state");
            if !verdict.is_exact() {
                failures.push(format!(
                    "{phase}: worker {index} {name}: lost {:?}, duplicated {:?}, unexpected {:?}, out of order {:?}",
                    first(&verdict.lost),
                    first(&verdict.duplicated),
                    first(&verdict.unexpected),
                    first(&verdict.out_of_order),
                ));
            }
            totals.add(&verdict);
        }
    }
    if lagged > 0 {
        failures.push(format!("{phase}: {lagged} Lagged reports"));
    }
    (totals, lagged)
}

/// The first few items of a list, for a readable failure.
pub fn first<T: Clone>(v: &[T]) -> Vec<T> {
    v.iter().take(10).cloned().collect()
}

/// Checks the invariants; violations go to `failures`. Returns how many rows broke one.
pub async fn invariants(phase: &str, admin: &PlaneDatabase, failures: &mut Vec<String>) -> i64 {
    let mut total = 0;
    for (name, rows) in sql::invariants(admin.pool()).await {
        if rows != 0 {
            failures.push(format!("{phase}: {name}: {rows} rows"));
        }
        total += rows;
    }
    total
}

/// The race's outcome: every caller of a key told the same backend, exactly one of them
/// spawned it, that backend holds the key with one spawn action, and every caller's token
/// routes to it. Returns figures; failures go to `failures`.
pub async fn check_race(
    admin: &PlaneDatabase,
    answers: &[RaceAnswer],
    failures: &mut Vec<String>,
) -> Vec<(&'static str, String)> {
    let mut by_key: HashMap<&str, Vec<&RaceAnswer>> = HashMap::new();
    for a in answers {
        by_key.entry(&a.key).or_default().push(a);
    }
    let holders = sql::race_holders(admin.pool(), worker::NAMESPACE).await;
    let (spawn_actions, spawned_backends) = sql::race_spawn_actions(admin.pool()).await;
    let (mut disagreeing, mut spawned, mut wrong_holder, mut misrouted) = (0, 0, 0, 0);
    for (key, answers) in &by_key {
        let backends: HashSet<&str> = answers.iter().map(|a| a.backend.as_str()).collect();
        if backends.len() != 1 {
            disagreeing += 1;
            failures.push(format!("race {key}: callers told {backends:?}"));
        }
        let spawns = answers.iter().filter(|a| a.spawned).count();
        spawned += spawns;
        if spawns != 1 {
            failures.push(format!("race {key}: spawned {spawns} times"));
        }
        if holders.get(*key).map(String::as_str) != answers.first().map(|a| a.backend.as_str()) {
            wrong_holder += 1;
            failures.push(format!("race {key}: held by {:?}", holders.get(*key)));
        }
        for a in answers {
            let route = admin
                .backend()
                .route_info_for_token(&BearerToken::from(a.token.as_str()))
                .await
                .expect("a route lookup");
            match route {
                RouteInfoResult::Pending(p) if p.backend_id.as_str() == a.backend => {}
                _ => misrouted += 1,
            }
        }
    }
    if by_key.len() != RACE_KEYS || answers.len() != RACE_KEYS * RACE_ATTEMPTS * PROCESSES {
        failures.push(format!(
            "race: {} answers for {} keys",
            answers.len(),
            by_key.len()
        ));
    }
    if holders.len() != RACE_KEYS {
        failures.push(format!("race: {} key rows", holders.len()));
    }
    if spawn_actions != RACE_KEYS as i64 || spawned_backends != RACE_KEYS as i64 {
        failures.push(format!(
            "race: {spawn_actions} spawn actions for {spawned_backends} backends"
        ));
    }
    if misrouted > 0 {
        failures.push(format!("race: {misrouted} tokens misrouted"));
    }
    vec![
        ("race_keys", RACE_KEYS.to_string()),
        ("race_connects", answers.len().to_string()),
        ("race_spawned", spawned.to_string()),
        ("race_key_rows", holders.len().to_string()),
        ("race_spawn_actions", spawn_actions.to_string()),
        ("race_callers_disagreeing", disagreeing.to_string()),
        ("race_keys_held_by_another", wrong_holder.to_string()),
        ("race_tokens_misrouted", misrouted.to_string()),
    ]
}

/// The process that wrote each backend's events, from its key (`<prefix>-<worker>-…`;
/// the race's keys have several callers and no single writer).
pub async fn writers_of(admin: &PlaneDatabase) -> HashMap<String, usize> {
    sql::backend_keys(admin.pool())
        .await
        .into_iter()
        .filter_map(|(backend, key)| {
            let mut parts = key.split('-');
            match (parts.next(), parts.next()) {
                (Some("w" | "s" | "k" | "b" | "a"), Some(index)) => {
                    Some((backend, index.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// Delivery latencies of `backend_state` events to the all-events subscribers of `indexes`
/// (from the writing statement's start, on the database clock, to the subscriber's receipt,
/// on the same machine's clock), split by whether the event was written by the same
/// process or by another one. In microseconds.
pub fn latencies(
    indexes: &[usize],
    received: &HashMap<usize, Received>,
    stored: &sql::Stored,
    floor: i64,
    writers: &HashMap<String, usize>,
) -> (Vec<i64>, Vec<i64>) {
    let (mut same, mut other) = (Vec::new(), Vec::new());
    for index in indexes {
        for d in &received[index].all {
            if d.id <= floor || d.kind != "backend_state" {
                continue;
            }
            let (Some(created), Some(writer)) = (
                stored.created_us.get(&d.id),
                d.key.as_ref().and_then(|k| writers.get(k)),
            ) else {
                continue;
            };
            if writer == index {
                same.push(d.at_us - created);
            } else {
                other.push(d.at_us - created);
            }
        }
    }
    (same, other)
}

/// "p50/p99/max" of microsecond figures, in milliseconds.
pub fn percentiles(mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    format!("{:.1}/{:.1}/{:.1}", at(0.5), at(0.99), at(1.0))
}

/// The machine's 1-minute load average (the figures are timed on a shared machine).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}
