//! Group commit's lone and batch statements write the same rows (issue 24, item 2).
//!
//! `connect` and `update_state` each have two statements for one write: one for a call
//! written alone, one for a batch. Each test here gives the same calls to three fresh
//! databases (alone, one batch of all, batches of one) and compares every row of every
//! table afterwards (all columns, found from the catalog, so a new column or table is
//! compared without touching this file), and what each statement answered. Times are the
//! one thing the paths cannot share (each statement has its own `now()`): timestamp and
//! `xid8` columns are left out of the rows and compared apart, as offsets from the
//! backend's creation.
//!
//! The items come from the crate's own constructors (`plane_db::testing::statements`), which
//! set every field: a field the lone statement writes and the batch one does not (or the
//! other way round) is a difference in some row here.

use crate::common::*;
use plane_db::connect::ConnectRequest;
use plane_db::node::NodeRegistration;
use plane_db::testing::statements::{self, Written};
use plane_db::testing::{create_database, TestDatabase};
use plane_db::types::{
    BackendName, BackendState, ClusterName, ControllerName, DronePoolName, KeyConfig, NodeKind,
};
use plane_db::PlaneDatabase;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

const WAYS: [Written; 3] = [Written::Alone, Written::OneBatch, Written::BatchesOfOne];

/// A fresh, migrated database of its own (the comparison needs one per way of writing).
async fn fresh() -> (PlaneDatabase, TestDatabase) {
    let database = create_database().await.expect("create a test database");
    let pool = plane_db::open(&database.url)
        .await
        .expect("connect to the test database")
        .pool()
        .clone();
    plane_db::MIGRATOR.run(&pool).await.expect("migrate");
    (
        PlaneDatabase::with_config(pool, plane_db::Config::default()),
        database,
    )
}

async fn drop_fresh(db: PlaneDatabase, database: TestDatabase) {
    db.pool().close().await;
    database
        .drop_database()
        .await
        .expect("drop the test database");
}

fn other_cluster() -> ClusterName {
    "other.test".parse().expect("valid cluster")
}

/// The same drones in every database, by name: one eligible drone per cluster and pool used
/// (so that every statement has one choice), and an unready one beside the default pool's.
async fn drones(db: &PlaneDatabase) {
    let controller: ControllerName = "co-fixture".parse().expect("valid name");
    db.controller()
        .heartbeat(&controller, true, "0.1.0", "abc")
        .await
        .expect("controller heartbeat");
    for (name, cluster, pool, ready) in [
        ("dr-default", cluster(), "", true),
        ("dr-unready", cluster(), "", false),
        ("dr-gpu", cluster(), "gpu", true),
        ("dr-other", other_cluster(), "", true),
    ] {
        let id = db
            .node()
            .register(&NodeRegistration {
                controller: &controller,
                kind: NodeKind::Drone,
                name,
                cluster: Some(&cluster),
                plane_version: "0.1.0",
                plane_hash: "abc",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await
            .expect("register node")
            .id;
        db.drone()
            .register(id, ready, &DronePoolName::from(pool))
            .await
            .expect("register drone");
    }
}

/// A request for backend `id` under key `key`.
fn named(key: &str, id: &str) -> ConnectRequest {
    request_named(key, &id.parse::<BackendName>().expect("valid name"))
}

/// The request with every optional field of the spawn config set (none at its default).
fn everything(key: &str, id: &str) -> ConnectRequest {
    let mut req = named(key, id);
    req.key = Some(KeyConfig {
        name: key.to_string(),
        namespace: "ns-full".to_string(),
        tag: "v2".to_string(),
    });
    req.user = Some("bob".to_string());
    req.auth = serde_json::json!({"role": "admin", "n": 3})
        .as_object()
        .cloned()
        .expect("an object");
    if let Some(spawn) = req.spawn_config.as_mut() {
        spawn.executable =
            serde_json::json!({"image": "ghcr.io/example/full:2", "env": {"A": "1"}});
        spawn.lifetime_limit_seconds = Some(3600);
        spawn.max_idle_seconds = Some(90);
        spawn.subdomain = Some("full-sub".parse().expect("valid subdomain"));
    }
    req
}

fn in_pool(mut req: ConnectRequest, pool: &str) -> ConnectRequest {
    if let Some(spawn) = req.spawn_config.as_mut() {
        spawn.pool = DronePoolName::from(pool);
    }
    req
}

/// Every row of every table (but the migrations' and the bus's incarnation marker), by
/// table, as JSON without the timestamp and `xid8` columns, the spawn actions' deadlines
/// replaced by a marker (they are compared in [`times`]), sorted.
async fn rows(db: &PlaneDatabase) -> BTreeMap<String, Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables
         where table_schema = current_schema() and table_type = 'BASE TABLE'
           and table_name not in ('_sqlx_migrations', 'plane_server_incarnation')
         order by 1",
    )
    .fetch_all(db.pool())
    .await
    .expect("list tables");
    assert!(tables.len() >= 8, "{tables:?}");
    let mut all = BTreeMap::new();
    for table in tables {
        let times: Vec<String> = sqlx::query_scalar(
            "select column_name::text from information_schema.columns
             where table_schema = current_schema() and table_name = $1
               and (data_type like 'timestamp%' or udt_name in ('xid8', 'xid'))",
        )
        .bind(&table)
        .fetch_all(db.pool())
        .await
        .expect("list columns");
        let found: Vec<Value> =
            sqlx::query_scalar(&format!("select to_jsonb(t) - $1::text[] from {table} t"))
                .bind(&times)
                .fetch_all(db.pool())
                .await
                .expect("read rows");
        let mut found: Vec<String> = found
            .into_iter()
            .map(|mut row| {
                mark_deadlines(&mut row);
                row.to_string()
            })
            .collect();
        found.sort();
        all.insert(table, found);
    }
    all
}

