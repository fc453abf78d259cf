//! ACME DNS-01 TXT leases.

use crate::common::*;
use plane_db::node::NodeRegistration;
use plane_db::types::{ControllerName, NodeId, NodeKind, ProxyName};
use plane_db::{Error, PlaneDatabase};
use std::net::{IpAddr, Ipv4Addr};

async fn proxy(db: &PlaneDatabase) -> NodeId {
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, "0.1.0", "abc")
        .await
        .unwrap();
    let name = ProxyName::new_random();
    db.node()
        .register(&NodeRegistration {
            controller: &controller,
            kind: NodeKind::Proxy,
            name: name.as_str(),
            cluster: Some(&cluster()),
            plane_version: "0.1.0",
            plane_hash: "abc",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .await
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_proxy_at_a_time_holds_the_txt_record() {
    with_db(|db| async move {
        let (p1, p2) = (proxy(&db).await, proxy(&db).await);
        let acme = db.acme();
        let c = cluster();

        assert_eq!(acme.txt(&c).await.unwrap(), None);
        assert!(
            !acme.set_txt(&c, p1, "early").await.unwrap(),
            "no lease yet"
        );
        assert!(acme.lease(&c, p1).await.unwrap());
        assert!(!acme.lease(&c, p2).await.unwrap(), "held by p1");
        assert!(
            !acme.set_txt(&c, p2, "intruder").await.unwrap(),
            "p2 holds no lease"
        );
        assert!(acme.set_txt(&c, p1, "challenge-1").await.unwrap());
        assert_eq!(acme.txt(&c).await.unwrap().as_deref(), Some("challenge-1"));
        // The holder may refresh its lease and keeps its value.
        assert!(acme.lease(&c, p1).await.unwrap());
        assert_eq!(acme.txt(&c).await.unwrap().as_deref(), Some("challenge-1"));
        // Other clusters are independent.
        let other: plane_db::types::ClusterName = "other.test".parse().unwrap();
        assert!(acme.lease(&other, p2).await.unwrap());

        assert!(
            !acme.release(&c, p2).await.unwrap(),
            "p2 cannot release p1's lease"
        );
        assert!(acme.release(&c, p1).await.unwrap());
        assert_eq!(acme.txt(&c).await.unwrap(), None);
        assert!(acme.lease(&c, p2).await.unwrap(), "free again");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_can_be_taken_over() {
    with_db(|db| async move {
        let (p1, p2) = (proxy(&db).await, proxy(&db).await);
        let acme = db.acme();
        let c = cluster();
        assert!(acme.lease(&c, p1).await.unwrap());
        assert!(acme.set_txt(&c, p1, "old").await.unwrap());
        exec(
            &db,
            "update acme_txt_entries set leased_at = now() - interval '59 seconds'",
        )
        .await;
        assert!(!acme.lease(&c, p2).await.unwrap(), "not a minute old yet");
        exec(
            &db,
            "update acme_txt_entries set leased_at = now() - interval '61 seconds'",
        )
        .await;
        assert!(acme.lease(&c, p2).await.unwrap());
        assert_eq!(
            acme.txt(&c).await.unwrap(),
            None,
            "the old holder's value is gone"
        );
        assert!(
            !acme.set_txt(&c, p1, "late").await.unwrap(),
            "p1 lost its lease"
        );
        assert!(acme.set_txt(&c, p2, "new").await.unwrap());
        assert_eq!(acme.txt(&c).await.unwrap().as_deref(), Some("new"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt_values_are_stored_verbatim_or_refused() {
    with_db(|db| async move {
        let p = proxy(&db).await;
        let acme = db.acme();
        let c = cluster();
        assert!(acme.lease(&c, p).await.unwrap());
        let hostile = "'; drop table acme_txt_entries; -- \\ \"ü\" 🚀";
        assert!(acme.set_txt(&c, p, hostile).await.unwrap());
        assert_eq!(acme.txt(&c).await.unwrap().as_deref(), Some(hostile));
        assert!(matches!(
            acme.set_txt(&c, p, "a\0b").await,
            Err(Error::InvalidArgument {
                argument: "value",
                ..
            })
        ));
        // An unknown proxy: refused while the lease is held, NotFound where it would win.
        assert!(!acme.lease(&c, NodeId::from(987_654)).await.unwrap());
        assert!(matches!(
            acme.lease(&"fresh.test".parse().unwrap(), NodeId::from(987_654))
                .await,
            Err(Error::NotFound { what: "node", .. })
        ));
    })
    .await
}

/// Plane 0.5.5 refuses a lease to the proxy that already holds it until its lease is a
/// minute old; plane-db grants it and restarts the minute (COMPATIBILITY.md says why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_may_lease_again_within_the_minute_which_extends_it() {
    with_db(|db| async move {
        let (p1, p2) = (proxy(&db).await, proxy(&db).await);
        let acme = db.acme();
        let c = cluster();
        assert!(acme.lease(&c, p1).await.unwrap());
        assert!(acme.set_txt(&c, p1, "challenge").await.unwrap());
        exec(
            &db,
            "update acme_txt_entries set leased_at = now() - interval '50 seconds'",
        )
        .await;
        assert!(
            acme.lease(&c, p1).await.unwrap(),
            "the holder's second lease within the minute is granted"
        );
        let age: f64 = sqlx::query_scalar(
            "select extract(epoch from now() - leased_at)::float8 from acme_txt_entries",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert!(age < 5.0, "the minute starts again: {age} s old");
        assert_eq!(acme.txt(&c).await.unwrap().as_deref(), Some("challenge"));
        // 50 s after the first lease plus 11 s: over a minute since the first lease, but
        // the renewed lease is 11 s old, so another proxy still cannot take it.
        exec(
            &db,
            "update acme_txt_entries set leased_at = now() - interval '11 seconds'",
        )
        .await;
        assert!(!acme.lease(&c, p2).await.unwrap());
        exec(
            &db,
            "update acme_txt_entries set leased_at = now() - interval '61 seconds'",
        )
        .await;
        assert!(
            acme.lease(&c, p2).await.unwrap(),
            "a stale lease is taken over"
        );
        assert!(
            !acme.lease(&c, p1).await.unwrap(),
            "the former holder is refused like any other proxy"
        );
    })
    .await
}
