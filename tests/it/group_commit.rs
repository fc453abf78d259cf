//! Group commit of `update_state` (`Config::write_batching`): concurrent calls share one
//! statement and one transaction, and each caller still gets exactly the answer it would
//! have got alone.
//!
//! The batch tests run on a current-thread runtime and start their calls with `join_all`.
//! The first call finds nobody writing and writes its change alone, at once; later calls
//! queue behind it (with `max_alone` 1) and form one batch. So that the first is not done before
//! the others are queued, it moves a backend whose row the test holds locked for a moment
//! ([`held`]). The tests check that the rest formed one batch: the events of one batch share
//! one transaction id.

use crate::common::*;
use futures_util::future::join_all;
use plane_db::types::{BackendName, BackendState, BackendStatus};
use plane_db::{Config, PlaneDatabase, SchedulerConfig, WriteBatchConfig};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// The `backend_state` events of `backends`: (key, status, transaction id), in id order.
async fn events_of(db: &PlaneDatabase, backends: &[&BackendName]) -> Vec<(String, String, String)> {
    let keys: Vec<&str> = backends.iter().map(|b| b.as_str()).collect();
    sqlx::query_as(
        "select key, data->>'status', xid::text from event
         where kind = 'backend_state' and key = any($1) order by id",
    )
    .bind(&keys)
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// A backend's history: its statuses in order.
async fn history(db: &PlaneDatabase, backend: &BackendName) -> Vec<BackendStatus> {
    db.backend()
        .state_history(backend)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.state.status())
        .collect()
}

async fn status(db: &PlaneDatabase, backend: &BackendName) -> BackendStatus {
    db.backend()
        .backend(backend)
        .await
        .unwrap()
        .expect("backend exists")
        .state
        .status()
}

async fn key_rows(db: &PlaneDatabase, backend: &BackendName) -> i64 {
    sqlx::query_scalar("select count(*) from backend_key where id = $1")
        .bind(backend.as_str())
        .fetch_one(db.pool())
        .await
        .unwrap()
}

fn distinct_xids(events: &[(String, String, String)]) -> BTreeSet<String> {
    events.iter().map(|e| e.2.clone()).collect()
}

/// A backend whose row is locked by an open transaction for `HOLD`: a call that moves it
/// writes alone and waits for the lock, while the calls after it queue. Returns the backend
/// and a future that releases the lock after `HOLD`, to join with the calls.
async fn held(db: &PlaneDatabase) -> (BackendName, impl std::future::Future<Output = ()>) {
    let backend = spawn(db).await.backend_id;
    let mut txn = db.pool().begin().await.unwrap();
    sqlx::query("select 1 from backend where id = $1 for update")
        .bind(backend.as_str())
        .execute(&mut *txn)
        .await
        .unwrap();
    let release = async move {
        tokio::time::sleep(HOLD).await;
        txn.rollback().await.unwrap();
    };
    (backend, release)
}

const HOLD: Duration = Duration::from_millis(300);

