//! The size limits of `plane_db::limits`: for each caller-supplied text and JSON, a value at
//! its limit is accepted and stored verbatim, one byte over is refused with
//! `InvalidArgument` naming the argument, its size and the limit, and nothing is written.

use crate::common::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectRequest;
use plane_db::events::{emit, NotificationPayload};
use plane_db::limits;
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendAction, BearerToken, ControllerName, DroneName, DronePoolName, KeyConfig, NodeKind,
    ProxyName,
};
use plane_db::{ConnectError, Error, PlaneDatabase};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

/// The tables any call could write to.
const TABLES: [&str; 8] = [
    "backend",
    "backend_key",
    "backend_state",
    "backend_action",
    "token",
    "event",
    "node",
    "controller",
];

/// Row counts of every table a call could write to.
async fn counts(db: &PlaneDatabase) -> Vec<(&'static str, i64)> {
    let mut all = Vec::new();
    for table in TABLES {
        all.push((table, count(db, table).await));
    }
    all
}

/// Asserts `e` is the refusal of `argument` at `size` bytes over `limit`.
fn assert_too_large(e: &Error, argument: &str, size: usize, limit: usize) {
    match e {
        Error::InvalidArgument {
            argument: a,
            reason,
        } => {
            assert_eq!(*a, argument, "{reason}");
            assert!(
                reason.starts_with(&format!(
                    "is {size} bytes, more than the limit of {limit} bytes (plane_db::limits::"
                )),
                "{argument}: {reason}"
            );
        }
        other => panic!("{argument}: expected InvalidArgument, got {other:?}"),
    }
}

fn connect_refusal(r: Result<plane_db::connect::ConnectResponse, ConnectError>) -> Error {
    match r {
        Err(ConnectError::Other(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// `len` bytes of non-ASCII text (each 'ü' is 2 bytes; an odd length ends in 'x'), so that
/// the limits are seen to count bytes.
fn text(len: usize) -> String {
    let mut s = "ü".repeat(len / 2);
    if len % 2 == 1 {
        s.push('x');
    }
    assert_eq!(s.len(), len);
    s
}

/// `len` bytes of text that does not compress (so that it stays `len` bytes in an index
/// row), different for each `seed`.
fn incompressible(len: usize, seed: u32) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
                    [x as usize % 64],
            )
        })
        .collect()
}

