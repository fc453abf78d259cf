//! Partitioned history: `event` and `backend_state` become partitioned in place (an older
//! schema migrated while writers and a subscriber run, its rows not rewritten), and what the
//! library does with the partitions (maintenance ahead of the sequence, retention by
//! dropping whole partitions).

use crate::common::*;
use plane_db::testing::create_database;
use plane_db::PlaneDatabase;
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The migration that partitions the history tables.
const PARTITIONED: i64 = 20_261_206_030_000;

/// The migrations of the build before partitioning (binary N's schema).
fn older_build() -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            plane_db::MIGRATOR
                .iter()
                .filter(|m| m.version < PARTITIONED)
                .cloned()
                .collect(),
        ),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

/// `relkind` and `relfilenode` of a table (the file its rows live in).
async fn relation(pool: &PgPool, name: &str) -> (String, i64) {
    sqlx::query_as(
        "select relkind::text, relfilenode::bigint from pg_class where oid = $1::regclass",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .expect("read pg_class")
}

/// The partitions of `table`: name and bounds as Postgres prints them, in order.
pub async fn partitions(pool: &PgPool, table: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "select c.relname::text, pg_get_expr(c.relpartbound, c.oid)
         from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = $1::regclass
         order by c.relname",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .expect("list partitions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_partitioned_in_place_while_writers_run() {
    const OLD_EVENTS: i64 = 100_000;
    let database = create_database().await.expect("create a test database");
    let pool = PgPool::connect(&database.url).await.expect("connect");
    older_build().run(&pool).await.expect("the older schema");
    let db = PlaneDatabase::new(pool.clone());
    tokio::time::timeout(TEST_TIMEOUT, async {
        drone(&db).await;
        let mut backends = Vec::new();
        for _ in 0..8 {
            backends.push(spawn(&db).await.backend_id);
        }
        exec(
            &db,
            &format!(
                "insert into event (kind, key, data, created_at)
                 select 'history', null, '{{}}', now() - interval '30 days'
                 from generate_series(1, {OLD_EVENTS})"
            ),
        )
        .await;
        exec(&db, "analyze event").await;
        let (kind, event_file) = relation(&pool, "event").await;
        assert_eq!(kind, "r");
        let (_, state_file) = relation(&pool, "backend_state").await;
        let events_before = count(&db, "event").await;
        let states_before = count(&db, "backend_state").await;
        let floor = db.latest_event_id().await.unwrap().unwrap_or(0);

        // Writers and a subscriber run through the migration.
        let mut all = db.subscribe_all_events().await.expect("subscribe");
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = backends
            .iter()
            .cloned()
            .map(|backend| {
                let db = db.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    for (written, state) in lifecycle().iter().take(5).cycle().enumerate() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // Forward transitions only: a repeated state is refused (false),
                        // which is fine; an error is not.
                        db.backend()
                            .update_state(&backend, state)
                            .await
                            .expect("update_state during the migration");
                        db.connect(&request(&format!("during-{}", written)))
                            .await
                            .expect("connect during the migration");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let report = plane_db::migrate(&pool).await.expect("migrate");
        let took = started.elapsed();
        assert_eq!(report.applied, vec![PARTITIONED]);
        println!("partitioned {events_before} events and {states_before} states in {took:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.expect("a writer never failed");
        }

        // The old tables are the first partitions, their files untouched.
        assert_eq!(relation(&pool, "event").await.0, "p");
        assert_eq!(
            relation(&pool, "event_p0").await,
            ("r".to_string(), event_file)
        );
        assert_eq!(relation(&pool, "backend_state").await.0, "p");
        assert_eq!(
            relation(&pool, "backend_state_p0").await,
            ("r".to_string(), state_file)
        );
        let parts = partitions(&pool, "event").await;
        assert_eq!(parts.len(), 4, "{parts:?}");
        assert!(parts
            .iter()
            .any(|(_, bound)| bound.contains("MAXVALUE") && !bound.contains("MINVALUE")));
        assert!(count(&db, "event").await >= events_before);
        assert!(count(&db, "backend_state").await >= states_before);

        // Every event written while it ran reached the subscriber, once.
        let written: Vec<i64> =
            sqlx::query_scalar("select id from event where id > $1 order by id")
                .bind(floor)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(!written.is_empty());
        let mut seen = HashSet::new();
        while seen.len() < written.len() {
            let event = tokio::time::timeout(Duration::from_secs(30), all.next())
                .await
                .expect("every event arrives")
                .expect("bus open")
                .expect("not lagged");
            if let Some(id) = event.id {
                assert!(seen.insert(id), "event {id} delivered twice");
            }
        }
        assert_eq!(seen, written.into_iter().collect::<HashSet<_>>());

        // The schema works as before for every path a controller uses (a controller started
        // after the migration: its bus starts from now).
        let after = PlaneDatabase::new(pool.clone());
        everyday_work(&after).await;
        bus_delivers_each_event_once(&after, 4).await;
    })
    .await
    .expect("test timed out");
    drop(db);
    pool.close().await;
    database.drop_database().await.expect("drop the database");
}

/// The sequence's last value moves to `last`.
async fn set_last(db: &PlaneDatabase, sequence: &str, last: i64) {
    exec(db, &format!("select setval('{sequence}', {last})")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_keeps_partitions_ahead_and_drops_whole_old_ones() {
    with_db(|db| async move {
        let config = plane_db::CleanupConfig {
            partition_rows: 100,
            partitions_ahead: 2,
            ..plane_db::CleanupConfig::default()
        };
        // A live backend (its history in the first backend_state partition) and old events.
        drone(&db).await;
        let live = spawn(&db).await.backend_id;
        let old = spawn(&db).await.backend_id;
        for state in lifecycle() {
            db.backend().update_state(&old, &state).await.unwrap();
        }
        exec(
            &db,
            &format!(
                "update backend set last_status_time = now() - interval '30 days' where id = '{old}'"
            ),
        )
        .await;
        exec(&db, "update event set created_at = now() - interval '30 days'").await;
        let old_events = count(&db, "event").await;

        // Writes have used up the first three partitions but the open-ended one.
        set_last(&db, "event_id_seq", 3_999_990).await;
        set_last(&db, "backend_state_id_seq", 1_999_999).await;
        exec(&db, "insert into event (kind, data) values ('recent', '{}')").await;
        let summary = db.run_cleanup(&config).await.unwrap();
        // Two partitions of 100 ids and a new open-ended one above each sequence... only the
        // event sequence needed them.
        assert_eq!(summary.partitions.partitions_created, 3, "{summary:?}");
        let parts: Vec<String> = partitions(db.pool(), "event")
            .await
            .into_iter()
            .map(|(_, bound)| bound)
            .collect();
        assert_eq!(
            parts,
            [
                "FOR VALUES FROM ('3000000') TO ('4000000')",
                "FOR VALUES FROM ('4000000') TO ('4000100')",
                "FOR VALUES FROM ('4000100') TO ('4000200')",
                "FOR VALUES FROM ('4000200') TO (MAXVALUE)",
            ],
            "the first partition (old events) and the empty one after it went"
        );
        assert_eq!(summary.partitions.event_partitions_dropped, 2);
        assert_eq!(summary.events as i64, old_events);
        assert_eq!(count(&db, "event").await, 1, "the recent event stays");
        // The old backend went with its history (row by row, with the backend); the live
        // backend's history keeps the first backend_state partition.
        assert_eq!(summary.backends.backends, 1);
        assert_eq!(summary.backends.states, 7);
        assert_eq!(summary.partitions.state_partitions_dropped, 0);
        assert_eq!(summary.partitions.state_partitions_kept, 1);
        assert_eq!(
            count(&db, &format!("backend_state where backend_id = '{live}'")).await,
            1,
            "the live backend's history is whole"
        );

        // Once the live backend is gone too, its partition goes.
        for state in lifecycle() {
            db.backend().update_state(&live, &state).await.unwrap();
        }
        exec(
            &db,
            "update backend set last_status_time = now() - interval '30 days'",
        )
        .await;
        let summary = db.run_cleanup(&config).await.unwrap();
        assert_eq!(summary.backends.backends, 1);
        assert_eq!(summary.partitions.state_partitions_dropped, 1, "{summary:?}");
        assert_eq!(summary.partitions.state_partitions_kept, 0);

        // A write beyond every partition created ahead (nothing maintained them) still
        // lands, in the open-ended partition; maintenance then gives that partition an upper
        // bound (room for two partitions above the sequence) and creates new ones above it.
        set_last(&db, "event_id_seq", 5_000_000).await;
        exec(&db, "insert into event (kind, data) values ('far', '{}')").await;
        assert_eq!(db.maintain_partitions(&config).await.unwrap(), 3);
        assert_eq!(count(&db, "event_p4000200").await, 1);
        let bounds = partitions(db.pool(), "event").await;
        assert!(
            bounds.contains(&(
                "event_p4000200".to_string(),
                "FOR VALUES FROM ('4000200') TO ('5000202')".to_string()
            )),
            "{bounds:?}"
        );
    })
    .await
}

/// The bounds of partition `name` of `table`, as Postgres prints them.
async fn bounds_of(db: &PlaneDatabase, table: &str, name: &str) -> String {
    partitions(db.pool(), table)
        .await
        .into_iter()
        .find(|(partition, _)| partition == name)
        .map(|(_, bounds)| bounds)
        .unwrap_or_else(|| panic!("{table} has no partition {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filled_open_ended_partition_is_split_while_writers_run_then_dropped_when_old() {
    with_db(|db| async move {
        // Room for 200,000 ids above the sequence: far more than the writer below inserts
        // while the split runs.
        let config = plane_db::CleanupConfig {
            partition_rows: 100_000,
            partitions_ahead: 2,
            event_min_age: Duration::from_secs(24 * 3600),
            ..plane_db::CleanupConfig::default()
        };
        // Nothing maintained the partitions: old events and a live backend's history are in
        // the open-ended partitions of a fresh database ([4M, MAXVALUE) for both tables).
        set_last(&db, "event_id_seq", 3_999_999).await;
        set_last(&db, "backend_state_id_seq", 3_999_999).await;
        drone(&db).await;
        let live = spawn(&db).await.backend_id;
        exec(
            &db,
            "insert into event (kind, data, created_at)
             select 'history', '{}', now() - interval '30 days' from generate_series(1, 20000)",
        )
        .await;
        let in_tail = count(&db, "event_p4000000").await;
        assert!(
            in_tail > 20_000,
            "the old events are in the open-ended partition"
        );
        assert_eq!(count(&db, "backend_state_p4000000").await, 1);

        // A writer inserts events, one transaction each, through the whole split.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let db = db.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut written = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    sqlx::query("insert into event (kind, data) values ('during', '{}')")
                        .execute(db.pool())
                        .await
                        .expect("an insert during the split");
                    written += 1;
                }
                written
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let summary = db.run_cleanup(&config).await.expect("cleanup splits");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        let written = writer.await.expect("the writer");
        assert!(written > 0);
        assert_eq!(summary.partitions.tails_split, 2, "{summary:?}");
        assert_eq!(summary.partitions.partitions_created, 6, "{summary:?}");
        // (The empty partitions below it went: their ids were all handed out.)
        assert_eq!(summary.partitions.events_dropped, 0, "{summary:?}");

        // The old open-ended partitions now end above their sequences, with nothing moved;
        // every event written is there, and the split's CHECK is gone.
        let event_bounds = bounds_of(&db, "event", "event_p4000000").await;
        let upper: i64 = event_bounds
            .trim_start_matches("FOR VALUES FROM ('4000000') TO ('")
            .trim_end_matches("')")
            .parse()
            .unwrap_or_else(|_| panic!("an upper bound: {event_bounds}"));
        let last: i64 = sqlx::query_scalar("select last_value from event_id_seq")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(
            upper > last && upper <= last + 200_001,
            "{upper} against {last}"
        );
        assert_eq!(
            count(&db, "event").await,
            20_000 + i64::try_from(written).unwrap() + (in_tail - 20_000),
            "no event lost or moved out"
        );
        let tails: Vec<String> = partitions(db.pool(), "event")
            .await
            .into_iter()
            .map(|(_, bounds)| bounds)
            .filter(|bounds| bounds.ends_with("TO (MAXVALUE)"))
            .collect();
        assert_eq!(
            tails,
            [format!(
                "FOR VALUES FROM ('{}') TO (MAXVALUE)",
                upper + 200_000
            )]
        );
        let state_bounds = bounds_of(&db, "backend_state", "backend_state_p4000000").await;
        assert!(
            state_bounds.starts_with("FOR VALUES FROM ('4000000') TO ('"),
            "{state_bounds}"
        );
        assert!(!state_bounds.contains("MAXVALUE"), "{state_bounds}");
        exec(&db, "insert into event (kind, data) values ('after', '{}')").await;
        assert_eq!(
            count(&db, "event where kind = 'after' and id >= 4000000").await,
            1
        );

        // Retention drops the split partition once its ids are all handed out and its newest
        // event is old; the live backend's history keeps its state partition.
        exec(
            &db,
            "update event set created_at = now() - interval '30 days'",
        )
        .await;
        set_last(&db, "event_id_seq", upper + 10).await;
        set_last(&db, "backend_state_id_seq", upper + 10).await;
        exec(
            &db,
            "insert into event (kind, data) values ('recent', '{}')",
        )
        .await;
        let summary = db.run_cleanup(&config).await.expect("cleanup drops");
        assert_eq!(summary.partitions.tails_split, 0, "{summary:?}");
        assert!(
            summary.partitions.event_partitions_dropped >= 1,
            "{summary:?}"
        );
        assert!(
            partitions(db.pool(), "event")
                .await
                .iter()
                .all(|(name, _)| name != "event_p4000000"),
            "the split partition was dropped"
        );
        assert_eq!(count(&db, "event").await, 1, "only the recent event stays");
        assert_eq!(
            count(&db, &format!("backend_state where backend_id = '{live}'")).await,
            1,
            "the live backend's history is whole"
        );
        assert!(summary.partitions.state_partitions_kept >= 1, "{summary:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_that_died_half_way_leaves_no_bound_behind() {
    with_db(|db| async move {
        let config = plane_db::CleanupConfig {
            partition_rows: 100,
            partitions_ahead: 2,
            ..plane_db::CleanupConfig::default()
        };
        let split_checks = || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from pg_constraint where conname = 'plane_split_bound'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap()
        };
        // A split's first step (the CHECK) ran on the empty open-ended partition, then the
        // process died. Maintenance finds the CHECK and drops it, then moves the partition up.
        exec(
            &db,
            "alter table event_p4000000 add constraint plane_split_bound
             check (id >= 4000000 and id < 4000010) not valid",
        )
        .await;
        set_last(&db, "event_id_seq", 3_999_990).await;
        db.maintain_partitions(&config).await.expect("maintenance");
        assert_eq!(split_checks().await, 0);
        set_last(&db, "event_id_seq", 4_000_020).await;
        exec(&db, "insert into event (kind, data) values ('lands', '{}')").await;

        // The same after writes reached the partition: the next cleanup finishes a split.
        exec(
            &db,
            "alter table event_p4000200 add constraint plane_split_bound
             check (id >= 4000200 and id < 4000300) not valid",
        )
        .await;
        set_last(&db, "event_id_seq", 4_000_250).await;
        exec(&db, "insert into event (kind, data) values ('lands', '{}')").await;
        set_last(&db, "event_id_seq", 4_000_299).await;
        let refused = sqlx::query("insert into event (kind, data) values ('refused', '{}')")
            .execute(db.pool())
            .await;
        assert!(refused.is_err(), "the CHECK is in force: {refused:?}");
        let summary = db.run_cleanup(&config).await.expect("cleanup");
        assert_eq!(summary.partitions.tails_split, 1, "{summary:?}");
        assert_eq!(split_checks().await, 0);
        let bounds = bounds_of(&db, "event", "event_p4000200").await;
        assert_eq!(bounds, "FOR VALUES FROM ('4000200') TO ('4000501')");
        set_last(&db, "event_id_seq", 4_000_900).await;
        exec(&db, "insert into event (kind, data) values ('lands', '{}')").await;
        assert_eq!(count(&db, "event where kind = 'lands'").await, 3);
    })
    .await
}