/// Batching with one call at a time writing alone: every call made while another is
/// written queues for the batch.
fn one_alone() -> Config {
    Config {
        write_batching: WriteBatchConfig {
            max_alone: 1,
            ..WriteBatchConfig::default()
        },
        ..Config::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_mixing_accepted_refused_and_unknown_backends_answers_each_caller() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let accepted = spawn(&db).await.backend_id;
        let backwards = spawn(&db).await.backend_id;
        let repeated = spawn(&db).await.backend_id;
        let ending = spawn(&db).await.backend_id;
        let unknown = BackendName::new_random();
        let states = lifecycle();
        let terminated = states[5].clone();
        assert!(db
            .backend()
            .update_state(&backwards, &states[1])
            .await
            .unwrap());
        let before: Vec<_> = events_of(&db, &[&backwards]).await;

        let backend = db.backend();
        let (first, release) = held(&db).await;
        let calls = vec![
            backend.update_state(&first, &states[0]),
            backend.update_state(&accepted, &states[0]),
            backend.update_state(&backwards, &states[0]),
            backend.update_state(&unknown, &states[0]),
            backend.update_state(&repeated, &BackendState::Scheduled),
            backend.update_state(&ending, &terminated),
        ];
        let (answers, ()) = tokio::join!(join_all(calls), release);
        let answers: Vec<bool> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, vec![true, true, false, false, false, true]);

        // One batch: the two accepted changes' events share one transaction.
        let written = events_of(&db, &[&accepted, &backwards, &unknown, &repeated, &ending]).await;
        let new: Vec<_> = written
            .iter()
            .filter(|e| e.1 != "scheduled" && !before.contains(e))
            .collect();
        // (Across backends a batch has no order: it writes them in id order.)
        let new_keys: BTreeSet<(&str, &str)> =
            new.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
        assert_eq!(
            new_keys,
            BTreeSet::from([
                (accepted.as_str(), "loading"),
                (ending.as_str(), "terminated")
            ])
        );
        assert_eq!(new.len(), 2);
        let batch_xids: BTreeSet<&String> = new.iter().map(|e| &e.2).collect();
        assert_eq!(
            batch_xids.len(),
            1,
            "one transaction for the batch: {new:?}"
        );

        // Exactly as alone: history rows for the accepted changes only, the key released on
        // `terminated` only, the refused backends untouched.
        assert_eq!(
            history(&db, &accepted).await,
            vec![BackendStatus::Scheduled, BackendStatus::Loading]
        );
        assert_eq!(
            history(&db, &backwards).await,
            vec![BackendStatus::Scheduled, BackendStatus::Starting]
        );
        assert_eq!(status(&db, &backwards).await, BackendStatus::Starting);
        assert_eq!(
            history(&db, &repeated).await,
            vec![BackendStatus::Scheduled]
        );
        assert_eq!(
            history(&db, &ending).await,
            vec![BackendStatus::Scheduled, BackendStatus::Terminated]
        );
        assert_eq!(key_rows(&db, &ending).await, 0);
        assert_eq!(key_rows(&db, &accepted).await, 1);
        assert_eq!(key_rows(&db, &backwards).await, 1);
        assert!(db.backend().backend(&unknown).await.unwrap().is_none());
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn two_changes_of_one_backend_in_one_batch_apply_in_call_order() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let x = spawn(&db).await.backend_id;
        let y = spawn(&db).await.backend_id;
        let z = spawn(&db).await.backend_id;
        let states = lifecycle();
        let backend = db.backend();
        // x: forward, forward again, then backwards (refused after the second); y: once;
        // z: the later status first, so the earlier one is refused, as it would be alone.
        let (first, release) = held(&db).await;
        let calls = vec![
            backend.update_state(&first, &states[0]),
            backend.update_state(&x, &states[0]),
            backend.update_state(&z, &states[1]),
            backend.update_state(&x, &states[1]),
            backend.update_state(&y, &states[0]),
            backend.update_state(&x, &states[0]),
            backend.update_state(&z, &states[0]),
            backend.update_state(&x, &states[2]),
        ];
        let (answers, ()) = tokio::join!(join_all(calls), release);
        let answers: Vec<bool> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            answers,
            vec![true, true, true, true, true, false, false, true]
        );
        assert_eq!(
            history(&db, &x).await,
            vec![
                BackendStatus::Scheduled,
                BackendStatus::Loading,
                BackendStatus::Starting,
                BackendStatus::Waiting
            ]
        );
        assert_eq!(
            history(&db, &z).await,
            vec![BackendStatus::Scheduled, BackendStatus::Starting]
        );
        assert_eq!(status(&db, &x).await, BackendStatus::Waiting);

        // Events in call order per backend, all from one transaction.
        let events: Vec<_> = events_of(&db, &[&x, &y, &z])
            .await
            .into_iter()
            .filter(|e| e.1 != "scheduled")
            .collect();
        let of_x: Vec<&str> = events
            .iter()
            .filter(|e| e.0 == x.as_str())
            .map(|e| e.1.as_str())
            .collect();
        assert_eq!(of_x, vec!["loading", "starting", "waiting"]);
        assert_eq!(events.len(), 5);
        assert_eq!(distinct_xids(&events).len(), 1, "{events:?}");
    })
    .await
}

