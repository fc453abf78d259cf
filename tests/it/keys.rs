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
            .key()
            .lookup(&key("renew-me"))
            .await
            .unwrap()
            .expect("held");

        // The drone's clock runs an hour fast: its deadlines are counted on its clock.
        let drone_now = chrono::Utc::now() + chrono::Duration::hours(1);
        let renewed = match db.key().renew(&backend, drone_now).await.unwrap() {
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
            .key()
            .lookup(&key("renew-me"))
            .await
            .unwrap()
            .expect("held");
        assert!(after.expires_at >= before.expires_at);
        // The stored lease runs on the database's clock, and outlives the hard-terminate
        // deadline by the margin: 60 s by default, as in Plane.
        assert_eq!(lease.expires_after(), std::time::Duration::from_secs(60));
        let remaining = after.expires_at - after.as_of;
        assert!(remaining <= secs(lease.expires_after()));
        assert!(remaining > secs(lease.expires_after()) - chrono::Duration::seconds(10));
        // A time at the end of the calendar is an error, not a panic.
        assert!(matches!(
            db.key()
                .renew(&backend, chrono::DateTime::<chrono::Utc>::MAX_UTC)
                .await,
            Err(Error::InvalidArgument {
                argument: "drone_local_time",
                ..
            })
        ));

        assert!(db.key().prevent_renew(&backend).await.unwrap());
        assert!(
            !db.key().prevent_renew(&backend).await.unwrap(),
            "already prevented"
        );
        assert_eq!(
            db.key().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::Prevented
        );
        let unchanged = db
            .key()
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
async fn a_missing_key_is_not_renewed() {
    with_db(|db| async move {
        drone(&db).await;
        let unknown = BackendName::new_random();
        assert_eq!(
            db.key().renew(&unknown, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::NotHeld
        );
        assert!(!db.key().prevent_renew(&unknown).await.unwrap());
        assert!(!db.key().remove_if_expired(&unknown).await.unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_key_is_never_removed() {
    with_db(|db| async move {
        drone(&db).await;
        let backend = db.connect(&request("remove-me")).await.unwrap().backend_id;
        assert!(!db.key().remove_if_expired(&backend).await.unwrap());
        assert!(db.key().lookup(&key("remove-me")).await.unwrap().is_some());

        expire_key(&db, &backend).await;
        let holder = db
            .key()
            .lookup(&key("remove-me"))
            .await
            .unwrap()
            .expect("held");
        assert!(!holder.is_live());
        assert!(db.key().remove_if_expired(&backend).await.unwrap());
        assert!(
            !db.key().remove_if_expired(&backend).await.unwrap(),
            "already gone"
        );
        assert_eq!(db.key().lookup(&key("remove-me")).await.unwrap(), None);
        assert_eq!(
            db.key().renew(&backend, chrono::Utc::now()).await.unwrap(),
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
            .key()
            .lookup(&key("looked-up"))
            .await
            .unwrap()
            .expect("held");
        assert_eq!(holder.backend_id, response.backend_id);
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
        assert_eq!(db.key().lookup(&other_namespace).await.unwrap(), None);
        // A NUL cannot be stored, so it is refused up front.
        assert!(matches!(
            db.key().lookup(&key("nul\0key")).await,
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
        assert_eq!(db.key().lookup(&key("fenced")).await.unwrap(), None);
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
            db.key()
                .renew(&second.backend_id, chrono::Utc::now())
                .await
                .unwrap(),
            KeyRenewal::NotHeld
        );
        assert!(matches!(
            db.key().renew(&third.backend_id, chrono::Utc::now()).await.unwrap(),
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
        let actions = db.backend_action().pending(d.id, 10).await.unwrap();
        let plane_db::types::BackendAction::Spawn { key: acquired, .. } = &actions[0].action else {
            panic!("expected a spawn action");
        };
        assert_eq!(actions[0].backend_id, backend);
        let holder = db
            .key()
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
            async move { db.key().renew(&backend, chrono::Utc::now()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!renewal.is_finished(), "the renewal waits for the row");
        tx.commit().await.unwrap();
        assert_eq!(renewal.await.unwrap().unwrap(), KeyRenewal::Prevented);
    })
    .await
}

/// Moves the lease of `backend`'s key as if the backend had been scheduled (or had last
/// renewed) `seconds` ago: its `expires_at` becomes that time plus the lease.
async fn age_lease(db: &plane_db::PlaneDatabase, backend: &BackendName, seconds: f64) {
    let expires_after = db.config().key_lease.expires_after().as_secs_f64();
    sqlx::query(
        "update backend_key set expires_at = now() + make_interval(secs => $2 - $3) where id = $1",
    )
    .bind(backend.as_str())
    .bind(expires_after)
    .bind(seconds)
    .execute(db.pool())
    .await
    .unwrap();
}

fn renewed_token(renewal: KeyRenewal) -> i64 {
    match renewal {
        KeyRenewal::Renewed(acquired) => acquired.token,
        other => panic!("expected a renewal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_expires_ten_seconds_after_the_hard_terminate_deadline() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let response = db.connect(&request("timed")).await.unwrap();
        let lease = db.config().key_lease.clone();
        assert_eq!(
            lease.hard_terminate_after,
            std::time::Duration::from_secs(50)
        );
        assert_eq!(lease.expiration_margin, std::time::Duration::from_secs(10));
        // Both written by the one statement, so on the same clock reading.
        let (scheduled, expires): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
            sqlx::query_as(
                "select b.last_status_time, k.expires_at from backend b
                 join backend_key k on k.id = b.id where b.id = $1",
            )
            .bind(response.backend_id.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(expires - scheduled, chrono::Duration::seconds(60));
        // The drone is told to hard-terminate 10 s before the key expires.
        let actions = db.backend_action().pending(d.id, 10).await.unwrap();
        let plane_db::types::BackendAction::Spawn { key: acquired, .. } = &actions[0].action else {
            panic!("expected a spawn action");
        };
        let margin = expires - acquired.deadlines.hard_terminate_at;
        assert!(
            (margin - chrono::Duration::seconds(10))
                .num_milliseconds()
                .abs()
                <= 1,
            "key expiry - hard terminate = {margin}"
        );
        assert_eq!(
            acquired.deadlines.hard_terminate_at - acquired.deadlines.renew_at,
            chrono::Duration::seconds(20)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_just_before_and_just_after_expiry_keeps_the_token() {
    with_db(|db| async move {
        drone(&db).await;
        let response = db.connect(&request("edge")).await.unwrap();
        let backend = response.backend_id;
        let token = response.fencing_token.expect("token");

        // 52 s after scheduling: past the hard-terminate deadline (50 s), within the margin.
        // (Before, the key expired at 50 s: this renewal was refused.)
        age_lease(&db, &backend, 52.0).await;
        let holder = db.key().lookup(&key("edge")).await.unwrap().unwrap();
        assert!(holder.is_live(), "live in the margin");
        let renewal = db.key().renew(&backend, chrono::Utc::now()).await.unwrap();
        assert_eq!(renewed_token(renewal), token);

        // Just before expiry (59.5 s) and just after it (60.5 s, nobody took the key).
        for seconds in [59.5, 60.5] {
            age_lease(&db, &backend, seconds).await;
            let before = db.key().lookup(&key("edge")).await.unwrap().unwrap();
            assert_eq!(before.is_live(), seconds < 60.0, "at {seconds} s");
            let renewal = db.key().renew(&backend, chrono::Utc::now()).await.unwrap();
            assert_eq!(renewed_token(renewal), token, "at {seconds} s");
            let after = db.key().lookup(&key("edge")).await.unwrap().unwrap();
            assert!(after.is_live(), "renewed at {seconds} s");
            let remaining = after.expires_at - after.as_of;
            assert!(
                remaining > chrono::Duration::seconds(55)
                    && remaining <= chrono::Duration::seconds(60),
                "a full lease again at {seconds} s: {remaining}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_in_the_margin_gets_the_existing_backend_and_after_it_takes_over() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("margin")).await.unwrap();
        let t1 = first.fencing_token.expect("token");

        // 52 s after scheduling: the drone was told to hard-terminate at 50 s, but the key
        // is still the backend's (before: a second backend was spawned here).
        age_lease(&db, &first.backend_id, 52.0).await;
        let again = db.connect(&request("margin")).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, first.backend_id);
        age_lease(&db, &first.backend_id, 59.5).await;
        let again = db.connect(&request("margin")).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, first.backend_id);
        assert_eq!(count(&db, "backend").await, 1);

        // After the margin: taken over, with a larger token.
        age_lease(&db, &first.backend_id, 60.5).await;
        let second = db.connect(&request("margin")).await.unwrap();
        assert!(second.spawned);
        assert_ne!(second.backend_id, first.backend_id);
        let t2 = second.fencing_token.expect("token");
        assert!(t2 > t1, "{t2} > {t1}");

        // Taken: the old holder's renewal no longer revives anything.
        assert_eq!(
            db.key()
                .renew(&first.backend_id, chrono::Utc::now())
                .await
                .unwrap(),
            KeyRenewal::NotHeld
        );
        let holder = db.key().lookup(&key("margin")).await.unwrap().unwrap();
        assert_eq!(holder.backend_id, second.backend_id);
        assert_eq!(holder.fencing_token, t2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_nobody_took_is_revived_by_its_holder() {
    with_db(|db| async move {
        drone(&db).await;
        let first = db.connect(&request("lapsed")).await.unwrap();
        let backend = first.backend_id.clone();
        // Long expired (an hour), but nobody connected for the key meanwhile.
        expire_key(&db, &backend).await;
        age_lease(&db, &backend, 3600.0).await;
        assert!(!db
            .key()
            .lookup(&key("lapsed"))
            .await
            .unwrap()
            .unwrap()
            .is_live());

        let renewal = db.key().renew(&backend, chrono::Utc::now()).await.unwrap();
        assert_eq!(
            Some(renewed_token(renewal)),
            first.fencing_token,
            "same token"
        );
        let holder = db.key().lookup(&key("lapsed")).await.unwrap().unwrap();
        assert!(holder.is_live());
        assert_eq!(holder.backend_id, backend);
        // Revived: a connect for the key now gets the backend instead of replacing it.
        let again = db.connect(&request("lapsed")).await.unwrap();
        assert!(!again.spawned);
        assert_eq!(again.backend_id, backend);

        // A prevented renewal stays prevented, expired or not.
        assert!(db.key().prevent_renew(&backend).await.unwrap());
        age_lease(&db, &backend, 3600.0).await;
        assert_eq!(
            db.key().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::Prevented
        );
        // A removed key is not revived either.
        assert!(db.key().remove_if_expired(&backend).await.unwrap());
        assert_eq!(
            db.key().renew(&backend, chrono::Utc::now()).await.unwrap(),
            KeyRenewal::NotHeld
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revival_and_a_takeover_never_both_succeed() {
    with_db(|db| async move {
        drone(&db).await;
        let (mut revived, mut taken) = (0, 0);
        for round in 0..20 {
            let name = format!("contested-{round}");
            let first = db.connect(&request(&name)).await.unwrap();
            age_lease(&db, &first.backend_id, 61.0).await;
            let renew = tokio::spawn({
                let db = db.clone();
                let backend = first.backend_id.clone();
                async move { db.key().renew(&backend, chrono::Utc::now()).await }
            });
            let connect = tokio::spawn({
                let db = db.clone();
                let req = request(&name);
                async move { db.connect(&req).await }
            });
            let renewal = renew.await.unwrap().unwrap();
            let response = connect.await.unwrap().unwrap();
            let holder = db.key().lookup(&key(&name)).await.unwrap().unwrap();
            match renewal {
                KeyRenewal::Renewed(acquired) => {
                    revived += 1;
                    assert_eq!(Some(acquired.token), first.fencing_token);
                    assert!(!response.spawned, "round {round}: revived and taken over");
                    assert_eq!(response.backend_id, first.backend_id);
                    assert_eq!(holder.backend_id, first.backend_id);
                }
                KeyRenewal::NotHeld => {
                    taken += 1;
                    assert!(response.spawned, "round {round}: neither revived nor taken");
                    assert_eq!(holder.backend_id, response.backend_id);
                }
                KeyRenewal::Prevented => panic!("round {round}: nothing prevented renewal"),
            }
        }
        assert_eq!(revived + taken, 20);
        println!("FIGURES revival_vs_takeover: rounds=20 revived={revived} taken_over={taken}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiration_margin_is_configurable() {
    for (margin, takeover_after) in [(0.0, 50.5), (25.0, 75.5)] {
        let mut config = plane_db::Config::default();
        config.key_lease.expiration_margin = std::time::Duration::from_secs_f64(margin);
        with_db_config(config, |db| async move {
            drone(&db).await;
            let first = db.connect(&request("cfg")).await.unwrap();
            let holder = db.key().lookup(&key("cfg")).await.unwrap().unwrap();
            let lease = (holder.expires_at - holder.as_of).num_milliseconds() as f64 / 1000.0;
            assert!(
                lease <= 50.0 + margin && lease > 45.0 + margin,
                "margin {margin}: lease {lease} s"
            );
            // Just before: still the backend's.
            age_lease(&db, &first.backend_id, takeover_after - 1.0).await;
            assert!(!db.connect(&request("cfg")).await.unwrap().spawned);
            age_lease(&db, &first.backend_id, takeover_after).await;
            assert!(db.connect(&request("cfg")).await.unwrap().spawned);
        })
        .await;
    }
}
