//! Out-of-range configuration is bad input too: the bus keeps delivering with a page size of
//! zero or below (it reads at least one row per page) and a queue limit of zero.

use crate::support::*;
use plane_db::events::{emit, BusConfig};
use plane_db::types::{BackendName, BackendState};
use plane_db::Config;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_bus_config_still_delivers() {
    with_url(|url| async move {
        for (batch, pending) in [(0, 10), (-5, 10), (1, 0), (i64::MAX, usize::MAX)] {
            let config = Config {
                bus: BusConfig {
                    fetch_batch_size: batch,
                    max_pending_per_subscription: pending,
                    ..BusConfig::default()
                },
                ..Config::default()
            };
            let db = open(&url, 4, config).await;
            let key = format!("cfg-{batch}-{pending}");
            let name: BackendName = key.parse().unwrap();
            let mut sub = db.subscribe_with_key::<BackendState>(&name).await.unwrap();
            let mut conn = db.pool().acquire().await.unwrap();
            emit(
                &mut conn,
                Some(&key.parse().unwrap()),
                &BackendState::Loading,
            )
            .await
            .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap_or_else(|_| panic!("nothing delivered with batch {batch}, queue {pending}"))
                .unwrap();
            // A queue limit of zero behaves as one: the event arrives.
            assert!(got.is_ok(), "batch {batch}, queue {pending}: {got:?}");
            figures(
                "bad_config",
                &[
                    ("fetch_batch_size", batch.to_string()),
                    ("max_pending", pending.to_string()),
                    ("delivered", "1".into()),
                ],
            );
        }
    })
    .await
}
