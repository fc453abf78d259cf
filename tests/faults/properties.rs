//! Property tests: every parser, on arbitrary input, never panics, accepts exactly what its
//! documented rules allow, and round-trips what it accepts; random sequences of state
//! updates (from one or several concurrent writers) never move a backend backwards, and
//! its status stream is exactly the sequence of accepted updates.

use crate::common::{drone, request};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::connect::ConnectRequest;
use plane_db::testing::create_database;
use plane_db::types::{
    AcmeDnsServerName, BackendActionName, BackendAddr, BackendName, BackendState, BackendStatus,
    BearerToken, ClusterName, ControllerName, DroneName, KeyConfig, NodeKind, ProxyName, Subdomain,
    MAX_NAME_LEN,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde::{de::DeserializeOwned, Serialize};
use std::cell::Cell;
use std::fmt::{Debug, Display};
use std::str::FromStr;
use std::time::Duration;

/// The documented rule for prefixed names, written independently of the parser.
fn name_rule(s: &str, prefix: &str) -> bool {
    match s.strip_prefix(prefix) {
        Some(rest) => {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && s.chars().count() <= MAX_NAME_LEN
        }
        None => false,
    }
}

/// The documented rule for backend names (Plane 0.5.5's: no prefix), written independently
/// of the parser: 1 to 45 characters, each a lowercase ASCII letter, digit or `-`.
fn backend_name_rule(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.chars().count())
        && s.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
}

