//! A real failover: a streaming replica of a private server is promoted while the
//! controller's connections go through an address that is switched to it (as a virtual IP or
//! a DNS name would be).
//!
//! - Switchover (the replica had replayed everything): every event is delivered once, before
//!   and after; nothing is delivered again.
//! - Lagging replica (it missed the last events of the old primary): events written on the
//!   new primary are all delivered; the events of the lost tail had been delivered from the
//!   old primary (their changes are gone with it: RELIABILITY.md). Events from before the
//!   failover may be delivered again (up to the replica's last restartpoint): counted, not
//!   promised away. Then the old primary comes back without a rewind and the address points
//!   at it again: its new events are delivered once, nothing delivered before again.

use crate::support::*;
use plane_db::events::{emit, Lagged};
use plane_db::testing::{private_server, TestServer};
use plane_db::types::BackendState;
use plane_db::{Config, PlaneDatabase};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP forwarder whose target can be switched; switching cuts every open connection.
struct Forwarder {
    port: u16,
    target: Arc<Mutex<u16>>,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(Mutex::new(target));
        let open: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (target, open) = (target.clone(), open.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let to = *target.lock().unwrap();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    open.lock().unwrap().push(task);
                }
            })
        };
        Self {
            port,
            target,
            open,
            accept,
        }
    }

    fn switch(&self, to: u16) {
        *self.target.lock().unwrap() = to;
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        self.switch(0);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Emits one event per key, retrying through the failover.
async fn write(db: &PlaneDatabase, keys: &[String]) {
    for key in keys {
        let mut tries = 0;
        loop {
            let attempt = async {
                let mut conn = db.pool().acquire().await?;
                emit(
                    &mut conn,
                    Some(&key.parse().unwrap()),
                    &BackendState::Loading,
                )
                .await?;
                Ok::<_, plane_db::Error>(())
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 500, "the new primary never took writes: {e:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Collects deliveries until nothing arrives for `quiet`.
async fn drain(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, u64>>,
    delivered: &mut HashMap<String, u32>,
    quiet: Duration,
) -> u64 {
    let mut lagged = 0;
    while let Ok(Some(got)) = tokio::time::timeout(quiet, rx.recv()).await {
        match got {
            Ok(key) => *delivered.entry(key).or_default() += 1,
            Err(missed) => lagged += missed,
        }
    }
    lagged
}

async fn setup() -> Option<(Arc<TestServer>, Arc<TestServer>, String)> {
    let primary = match blocking(private_server).await {
        Ok(server) => Arc::new(server),
        // No local Postgres binaries fails too: these scenarios need a server of their own,
        // and a scenario that did not run must not pass.
        Err(error) => panic!("could not start a private server: {error}"),
    };
    let database = primary.create_database().await.unwrap();
    migrate(&database.url).await;
    // The controller connects as an unprivileged role (with the functions a checkpoint-based
    // floor needed revoked); the replica copies the role.
    create_app_role(&database.url).await;
    let p = primary.clone();
    let replica = match blocking(move || p.replica()).await {
        Ok(replica) => Arc::new(replica),
        Err(error) => panic!("could not start a replica: {error}"),
    };
    Some((primary, replica, database.name))
}

fn subscribe_channel(
    mut sub: plane_db::events::Subscription<BackendState>,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<String, u64>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(got) = sub.next().await {
            let msg = match got {
                Ok(n) => Ok(n.key.unwrap()),
                Err(Lagged { missed }) => Err(missed),
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    rx
}

async fn wait_replayed(primary: &PlaneDatabase, replica_url: &str) {
    let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(primary.pool())
        .await
        .unwrap();
    let replica = sqlx::PgPool::connect(replica_url).await.unwrap();
    for _ in 0..500 {
        let caught_up: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&lsn)
            .fetch_one(&replica)
            .await
            .unwrap();
        if caught_up {
            replica.close().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the replica did not catch up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_to_a_caught_up_replica() {
    let Some((primary, replica, name)) = setup().await else {
        return;
    };
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let forwarder = Forwarder::start(primary.port().unwrap()).await;
        let url = app_url(&format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            forwarder.port
        ));
        let db = open(&url, 4, Config::default()).await;
        let mut rx = subscribe_channel(db.subscribe::<BackendState>().await.unwrap());
        let mut delivered = HashMap::new();

        let before = keys("before", 100);
        write(&db, &before).await;
        drain(&mut rx, &mut delivered, Duration::from_millis(1_000)).await;
        wait_replayed(&db, &replica.url_for(&name)).await;

        // Switchover: stop the primary, promote the replica, move the address.
        let (p, r) = (primary.clone(), replica.clone());
        blocking(move || {
            p.stop()?;
            r.run_tool("pg_ctl", &["promote", "-w"]).map(drop)
        })
        .await
        .unwrap();
        forwarder.switch(replica.port().unwrap());

        let after = keys("after", 100);
        write(&db, &after).await;
        let lagged = drain(&mut rx, &mut delivered, Duration::from_secs(3)).await;

        let lost = before
            .iter()
            .chain(&after)
            .filter(|k| !delivered.contains_key(*k))
            .count();
        let duplicated: u32 = delivered.values().map(|n| n - 1).sum();
        figures(
            "promotion(switchover)",
            &[
                ("events_before", before.len().to_string()),
                ("events_after", after.len().to_string()),
                ("received", delivered.values().sum::<u32>().to_string()),
                ("lost", lost.to_string()),
                ("duplicated", duplicated.to_string()),
                ("lagged", lagged.to_string()),
            ],
        );
        assert_eq!(lost, 0);
        assert_eq!(duplicated, 0);
        assert_eq!(lagged, 0);
        db.pool().close().await;
    })
    .await
    .expect("scenario timed out");
    blocking(move || drop((primary, replica))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_lagging_replica() {
    let Some((primary, replica, name)) = setup().await else {
        return;
    };
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let forwarder = Forwarder::start(primary.port().unwrap()).await;
        let url = app_url(&format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            forwarder.port
        ));
        let db = open(&url, 4, Config::default()).await;
        let mut rx = subscribe_channel(db.subscribe::<BackendState>().await.unwrap());
        let mut delivered = HashMap::new();

        let before = keys("before", 50);
        write(&db, &before).await;
        drain(&mut rx, &mut delivered, Duration::from_millis(1_000)).await;
        wait_replayed(&db, &replica.url_for(&name)).await;

        // The replica stops receiving; the primary goes on (the tail the replica will miss),
        // then dies; the replica comes back and is promoted.
        let r = replica.clone();
        blocking(move || r.stop()).await.unwrap();
        let tail = keys("tail", 300);
        write(&db, &tail).await;
        drain(&mut rx, &mut delivered, Duration::from_millis(1_000)).await;
        let (p, r) = (primary.clone(), replica.clone());
        blocking(move || {
            p.stop()?;
            r.start()?;
            r.run_tool("pg_ctl", &["promote", "-w"]).map(drop)
        })
        .await
        .unwrap();
        forwarder.switch(replica.port().unwrap());

        let after = keys("after", 30);
        write(&db, &after).await;
        let late = keys("late", 30);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        write(&db, &late).await;
        let lagged = drain(&mut rx, &mut delivered, Duration::from_secs(3)).await;

        let count = |ks: &[String]| ks.iter().filter(|k| delivered.contains_key(*k)).count();
        let lost_after = after.len() + late.len() - count(&after) - count(&late);
        let duplicated_after: u32 = after
            .iter()
            .chain(&late)
            .filter_map(|k| delivered.get(k))
            .map(|n| n - 1)
            .sum();
        let redelivered_before: u32 = before
            .iter()
            .chain(&tail)
            .filter_map(|k| delivered.get(k))
            .map(|n| n - 1)
            .sum();
        figures(
            "promotion(lagging)",
            &[
                ("events_before", before.len().to_string()),
                ("tail_lost_with_old_primary", tail.len().to_string()),
                ("tail_delivered_before_failover", count(&tail).to_string()),
                ("events_after", (after.len() + late.len()).to_string()),
                ("lost_after", lost_after.to_string()),
                ("duplicated_after", duplicated_after.to_string()),
                ("before_delivered_again", redelivered_before.to_string()),
                ("lagged", lagged.to_string()),
            ],
        );
        assert_eq!(count(&before), before.len());
        assert_eq!(lost_after, 0, "events written on the new primary were lost");
        assert_eq!(duplicated_after, 0);
        // The re-read reaches below the events delivered before the failover (the replica's
        // ids went back below them); the bus skips those it delivered.
        assert_eq!(
            redelivered_before, 0,
            "events from before the failover delivered again"
        );

        // The old primary comes back as it was, without a rewind (it still holds the tail,
        // not the new primary's events), and the address points at it again: another
        // server, another past.
        let p = primary.clone();
        blocking(move || p.start()).await.unwrap();
        forwarder.switch(primary.port().unwrap());
        let settled: HashMap<String, u32> = delivered.clone();
        let back = keys("back", 20);
        write(&db, &back).await;
        let lagged_back = drain(&mut rx, &mut delivered, Duration::from_secs(3)).await;
        let back_received = back.iter().filter(|k| delivered.contains_key(*k)).count();
        let duplicated_back: u32 = back
            .iter()
            .filter_map(|k| delivered.get(k))
            .map(|n| n - 1)
            .sum();
        let old_again: u32 = settled
            .iter()
            .map(|(k, n)| delivered.get(k).copied().unwrap_or(0) - n)
            .sum();
        figures(
            "promotion(old_primary_back)",
            &[
                ("events_written", back.len().to_string()),
                ("received", back_received.to_string()),
                ("duplicated", duplicated_back.to_string()),
                ("earlier_events_delivered_again", old_again.to_string()),
                ("lagged", lagged_back.to_string()),
            ],
        );
        assert_eq!(back_received, back.len(), "events on the old primary lost");
        assert_eq!(duplicated_back, 0);
        assert_eq!(old_again, 0, "events delivered before were delivered again");
        db.pool().close().await;
    })
    .await
    .expect("scenario timed out");
    blocking(move || drop((primary, replica))).await;
}