/// A change the server refuses (here a trigger raises for one backend) fails only its own
/// call: the others of its batch are written again alone and succeed.
#[tokio::test(flavor = "current_thread")]
async fn a_failing_change_fails_only_its_own_call() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let good: Vec<BackendName> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(spawn(&db).await.backend_id);
            }
            v
        };
        let bad = spawn(&db).await.backend_id;
        exec(
            &db,
            &format!(
                "create function refuse_one() returns trigger language plpgsql as $$
                 begin
                     if new.backend_id = '{bad}' then raise exception 'refused for the test'; end if;
                     return new;
                 end $$"
            ),
        )
        .await;
        exec(
            &db,
            "create trigger refuse_one before insert on backend_state
             for each row execute function refuse_one()",
        )
        .await;
        let backend = db.backend();
        let loading = BackendState::Loading;
        let (first, release) = held(&db).await;
        let mut calls = vec![backend.update_state(&first, &loading)];
        for (i, b) in good.iter().enumerate() {
            if i == 2 {
                calls.push(backend.update_state(&bad, &loading));
            }
            calls.push(backend.update_state(b, &loading));
        }
        let (answers, ()) = tokio::join!(join_all(calls), release);
        assert_eq!(answers.len(), 6);
        assert!(answers[0].as_ref().unwrap());
        for (i, answer) in answers.iter().enumerate().skip(1).map(|(i, a)| (i - 1, a)) {
            if i == 2 {
                let error = answer.as_ref().expect_err("the bad change fails");
                assert!(error.to_string().contains("refused for the test"), "{error}");
            } else {
                assert!(answer.as_ref().unwrap(), "change {i}: {answer:?}");
            }
        }
        for b in &good {
            assert_eq!(
                history(&db, b).await,
                vec![BackendStatus::Scheduled, BackendStatus::Loading]
            );
        }
        assert_eq!(history(&db, &bad).await, vec![BackendStatus::Scheduled]);
        assert_eq!(status(&db, &bad).await, BackendStatus::Scheduled);
        let refs: Vec<&BackendName> = good.iter().chain([&bad]).collect();
        let events: Vec<_> = events_of(&db, &refs)
            .await
            .into_iter()
            .filter(|e| e.1 == "loading")
            .collect();
        assert_eq!(events.len(), 4, "one event per good change, none for the bad: {events:?}");
        // The refused batch was written again change by change: four transactions.
        assert_eq!(distinct_xids(&events).len(), 4, "{events:?}");
    })
    .await
}

/// A caller that stops waiting (its future dropped once its change is queued, before its
/// batch is taken) does not break the batch: the others get their answers, and its change
/// is not written.
#[tokio::test(flavor = "current_thread")]
async fn a_dropped_caller_is_not_written_and_does_not_break_its_batch() {
    with_db_config(one_alone(), |db| async move {
        drone(&db).await;
        let (a, release) = held(&db).await;
        let b = spawn(&db).await.backend_id;
        let c = spawn(&db).await.backend_id;
        let backend = db.backend();
        let loading = BackendState::Loading;
        let dropped = async {
            // Polled once (queued), then dropped.
            let mut call = std::pin::pin!(backend.update_state(&b, &loading));
            assert!(futures_util::FutureExt::now_or_never(call.as_mut()).is_none());
        };
        let (ra, (), rc, ()) = tokio::join!(
            backend.update_state(&a, &loading),
            dropped,
            backend.update_state(&c, &loading),
            release,
        );
        assert!(ra.unwrap());
        assert!(rc.unwrap());
        // The dropped caller's change was queued, but nobody waited for it any more when
        // its batch was taken: it is not written (given time to be, were it).
        tokio::time::sleep(HOLD).await;
        assert_eq!(history(&db, &b).await, vec![BackendStatus::Scheduled]);
        assert!(events_of(&db, &[&b])
            .await
            .iter()
            .all(|e| e.1 == "scheduled"));
        // And the writer goes on with later calls.
        assert!(backend.update_state(&b, &loading).await.unwrap());

        // The call writing alone is dropped while others are queued behind it: they are
        // handed to a batch writer and answered. Its own change is written whole or not at
        // all (its future was dropped mid-statement).
        let (lone, release) = held(&db).await;
        let d = spawn(&db).await.backend_id;
        let e = spawn(&db).await.backend_id;
        let dropped = async {
            let mut call = std::pin::pin!(backend.update_state(&lone, &loading));
            assert!(futures_util::FutureExt::now_or_never(call.as_mut()).is_none());
            // Let the other calls queue behind it, then drop it.
            tokio::task::yield_now().await;
        };
        let (_, rd, re, ()) = tokio::join!(
            dropped,
            backend.update_state(&d, &loading),
            backend.update_state(&e, &loading),
            release,
        );
        assert!(rd.unwrap());
        assert!(re.unwrap());
        tokio::time::sleep(HOLD).await;
        let written = history(&db, &lone).await.len() - 1;
        let events = events_of(&db, &[&lone])
            .await
            .into_iter()
            .filter(|e| e.1 == "loading")
            .count();
        assert_eq!(written, events, "history and events agree");
        assert_eq!(
            status(&db, &lone).await,
            if written == 1 {
                BackendStatus::Loading
            } else {
                BackendStatus::Scheduled
            }
        );
    })
    .await
}

