//! Hostile strings (quotes, SQL, backslashes, NUL, 10,000 characters, non-ASCII, control
//! characters) in every string input: each call either stores the string verbatim (read
//! back byte for byte) or returns a typed error, and nothing is ever executed.
//!
//! The only errors accepted are refusals by validation, before any query
//! (`InvalidArgument`): a NUL, which Postgres text and JSON cannot hold, and a value over its
//! size limit (`plane_db::limits`: the 10,000-character strings, in every input but the
//! lookups by token, which answer `NotFound`, and the parsers). The database refuses nothing:
//! a refusal with a SQLSTATE fails the test.

use crate::common::{drone, request};
use crate::support::*;
use plane_db::backend::RouteInfoResult;
use plane_db::connect::ConnectRequest;
use plane_db::events::{emit, NotificationPayload};
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendName, BackendState, BearerToken, ClusterName, ControllerName, DroneName, DronePoolName,
    KeyConfig, NodeKind, Subdomain,
};
use plane_db::{Config, ConnectError, Error, PlaneDatabase};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// A payload kind of a caller's own, keyed by free-form strings: hostile keys travel on it
/// (the crate's own kinds are keyed by names and ids, which reject them).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct FreeKeyed(BackendState);

impl NotificationPayload for FreeKeyed {
    type Key = String;

    fn kind() -> &'static str {
        "free_keyed"
    }
}

/// The hostile strings, by name.
pub fn hostile_strings() -> Vec<(&'static str, String)> {
    // 10,000 characters that do not compress (so they stay 10,000 bytes in an index).
    let mut x: u32 = 0x2545_f491;
    let varied: String = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"\\;"
                    [x as usize % 66],
            )
        })
        .collect();
    vec![
        ("empty", String::new()),
        ("quotes", r#"it's "quoted" `back` ''"#.to_string()),
        ("sql", "x'); drop table backend; select ('".to_string()),
        ("sql2", "\"; delete from token; --".to_string()),
        (
            "backslashes",
            r"C:\temp\new \\ \' \x00 \u0000 E'\n'".to_string(),
        ),
        ("nul", "before\0after".to_string()),
        ("control", "tab\tnewline\ncr\r\u{7f}\u{1b}[31m".to_string()),
        ("format", "%s %n %x {} {0} $1 $$ :name ? @p".to_string()),
        (
            "json",
            r#"{"status":"ready","address":"1.2.3.4:5"}"#.to_string(),
        ),
        (
            "unicode",
            "héllo wörld 世界 🚀 \u{202e}gnp.exe \u{feff}\u{200b} ǅ".to_string(),
        ),
        ("long_repeated", "x".repeat(10_000)),
        ("long_varied", varied),
        ("long_unicode", "ü世🚀".repeat(2_500)),
    ]
}

/// The name of a hostile string, for figures.
fn label(s: &str) -> &'static str {
    hostile_strings()
        .into_iter()
        .find(|(_, h)| s.contains(h.as_str()) && !h.is_empty())
        .map_or("empty", |(name, _)| name)
}

/// The smallest size limit on a free-form string (a node name looked up, `limits`).
const SMALLEST_LIMIT: usize = plane_db::limits::NODE_NAME_BYTES;

/// Why `e` is an acceptable refusal of `s` (see the module docs): `nul` or `size`; `None`
/// if it is not acceptable.
fn acceptable(s: &str, e: &Error) -> Option<&'static str> {
    let Error::InvalidArgument { reason, .. } = e else {
        return None;
    };
    // Refused before reaching the database, saying why.
    if s.contains('\0') && reason.contains("NUL") {
        Some("nul")
    } else if s.len() > SMALLEST_LIMIT && reason.contains("more than the limit of") {
        Some("size")
    } else {
        None
    }
}

fn connect_error(e: ConnectError) -> Error {
    match e {
        ConnectError::Other(e) => e,
        other => panic!("unexpected connect error: {other:?}"),
    }
}

