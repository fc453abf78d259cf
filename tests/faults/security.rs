//! Token storage and token randomness.
//!
//! Bearer tokens issued by `connect` are stored only as SHA-256 digests: no value found
//! anywhere in a dump of the database (every row of every table) routes. Static tokens
//! (`s.…`) are the documented exception: `connect` hands the same static token to every
//! later caller for the key, so it is stored on the backend row (DESIGN §2) and a dump
//! does route those backends; this test counts them and checks nothing else routes.
//! Tokens and secrets come from the OS CSPRNG (`getrandom`), 32 symbols of 62 each.

use crate::common::{addr, drone, request};
use crate::support::*;
use plane_db::backend::RouteInfoResult;
use plane_db::types::{BackendAddr, BackendState, BearerToken, SecretToken};
use plane_db::Config;
use std::collections::{BTreeSet, HashSet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dump_cannot_route() {
    with_url(|url| async move {
        let db = open(&url, 8, Config::default()).await;
        drone(&db).await;
        let mut tokens = Vec::new();
        let mut static_tokens = HashSet::new();
        for i in 0..20 {
            let mut req = request(&format!("dump-{i}"));
            req.auth.insert("role".into(), serde_json::json!("admin"));
            let first = db.connect(&req).await.unwrap();
            // A reconnect issues another token for the same backend.
            let second = db.connect(&req).await.unwrap();
            assert_eq!(first.backend_id, second.backend_id);
            if i % 2 == 0 {
                let b = &first.backend_id;
                for state in [
                    BackendState::Loading,
                    BackendState::Starting,
                    BackendState::Waiting {
                        address: BackendAddr(addr(9000)),
                    },
                    BackendState::Ready {
                        address: BackendAddr(addr(9000)),
                    },
                ] {
                    assert!(db.backend().update_state(b, &state).await.unwrap());
                }
            }
            tokens.push(first.token);
            tokens.push(second.token);
        }
        for i in 0..5 {
            let mut req = request(&format!("dump-static-{i}"));
            req.spawn_config.as_mut().unwrap().use_static_token = true;
            let r = db.connect(&req).await.unwrap();
            static_tokens.insert(r.token.as_str().to_string());
        }
        // The issued tokens route (so a NotFound below means something).
        for t in &tokens {
            let r = db.backend().route_info_for_token(t).await.unwrap();
            assert!(!matches!(r, RouteInfoResult::NotFound));
        }

        // The dump: every row of every table, as JSON text.
        let tables: Vec<String> = sqlx::query_scalar(
            "select table_name::text from information_schema.tables
             where table_schema = 'public' and table_type = 'BASE TABLE' order by 1",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        let mut rows = Vec::new();
        for table in &tables {
            let dumped: Vec<String> =
                sqlx::query_scalar(&format!("select row_to_json(t)::text from \"{table}\" t"))
                    .fetch_all(db.pool())
                    .await
                    .unwrap();
            rows.extend(dumped);
        }
        let dump = rows.join("\n");

        // No issued token appears in it, not even as a substring; its digest does.
        for t in &tokens {
            assert!(!dump.contains(t.as_str()), "a token is stored in clear");
            let hex: String = t.digest().iter().map(|b| format!("{b:02x}")).collect();
            assert!(dump.contains(&hex), "the digest is what is stored");
        }

        // Every value in the dump, presented as a bearer token: nothing routes but the
        // static tokens.
        let mut values = BTreeSet::new();
        for row in &rows {
            collect_strings(&serde_json::from_str(row).unwrap(), &mut values);
        }
        let mut variants = BTreeSet::new();
        for v in &values {
            variants.insert(v.clone());
            if let Some(hex) = v.strip_prefix("\\x") {
                variants.insert(hex.to_string());
            }
        }
        let mut routed_static = 0;
        for v in &variants {
            match db
                .backend()
                .route_info_for_token(&BearerToken::from(v.as_str()))
                .await
                .unwrap()
            {
                RouteInfoResult::NotFound => {}
                _ if static_tokens.contains(v) => routed_static += 1,
                other => panic!("a value from the dump routes: {other:?}"),
            }
        }
        figures(
            "dump_cannot_route",
            &[
                ("tables_dumped", tables.len().to_string()),
                ("rows_dumped", rows.len().to_string()),
                ("values_tried_as_tokens", variants.len().to_string()),
                ("issued_tokens", tokens.len().to_string()),
                ("issued_tokens_routable_from_dump", "0".into()),
                (
                    "static_tokens_routable_from_dump",
                    format!("{routed_static} (by design)"),
                ),
            ],
        );
        assert_eq!(routed_static, static_tokens.len());
    })
    .await
}

/// Every string in a JSON value (object keys and values, numbers as text).
fn collect_strings(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        serde_json::Value::Number(n) => {
            out.insert(n.to_string());
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                out.insert(k.clone());
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

#[test]
fn tokens_are_uniform_and_long_enough() {
    const N: usize = 20_000;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut seen = HashSet::new();
    let mut counts = [0_u64; 256];
    for _ in 0..N {
        for token in [
            BearerToken::new_random().as_str().to_string(),
            SecretToken::new_random().as_str().to_string(),
            BearerToken::new_random_static().as_str()[2..].to_string(),
        ] {
            assert_eq!(token.len(), 32);
            for b in token.bytes() {
                assert!(alphabet.contains(&b), "{b}");
                counts[usize::from(b)] += 1;
            }
            assert!(seen.insert(token), "a token repeated");
        }
    }
    assert!(BearerToken::new_random_static().as_str().starts_with("s."));
    // Chi-square over the 62 symbols (61 degrees of freedom): a biased generator (say,
    // modulo bias) lands far above 130; a uniform one exceeds it with p < 1e-6.
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / 62.0;
    let chi2: f64 = alphabet
        .iter()
        .map(|&b| (counts[usize::from(b)] as f64 - expected).powi(2) / expected)
        .sum();
    let bits = 32.0 * 62_f64.log2();
    figures(
        "token_randomness",
        &[
            ("tokens", (3 * N).to_string()),
            ("distinct", seen.len().to_string()),
            ("chi_square_61df", format!("{chi2:.1}")),
            ("entropy_bits", format!("{bits:.1}")),
        ],
    );
    assert!(
        chi2 < 130.0,
        "symbol frequencies are not uniform: chi2 = {chi2}"
    );
    assert!(bits >= 128.0);
}

/// The only randomness source in the library's own dependencies is the OS CSPRNG.
#[test]
fn the_only_rng_dependency_is_the_os_csprng() {
    let manifest = include_str!("../../Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [dependencies] section");
    assert!(deps.lines().any(|l| l.starts_with("getrandom")));
    for rng in [
        "rand ", "rand=", "fastrand", "oorandom", "nanorand", "rand_",
    ] {
        assert!(!deps.contains(rng), "{rng} among the dependencies");
    }
}