/// A JSON object whose compact serialization is exactly `len` bytes.
fn object(len: usize) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("a".into(), Value::String(String::new()));
    let overhead = serde_json::to_string(&map).unwrap().len();
    map.insert("a".into(), Value::String(text(len - overhead)));
    assert_eq!(serde_json::to_string(&map).unwrap().len(), len);
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_stores_each_input_at_its_limit_and_refuses_one_byte_more() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("");
        req.key = Some(KeyConfig {
            name: text(limits::KEY_NAME_BYTES),
            namespace: text(limits::KEY_NAMESPACE_BYTES),
            tag: text(limits::KEY_TAG_BYTES),
        });
        req.user = Some(text(limits::USER_BYTES));
        req.auth = object(limits::AUTH_BYTES);
        req.spawn_config.as_mut().unwrap().executable =
            Value::Object(object(limits::EXECUTABLE_BYTES));
        let resp = db.connect(&req).await.unwrap();
        assert!(resp.spawned);

        // Stored verbatim: the key, the token's user and auth, the spawn action's executable.
        let key = req.key.clone().unwrap();
        let (name, namespace, tag): (String, String, String) =
            sqlx::query_as("select key_name, namespace, tag from backend_key where id = $1")
                .bind(resp.backend_id.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((name, namespace, tag), (key.name, key.namespace, key.tag));
        let (user, auth): (Option<String>, Value) =
            sqlx::query_as("select username, auth from token where token_digest = $1")
                .bind(resp.token.digest())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(user, req.user);
        assert_eq!(auth, Value::Object(req.auth.clone()));
        let pending = db
            .backend_action()
            .pending(drone_id(&db).await, 10)
            .await
            .unwrap();
        match &pending[0].action {
            BackendAction::Spawn { executable, .. } => {
                assert_eq!(executable, &req.spawn_config.as_ref().unwrap().executable)
            }
            other => panic!("{other:?}"),
        }
        // The reconnect path takes them too.
        let again = db.connect(&req).await.unwrap();
        assert_eq!(again.backend_id, resp.backend_id);

        // The key's name and namespace at their limits fit its unique index even when they do
        // not compress (Postgres refuses an index row over about 2,700 bytes).
        let mut dense = request("");
        dense.key = Some(KeyConfig {
            name: incompressible(limits::KEY_NAME_BYTES, 0x2545_f491),
            namespace: incompressible(limits::KEY_NAMESPACE_BYTES, 0x9e37_79b9),
            tag: incompressible(limits::KEY_TAG_BYTES, 0x85eb_ca6b),
        });
        let first = db.connect(&dense).await.unwrap();
        assert!(first.spawned);
        let found = db
            .key()
            .lookup(dense.key.as_ref().unwrap())
            .await
            .unwrap()
            .expect("held");
        assert_eq!(&found.key, dense.key.as_ref().unwrap());
        assert_eq!(
            db.connect(&dense).await.unwrap().backend_id,
            first.backend_id
        );

        // One byte over, one input at a time: refused, naming it, and nothing written.
        let before = counts(&db).await;
        type Edit = fn(&mut ConnectRequest);
        let over: [(&str, usize, usize, Edit); 7] = [
            (
                "key.name",
                limits::KEY_NAME_BYTES + 1,
                limits::KEY_NAME_BYTES,
                |r| r.key.as_mut().unwrap().name = text(limits::KEY_NAME_BYTES + 1),
            ),
            (
                "key.namespace",
                limits::KEY_NAMESPACE_BYTES + 1,
                limits::KEY_NAMESPACE_BYTES,
                |r| r.key.as_mut().unwrap().namespace = text(limits::KEY_NAMESPACE_BYTES + 1),
            ),
            (
                "key.tag",
                limits::KEY_TAG_BYTES + 1,
                limits::KEY_TAG_BYTES,
                |r| r.key.as_mut().unwrap().tag = text(limits::KEY_TAG_BYTES + 1),
            ),
            ("user", limits::USER_BYTES + 1, limits::USER_BYTES, |r| {
                r.user = Some(text(limits::USER_BYTES + 1))
            }),
            ("auth", limits::AUTH_BYTES + 1, limits::AUTH_BYTES, |r| {
                r.auth = object(limits::AUTH_BYTES + 1)
            }),
            (
                "spawn_config.executable",
                limits::EXECUTABLE_BYTES + 1,
                limits::EXECUTABLE_BYTES,
                |r| {
                    r.spawn_config.as_mut().unwrap().executable =
                        Value::Object(object(limits::EXECUTABLE_BYTES + 1))
                },
            ),
            (
                "spawn_config.pool",
                limits::DRONE_POOL_BYTES + 1,
                limits::DRONE_POOL_BYTES,
                |r| {
                    r.spawn_config.as_mut().unwrap().pool =
                        DronePoolName::from(text(limits::DRONE_POOL_BYTES + 1))
                },
            ),
        ];
        for (argument, size, limit, edit) in over {
            // On a fresh key (the spawn path) and on the held key (the reconnect path), and
            // without a spawn config (the read-only path) where the input is not in it.
            let mut fresh = request(&format!("fresh-{argument}"));
            edit(&mut fresh);
            let mut held = req.clone();
            edit(&mut held);
            let mut read_only = held.clone();
            read_only.spawn_config = None;
            let mut attempts = vec![fresh, held];
            if !argument.starts_with("spawn_config") {
                attempts.push(read_only);
            }
            for attempt in attempts {
                let e = connect_refusal(db.connect(&attempt).await);
                assert_too_large(&e, argument, size, limit);
            }
        }
        assert_eq!(counts(&db).await, before, "nothing was written");

        // A request without a key is checked the same way.
        let mut keyless = request("");
        keyless.key = None;
        keyless.user = Some(text(limits::USER_BYTES + 1));
        let e = connect_refusal(db.connect(&keyless).await);
        assert_too_large(&e, "user", limits::USER_BYTES + 1, limits::USER_BYTES);
        assert_eq!(counts(&db).await, before, "nothing was written");
    })
    .await
}

