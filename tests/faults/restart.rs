//! The Postgres server stopped and started again while writers write and subscribers
//! listen: the pool and the bus recover by themselves, streams resume, nothing is lost.
//!
//! Uses a throwaway server of its own ([`plane_db::testing::private_server`]): stopping the
//! suite's shared server would break the scenarios running beside this one.

use crate::common::{drone, request};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::events::Lagged;
use plane_db::types::{BackendName, BackendState, BackendStatus};
use plane_db::{Config, PlaneDatabase};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BACKENDS: usize = 64;
const WRITERS: usize = 8;
/// How long the server stays down.
const DOWN: Duration = Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream() {
    with_private_server("restart", scenario).await;
}

async fn scenario(server: Arc<plane_db::testing::TestServer>, url: String) {
    let db = open(&url, 16, Config::default()).await;
    drone(&db).await;
    let mut backends = Vec::new();
    for i in 0..BACKENDS {
        backends.push(
            db.connect(&request(&format!("r-{i}")))
                .await
                .unwrap()
                .backend_id,
        );
    }

    // Subscribers: every state change, and one status stream per backend.
    let mut sub = db.subscribe::<BackendState>().await.unwrap();
    let received = Arc::new(Mutex::new(Vec::<(i64, Instant)>::new()));
    let collector = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut lagged = 0;
            while received.lock().unwrap().len() < BACKENDS * 7 {
                match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
                    Ok(Some(Ok(n))) => received
                        .lock()
                        .unwrap()
                        .push((n.id.unwrap(), Instant::now())),
                    Ok(Some(Err(Lagged { missed }))) => lagged += missed,
                    Ok(None) | Err(_) => break,
                }
            }
            lagged
        })
    };
    let mut streams = Vec::new();
    for backend in &backends {
        let stream = db.backend().status_stream(backend).await.unwrap();
        streams.push(tokio::spawn(stream.map(|e| e.status).collect::<Vec<_>>()));
    }

    // Writers: each update is retried until the database answers; a retry that is refused
    // because the first attempt did commit (its reply was lost) counts as applied.
    let errors = Arc::new(Mutex::new(0_u64));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            let errors = errors.clone();
            let mine: Vec<BackendName> =
                backends.iter().skip(w).step_by(WRITERS).cloned().collect();
            tokio::spawn(async move {
                for status in full_life() {
                    for backend in &mine {
                        apply(&db, backend, status, &errors).await;
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                }
            })
        })
        .collect();

    // The fault: stop the server mid-stream, keep it down, start it again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = received.lock().unwrap().len();
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop())
        .await
        .unwrap()
        .unwrap();
    let stopped_at = Instant::now();
    tokio::time::sleep(DOWN).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start())
        .await
        .unwrap()
        .unwrap();
    let started_at = Instant::now();

    // Recovery: the pool answers, the bus listens and delivers again.
    let mut pool_back = None;
    let mut listening_back = None;
    let deadline = started_at + Duration::from_secs(60);
    while (pool_back.is_none() || listening_back.is_none()) && Instant::now() < deadline {
        if pool_back.is_none() && db.health_check().await.is_ok() {
            pool_back = Some(started_at.elapsed());
        }
        if pool_back.is_some() && listening_back.is_none() && listener_up(&db).await {
            listening_back = Some(started_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for w in writers {
        w.await.unwrap();
    }
    let lagged = collector.await.unwrap();
    let received = received.lock().unwrap().clone();
    let first_after = received
        .iter()
        .filter(|(_, at)| *at > started_at)
        .map(|(_, at)| at.duration_since(started_at))
        .min();

    let table = table_event_ids(&db, "backend_state", None).await;
    // The scheduled events were written before the subscription.
    let expected: Vec<i64> = sqlx::query_scalar(
        "select id from event where kind = 'backend_state' and data->>'status' <> 'scheduled'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut by_id: HashMap<i64, u32> = HashMap::new();
    for (id, _) in &received {
        *by_id.entry(*id).or_default() += 1;
    }
    let lost = expected.iter().filter(|id| !by_id.contains_key(id)).count();
    let duplicated: u32 = by_id.values().map(|n| n - 1).sum();
    let mut complete = 0;
    for s in streams {
        if s.await.unwrap() == BackendStatus::ALL {
            complete += 1;
        }
    }

    let opt_ms = |d: Option<Duration>| d.map_or("never".to_string(), ms);
    figures(
        "server_restart",
        &[
            ("backends", BACKENDS.to_string()),
            ("writers", WRITERS.to_string()),
            ("down_ms", ms(started_at.duration_since(stopped_at))),
            ("events_before_stop", before.to_string()),
            ("state_changes_written", expected.len().to_string()),
            ("received", received.len().to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
            ("writer_errors_retried", errors.lock().unwrap().to_string()),
            ("pool_recovered_ms", opt_ms(pool_back)),
            ("listener_recovered_ms", opt_ms(listening_back)),
            ("first_event_after_restart_ms", opt_ms(first_after)),
            ("status_streams_complete", format!("{complete}/{BACKENDS}")),
        ],
    );

    assert_eq!(
        table.len(),
        BACKENDS * 8,
        "every state change committed once"
    );
    assert!(
        before > 0 && before < BACKENDS * 7,
        "the stop fell mid-stream ({before})"
    );
    assert!(pool_back.is_some(), "the pool never recovered");
    assert!(listening_back.is_some(), "the bus never listened again");
    assert_eq!(lagged, 0);
    assert_eq!(lost, 0, "events lost across the restart");
    assert_eq!(duplicated, 0, "events duplicated across the restart");
    assert_eq!(received.len(), expected.len());
    assert_eq!(complete, BACKENDS, "status streams resumed and completed");
}

/// Applies one update, retrying through the outage.
async fn apply(
    db: &PlaneDatabase,
    backend: &BackendName,
    status: BackendStatus,
    errors: &Mutex<u64>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempted = false;
    loop {
        match db.backend().update_state(backend, &state_for(status)).await {
            Ok(true) => return,
            Ok(false) if attempted => {
                // An earlier attempt committed but its reply was lost: check it is there.
                let row = db.backend().backend(backend).await.unwrap().unwrap();
                assert_eq!(row.state.status(), status, "{backend} refused {status}");
                return;
            }
            Ok(false) => panic!("{backend} refused {status}"),
            Err(_) => {
                attempted = true;
                *errors.lock().unwrap() += 1;
                assert!(Instant::now() < deadline, "the database did not come back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Events in one big backlog.
const BACKLOG: usize = 5_000;

/// The server restarts while the bus is in the middle of reading a backlog page by page (one
/// row per page): the read is cut short, and the read after the restart must deliver the rest
/// without delivering again what the cut-short read already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_between_pages_of_one_read() {
    with_private_server("restart", between_pages).await;
}

async fn between_pages(server: Arc<plane_db::testing::TestServer>, url: String) {
    let mut config = Config::default();
    config.bus.fetch_batch_size = 1;
    let db = open(&url, 4, config).await;
    let mut sub = db.subscribe_all_events().await.unwrap();
    let received = Arc::new(Mutex::new(Vec::<i64>::new()));
    let collector = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(5), sub.next()).await
            {
                let event = event.expect("not lagged");
                received.lock().unwrap().push(event.id.expect("persisted"));
            }
        })
    };

    // One transaction writes the whole backlog, so one read has to page through all of it.
    let mut tx = db.pool().begin().await.unwrap();
    for i in 0..BACKLOG {
        plane_db::events::emit(
            &mut tx,
            Some(&(format!("k{i}")).parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    // Once the read is under way, restart the server under it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().len() < 100 {
        assert!(Instant::now() < deadline, "the read never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop())
        .await
        .unwrap()
        .unwrap();
    let before_restart = received.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();

    // The collector stops after 5 s without an event: by then everything, and any duplicate,
    // has arrived.
    collector.await.unwrap();
    let received = received.lock().unwrap().clone();
    let unique: std::collections::HashSet<i64> = received.iter().copied().collect();
    figures(
        "restart_between_pages",
        &[
            ("written", BACKLOG.to_string()),
            ("delivered_before_restart", before_restart.to_string()),
            ("received", received.len().to_string()),
            ("unique", unique.len().to_string()),
            ("duplicated", (received.len() - unique.len()).to_string()),
            (
                "recovered_in_s",
                format!("{:.1}", started.elapsed().as_secs_f64() - 5.0),
            ),
        ],
    );
    assert!(
        before_restart < BACKLOG,
        "the read finished before the restart: the scenario did not happen"
    );
    assert_eq!(unique.len(), BACKLOG, "every event delivered");
    assert_eq!(received.len(), BACKLOG, "no event delivered twice");
}