/// Updates each of `backends` through a fixed pseudo-random sequence of statuses (forward,
/// backwards and repeated), one task per backend list, all at once. Returns every answer.
async fn run_writers(
    db: &PlaneDatabase,
    writers: &[Vec<BackendName>],
    steps: usize,
) -> Vec<Vec<bool>> {
    let states = lifecycle();
    let mut tasks = Vec::new();
    for (w, backends) in writers.iter().enumerate() {
        let db = db.clone();
        let backends = backends.clone();
        let states = states.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for step in 0..steps {
                for (i, b) in backends.iter().enumerate() {
                    // A fixed mix: mostly forward, sometimes back or repeated.
                    let pick = (w * 7 + i * 3 + step * 5) % 9;
                    let state = &states[(step + pick / 3).min(states.len() - 1)];
                    let state = if pick == 4 { &states[0] } else { state };
                    answers.push(db.backend().update_state(b, state).await.unwrap());
                }
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all
}

/// Many concurrent writers (each with its own backends) get exactly the answers a sequential
/// run gives, and the database ends the same: histories, events and keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writers_get_the_answers_of_a_sequential_run() {
    // On a loaded machine setting up 96 backends in a debug build has taken over 30 s: the
    // drone must stay eligible (heard from) until the last is scheduled.
    let scheduler = SchedulerConfig {
        drone_heartbeat_timeout: Duration::from_secs(3600),
        controller_heartbeat_timeout: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    };
    let batched = Config {
        scheduler: scheduler.clone(),
        ..Config::default()
    };
    let alone = Config {
        write_batching: WriteBatchConfig {
            enabled: false,
            ..WriteBatchConfig::default()
        },
        scheduler,
        ..Config::default()
    };
    let mut outcomes = Vec::new();
    for config in [batched, alone] {
        let (answers, histories, events, keys) = {
            let result = std::sync::Arc::new(std::sync::Mutex::new(None));
            let slot = result.clone();
            with_db_config(config, |db| async move {
                drone(&db).await;
                let mut writers = Vec::new();
                for _ in 0..32 {
                    let mut backends = Vec::new();
                    for _ in 0..3 {
                        backends.push(spawn(&db).await.backend_id);
                    }
                    writers.push(backends);
                }
                let answers = run_writers(&db, &writers, 8).await;
                let mut histories = Vec::new();
                let mut keys = Vec::new();
                for backends in &writers {
                    for b in backends {
                        histories.push(history(&db, b).await);
                        keys.push(key_rows(&db, b).await);
                    }
                }
                let events: i64 = sqlx::query_scalar(
                    "select count(*) from event where kind = 'backend_state' and data->>'status' <> 'scheduled'",
                )
                .fetch_one(db.pool())
                .await
                .unwrap();
                let transactions: i64 = sqlx::query_scalar(
                    "select count(distinct xid) from event where kind = 'backend_state' and data->>'status' <> 'scheduled'",
                )
                .fetch_one(db.pool())
                .await
                .unwrap();
                println!("FIGURES group commit: {events} state changes in {transactions} transactions");
                *slot.lock().unwrap() = Some((answers, histories, events, keys));
            })
            .await;
            let taken = result.lock().unwrap().take();
            taken.expect("the run finished")
        };
        outcomes.push((answers, histories, events, keys));
    }
    let (batched, alone) = (&outcomes[0], &outcomes[1]);
    // The same answers, call by call, as the sequential model and as without batching.
    let states = lifecycle();
    let mut expected = Vec::new();
    for w in 0..32 {
        let mut current: HashMap<usize, BackendStatus> = HashMap::new();
        let mut answers = Vec::new();
        for step in 0..8 {
            for i in 0..3 {
                let pick = (w * 7 + i * 3 + step * 5) % 9;
                let state = &states[(step + pick / 3).min(states.len() - 1)];
                let state = if pick == 4 { &states[0] } else { state };
                let now = current.entry(i).or_insert(BackendStatus::Scheduled);
                let ok = state.status().as_int() > now.as_int();
                if ok {
                    *now = state.status();
                }
                answers.push(ok);
            }
        }
        expected.push(answers);
    }
    assert_eq!(batched.0, expected, "batched answers");
    assert_eq!(alone.0, expected, "answers without batching");
    assert_eq!(batched.1, alone.1, "histories");
    assert_eq!(batched.2, alone.2, "events");
    assert_eq!(batched.3, alone.3, "key rows");
    let accepted = expected.iter().flatten().filter(|a| **a).count() as i64;
    assert_eq!(batched.2, accepted, "one event per accepted change");
}

/// `update_state` calls are still counted one by one in the metrics when they are batched,
/// and the batches are counted by group commit's own metric.
#[tokio::test(flavor = "current_thread")]
async fn batched_calls_are_counted_one_by_one() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    with_db(|db| async move {
        drone(&db).await;
        let mut backends = Vec::new();
        for _ in 0..6 {
            backends.push(spawn(&db).await.backend_id);
        }
        let backend = db.backend();
        let loading = BackendState::Loading;
        let calls: Vec<_> = backends
            .iter()
            .map(|b| backend.update_state(b, &loading))
            .chain([backend.update_state(&backends[0], &loading)])
            .collect();
        let answers: Vec<bool> = join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // The first and the last call change the same backend at the same time: exactly one
        // of them wins (a lone write and a batch may commit in either order).
        assert!(answers[1..6].iter().all(|a| *a), "{answers:?}");
        assert!(
            answers[0] ^ answers[6],
            "one of the two changes of one backend: {answers:?}"
        );
        let page = handle.render();
        let value: f64 = page
            .lines()
            .filter(|l| {
                l.starts_with(plane_db::metrics::OPERATIONS_TOTAL)
                    && l.contains("operation=\"update_state\"")
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum();
        assert_eq!(value, 7.0, "{page}");
        // Group commit's own metric: the 7 calls were written in fewer writes than 7.
        let batch_metric = |suffix: &str| -> f64 {
            let name = format!("{}{suffix}", plane_db::metrics::WRITE_BATCH_CALLS);
            page.lines()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{")) && l.contains("operation=\"update_state\"")
                })
                .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                .sum()
        };
        assert_eq!(batch_metric("_sum"), 7.0, "every call in one write: {page}");
        let writes = batch_metric("_count");
        assert!(
            (1.0..7.0).contains(&writes),
            "{writes} writes for 7 calls: {page}"
        );
    })
    .await
}