/// Parses `s` every way the type offers and checks they agree with each other and with
/// `rule`, and that an accepted value round-trips through `Display` and JSON.
fn check_parser<T>(s: &str, rule: Option<bool>)
where
    T: FromStr + TryFrom<String> + Display + Debug + PartialEq + Serialize + DeserializeOwned,
    <T as FromStr>::Err: Debug + Display,
{
    let parsed = s.parse::<T>();
    let tried = T::try_from(s.to_string());
    let from_json = serde_json::from_value::<T>(serde_json::Value::String(s.to_string()));
    assert_eq!(parsed.is_ok(), tried.is_ok(), "{s:?}");
    assert_eq!(
        parsed.is_ok(),
        from_json.is_ok(),
        "{s:?}: JSON must validate too"
    );
    if let Some(rule) = rule {
        assert_eq!(
            parsed.is_ok(),
            rule,
            "{s:?}: parser and documented rule disagree"
        );
    }
    match parsed {
        Ok(value) => {
            assert_eq!(value.to_string(), s);
            assert_eq!(s.parse::<T>().ok().as_ref(), Some(&value));
            let json = serde_json::to_value(&value).unwrap();
            assert_eq!(json, serde_json::Value::String(s.to_string()));
            assert_eq!(serde_json::from_value::<T>(json).unwrap(), value);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Arbitrary strings, and strings close to the valid forms (where bugs live).
fn strings() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(ba|dr|co|px|ns|ak|lk|BA)-[a-z0-9\\-]{0,50}",
        "(ba|dr|co|px|ns|ak)-[a-zA-Z0-9\\-_. éß\u{0}]{0,46}",
        "[a-zA-Z0-9\\-]{0,70}(\\.[a-zA-Z0-9\\-]{0,70}){0,4}(:[0-9]{0,6})?",
        "[0-9]{1,3}(\\.[0-9]{1,3}){3}(:[0-9]{1,5})?",
        "[a-z\\-]{0,20}",
        // Plane-made backend names (14 characters) and names near the length limit.
        "[a-z0-9]{14}",
        "[a-z0-9\\-]{40,50}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn names_accept_exactly_the_documented_rule(s in strings()) {
        check_parser::<BackendName>(&s, Some(backend_name_rule(&s)));
        check_parser::<DroneName>(&s, Some(name_rule(&s, "dr-")));
        check_parser::<ControllerName>(&s, Some(name_rule(&s, "co-")));
        check_parser::<ProxyName>(&s, Some(name_rule(&s, "px-")));
        check_parser::<AcmeDnsServerName>(&s, Some(name_rule(&s, "ns-")));
        check_parser::<BackendActionName>(&s, Some(name_rule(&s, "ak-")));
    }

    #[test]
    fn cluster_names_and_subdomains_round_trip(s in strings()) {
        check_parser::<ClusterName>(&s, None);
        check_parser::<Subdomain>(&s, None);
        if let Ok(cluster) = s.parse::<ClusterName>() {
            let (host, port) = (cluster.host(), cluster.port());
            prop_assert!(!host.is_empty());
            prop_assert_eq!(port.is_some(), s.contains(':'));
            if let Some(port) = port {
                prop_assert_eq!(format!("{host}:{port}"), s.clone());
            }
            let _ = cluster.is_https();
        }
        if let Ok(sub) = s.parse::<Subdomain>() {
            prop_assert!(sub.as_str().len() <= 63 && !sub.as_str().starts_with('-'));
            prop_assert!(!sub.as_str().ends_with('-'));
        }
    }

    #[test]
    fn enums_and_addresses_round_trip(s in strings(), n in any::<i32>()) {
        if let Ok(status) = s.parse::<BackendStatus>() {
            prop_assert_eq!(status.as_str(), s.as_str());
            prop_assert_eq!(status.to_string(), s.clone());
        }
        if let Some(status) = BackendStatus::from_int(n) {
            prop_assert_eq!(status.as_int(), n);
        }
        if let Ok(kind) = s.parse::<NodeKind>() {
            prop_assert_eq!(kind.as_str().parse::<NodeKind>().ok(), Some(kind));
        }
        if let Ok(addr) = s.parse::<BackendAddr>() {
            prop_assert_eq!(addr.to_string().parse::<BackendAddr>().ok(), Some(addr));
        }
    }

    #[test]
    fn tokens_accept_anything(s in any::<String>()) {
        let token = BearerToken::from(s.as_str());
        prop_assert_eq!(token.is_static(), s.starts_with("s."));
        prop_assert_eq!(token.digest().len(), 32);
        prop_assert_eq!(token.as_str(), s.as_str());
        let debug = format!("{token:?}");
        prop_assert!(debug == "BearerToken(\"****\")" || debug == "BearerToken(\"s.****\")");
    }

    #[test]
    fn json_inputs_never_panic(s in any::<String>(), status in "[a-z\\-]{0,18}", addr in strings(), reason in "[a-z]{0,14}", code in any::<Option<i32>>()) {
        let _ = serde_json::from_str::<BackendState>(&s);
        let _ = serde_json::from_str::<ConnectRequest>(&s);
        let _ = serde_json::from_str::<KeyConfig>(&s);
        let candidates = [
            serde_json::json!({"status": status}),
            serde_json::json!({"status": status, "address": addr}),
            serde_json::json!({"status": status, "last_status": "ready", "termination": "soft", "reason": reason}),
            serde_json::json!({"status": status, "last_status": status, "reason": reason, "exit_code": code}),
            serde_json::json!({"status": status, "last_status": "ready", "termination": null, "reason": null, "exit_code": code}),
        ];
        for value in candidates {
            if let Ok(state) = serde_json::from_value::<BackendState>(value.clone()) {
                let again = serde_json::to_value(&state).unwrap();
                prop_assert_eq!(serde_json::from_value::<BackendState>(again).unwrap(), state.clone());
                prop_assert_eq!(state.status().as_str(), status.as_str());
            }
        }
    }
}

/// How many random update sequences run against the database (each a fresh backend).
const DB_CASES: u32 = 96;

#[test]
fn random_updates_never_go_backwards_and_streams_match() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (database, db) = rt.block_on(async {
        let database = create_database().await.unwrap();
        migrate(&database.url).await;
        let db = open(&database.url, 8, plane_db::Config::default()).await;
        drone(&db).await;
        (database, db)
    });

    let statuses = prop::collection::vec(prop::sample::select(BackendStatus::ALL.to_vec()), 0..14);
    let strategy = (statuses, 1..=3_usize, 0..14_usize);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: DB_CASES,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let (cases, accepted_total, refused_total) = (Cell::new(0), Cell::new(0), Cell::new(0));
    runner
        .run(&strategy, |(sequence, writers, open_at)| {
            let (accepted, refused) = rt
                .block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        one_case(&db, sequence, writers, open_at),
                    )
                    .await
                })
                .expect("case timed out");
            cases.set(cases.get() + 1);
            accepted_total.set(accepted_total.get() + accepted);
            refused_total.set(refused_total.get() + refused);
            Ok(())
        })
        .unwrap();
    figures(
        "property_state_updates",
        &[
            ("cases_run", cases.get().to_string()),
            ("updates_accepted", accepted_total.get().to_string()),
            ("updates_refused", refused_total.get().to_string()),
        ],
    );
    rt.block_on(async {
        db.pool().close().await;
        database.drop_database().await.unwrap();
    });
}