/// The id of the only drone.
async fn drone_id(db: &PlaneDatabase) -> plane_db::types::NodeId {
    let id: i32 = sqlx::query_scalar("select id from drone")
        .fetch_one(db.pool())
        .await
        .unwrap();
    plane_db::types::NodeId::from(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_at_its_limit_is_stored_and_scheduled_and_one_byte_more_is_refused() {
    with_db(|db| async move {
        let pool = DronePoolName::from(text(limits::DRONE_POOL_BYTES));
        let d = drone_in(&db, &cluster(), &pool).await;
        assert_eq!(db.drone().pool(d.id).await.unwrap(), pool);
        let found = db
            .drone()
            .drones_for_pool(&cluster(), &pool, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        let mut req = request("pooled");
        req.spawn_config.as_mut().unwrap().pool = pool.clone();
        let resp = db.connect(&req).await.unwrap();
        assert_eq!(resp.drone.as_ref(), Some(&d.name));

        let before = counts(&db).await;
        let long = DronePoolName::from(text(limits::DRONE_POOL_BYTES + 1));
        let (size, limit) = (limits::DRONE_POOL_BYTES + 1, limits::DRONE_POOL_BYTES);
        let e = db.drone().register(d.id, true, &long).await.unwrap_err();
        assert_too_large(&e, "pool", size, limit);
        assert_eq!(db.drone().pool(d.id).await.unwrap(), pool, "pool unchanged");
        let e = db
            .drone()
            .drones_for_pool(&cluster(), &long, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_too_large(&e, "pool", size, limit);
        let e = db
            .drone()
            .pick_for_spawn(&cluster(), &long)
            .await
            .unwrap_err();
        assert_too_large(&e, "pool", size, limit);
        assert_eq!(counts(&db).await, before, "nothing was written");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lookups_and_revoke_take_inputs_at_their_limits_and_refuse_longer() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("");
        let key = KeyConfig {
            name: text(limits::KEY_NAME_BYTES),
            namespace: text(limits::KEY_NAMESPACE_BYTES),
            tag: String::new(),
        };
        req.key = Some(key.clone());
        req.user = Some(text(limits::USER_BYTES));
        let resp = db.connect(&req).await.unwrap();
        let found = db.key().lookup(&key).await.unwrap().expect("held");
        assert_eq!(found.backend_id, resp.backend_id);
        assert_eq!(found.key.name, key.name);

        let before = counts(&db).await;
        for (argument, long, limit) in [
            (
                "key.name",
                KeyConfig {
                    name: text(limits::KEY_NAME_BYTES + 1),
                    ..key.clone()
                },
                limits::KEY_NAME_BYTES,
            ),
            (
                "key.namespace",
                KeyConfig {
                    namespace: text(limits::KEY_NAMESPACE_BYTES + 1),
                    ..key.clone()
                },
                limits::KEY_NAMESPACE_BYTES,
            ),
        ] {
            let e = db.key().lookup(&long).await.unwrap_err();
            assert_too_large(&e, argument, limit + 1, limit);
        }
        let e = db
            .revoke(&resp.backend_id, &text(limits::USER_BYTES + 1))
            .await
            .unwrap_err();
        assert_too_large(&e, "user", limits::USER_BYTES + 1, limits::USER_BYTES);
        assert_eq!(counts(&db).await, before, "nothing was revoked");
        let revoked = db
            .revoke(&resp.backend_id, req.user.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(revoked, 1, "the user at its limit matches verbatim");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_hashes_node_names_and_txt_values_at_their_limits_and_over() {
    with_db(|db| async move {
        let cluster = cluster();
        let (version, hash) = (
            text(limits::PLANE_VERSION_BYTES),
            text(limits::PLANE_HASH_BYTES),
        );
        let controller = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, &version, &hash)
            .await
            .unwrap();
        let stored: (String, String) =
            sqlx::query_as("select plane_version, plane_hash from controller where id = $1")
                .bind(controller.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(stored, (version.clone(), hash.clone()));

        let proxy = ProxyName::new_random();
        let registration = NodeRegistration {
            controller: &controller,
            kind: NodeKind::Proxy,
            name: proxy.as_str(),
            cluster: Some(&cluster),
            plane_version: &version,
            plane_hash: &hash,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let node = db.node().register(&registration).await.unwrap().id;
        let stored: (String, String) =
            sqlx::query_as("select plane_version, plane_hash from node where id = $1")
                .bind(node.as_i32())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(stored, (version.clone(), hash.clone()));

        // The longest node name is looked up; a longer one is refused.
        let longest = format!("dr-{}", "a".repeat(limits::NODE_NAME_BYTES - 3));
        assert!(longest.parse::<DroneName>().is_ok());
        assert_eq!(
            db.node().id_of(Some(&cluster), &longest).await.unwrap(),
            None
        );

        let txt = text(limits::ACME_TXT_VALUE_BYTES);
        assert!(db.acme().lease(&cluster, node).await.unwrap());
        assert!(db.acme().set_txt(&cluster, node, &txt).await.unwrap());
        assert_eq!(
            db.acme().txt(&cluster).await.unwrap().as_deref(),
            Some(txt.as_str())
        );

        // One byte over each: refused, and nothing written or changed.
        let before = counts(&db).await;
        let (long_version, long_hash) = (
            text(limits::PLANE_VERSION_BYTES + 1),
            text(limits::PLANE_HASH_BYTES + 1),
        );
        let other = ControllerName::new_random();
        let e = db
            .controller()
            .heartbeat(&other, true, &long_version, &hash)
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "plane_version",
            limits::PLANE_VERSION_BYTES + 1,
            limits::PLANE_VERSION_BYTES,
        );
        let e = db
            .controller()
            .heartbeat(&controller, true, &version, &long_hash)
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "plane_hash",
            limits::PLANE_HASH_BYTES + 1,
            limits::PLANE_HASH_BYTES,
        );
        let e = db
            .node()
            .register(&NodeRegistration {
                plane_version: &long_version,
                ..registration
            })
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "plane_version",
            limits::PLANE_VERSION_BYTES + 1,
            limits::PLANE_VERSION_BYTES,
        );
        let e = db
            .node()
            .register(&NodeRegistration {
                plane_hash: &long_hash,
                ..registration
            })
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "plane_hash",
            limits::PLANE_HASH_BYTES + 1,
            limits::PLANE_HASH_BYTES,
        );
        let e = db
            .node()
            .id_of(Some(&cluster), &format!("{longest}a"))
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "name",
            limits::NODE_NAME_BYTES + 1,
            limits::NODE_NAME_BYTES,
        );
        let e = db
            .acme()
            .set_txt(&cluster, node, &text(limits::ACME_TXT_VALUE_BYTES + 1))
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "value",
            limits::ACME_TXT_VALUE_BYTES + 1,
            limits::ACME_TXT_VALUE_BYTES,
        );
        assert_eq!(counts(&db).await, before, "nothing was written");
        let stored: (String, String) =
            sqlx::query_as("select plane_version, plane_hash from controller where id = $1")
                .bind(controller.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(stored, (version, hash), "controller unchanged");
        assert_eq!(
            db.acme().txt(&cluster).await.unwrap().as_deref(),
            Some(txt.as_str()),
            "TXT value unchanged"
        );
    })
    .await
}

/// A caller's own event kind: a JSON string, keyed by free-form text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Blob(String);

impl NotificationPayload for Blob {
    type Key = String;

    fn kind() -> &'static str {
        "blob"
    }
}

/// A caller's kind whose name is one byte over the limit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct LongKind;

impl NotificationPayload for LongKind {
    type Key = String;

    fn kind() -> &'static str {
        static KIND: OnceLock<String> = OnceLock::new();
        KIND.get_or_init(|| "k".repeat(limits::EVENT_KIND_BYTES + 1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_stores_a_key_and_payload_at_their_limits_and_refuses_more_in_a_usable_transaction() {
    with_db(|db| async move {
        let key = text(limits::EVENT_KEY_BYTES);
        // A JSON string is its text and two quotes.
        let payload = Blob(text(limits::EVENT_PAYLOAD_BYTES - 2));
        let mut sub = db.subscribe_with_key::<Blob>(&key).await.unwrap();
        let mut txn = db.pool().begin().await.unwrap();
        let id = emit(&mut txn, Some(&key), &payload).await.unwrap();

        // Over the limits: refused before the statement, so the transaction goes on.
        let before: i64 = sqlx::query_scalar("select count(*) from event")
            .fetch_one(&mut *txn)
            .await
            .unwrap();
        let long_key = text(limits::EVENT_KEY_BYTES + 1);
        let e = emit(&mut txn, Some(&long_key), &Blob("x".into()))
            .await
            .unwrap_err();
        assert_too_large(
            &e,
            "key",
            limits::EVENT_KEY_BYTES + 1,
            limits::EVENT_KEY_BYTES,
        );
        let long_payload = Blob(text(limits::EVENT_PAYLOAD_BYTES - 1));
        let e = emit(&mut txn, Some(&key), &long_payload).await.unwrap_err();
        assert_too_large(
            &e,
            "payload",
            limits::EVENT_PAYLOAD_BYTES + 1,
            limits::EVENT_PAYLOAD_BYTES,
        );
        let e = emit(&mut txn, None, &LongKind).await.unwrap_err();
        assert_too_large(
            &e,
            "kind",
            limits::EVENT_KIND_BYTES + 1,
            limits::EVENT_KIND_BYTES,
        );
        let after: i64 = sqlx::query_scalar("select count(*) from event")
            .fetch_one(&mut *txn)
            .await
            .unwrap();
        assert_eq!(after, before, "nothing was written");
        txn.commit().await.unwrap();

        let n = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivered")
            .unwrap()
            .unwrap();
        assert_eq!(n.id, Some(id));
        assert_eq!(n.key.as_deref(), Some(key.as_str()));
        assert_eq!(n.payload, payload, "stored verbatim");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presented_token_longer_than_any_issued_is_not_found() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("static");
        req.spawn_config.as_mut().unwrap().use_static_token = true;
        let resp = db.connect(&req).await.unwrap();
        assert!(matches!(
            db.backend()
                .route_info_for_token(&resp.token)
                .await
                .unwrap(),
            RouteInfoResult::Pending(_)
        ));
        for token in [
            "t".repeat(limits::BEARER_TOKEN_BYTES + 1),
            format!(
                "{}{}",
                resp.token.as_str(),
                " ".repeat(limits::BEARER_TOKEN_BYTES)
            ),
        ] {
            let token = BearerToken::from(token.as_str());
            assert_eq!(
                db.backend().route_info_for_token(&token).await.unwrap(),
                RouteInfoResult::NotFound
            );
            assert_eq!(
                db.backend()
                    .route_info_for_static_token(&token)
                    .await
                    .unwrap(),
                RouteInfoResult::NotFound
            );
        }
    })
    .await
}