/// The answers a sequential run of [`run_writers`] gives: per writer, per step, per backend.
fn sequential_answers(writers: usize, per_writer: usize, steps: usize) -> Vec<Vec<bool>> {
    let states = lifecycle();
    let mut expected = Vec::new();
    for w in 0..writers {
        let mut current: HashMap<usize, BackendStatus> = HashMap::new();
        let mut answers = Vec::new();
        for step in 0..steps {
            for i in 0..per_writer {
                let pick = (w * 7 + i * 3 + step * 5) % 9;
                let state = &states[(step + pick / 3).min(states.len() - 1)];
                let state = if pick == 4 { &states[0] } else { state };
                let now = current.entry(i).or_insert(BackendStatus::Scheduled);
                let ok = state.status().as_int() > now.as_int();
                if ok {
                    *now = state.status();
                }
                answers.push(ok);
            }
        }
        expected.push(answers);
    }
    expected
}

/// With room for only two queued calls (`max_queued`), many more concurrent callers wait
/// for room instead of queueing without bound: each gets the answer of a sequential run,
/// and no batch holds more than two calls (one transaction's events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_calls_wait_for_room() {
    const WRITERS: usize = 16;
    let config = Config {
        write_batching: WriteBatchConfig {
            max_queued: 2,
            ..WriteBatchConfig::default()
        },
        scheduler: SchedulerConfig {
            drone_heartbeat_timeout: Duration::from_secs(3600),
            controller_heartbeat_timeout: Duration::from_secs(3600),
            ..SchedulerConfig::default()
        },
        ..Config::default()
    };
    with_db_config(config, |db| async move {
        drone(&db).await;
        let mut writers = Vec::new();
        for _ in 0..WRITERS {
            let mut backends = Vec::new();
            for _ in 0..3 {
                backends.push(spawn(&db).await.backend_id);
            }
            writers.push(backends);
        }
        let answers = run_writers(&db, &writers, 8).await;
        assert_eq!(answers, sequential_answers(WRITERS, 3, 8));
        let (largest, transactions, events): (i64, i64, i64) = sqlx::query_as(
            "select max(n), count(*), sum(n)::bigint from (
                 select count(*) as n from event
                 where kind = 'backend_state' and data->>'status' <> 'scheduled'
                 group by xid
             ) t",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        println!(
            "FIGURES bounded queue: {events} state changes in {transactions} transactions, at most {largest} in one"
        );
        assert!(largest <= 2, "a batch of {largest} calls with room for 2");
    })
    .await
}