/// Applies `sequence` to a new backend with `writers` concurrent writers (round-robin),
/// opening its status stream after `open_at` updates (1 writer) or before (several), then
/// terminates it. Returns how many updates were accepted and refused.
async fn one_case(
    db: &plane_db::PlaneDatabase,
    sequence: Vec<BackendStatus>,
    writers: usize,
    open_at: usize,
) -> (usize, usize) {
    let backend = db
        .connect(&request(&format!("prop-{}", BackendName::new_random())))
        .await
        .unwrap()
        .backend_id;
    let mut applied: Vec<(BackendStatus, bool)> = Vec::new();
    let stream;
    if writers == 1 {
        // The documented rule: an update is accepted iff it moves strictly forward.
        let mut current = BackendStatus::Scheduled;
        let mut early = None;
        for (i, status) in sequence.iter().enumerate() {
            if i == open_at {
                early = Some(db.backend().status_stream(&backend).await.unwrap());
            }
            let ok = db
                .backend()
                .update_state(&backend, &state_for(*status))
                .await
                .unwrap();
            assert_eq!(ok, *status > current, "{current} -> {status}");
            if ok {
                current = *status;
            }
            let row = db.backend().backend(&backend).await.unwrap().unwrap();
            assert_eq!(row.state.status(), current, "never backwards");
            applied.push((*status, ok));
        }
        stream = match early {
            Some(s) => s,
            None => db.backend().status_stream(&backend).await.unwrap(),
        };
    } else {
        stream = db.backend().status_stream(&backend).await.unwrap();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let db = db.clone();
                let backend = backend.clone();
                let mine: Vec<BackendStatus> =
                    sequence.iter().skip(w).step_by(writers).copied().collect();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for status in mine {
                        let ok = db
                            .backend()
                            .update_state(&backend, &state_for(status))
                            .await
                            .unwrap();
                        out.push((status, ok));
                    }
                    out
                })
            })
            .collect();
        for t in tasks {
            applied.extend(t.await.unwrap());
        }
    }
    // End the stream.
    let ended = db
        .backend()
        .update_state(&backend, &state_for(BackendStatus::Terminated))
        .await
        .unwrap();
    applied.push((BackendStatus::Terminated, ended));

    let mut accepted: Vec<BackendStatus> = applied
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(s, _)| *s)
        .collect();
    let refused = applied.len() - accepted.len();
    if writers > 1 {
        accepted.sort();
    }
    assert!(
        accepted.windows(2).all(|w| w[0] < w[1]),
        "accepted updates go forward: {accepted:?}"
    );
    assert_eq!(accepted.last(), Some(&BackendStatus::Terminated));

    let streamed: Vec<BackendStatus> = stream.map(|e| e.status).collect().await;
    let mut expected = vec![BackendStatus::Scheduled];
    expected.extend(&accepted);
    assert_eq!(
        streamed, expected,
        "the stream is the accepted updates (sequence {sequence:?}, writers {writers})"
    );

    let history: Vec<String> = sqlx::query_scalar(
        "select state->>'status' from backend_state where backend_id = $1 order by id",
    )
    .bind(backend.as_str())
    .fetch_all(db.pool())
    .await
    .unwrap();
    let expected_history: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(history, expected_history, "history in id order");
    (accepted.len(), refused)
}
