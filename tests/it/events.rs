//! The event bus: exactly-once delivery under concurrent writers, live-on-return
//! subscriptions, a killed listening connection, transactions, lag.

use crate::common::*;
use plane_db::events::{emit, BusConfig, Lagged, Subscription};
use plane_db::types::{BackendMetricsMessage, BackendName, BackendState, BackendStatus};
use plane_db::{Config, PlaneDatabase};
use std::collections::HashMap;
use std::time::Duration;

/// A backend name as an event key.
fn name(key: &str) -> BackendName {
    key.parse().expect("a valid backend name")
}

/// Counts (key, status) pairs a subscriber received.
type Seen = HashMap<(String, BackendStatus), usize>;

async fn collect_states(
    mut sub: plane_db::events::Subscription<BackendState>,
    expected: usize,
) -> Seen {
    let mut seen = Seen::new();
    let mut total = 0;
    while total < expected {
        let n = sub.next().await.expect("bus open").expect("not lagged");
        let status = n.payload.status();
        if status == BackendStatus::Scheduled {
            continue; // connect's own event, committed before the subscription
        }
        *seen.entry((n.key.expect("keyed"), status)).or_default() += 1;
        total += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_every_event_once_under_32_writers() {
    with_db(|db| async move {
        drone(&db).await;
        drone(&db).await;
        const WRITERS: usize = 32;
        const BACKENDS_PER_WRITER: usize = 3;
        let mut backends = Vec::new();
        for _ in 0..WRITERS * BACKENDS_PER_WRITER {
            backends.push(spawn(&db).await.backend_id);
        }
        let expected = backends.len() * lifecycle().len();

        let mut collectors = Vec::new();
        for _ in 0..3 {
            let sub = db.subscribe::<BackendState>().await.unwrap();
            collectors.push(tokio::spawn(collect_states(sub, expected)));
        }
        let mut all = db.subscribe_all_events().await.unwrap();

        let writers: Vec<_> = backends
            .chunks(BACKENDS_PER_WRITER)
            .map(|chunk| {
                let db = db.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    for backend in &chunk {
                        for state in lifecycle() {
                            assert!(db.backend().update_state(backend, &state).await.unwrap());
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }

        for collector in collectors {
            let seen = collector.await.unwrap();
            assert_eq!(seen.len(), expected, "every event received");
            assert!(seen.values().all(|&n| n == 1), "no event received twice");
        }
        let mut untyped = Seen::new();
        let mut total = 0;
        while total < expected {
            let event = all.next().await.unwrap().unwrap();
            if event.kind != "backend_state" || event.data["status"] == "scheduled" {
                continue;
            }
            let state: BackendState = serde_json::from_value(event.data.clone()).unwrap();
            *untyped
                .entry((event.key.clone().unwrap(), state.status()))
                .or_default() += 1;
            total += 1;
        }
        assert_eq!(untyped.len(), expected);
        assert!(untyped.values().all(|&n| n == 1));
        // Nothing more is pending for the untyped subscriber.
        assert!(tokio::time::timeout(Duration::from_millis(300), all.next())
            .await
            .is_err());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_live_when_it_returns() {
    with_db(|db| async move {
        for _ in 0..30 {
            let key = BackendName::new_random();
            let mut sub = db.subscribe_with_key::<BackendState>(&key).await.unwrap();
            let mut conn = db.pool().acquire().await.unwrap();
            emit(
                &mut conn,
                Some(&(key.as_str()).parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("event delivered")
                .unwrap()
                .unwrap();
            assert_eq!(n.payload, BackendState::Loading);
            assert_eq!(n.key.as_deref(), Some(key.as_str()));
        }
    })
    .await
}

async fn kill_listeners(db: &PlaneDatabase) -> u64 {
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and query ilike 'listen %plane_events%'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    killed.into_iter().filter(|k| *k).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_loses_nothing() {
    with_db(|db| async move {
        const WRITERS: usize = 8;
        const EVENTS_PER_WRITER: usize = 150;
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let db = db.clone();
                tokio::spawn(async move {
                    for i in 0..EVENTS_PER_WRITER {
                        let key = format!("w{w}-{i}");
                        let mut txn = db.pool().begin().await.unwrap();
                        emit(
                            &mut txn,
                            Some(&key.parse().unwrap()),
                            &BackendState::Loading,
                        )
                        .await
                        .unwrap();
                        txn.commit().await.unwrap();
                        if i % 10 == 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        let mut kills = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            kills += kill_listeners(&db).await;
        }
        for w in writers {
            w.await.unwrap();
        }
        assert!(
            kills >= 3,
            "the listening connection was killed ({kills} times)"
        );

        let mut seen: HashMap<String, usize> = HashMap::new();
        while seen.len() < WRITERS * EVENTS_PER_WRITER {
            let n = sub.next().await.unwrap().unwrap();
            *seen.entry(n.key.unwrap()).or_default() += 1;
        }
        assert!(seen.values().all(|&n| n == 1), "no duplicates");
        assert!(tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_events_are_delivered() {
    with_db(|db| async move {
        let mut sub = db
            .subscribe_with_key::<BackendState>(&name("k"))
            .await
            .unwrap();
        let mut txn = db.pool().begin().await.unwrap();
        emit(
            &mut txn,
            Some(&"k".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        txn.rollback().await.unwrap();
        let mut txn = db.pool().begin().await.unwrap();
        let id = emit(
            &mut txn,
            Some(&"k".parse().unwrap()),
            &BackendState::Starting,
        )
        .await
        .unwrap();
        txn.commit().await.unwrap();
        let n = sub.next().await.unwrap().unwrap();
        assert_eq!(n.payload, BackendState::Starting);
        assert_eq!(n.id, Some(id));
        assert!(tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_elsewhere_delays_nobody() {
    with_db(|db| async move {
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        // Holds an xid (it wrote) and stays open.
        let mut open = db.pool().begin().await.unwrap();
        emit(
            &mut open,
            Some(&"slow".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        let mut conn = db.pool().acquire().await.unwrap();
        emit(
            &mut conn,
            Some(&"fast".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .expect("not delayed by the open transaction")
            .unwrap()
            .unwrap();
        assert_eq!(n.key.as_deref(), Some("fast"));
        open.commit().await.unwrap();
        let n = sub.next().await.unwrap().unwrap();
        assert_eq!(n.key.as_deref(), Some("slow"), "delivered once it commits");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_since_an_id() {
    with_db(|db| async move {
        let mut conn = db.pool().acquire().await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                emit(
                    &mut conn,
                    Some(&(format!("k{i}")).parse().unwrap()),
                    &BackendState::Loading,
                )
                .await
                .unwrap(),
            );
        }
        let events = db.get_events_since(ids[1], 2).await.unwrap();
        let got: Vec<i64> = events.iter().filter_map(|e| e.id).collect();
        assert_eq!(got, [ids[2], ids[3]]);
        assert_eq!(events[0].kind, "backend_state");
        assert_eq!(events[0].key.as_deref(), Some("k2"));
        assert!(db.get_events_since(ids[4], 10).await.unwrap().is_empty());
        assert!(db.get_events_since(0, -1).await.is_err());
    })
    .await
}

fn small_queue_config() -> Config {
    Config {
        bus: BusConfig {
            max_pending_per_subscription: 5,
            ..BusConfig::default()
        },
        ..Config::default()
    }
}

/// On a current-thread runtime with a recorder local to this thread, so that the catch-up
/// metrics counted are this test's alone.
#[tokio::test(flavor = "current_thread")]
async fn a_lagging_subscription_catches_up_from_the_table() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    with_db_config(small_queue_config(), |db| async move {
        let mut sub = db
            .subscribe_with_key::<BackendState>(&name("k"))
            .await
            .unwrap();
        let mut conn = db.pool().acquire().await.unwrap();
        let mut written = Vec::new();
        for _ in 0..20 {
            written.push(
                emit(
                    &mut conn,
                    Some(&"k".parse().unwrap()),
                    &BackendState::Loading,
                )
                .await
                .unwrap(),
            );
            // Another key's events in between: the catch-up reads only this key's.
            emit(
                &mut conn,
                Some(&"other".parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
        }
        // Wait until the bus has read them all: the queue (5) overflowed long before.
        let mut probe = db
            .subscribe_with_key::<BackendState>(&name("probe"))
            .await
            .unwrap();
        emit(
            &mut conn,
            Some(&"probe".parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        probe.next().await.unwrap().unwrap();
        // One more after the pause: it comes after the catch-up, not before.
        written.push(
            emit(
                &mut conn,
                Some(&"k".parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap(),
        );

        let mut delivered = Vec::new();
        while delivered.len() < written.len() {
            match tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("the subscription delivers")
                .unwrap()
            {
                Ok(n) => {
                    assert_eq!(n.key.as_deref(), Some("k"));
                    delivered.push(n.id.unwrap());
                }
                Err(lagged) => panic!("stored events are caught up, not reported: {lagged}"),
            }
        }
        assert_eq!(delivered, written, "every event once, in order");
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(
            extra.is_err(),
            "nothing more: {:?}",
            extra.map(|e| e.map(|r| r.is_ok()))
        );
        // One catch-up, which read back the 15 events of "k" the full queue (5) did not
        // take, and the post-pause one if the bus had read it before the catch-up began.
        let page = handle.render();
        let value = |name: &str| {
            page.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        assert_eq!(
            value(plane_db::metrics::BUS_CATCH_UPS_TOTAL),
            Some(1.0),
            "{page}"
        );
        let caught_up = value(plane_db::metrics::BUS_EVENTS_CAUGHT_UP_TOTAL);
        assert!(matches!(caught_up, Some(15.0) | Some(16.0)), "{page}");
        assert!(
            !page.contains(plane_db::metrics::BUS_LAGGED_TOTAL),
            "{page}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_ephemeral_messages_are_reported() {
    with_db_config(small_queue_config(), |db| async move {
        let mut sub = db.subscribe_all_events().await.unwrap();
        let mut probe = db
            .subscribe_with_key::<BackendMetricsMessage>(&name("probe"))
            .await
            .unwrap();
        let send = |key: &str, data: &str| {
            format!(
                "select pg_notify('plane_ephemeral', \
                 '{{\"kind\":\"backend_metrics\",\"key\":{key},\"data\":{data}}}')"
            )
        };
        for n in 0..20 {
            let sql = send("null", &format!("{{\"n\":{n}}}"));
            sqlx::query(&sql).execute(db.pool()).await.unwrap();
        }
        // The listener receives messages in order: once the probe arrives, all 20 have been
        // dispatched.
        let metrics = r#"{"backend_id":"ba-probe","mem_used":1,"mem_total":1,"mem_active":1,"mem_inactive":1,"mem_unevictable":1,"mem_limit":1,"cpu_used":1,"sys_cpu":1}"#;
        sqlx::query(&send("\"probe\"", metrics))
            .execute(db.pool())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), probe.next())
            .await
            .expect("the probe arrives")
            .unwrap()
            .unwrap();
        // They are not stored, so what the queue (5) could not hold is reported (the probe
        // counts too: 21 in all).
        let mut delivered = 0;
        let mut missed = 0;
        while delivered + missed < 21 {
            match tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("the subscription answers")
                .unwrap()
            {
                Ok(_) => delivered += 1,
                Err(Lagged { missed: m }) => missed += m,
            }
        }
        assert_eq!((delivered, missed), (5, 16));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_end_when_the_database_is_dropped() {
    with_db(|db| async move {
        let mut sub = db.subscribe::<BackendState>().await.unwrap();
        drop(db);
        let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("ends");
        assert!(end.is_none());
    })
    .await
}

/// Wake-ups, not polling, carry events between processes and within one, whichever way the
/// writer wakes readers (coalesced after commit, or NOTIFY in its transaction): with a one-hour
/// poll interval, a lost wake-up would time this test out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_ups_reach_every_process_without_polling() {
    let no_polling = |coalesce_wakeups| Config {
        bus: BusConfig {
            poll_interval: Duration::from_secs(3600),
            coalesce_wakeups,
            ..BusConfig::default()
        },
        ..Config::default()
    };
    with_db_config(no_polling(true), |writer| async move {
        // Two more "processes" on the same database, each with its own bus: a reader, and a
        // writer that notifies in every transaction.
        let reader = PlaneDatabase::with_config(writer.pool().clone(), no_polling(true));
        let trigger_writer = PlaneDatabase::with_config(writer.pool().clone(), no_polling(false));
        drone(&writer).await;
        let mut elsewhere = reader.subscribe::<BackendState>().await.unwrap();
        let mut here = writer.subscribe::<BackendState>().await.unwrap();

        // Each change must arrive at both before the next is written: a later wake-up
        // would otherwise bring an earlier event along and hide a lost one.
        async fn arrives(subs: [&mut Subscription<BackendState>; 2], status: BackendStatus) {
            for sub in subs {
                let n = tokio::time::timeout(Duration::from_secs(10), sub.next())
                    .await
                    .expect("woken without polling")
                    .unwrap()
                    .unwrap();
                assert_eq!(n.payload.status(), status);
            }
        }
        let backend = spawn(&writer).await.backend_id;
        arrives([&mut elsewhere, &mut here], BackendStatus::Scheduled).await;
        writer
            .backend()
            .update_state(&backend, &BackendState::Loading)
            .await
            .unwrap();
        arrives([&mut elsewhere, &mut here], BackendStatus::Loading).await;
        trigger_writer
            .backend()
            .update_state(&backend, &BackendState::Starting)
            .await
            .unwrap();
        arrives([&mut elsewhere, &mut here], BackendStatus::Starting).await;
        let mut txn = writer.pool().begin().await.unwrap();
        emit(
            &mut txn,
            Some(&(backend.as_str()).parse().unwrap()),
            &BackendState::Loading,
        )
        .await
        .unwrap();
        txn.commit().await.unwrap();
        arrives([&mut elsewhere, &mut here], BackendStatus::Loading).await;
    })
    .await
}

/// The bus's tasks run on the runtime of the first subscription. When that runtime shuts
/// down, its subscriptions end (they do not hang), and a subscription made on another
/// runtime starts the bus again there and delivers.
#[test]
fn the_bus_outlives_the_runtime_that_started_it() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let (database, db, mut old_sub) = first.block_on(async {
        let database = plane_db::testing::create_database().await.unwrap();
        let db = plane_db::open_and_migrate(&database.url).await.unwrap();
        let sub = db.subscribe::<BackendState>().await.unwrap();
        (database, db, sub)
    });
    drop(first);

    runtime().block_on(async {
        let ended = tokio::time::timeout(Duration::from_secs(10), old_sub.next()).await;
        assert!(
            matches!(ended, Ok(None)),
            "a subscription of the runtime that shut down should end"
        );
        let mut sub = tokio::time::timeout(Duration::from_secs(30), db.subscribe::<BackendState>())
            .await
            .expect("subscribing again hangs")
            .unwrap();
        let key: plane_db::types::BackendName = "after-runtime".parse().unwrap();
        let mut conn = db.pool().acquire().await.unwrap();
        emit(&mut conn, Some(&key), &BackendState::Loading)
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("no event from the restarted bus")
            .expect("subscription ended")
            .expect("lagged");
        assert_eq!(next.key.as_deref(), Some("after-runtime"));
        drop(conn);
        db.pool().close().await;
        drop(db);
        database.drop_database().await.unwrap();
    });
}

/// A read's pages are bounded by bytes as well as rows (`BusConfig::max_page_bytes`): a
/// backlog of large and small events, in one transaction, read with pages of at most 7 rows
/// and 40,000 bytes, arrives whole, in id order, each event once (a page cut by bytes is
/// not taken for the end of the read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_by_bytes_and_lose_nothing() {
    let config = Config {
        bus: BusConfig {
            fetch_batch_size: 7,
            max_page_bytes: 40_000,
            ..BusConfig::default()
        },
        ..Config::default()
    };
    with_db_config(config, |db| async move {
        let mut sub = db.subscribe_all_events().await.unwrap();
        // 60 events, every third about 30 kB (random text, which does not compress).
        let ids: Vec<i64> = sqlx::query_scalar(
            "select unnest(plane_write_events(
                 array_agg('bytes_test'::text order by i),
                 array_agg('k' || i order by i),
                 array_agg(case when i % 3 = 0
                     then jsonb_build_object('blob', (select string_agg(md5(random()::text), '')
                                                      from generate_series(1, 1000 + i * 0)))
                     else jsonb_build_object('n', i) end order by i),
                 'notify'))
             from generate_series(1, 60) i",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(ids.len(), 60);
        let mut received = Vec::new();
        while received.len() < ids.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("the backlog did not arrive whole")
                .expect("subscription ended")
                .expect("lagged");
            received.push(event.id.unwrap());
        }
        assert_eq!(received, ids, "each event once, in id order");
        let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
        assert!(extra.is_err(), "an event delivered twice: {extra:?}");
    })
    .await
}
