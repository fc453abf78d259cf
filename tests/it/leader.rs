//! The leader lease: acquire, renew and resign touch only their own term; an expired lease
//! is taken over; a resignation wakes a waiting follower at once; fenced cleanup under a
//! stale term deletes nothing; a fenced transaction holds a takeover back; the cleanup loop
//! runs on one controller only.

use crate::common::*;
use plane_db::leader::{fence, Acquired, CLEANUP_LEASE};
use plane_db::{CleanupConfig, Config, Error, LeaderConfig, PlaneDatabase};
use std::time::{Duration, Instant};

const LEASE: &str = "test-lease";
const LONG: Duration = Duration::from_secs(30);

fn elected(outcome: Acquired) -> i64 {
    match outcome {
        Acquired::Elected { term } => term,
        other => panic!("expected to be elected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_renew_and_resign_touch_only_their_own_term() {
    with_db(|db| async move {
        let leases = db.leader_lease();
        assert_eq!(db.leader(LEASE).await.unwrap(), None);
        let a = elected(leases.acquire(LEASE, "a", LONG).await.unwrap());
        assert_eq!(a, 1);
        // B finds A holding it, with about the whole lease to go.
        match leases.acquire(LEASE, "b", LONG).await.unwrap() {
            Acquired::Held { leader, expires_in } => {
                let leader = leader.expect("the holder is visible");
                assert_eq!((leader.holder.as_str(), leader.term), ("a", 1));
                assert!(leader.active);
                assert!(expires_in > Duration::from_secs(25), "{expires_in:?}");
            }
            other => panic!("{other:?}"),
        }
        // A renewal or resignation by another holder, or under another term, does nothing.
        assert!(!leases.renew(LEASE, a, "b", LONG).await.unwrap());
        assert!(!leases.renew(LEASE, a + 1, "a", LONG).await.unwrap());
        assert!(!leases.resign(LEASE, a, "b").await.unwrap());
        assert!(!leases.resign(LEASE, a + 1, "a").await.unwrap());
        let still = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!(
            (still.holder.as_str(), still.term, still.active),
            ("a", 1, true)
        );
        // A's own renewal moves its expiry and keeps its term and start.
        assert!(leases.renew(LEASE, a, "a", LONG).await.unwrap());
        let renewed = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!(renewed.elected_at, still.elected_at);
        assert!(renewed.expires_at >= still.expires_at);
        // A resigns: nobody leads; B is elected under a larger term.
        assert!(leases.resign(LEASE, a, "a").await.unwrap());
        assert!(!db.leader(LEASE).await.unwrap().unwrap().active);
        let b = elected(leases.acquire(LEASE, "b", LONG).await.unwrap());
        assert_eq!(b, 2);
        // A's old term can neither renew nor resign B's.
        assert!(!leases.renew(LEASE, a, "a", LONG).await.unwrap());
        assert!(!leases.resign(LEASE, a, "a").await.unwrap());
        let now = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!((now.holder.as_str(), now.term, now.active), ("b", 2, true));
        // A holder that lost track of its term is re-elected at once, with a new term.
        assert_eq!(elected(leases.acquire(LEASE, "b", LONG).await.unwrap()), 3);
        assert!(!leases.renew(LEASE, 2, "b", LONG).await.unwrap());
        // Other leases are independent; status lists them all.
        assert_eq!(
            elected(leases.acquire("other", "a", LONG).await.unwrap()),
            1
        );
        let status = db.status().await.unwrap();
        let names: Vec<(&str, &str, i64)> = status
            .leaders
            .iter()
            .map(|l| (l.lease.as_str(), l.holder.as_str(), l.term))
            .collect();
        assert_eq!(names, [("other", "a", 1), (LEASE, "b", 3)]);
        // Names are checked before any statement.
        assert!(matches!(
            leases.acquire("", "a", LONG).await,
            Err(Error::InvalidArgument {
                argument: "lease",
                ..
            })
        ));
        assert!(matches!(
            leases.acquire(LEASE, &"x".repeat(257), LONG).await,
            Err(Error::InvalidArgument {
                argument: "holder",
                ..
            })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over() {
    with_db(|db| async move {
        let leases = db.leader_lease();
        let short = Duration::from_millis(300);
        let a = elected(leases.acquire(LEASE, "a", short).await.unwrap());
        match leases.acquire(LEASE, "b", LONG).await.unwrap() {
            Acquired::Held { expires_in, .. } => assert!(expires_in <= short),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(short + Duration::from_millis(100)).await;
        // Expired, not resigned: A can no longer renew it, and B takes it.
        assert!(!leases.renew(LEASE, a, "a", LONG).await.unwrap());
        let b = elected(leases.acquire(LEASE, "b", LONG).await.unwrap());
        assert!(b > a);
        let leader = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!((leader.holder.as_str(), leader.term), ("b", b));
    })
    .await
}

/// A configuration whose followers would wait 20 s between tries: only the resignation
/// notice can wake them sooner.
fn slow_followers() -> Config {
    Config {
        leader: LeaderConfig {
            lease_duration: LONG,
            renew_interval: Duration::from_secs(10),
            retry_interval: Duration::from_secs(20),
            safety_margin: Duration::from_secs(2),
        },
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resignation_wakes_a_waiting_follower_at_once() {
    with_db_config(slow_followers(), |db| async move {
        let first = db.spawn_leader_election(LEASE).unwrap();
        let term = tokio::time::timeout(Duration::from_secs(10), first.leading())
            .await
            .expect("the only candidate is elected");
        assert_eq!(first.term(), Some(term));
        let other = PlaneDatabase::with_config(db.pool().clone(), slow_followers());
        let second = other.spawn_leader_election(LEASE).unwrap();
        assert_ne!(first.holder(), second.holder());
        // The second has tried once and waits (for 20 s, or a notice).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(second.term(), None);
        let leader = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!(leader.holder, first.holder());

        let resigned = Instant::now();
        first.resign().await;
        let next = tokio::time::timeout(Duration::from_secs(5), second.leading())
            .await
            .expect("the resignation notice wakes the follower");
        let took = resigned.elapsed();
        println!("FIGURES leader(resign): takeover_ms={}", took.as_millis());
        assert!(next > term);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let leader = db.leader(LEASE).await.unwrap().unwrap();
        assert_eq!(
            (leader.holder.as_str(), leader.term),
            (second.holder(), next)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_cleanup_under_a_stale_term_deletes_nothing() {
    with_db(|db| async move {
        exec(
            &db,
            "insert into event (kind, key, data, created_at)
             select 'test', null, '{}', now() - interval '10 days' from generate_series(1, 5)",
        )
        .await;
        let leases = db.leader_lease();
        let config = CleanupConfig::default();
        // No lease at all: refused.
        assert!(matches!(
            db.run_cleanup_fenced(&config, CLEANUP_LEASE, 1).await,
            Err(Error::NotLeader { term: 1, .. })
        ));
        let old = elected(
            leases
                .acquire(CLEANUP_LEASE, "old", Duration::from_millis(200))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Expired but not yet taken over: refused too.
        assert!(matches!(
            db.run_cleanup_fenced(&config, CLEANUP_LEASE, old).await,
            Err(Error::NotLeader { .. })
        ));
        let new = elected(leases.acquire(CLEANUP_LEASE, "new", LONG).await.unwrap());
        match db.run_cleanup_fenced(&config, CLEANUP_LEASE, old).await {
            Err(Error::NotLeader { lease, term }) => {
                assert_eq!((lease.as_str(), term), (CLEANUP_LEASE, old));
            }
            other => panic!("the stale term ran: {other:?}"),
        }
        assert_eq!(count(&db, "event").await, 5, "nothing deleted");
        assert_eq!(count(&db, "cleanup_run").await, 0, "no run recorded");
        // The current term cleans up.
        fill_first_event_partition(&db).await;
        let summary = db
            .run_cleanup_fenced(&config, CLEANUP_LEASE, new)
            .await
            .unwrap();
        assert_eq!(summary.events, 5);
        assert_eq!(count(&db, "event").await, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_transaction_holds_a_takeover_back_until_it_ends() {
    with_db(|db| async move {
        let leases = db.leader_lease();
        let lease_for = Duration::from_millis(500);
        let a = elected(leases.acquire(LEASE, "a", lease_for).await.unwrap());
        let mut tx = db.pool().begin().await.unwrap();
        fence(&mut tx, LEASE, a).await.unwrap();
        assert!(matches!(
            fence(&mut tx, LEASE, a + 1).await,
            Err(Error::NotLeader { .. })
        ));
        tokio::time::sleep(lease_for + Duration::from_millis(100)).await;
        // Expired, but A's fenced transaction is still open: B's takeover waits for it.
        let other = db.clone();
        let takeover = tokio::spawn(async move {
            let outcome = other.leader_lease().acquire(LEASE, "b", LONG).await;
            (outcome, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!takeover.is_finished(), "the takeover did not wait");
        let committed = Instant::now();
        tx.commit().await.unwrap();
        let (outcome, at) = takeover.await.unwrap();
        assert!(at >= committed);
        assert_eq!(elected(outcome.unwrap()), a + 1);
        // A fence with the old term now fails at once.
        let mut tx = db.pool().begin().await.unwrap();
        assert!(matches!(
            fence(&mut tx, LEASE, a).await,
            Err(Error::NotLeader { .. })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cleanup_loop_of_two_leads_and_hands_over_on_shutdown() {
    let config = Config {
        leader: LeaderConfig::with_lease(Duration::from_secs(3)),
        ..Config::default()
    };
    with_db_config(config.clone(), |db| async move {
        let cleanup = CleanupConfig {
            event_min_age: Duration::from_secs(60),
            ..CleanupConfig::default()
        };
        let other = PlaneDatabase::with_config(db.pool().clone(), config);
        let first = db
            .spawn_cleanup_loop(Duration::from_millis(100), cleanup.clone())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while first.leader_term().is_none() {
            assert!(Instant::now() < deadline, "nobody was elected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let second = other
            .spawn_cleanup_loop(Duration::from_millis(100), cleanup)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(second.leader_term(), None, "two leaders");
        let leader = db.leader(CLEANUP_LEASE).await.unwrap().unwrap();
        assert_eq!(leader.holder, first.holder());
        assert_eq!(Some(leader.term), first.leader_term());
        // The leader cleans up.
        exec(
            &db,
            "insert into event (kind, key, data, created_at)
             select 'test', null, '{}', now() - interval '1 hour' from generate_series(1, 3)",
        )
        .await;
        fill_first_event_partition(&db).await;
        while count(&db, "event").await > 0 {
            assert!(Instant::now() < deadline, "the leader never cleaned up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Shut down, it resigns and the other takes over well before the lease would expire.
        let old_term = first.leader_term();
        let resigned = Instant::now();
        first.shutdown().await;
        while second.leader_term().is_none() {
            assert!(
                resigned.elapsed() < Duration::from_secs(2),
                "no takeover after the resignation"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(second.leader_term() > old_term);
        let leader = db.leader(CLEANUP_LEASE).await.unwrap().unwrap();
        assert_eq!(leader.holder, second.holder());
        // An invalid leader configuration is refused before anything starts.
        let mut bad = Config::default();
        bad.leader.safety_margin = bad.leader.lease_duration;
        let bad = PlaneDatabase::with_config(db.pool().clone(), bad);
        assert!(matches!(
            bad.spawn_cleanup_loop(Duration::from_secs(1), CleanupConfig::default()),
            Err(Error::InvalidArgument {
                argument: "leader.safety_margin",
                ..
            })
        ));
        drop(second);
    })
    .await
}