/// Replaces every `deadlines` object (the spawn action's, in its row and in its event) by a
/// marker: they are times, compared in [`times`].
fn mark_deadlines(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "deadlines" {
                    *inner = Value::from("compared apart");
                } else {
                    mark_deadlines(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mark_deadlines),
        _ => {}
    }
}

/// The times each spawn statement derives from its `now()`, per backend, as seconds after
/// the backend's creation (`last_keepalive`, set to `now()` by both and by no state change):
/// its expiration, its key's lease, its tokens' expiry and its spawn action's deadlines.
async fn times(db: &PlaneDatabase) -> Vec<String> {
    sqlx::query_scalar(
        r#"
        select jsonb_build_object(
            'backend', b.id,
            'expiration', extract(epoch from b.expiration_time - b.last_keepalive),
            'lease', (select extract(epoch from k.expires_at - b.last_keepalive)
                      from backend_key k where k.id = b.id),
            'tokens', (select jsonb_agg(extract(epoch from t.expiration_time - b.last_keepalive)
                                        order by t.token_digest)
                       from token t where t.backend_id = b.id),
            'deadlines', (select jsonb_object_agg(d.key,
                              round((d.value::text::numeric
                                     - extract(epoch from b.last_keepalive) * 1000) / 1000, 1))
                          from backend_action a,
                               jsonb_each(a.action -> 'Spawn' -> 'key' -> 'deadlines') d
                          where a.backend_id = b.id)
        )::text
        from backend b
        order by b.id
        "#,
    )
    .fetch_all(db.pool())
    .await
    .expect("read times")
}

/// What one way of writing left: its rows by table ([`rows`]), its [`times`] and the
/// statements' answers.
type Run<T> = (Written, BTreeMap<String, Vec<String>>, Vec<String>, T);

/// Compares each way's rows, times and answers with the lone statement's, table by table.
fn assert_same<T: std::fmt::Debug + PartialEq>(runs: &[Run<T>]) {
    let (_, lone_rows, lone_times, lone_answers) = &runs[0];
    for (way, rows, times, answers) in &runs[1..] {
        assert_eq!(answers, lone_answers, "answers: {way:?} against alone");
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            lone_rows.keys().collect::<Vec<_>>()
        );
        for (table, lone) in lone_rows {
            assert_eq!(&rows[table], lone, "table {table}: {way:?} against alone");
        }
        assert_eq!(times, lone_times, "times: {way:?} against alone");
    }
}