/// Counts outcomes for the figures.
#[derive(Default)]
struct Tally {
    verbatim: u32,
    refused: u32,
    /// `input/string` of each refusal of a NUL by validation.
    nul_refusals: Vec<String>,
    /// `input/string` of each refusal of a value over its size limit.
    size_refusals: Vec<String>,
}

impl Tally {
    fn outcome<T>(&mut self, what: &str, s: &str, r: Result<T, Error>) -> Option<T> {
        match r {
            Ok(v) => {
                self.verbatim += 1;
                Some(v)
            }
            Err(e) => {
                let why = acceptable(s, &e);
                assert!(why.is_some(), "{what} with {s:.40?}: {e:?}");
                self.refused += 1;
                let refusal = format!("{}/{}", what.replace(' ', "_"), label(s));
                match why {
                    Some("nul") => self.nul_refusals.push(refusal),
                    _ => self.size_refusals.push(refusal),
                }
                None
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_are_stored_verbatim_or_refused() {
    with_url(|url| async move {
        let db = open(&url, 8, Config::default()).await;
        drone(&db).await;
        let mut t = Tally::default();
        for (label, s) in hostile_strings() {
            connect_fields(&db, &mut t, label, &s).await;
            other_inputs(&db, &mut t, label, &s).await;
            control_plane_inputs(&db, &mut t, &s).await;
        }
        // Nothing was executed: every table is still there, nothing was deleted.
        for table in [
            "backend",
            "token",
            "backend_key",
            "backend_action",
            "event",
            "node",
        ] {
            let n: i64 = sqlx::query_scalar(&format!("select count(*) from {table}"))
                .fetch_one(db.pool())
                .await
                .unwrap();
            assert!(n > 0, "{table} is empty");
        }
        figures(
            "hostile_strings",
            &[
                ("strings", hostile_strings().len().to_string()),
                ("stored_verbatim", t.verbatim.to_string()),
                ("typed_refusals", t.refused.to_string()),
                (
                    "node_names_refused_by_validation",
                    hostile_strings().len().to_string(),
                ),
                ("nul_refusals", format!("{:?}", t.nul_refusals)),
                ("size_refusals", format!("{:?}", t.size_refusals)),
                // `acceptable` admits no refusal by the database.
                ("database_refusals", "0".into()),
                ("panics", "0".into()),
            ],
        );
    })
    .await
}

/// The string inputs of `connect`: key name, namespace and tag, user, auth (key and value),
/// executable. Each accepted value is read back; a reconnect with the same key finds the
/// same backend; `revoke` with the user matches it verbatim.
async fn connect_fields(db: &PlaneDatabase, t: &mut Tally, label: &str, s: &str) {
    let key = |name: &str, namespace: &str, tag: &str| KeyConfig {
        name: name.to_string(),
        namespace: namespace.to_string(),
        tag: tag.to_string(),
    };
    let unique = format!("{label}-{}", BackendName::new_random());
    let keys = [
        ("key name", key(&format!("{unique}{s}"), "ns", "")),
        ("key namespace", key(&unique, s, "")),
        ("key tag", key(&unique, "ns2", s)),
    ];
    for (what, k) in keys {
        let req = ConnectRequest {
            key: Some(k.clone()),
            ..request("unused")
        };
        let r = db.connect(&req).await.map_err(connect_error);
        let Some(resp) = t.outcome(what, s, r) else {
            continue;
        };
        let (name, namespace, tag): (String, String, String) =
            sqlx::query_as("select key_name, namespace, tag from backend_key where id = $1")
                .bind(resp.backend_id.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(
            (name, namespace, tag),
            (k.name.clone(), k.namespace.clone(), k.tag.clone()),
            "{what}"
        );
        let again = db.connect(&req).await.unwrap();
        assert_eq!(
            again.backend_id, resp.backend_id,
            "{what}: reconnect finds it"
        );
        assert!(!again.spawned);
    }

    // User and auth, on a token; executable, in the spawn action.
    let mut req = request(&format!("{unique}-user"));
    req.user = Some(s.to_string());
    req.auth
        .insert(s.to_string(), serde_json::Value::String(s.to_string()));
    req.auth
        .insert("k".into(), serde_json::json!([s, {"nested": s}]));
    req.spawn_config.as_mut().unwrap().executable = serde_json::json!({"image": s, s: 1});
    let r = db.connect(&req).await.map_err(connect_error);
    if let Some(resp) = t.outcome("user/auth/executable", s, r) {
        let (user, auth): (Option<String>, serde_json::Value) =
            sqlx::query_as("select username, auth from token where token_digest = $1")
                .bind(resp.token.digest())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(user.as_deref(), Some(s));
        assert_eq!(auth, serde_json::Value::Object(req.auth.clone()));
        let executable: serde_json::Value = sqlx::query_scalar(
            "select action->'Spawn'->'executable' from backend_action where backend_id = $1",
        )
        .bind(resp.backend_id.as_str())
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(executable, req.spawn_config.as_ref().unwrap().executable);
        match db
            .backend()
            .route_info_for_token(&resp.token)
            .await
            .unwrap()
        {
            RouteInfoResult::Pending(p) => {
                assert_eq!(p.user.as_deref(), Some(s));
                assert_eq!(
                    p.user_data,
                    Some(serde_json::Value::Object(req.auth.clone()))
                );
            }
            other => panic!("{other:?}"),
        }
        let revoked = db.revoke(&resp.backend_id, s).await.unwrap();
        assert_eq!(revoked, 1, "revoke matches the user verbatim");
    } else {
        let r = db.revoke(&BackendName::new_random(), s).await;
        t.outcome("revoke", s, r);
    }

    // A hostile pool: no drone there (or a typed refusal), never a match elsewhere.
    let mut req = request(&format!("{unique}-pool"));
    req.spawn_config.as_mut().unwrap().pool = DronePoolName::from(s);
    match db.connect(&req).await {
        Err(ConnectError::NoDroneAvailable { pool, .. }) if !s.is_empty() => {
            assert_eq!(pool.as_str(), s);
            t.verbatim += 1;
        }
        Ok(_) if s.is_empty() => t.verbatim += 1, // the default pool
        Err(ConnectError::Other(e)) => {
            t.outcome::<()>("pool", s, Err(e));
        }
        other => panic!("hostile pool {s:.40?}: {other:?}"),
    }
}

/// Every other string input: heartbeats, node registration, drone pools, event keys,
/// subscriptions, tokens presented by clients, and the parsers.
async fn other_inputs(db: &PlaneDatabase, t: &mut Tally, label: &str, s: &str) {
    // Controller heartbeat: version and hash stored verbatim.
    let controller = ControllerName::new_random();
    let r = db.controller().heartbeat(&controller, true, s, s).await;
    if t.outcome("controller heartbeat", s, r).is_some() {
        let (v, h): (String, String) =
            sqlx::query_as("select plane_version, plane_hash from controller where id = $1")
                .bind(controller.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((v.as_str(), h.as_str()), (s, s));
    }

    // Node registration: a hostile name is refused by validation; version and hash stored.
    let cluster: ClusterName = "plane.test".parse().unwrap();
    db.controller()
        .heartbeat(&controller, true, "v", "h")
        .await
        .unwrap();
    let e = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: s,
            cluster: Some(&cluster),
            plane_version: "v",
            plane_hash: "h",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                argument: "name",
                ..
            }
        ),
        "{e:?}"
    );
    t.refused += 1;
    let name = DroneName::new_random();
    let r = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: name.as_str(),
            cluster: Some(&cluster),
            plane_version: s,
            plane_hash: s,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .map(|connection| connection.id);
    if let Some(id) = t.outcome("node registration", s, r) {
        let v: String = sqlx::query_scalar("select plane_version from node where id = $1")
            .bind(id.as_i32())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(v, s);
        // A drone in a hostile pool is scheduled there, and only there.
        let r = db.drone().register(id, true, &DronePoolName::from(s)).await;
        if t.outcome("drone pool", s, r).is_some() {
            let picked = db
                .drone()
                .pick_for_spawn(&cluster, &DronePoolName::from(s))
                .await
                .unwrap();
            assert_eq!(picked.map(|p| p.id), Some(id), "pool {s:.40?}");
            db.drone().set_ready(id, false).await.unwrap();
        }
    }

    // Event keys and keyed subscriptions: the key round-trips exactly.
    let key = format!("{label}:{s}");
    let mut sub = db.subscribe_with_key::<FreeKeyed>(&key).await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let r = emit(&mut conn, Some(&key), &FreeKeyed(BackendState::Loading)).await;
    if let Some(id) = t.outcome("event key", s, r) {
        let n = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("delivered")
            .unwrap()
            .unwrap();
        assert_eq!((n.id, n.key.as_deref()), (Some(id), Some(key.as_str())));
    }

    // Tokens presented by clients: unknown, whatever they contain.
    for token in [s.to_string(), format!("s.{s}")] {
        let r = db
            .backend()
            .route_info_for_token(&BearerToken::from(token.as_str()))
            .await;
        assert_eq!(r.unwrap(), RouteInfoResult::NotFound, "token {token:.40?}");
    }

    // Parsers: a typed error, never a panic (and nothing hostile parses as a name).
    assert!(s.parse::<BackendName>().is_err());
    assert!(s.parse::<DroneName>().is_err());
    assert!(s.parse::<ControllerName>().is_err());
    assert!(s.parse::<ClusterName>().is_err());
    assert!(s.parse::<Subdomain>().is_err());
    let _ = serde_json::from_str::<ConnectRequest>(s);
    let _ = serde_json::from_value::<ConnectRequest>(serde_json::json!({"key": {"name": s}}));
}

/// The string inputs of the keys, nodes, drones and ACME facades: a hostile key or name
/// matches nothing, a hostile pool lists only its own drones, and a TXT value is stored
/// verbatim.
async fn control_plane_inputs(db: &PlaneDatabase, t: &mut Tally, s: &str) {
    let key = KeyConfig {
        name: s.to_string(),
        namespace: s.to_string(),
        tag: String::new(),
    };
    let r = db.key().lookup(&key).await;
    if let Some(found) = t.outcome("key lookup", s, r) {
        assert!(found.is_none() || s.is_empty(), "key lookup {s:.40?}");
    }
    let cluster: ClusterName = "plane.test".parse().unwrap();
    let r = db.node().id_of(Some(&cluster), s).await;
    if let Some(found) = t.outcome("node id lookup", s, r) {
        assert_eq!(found, None, "node id lookup {s:.40?}");
    }
    let r = db
        .drone()
        .drones_for_pool(&cluster, &DronePoolName::from(s), Duration::from_secs(60))
        .await;
    if let Some(found) = t.outcome("drones of a pool", s, r) {
        // other_inputs put a drone in this pool: only drones of exactly this pool come back.
        assert!(
            found.iter().all(|d| d.pool.as_str() == s),
            "drones of pool {s:.40?}"
        );
    }

    // A TXT value, set by the lease holder: read back verbatim.
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, "v", "h")
        .await
        .unwrap();
    let proxy = plane_db::types::ProxyName::new_random();
    let proxy = db
        .node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Proxy,
            name: proxy.as_str(),
            cluster: Some(&cluster),
            plane_version: "v",
            plane_hash: "h",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .unwrap()
        .id;
    let acme_cluster: ClusterName = format!("{}.acme.test", label_host(s)).parse().unwrap();
    assert!(db.acme().lease(&acme_cluster, proxy).await.unwrap());
    let r = db.acme().set_txt(&acme_cluster, proxy, s).await;
    if t.outcome("acme txt value", s, r).is_some() {
        assert_eq!(
            db.acme().txt(&acme_cluster).await.unwrap().as_deref(),
            Some(s)
        );
    }
    assert!(db.acme().release(&acme_cluster, proxy).await.unwrap());
}

/// A host-name label unique to each hostile string (its label, which is ASCII).
fn label_host(s: &str) -> String {
    label(s).replace('_', "-")
}
