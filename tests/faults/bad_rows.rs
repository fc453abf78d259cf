//! Rows that cannot be decoded (bad state JSON, bad names, unknown status numbers, bad
//! event payloads): a call that returns one row reports an error, a call that lists rows or
//! streams events skips the bad one with a warning; nothing panics and the good rows still
//! come back.

use crate::common::{drone, drone_in, exec, lifecycle, request, spawn, spawn_config};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::types::{
    BackendMetricsMessage, BackendName, BackendState, BackendStatus, BearerToken, ClusterName,
    DronePoolName,
};
use plane_db::{Config, ConnectError, Error};
use std::collections::BTreeSet;
use std::time::Duration;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("delivered in time")
}

fn is_decode(e: &Error) -> bool {
    matches!(e, Error::Decode { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_reported_or_skipped() {
    with_url(|url| async move {
        let db = open(&url, 8, Config::default()).await;
        let d = drone(&db).await;
        let good_a = spawn(&db).await.backend_id;
        let good_b = spawn(&db).await.backend_id;
        for good in [&good_a, &good_b] {
            assert!(db.backend().update_state(good, &BackendState::Loading).await.unwrap());
        }

        // Bad rows, written behind the library's back. Each copies a good row and breaks one
        // column. All are alive, idle for an hour with 1 s allowed: termination candidates.
        let clone = |id: &str, set: &str| {
            format!(
                "insert into backend (id, cluster, last_status, last_status_number,
                     last_status_time, state, drone_id, allowed_idle_seconds, last_keepalive)
                 select '{id}', cluster, 'ready', 50, now(),
                        '{{\"status\":\"ready\",\"address\":\"10.0.0.1:8080\"}}', drone_id, 1,
                        now() - interval '1 hour'
                 from backend where id = '{good_a}';
                 update backend set {set} where id = '{id}'"
            )
        };
        let bad: [(&str, &str); 5] = [
            ("ba-badstate", "state = '{\"status\":\"bogus\"}'"),
            ("ba-badaddress", "state = '{\"status\":\"ready\",\"address\":\"nowhere\"}'"),
            ("BAD NAME", "last_status = 'ready'"),
            ("ba-badcluster", "cluster = 'not a cluster!'"),
            ("ba-badnumber", "last_status_number = 55"),
        ];
        for (id, set) in bad {
            sqlx::raw_sql(&clone(id, set)).execute(db.pool()).await.unwrap();
        }
        exec(&db, &format!("update backend set allowed_idle_seconds = 1, last_keepalive = now() - interval '1 hour' where id in ('{good_a}', '{good_b}')")).await;
        let name = |s: &str| s.parse::<BackendName>().unwrap();

        // Lists skip the undecodable rows and return every other one.
        let listed: BTreeSet<String> = db
            .backend()
            .list_backends()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id.to_string())
            .collect();
        let expected: BTreeSet<String> = [good_a.as_str(), good_b.as_str(), "ba-badnumber"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(listed, expected, "list_backends");
        let alive: BTreeSet<String> = db
            .backend()
            .list_alive_backends_for_drone(d.id)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id.to_string())
            .collect();
        assert_eq!(alive, expected, "list_alive_backends_for_drone");

        // Termination candidates read no state: only the bad name is skipped.
        let candidates: BTreeSet<String> = db
            .backend()
            .termination_candidates(d.id)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.backend_id.to_string())
            .collect();
        assert!(!candidates.contains("BAD NAME"));
        assert!(candidates.contains(good_a.as_str()) && candidates.contains(good_b.as_str()));
        assert_eq!(candidates.len(), 6, "{candidates:?}");

        // Single-row reads report the bad column.
        for id in ["ba-badstate", "ba-badaddress", "ba-badcluster"] {
            let e = db.backend().backend(&name(id)).await.unwrap_err();
            assert!(is_decode(&e), "{id}: {e:?}");
        }
        assert!(db.backend().backend(&good_a).await.unwrap().is_some());

        // Routes to a backend with a bad cluster, an unknown status number, a bad
        // subdomain (static token): errors, not panics.
        let token = BearerToken::from("t0k3n-bad-cluster");
        let token2 = BearerToken::from("t0k3n-bad-number");
        for (t, id) in [(&token, "ba-badcluster"), (&token2, "ba-badnumber")] {
            sqlx::query(
                "insert into token (token_digest, backend_id, expiration_time, auth, secret_token)
                 values ($1, $2, now() + interval '1 hour', '{}', 'x')",
            )
            .bind(t.digest())
            .bind(id)
            .execute(db.pool())
            .await
            .unwrap();
            let e = db.backend().route_info_for_token(t).await.unwrap_err();
            assert!(is_decode(&e), "{id}: {e:?}");
        }
        exec(&db, "update backend set static_token = 's.badsub', subdomain = '-bad-' where id = 'ba-badnumber'").await;
        exec(&db, "update backend set last_status_number = 50 where id = 'ba-badnumber'").await;
        let e = db
            .backend()
            .route_info_for_static_token(&BearerToken::from("s.badsub"))
            .await
            .unwrap_err();
        assert!(is_decode(&e), "{e:?}");

        // A key held by a backend that does not decode: connect reports it.
        exec(&db, "insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                   values ('ba-badcluster', 'ns', 'held-by-bad', '', now() + interval '1 hour', 1)").await;
        match db.connect(&request("held-by-bad")).await {
            Err(ConnectError::Other(e)) => assert!(is_decode(&e), "{e:?}"),
            other => panic!("connect to a key held by a bad row: {other:?}"),
        }

        // A drone whose name does not decode: picking it reports it; connect, which picks
        // and creates in one statement, creates the backend and names no drone (an error
        // would make a caller without a key retry and create a second backend).
        let odd: ClusterName = "odd.test".parse().unwrap();
        let odd_drone = drone_in(&db, &odd, &DronePoolName::default()).await;
        exec(&db, &format!("update node set name = 'DR BAD' where id = {}", odd_drone.id)).await;
        let e = db.drone().pick_for_spawn(&odd, &DronePoolName::default()).await.unwrap_err();
        assert!(is_decode(&e), "{e:?}");
        let mut spawn_odd = request("odd-key");
        spawn_odd.spawn_config = Some(plane_db::connect::SpawnConfig {
            cluster: Some(odd),
            ..spawn_config()
        });
        let response = db.connect(&spawn_odd).await.unwrap();
        assert!(response.spawned);
        assert_eq!(response.drone, None);
        let on_odd: i64 = sqlx::query_scalar("select count(*) from backend where id = $1 and drone_id = $2")
            .bind(response.backend_id.as_str())
            .bind(odd_drone.id.as_i32())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(on_odd, 1);

        // A status stream skips a history row that does not decode.
        let good_c = spawn(&db).await.backend_id;
        exec(&db, &format!("insert into backend_state (backend_id, state) values ('{good_c}', '{{\"status\":\"nope\"}}')")).await;
        let stream = db.backend().status_stream(&good_c).await.unwrap();
        for state in lifecycle() {
            assert!(db.backend().update_state(&good_c, &state).await.unwrap());
        }
        let statuses: Vec<BackendStatus> = tokio::time::timeout(
            Duration::from_secs(10),
            stream.map(|e| e.status).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        assert_eq!(statuses.len(), 7, "{statuses:?}");

        // Events whose payload does not decode are skipped by typed subscriptions (raw ones
        // get them); the bus carries on.
        let mut typed = db.subscribe::<BackendState>().await.unwrap();
        let mut raw = db.subscribe_all_events().await.unwrap();
        let mut metrics = db.subscribe::<BackendMetricsMessage>().await.unwrap();
        exec(&db, "insert into event (kind, key, data) values
                   ('backend_state', 'k', '{\"status\":\"bogus\"}'),
                   ('backend_state', 'k', '\"just a string\"'),
                   ('backend_state', 'k', 'null')").await;
        exec(&db, "select pg_notify('plane_ephemeral', 'not json at all')").await;
        exec(&db, "select pg_notify('plane_ephemeral', '{\"kind\":\"backend_metrics\",\"key\":null,\"data\":{\"x\":1}}')").await;
        exec(&db, "insert into event (kind, key, data) values ('backend_state', 'k', '{\"status\":\"loading\"}')").await;
        let m = BackendMetricsMessage {
            backend_id: good_a.clone(),
            mem_used: 1,
            mem_total: 2,
            mem_active: 3,
            mem_inactive: 4,
            mem_unevictable: 5,
            mem_limit: 6,
            cpu_used: 7,
            sys_cpu: 8,
        };
        db.backend().publish_metrics(&m).await.unwrap();
        let n = within(typed.next()).await.unwrap().unwrap();
        assert_eq!(n.payload, BackendState::Loading, "bad payloads skipped");
        // Raw: the 4 persisted events and the 2 well-formed ephemeral envelopes (the one
        // that is not JSON is dropped by the bus with a warning).
        let mut raw_kinds = Vec::new();
        for _ in 0..6 {
            raw_kinds.push(within(raw.next()).await.unwrap().unwrap().kind.clone());
        }
        raw_kinds.sort();
        assert_eq!(raw_kinds, ["backend_metrics", "backend_metrics", "backend_state", "backend_state", "backend_state", "backend_state"]);
        assert!(tokio::time::timeout(Duration::from_millis(300), raw.next()).await.is_err());
        let got = within(metrics.next()).await.unwrap().unwrap();
        assert_eq!(got.payload, m, "malformed ephemeral messages skipped");

        figures(
            "bad_rows",
            &[
                ("bad_backend_rows", bad.len().to_string()),
                ("listed_good", listed.len().to_string()),
                ("bad_events_skipped", "3".into()),
                ("bad_ephemeral_skipped", "2".into()),
                ("panics", "0".into()),
            ],
        );
    })
    .await
}