/// Backends created before the compared calls (the same in every database), each alone.
async fn earlier_backends(db: &PlaneDatabase) {
    let answers = statements::spawn(
        db,
        &[named("held", "pre-held"), named("expired", "pre-expired")],
        Written::Alone,
    )
    .await
    .expect("earlier backends");
    assert!(
        answers.iter().all(|a| a.starts_with("Created")),
        "{answers:?}"
    );
    exec(
        db,
        "update backend_key set expires_at = now() - interval '1 hour' where id = 'pre-expired'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_statements_write_the_same_rows_alone_and_batched() {
    let requests = vec![
        named("plain", "plain"),
        everything("full", "full"),
        {
            let mut req = named("static", "static");
            if let Some(spawn) = req.spawn_config.as_mut() {
                spawn.use_static_token = true;
            }
            req
        },
        in_pool(named("gpu", "gpu"), "gpu"),
        in_pool(named("nowhere", "nowhere"), "none"),
        named("held", "held"),
        named("expired", "expired"),
        {
            let mut req = named("elsewhere", "elsewhere");
            if let Some(spawn) = req.spawn_config.as_mut() {
                spawn.cluster = Some(other_cluster());
            }
            req
        },
    ];
    let mut runs = Vec::new();
    for way in WAYS {
        let (db, database) = fresh().await;
        tokio::time::timeout(TEST_TIMEOUT, async {
            drones(&db).await;
            earlier_backends(&db).await;
            let answers = statements::spawn(&db, &requests, way)
                .await
                .expect("spawn statements");
            runs.push((way, rows(&db).await, times(&db).await, answers));
        })
        .await
        .expect("test timed out");
        drop_fresh(db, database).await;
    }
    // What the calls did, so that the comparison compares something: six created (one on
    // an expired key), one without a drone, one on a held key.
    let answers = &runs[0].3;
    assert_eq!(
        answers
            .iter()
            .map(|a| a.split([' ', '{']).next().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["Created", "Created", "Created", "Created", "NoDrone", "KeyHeld", "Created", "Created"],
        "{answers:?}"
    );
    let lone_rows = &runs[0].1;
    assert_eq!(lone_rows["backend"].len(), 8, "two earlier, six new");
    assert_eq!(lone_rows["backend_action"].len(), 8);
    assert_eq!(
        lone_rows["token"].len(),
        7,
        "no token for the static backend"
    );
    assert_eq!(
        lone_rows["event"].len(),
        4 + 2 * 8,
        "a drone's connection each, a state and an action event per backend"
    );
    assert_same(&runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_statements_write_the_same_rows_alone_and_batched() {
    let ids = ["s1", "s2", "s3", "s4", "s5"];
    let states = lifecycle();
    let [loading, _starting, waiting, ready, _terminating, terminated] = states.as_slice() else {
        panic!("six states after scheduled");
    };
    let name = |id: &str| id.parse::<BackendName>().expect("valid name");
    // Two rounds over the same backends (distinct in each round, as in a batch): forward
    // changes with and without an address, a termination (which releases the key), a
    // change that is not forward, and an unknown backend.
    let rounds: Vec<Vec<(BackendName, BackendState)>> = vec![
        vec![
            (name("s1"), loading.clone()),
            (name("s2"), waiting.clone()),
            (name("s3"), ready.clone()),
            (name("s4"), terminated.clone()),
            (name("unknown"), loading.clone()),
        ],
        vec![
            (name("s1"), ready.clone()),
            (name("s2"), loading.clone()),
            (name("s3"), terminated.clone()),
            (name("s4"), ready.clone()),
            (name("s5"), BackendState::Scheduled),
        ],
    ];
    let mut runs = Vec::new();
    for way in WAYS {
        let (db, database) = fresh().await;
        tokio::time::timeout(TEST_TIMEOUT, async {
            drones(&db).await;
            let created: Vec<ConnectRequest> = ids.iter().map(|id| named(id, id)).collect();
            statements::spawn(&db, &created, Written::Alone)
                .await
                .expect("backends");
            let mut answers = Vec::new();
            for changes in &rounds {
                answers.push(
                    statements::update_state(&db, changes, way)
                        .await
                        .expect("state statements"),
                );
            }
            runs.push((way, rows(&db).await, times(&db).await, answers));
        })
        .await
        .expect("test timed out");
        drop_fresh(db, database).await;
    }
    let yes = Some(true);
    let no = Some(false);
    assert_eq!(
        runs[0].3,
        [vec![yes, yes, yes, yes, no], vec![yes, no, yes, no, no]]
    );
    let lone_rows = &runs[0].1;
    assert_eq!(
        lone_rows["backend_state"].len(),
        5 + 6,
        "one per creation and change"
    );
    assert_eq!(lone_rows["backend_key"].len(), 3, "two released");
    assert_same(&runs);
}
