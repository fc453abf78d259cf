//! Key leases: renew, prevent renewal, remove if expired, look up, fencing tokens.

use crate::common::*;
use plane_db::keys::KeyRenewal;
use plane_db::types::{BackendName, BackendStatus, KeyConfig, Subdomain};
use plane_db::Error;

fn key(name: &str) -> KeyConfig {
    KeyConfig {
        name: name.to_string(),
        namespace: "ns".to_string(),
        tag: String::new(),
    }
}

async fn expire_key(db: &plane_db::PlaneDatabase, backend: &BackendName) {
    exec(
        db,
        &format!(
            "update backend_key set expires_at = now() - interval '1 second' where id = '{backend}'"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_extends_the_lease_until_renewal_is_prevented() {
    with_db(|db| async move {
        drone(&db).await;
        let response = db.connect(&request("renew-me")).await.unwrap();
        let backend = response.backend_id;
        let before = db
            .keys()
            .lookup(&key("renew-me"))
            .await
            .unwrap()
            .expect("held");

        // The drone's clock runs an hour fast: its deadlines are counted on its clock.
        let drone_now = chrono::Utc::now() + chrono::Duration::hours(1);
        let renewed = match db.keys().renew(&backend, drone_now).await.unwrap() {
            KeyRenewal::Renewed(acquired) => acquired,
            other => panic!("expected a renewal, got {other:?}"),
        };
        assert_eq!(renewed.key, key("renew-me"));
        assert_eq!(
            Some(renewed.token),
            response.fencing_token,
            "renewal keeps the token"
        );
        let deadlines = renewed.deadlines;
        let lease = db.config().key_lease.clone();
        let secs = |d: std::time::Duration| chrono::Duration::seconds(d.as_secs() as i64);
        assert_eq!(deadlines.renew_at, drone_now + secs(lease.renew_after));
        assert_eq!(
            deadlines.soft_terminate_at,
            drone_now + secs(lease.soft_terminate_after)
        );
        assert_eq!(
            deadlines.hard_terminate_at,
            drone_now + secs(lease.hard_terminate_after)
        );
        let after = db
            .keys()
            .lookup(&key("renew-me"))
            .await
            .unwrap()
            .expect("held");
        assert!(after.expires_at >= before.expires_at);
        // The stored lease runs on the database's clock.
        let remaining = after.expires_at - after.as_of;
        assert!(remaining <= secs(lease.hard_terminate_after));
        assert!(remaining > secs(lease.hard_terminate_after) - chrono::Duration::seconds(10));
        // A time at the end of the calendar is an error, not a panic.
        assert!(matches!(
            db.keys()
                .renew(&backend, chrono::DateTime::<chrono::Utc>::MAX_UTC)
                .await,
            Err(Error::InvalidArgument {
                argument: "drone_local_time",
                ..
            })
        ));

        assert!(db.keys().prevent_renew(&backend).await.unwrap());
        assert!(
            !db.keys().prevent_renew(&backend).await.unwrap(),
            "already prevented"
        );
        assert_eq!(
            db.keys().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::Prevented
        );
        let unchanged = db
            .keys()
            .lookup(&key("renew-me"))
            .await
            .unwrap()
            .expect("held");
        assert_eq!(
            unchanged.expires_at, after.expires_at,
            "a refused renewal changes nothing"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_missing_key_is_not_renewed() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = db.connect(&request("lapsed")).await.unwrap().backend_id;
        expire_key(&db, &backend).await;
        assert_eq!(
            db.keys().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::NotHeld
        );
        let unknown = BackendName::new_random();
        assert_eq!(
            db.keys().renew(&unknown, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::NotHeld
        );
        assert!(!db.keys().prevent_renew(&unknown).await.unwrap());
        assert!(!db.keys().remove_if_expired(&unknown).await.unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_key_is_never_removed() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = db.connect(&request("remove-me")).await.unwrap().backend_id;
        assert!(!db.keys().remove_if_expired(&backend).await.unwrap());
        assert!(db.keys().lookup(&key("remove-me")).await.unwrap().is_some());

        expire_key(&db, &backend).await;
        let holder = db
            .keys()
            .lookup(&key("remove-me"))
            .await
            .unwrap()
            .expect("held");
        assert!(!holder.is_live());
        assert!(db.keys().remove_if_expired(&backend).await.unwrap());
        assert!(
            !db.keys().remove_if_expired(&backend).await.unwrap(),
            "already gone"
        );
        assert_eq!(db.keys().lookup(&key("remove-me")).await.unwrap(), None);
        assert_eq!(
            db.keys().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::NotHeld
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_returns_the_holder_with_its_backend() {
    with_db(|db| async move {
        drone(&db).await;
        let mut req = request("looked-up");
        let spawn = req.spawn_config.as_mut().expect("spawn config");
        spawn.use_static_token = true;
        spawn.subdomain = Some("team-a".parse::<Subdomain>().unwrap());
        let response = db.connect(&req).await.unwrap();

        let holder = db
            .keys()
            .lookup(&key("looked-up"))
            .await
            .unwrap()
            .expect("held");
        assert_eq!(holder.backend, response.backend_id);
        assert_eq!(holder.key, key("looked-up"));
        assert_eq!(Some(holder.fencing_token), response.fencing_token);
        assert_eq!(holder.status, BackendStatus::Scheduled);
        assert_eq!(holder.cluster, cluster());
        assert_eq!(holder.subdomain, response.subdomain);
        assert_eq!(holder.static_token.as_ref(), Some(&response.token));
        assert!(holder.is_live());

        // The namespace is part of the key.
        let mut other_namespace = key("looked-up");
        other_namespace.namespace = "elsewhere".into();
        assert_eq!(db.keys().lookup(&other_namespace).await.unwrap(), None);
        // A NUL cannot be stored, so it is refused up front.
        assert!(matches!(
            db.keys().lookup(&key("nul\0key")).await,
            Err(Error::InvalidArgument {
                argument: "key.name",
                ..
            })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_token_grows_with_every_acquisition() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("fenced")).await.unwrap();
        let t1 = first.fencing_token.expect("token");

        // Released by termination, then acquired again.
        for state in lifecycle() {
            db.backend()
                .update_state(&first.backend_id, &state)
                .await
                .unwrap();
        }
        assert_eq!(db.keys().lookup(&key("fenced")).await.unwrap(), None);
        let second = db.connect(&request("fenced")).await.unwrap();
        assert_ne!(second.backend_id, first.backend_id);
        let t2 = second.fencing_token.expect("token");
        assert!(t2 > t1, "{t2} > {t1}");

        // Taken over after its lease ran out.
        expire_key(&db, &second.backend_id).await;
        let third = db.connect(&request("fenced")).await.unwrap();
        assert_ne!(third.backend_id, second.backend_id);
        let t3 = third.fencing_token.expect("token");
        assert!(t3 > t2, "{t3} > {t2}");
        // The old holder can no longer renew.
        assert_eq!(
            db.keys()
                .renew(&second.backend_id, chrono::Utc::now())
                .await
                .unwrap(),
            KeyRenewal::NotHeld
        );
        assert!(matches!(
            db.keys().renew(&third.backend_id, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::Renewed(acquired) if acquired.token == t3
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_deadlines_follow_the_drones_clock() {
    with_db(|db| async move {
        let d = drone(&db).await;
        // The drone's clock is an hour ahead of the database's.
        assert!(db
            .drone()
            .heartbeat(d.id, chrono::Utc::now() + chrono::Duration::hours(1))
            .await
            .unwrap());
        let backend = db.connect(&request("skewed")).await.unwrap().backend_id;
        let actions = db.backend_actions().pending(d.id, 10).await.unwrap();
        let plane_db::types::BackendAction::Spawn { key: acquired, .. } = &actions[0].action else {
            panic!("expected a spawn action");
        };
        assert_eq!(actions[0].backend_id, backend);
        let holder = db
            .keys()
            .lookup(&key("skewed"))
            .await
            .unwrap()
            .expect("held");
        let skew = acquired.deadlines.hard_terminate_at - holder.expires_at;
        assert!(
            skew > chrono::Duration::minutes(59) && skew < chrono::Duration::minutes(61),
            "deadlines shifted by the drone's skew, got {skew}"
        );
        let deadlines = acquired.deadlines;
        assert!(deadlines.renew_at < deadlines.soft_terminate_at);
        assert!(deadlines.soft_terminate_at < deadlines.hard_terminate_at);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_racing_prevent_renew_says_prevented() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = db.connect(&request("raced")).await.unwrap().backend_id;
        // prevent_renew's update, left uncommitted while a renewal arrives.
        let mut tx = db.pool().begin().await.unwrap();
        sqlx::query("update backend_key set allow_renew = false where id = $1")
            .bind(backend.as_str())
            .execute(&mut *tx)
            .await
            .unwrap();
        let renewal = tokio::spawn({
            let db = db.clone();
            let backend = backend.clone();
            async move { db.keys().renew(&backend, chrono::Utc::now()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!renewal.is_finished(), "the renewal waits for the row");
        tx.commit().await.unwrap();
        assert_eq!(renewal.await.unwrap().unwrap(), KeyRenewal::Prevented);
    })
    .await
}
