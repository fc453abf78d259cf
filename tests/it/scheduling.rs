//! Scheduling inputs: controllers, nodes, drones and picking a drone.

use crate::common::*;
use plane_db::node::NodeRegistration;
use plane_db::testing::statements;
use plane_db::types::{ControllerName, DroneName, DronePoolName, NodeKind};
use plane_db::Error;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_only_eligible_drones() {
    with_db(|db| async move {
        let pool = DronePoolName::default();
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );

        let good = drone(&db).await;
        let picked = db
            .drone()
            .pick_for_spawn(&cluster(), &pool)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(picked.id, good.id);
        assert_eq!(picked.name, good.name);

        // Unready.
        db.drone().set_ready(good.id, false).await.unwrap();
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );
        db.drone().set_ready(good.id, true).await.unwrap();
        // Draining.
        sqlx::query("update drone set draining = true where id = $1")
            .bind(good.id.as_i32())
            .execute(db.pool())
            .await
            .unwrap();
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );
        exec(&db, "update drone set draining = false").await;
        // Silent.
        exec(
            &db,
            "update drone set last_heartbeat = now() - interval '5 minutes'",
        )
        .await;
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );
        assert!(db
            .drone()
            .heartbeat(good.id, chrono::Utc::now())
            .await
            .unwrap());
        assert!(db
            .drone()
            .pick_for_spawn(&cluster(), &pool)
            .await
            .unwrap()
            .is_some());
        // Controller offline, or controller silent.
        db.controller()
            .heartbeat(&good.controller, false, "0.1.0", "abc")
            .await
            .unwrap();
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );
        db.controller()
            .heartbeat(&good.controller, true, "0.1.0", "abc")
            .await
            .unwrap();
        exec(
            &db,
            "update controller set last_heartbeat = now() - interval '5 minutes'",
        )
        .await;
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None
        );
        db.controller()
            .heartbeat(&good.controller, true, "0.1.0", "abc")
            .await
            .unwrap();
        // Other cluster, other pool.
        let other_cluster = "other.test".parse().unwrap();
        assert_eq!(
            db.drone()
                .pick_for_spawn(&other_cluster, &pool)
                .await
                .unwrap(),
            None
        );
        let gpu = DronePoolName::from("gpu");
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &gpu).await.unwrap(),
            None
        );
        let gpu_drone = drone_in(&db, &cluster(), &gpu).await;
        assert_eq!(
            db.drone()
                .pick_for_spawn(&cluster(), &gpu)
                .await
                .unwrap()
                .unwrap()
                .id,
            gpu_drone.id
        );
        assert_eq!(
            db.drone()
                .pick_for_spawn(&cluster(), &pool)
                .await
                .unwrap()
                .unwrap()
                .id,
            good.id
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_backends_over_drones() {
    with_db(|db| async move {
        let a = drone(&db).await;
        let b = drone(&db).await;
        let mut per_drone: HashMap<_, usize> = HashMap::new();
        for _ in 0..20 {
            let response = spawn(&db).await;
            *per_drone.entry(response.drone.unwrap()).or_default() += 1;
        }
        // With a sample of 2 out of 2 drones the least loaded always wins: an even split.
        assert_eq!(per_drone.get(&a.name), Some(&10));
        assert_eq!(per_drone.get(&b.name), Some(&10));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registration_returns_a_stable_id_and_checks_the_name() {
    with_db(|db| async move {
        let controller = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller, true, "0.1.0", "abc")
            .await
            .unwrap();
        let name = DroneName::new_random();
        let c = cluster();
        let registration = NodeRegistration {
            controller: &controller,
            kind: NodeKind::Drone,
            name: name.as_str(),
            cluster: Some(&c),
            plane_version: "0.1.0",
            plane_hash: "abc",
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let first = db.node().register(&registration).await.unwrap();
        let again = db.node().register(&registration).await.unwrap();
        assert_eq!(first.id, again.id);
        assert!(
            again.connected_at > first.connected_at,
            "a new connection each time"
        );

        let wrong = NodeRegistration {
            kind: NodeKind::Proxy,
            ..registration.clone()
        };
        assert!(matches!(
            db.node().register(&wrong).await,
            Err(Error::InvalidArgument {
                argument: "name",
                ..
            })
        ));
        // A DNS server has no cluster; registering it twice still finds the same row.
        let dns = plane_db::types::AcmeDnsServerName::new_random();
        let dns_registration = NodeRegistration {
            kind: NodeKind::AcmeDnsServer,
            name: dns.as_str(),
            cluster: None,
            ..registration.clone()
        };
        let d1 = db.node().register(&dns_registration).await.unwrap();
        let d2 = db.node().register(&dns_registration).await.unwrap();
        assert_eq!(d1.id, d2.id);
        // Heartbeats for unknown drones report false.
        assert!(!db
            .drone()
            .heartbeat(plane_db::types::NodeId::from(987_654), chrono::Utc::now())
            .await
            .unwrap());
        assert!(!db
            .drone()
            .set_ready(plane_db::types::NodeId::from(987_654), true)
            .await
            .unwrap());
        db.health_check().await.unwrap();
    })
    .await
}

/// `connect` picks its drone inside its spawn statement, alone or in a batch: by the same
/// rules as `pick_for_spawn`, and each backend of a batch on its own pick. The rules are
/// written in three statements (`pick_for_spawn`, the lone and the batch spawn statement; a
/// shared database function was measured too slow, see BENCHMARKS.md "Group commit"), so
/// all three are checked here against the same drones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_schedules_only_on_eligible_drones_alone_and_batched() {
    with_db(|db| async move {
        let good = [drone(&db).await, drone(&db).await];
        let unready = drone(&db).await;
        db.drone().set_ready(unready.id, false).await.unwrap();
        let draining = drone(&db).await;
        exec(&db, &format!("update drone set draining = true where id = {}", draining.id)).await;
        let silent = drone(&db).await;
        exec(
            &db,
            &format!("update drone set last_heartbeat = now() - interval '5 minutes' where id = {}", silent.id),
        )
        .await;
        let offline = drone(&db).await;
        db.controller()
            .heartbeat(&offline.controller, false, "0.1.0", "abc")
            .await
            .unwrap();
        let silent_controller = drone(&db).await;
        exec(
            &db,
            &format!(
                "update controller set last_heartbeat = now() - interval '5 minutes' where id = '{}'",
                silent_controller.controller
            ),
        )
        .await;
        let gpu = DronePoolName::from("gpu");
        let gpu_drone = drone_in(&db, &cluster(), &gpu).await;
        let other_cluster: plane_db::types::ClusterName = "other.test".parse().unwrap();
        let other_drone = drone_in(&db, &other_cluster, &DronePoolName::default()).await;

        // `pick_for_spawn` picks among the same drones.
        let eligible: Vec<&DroneName> = good.iter().map(|d| &d.name).collect();
        for _ in 0..20 {
            let picked = db
                .drone()
                .pick_for_spawn(&cluster(), &DronePoolName::default())
                .await
                .unwrap()
                .expect("an eligible drone");
            assert!(eligible.contains(&&picked.name), "{picked:?}");
        }
        let pick = |cluster: plane_db::types::ClusterName, pool: &DronePoolName| {
            let db = db.clone();
            let pool = pool.clone();
            async move {
                db.drone()
                    .pick_for_spawn(&cluster, &pool)
                    .await
                    .unwrap()
                    .map(|d| d.name)
            }
        };
        assert_eq!(pick(cluster(), &gpu).await, Some(gpu_drone.name.clone()));
        assert_eq!(
            pick(other_cluster.clone(), &DronePoolName::default()).await,
            Some(other_drone.name.clone())
        );
        assert_eq!(pick(cluster(), &DronePoolName::from("none")).await, None);

        // The batch statement, certainly (not only when concurrent calls happen to form a
        // batch): 8 backends in one statement, then the lone statement for 8 more.
        let forced: Vec<_> = (0..8)
            .map(|i| {
                request_named(
                    &format!("forced-batch-{i}"),
                    &format!("forced-batch-{i}").parse().unwrap(),
                )
            })
            .collect();
        let alone: Vec<_> = (0..8)
            .map(|i| {
                request_named(
                    &format!("forced-alone-{i}"),
                    &format!("forced-alone-{i}").parse().unwrap(),
                )
            })
            .collect();
        for (requests, way) in [
            (&forced, statements::Written::OneBatch),
            (&alone, statements::Written::Alone),
        ] {
            let answers = statements::spawn(&db, requests, way).await.unwrap();
            assert_eq!(answers.len(), 8);
            for answer in answers {
                assert!(
                    eligible.iter().any(|d| answer.contains(&format!("{:?}", d.as_str()))),
                    "{way:?}: {answer}"
                );
            }
        }
        exec(&db, "delete from token").await;
        exec(&db, "delete from backend_action").await;
        exec(&db, "delete from backend_key").await;
        exec(&db, "delete from backend_state").await;
        exec(&db, "delete from backend").await;

        // 8 alone, then 32 at once (batched).
        let mut drones = Vec::new();
        for i in 0..8 {
            drones.push(db.connect(&request(&format!("alone-{i}"))).await.unwrap().drone);
        }
        let mut tasks = Vec::new();
        for i in 0..32 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.connect(&request(&format!("batched-{i}"))).await.unwrap().drone
            }));
        }
        for t in tasks {
            drones.push(t.await.unwrap());
        }
        let mut per_drone: HashMap<DroneName, usize> = HashMap::new();
        for d in drones {
            *per_drone.entry(d.expect("spawned")).or_default() += 1;
        }
        assert!(
            per_drone.keys().all(|d| eligible.contains(&d)),
            "only eligible drones: {per_drone:?}"
        );
        assert_eq!(per_drone.values().sum::<usize>(), 40);
        // An even split, give or take: a batch spreads its backends as if they were picked
        // one after the other (before it did not, 35 of 40 went to one drone).
        for d in &good {
            let n = per_drone.get(&d.name).copied().unwrap_or(0);
            assert!((15..=25).contains(&n), "{per_drone:?}");
        }

        // The pool and the cluster of the spawn config decide.
        let mut in_gpu = request("in-gpu");
        if let Some(spawn) = in_gpu.spawn_config.as_mut() {
            spawn.pool = gpu.clone();
        }
        assert_eq!(db.connect(&in_gpu).await.unwrap().drone, Some(gpu_drone.name));
        let mut elsewhere = request("elsewhere");
        if let Some(spawn) = elsewhere.spawn_config.as_mut() {
            spawn.cluster = Some(other_cluster);
        }
        assert_eq!(db.connect(&elsewhere).await.unwrap().drone, Some(other_drone.name));
        // No eligible drone: nothing is created.
        let mut nowhere = request("nowhere");
        if let Some(spawn) = nowhere.spawn_config.as_mut() {
            spawn.pool = DronePoolName::from("none");
        }
        assert!(matches!(
            db.connect(&nowhere).await,
            Err(plane_db::ConnectError::NoDroneAvailable { .. })
        ));
        let key_rows: i64 = sqlx::query_scalar("select count(*) from backend_key where key_name = 'nowhere'")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(key_rows, 0);
    })
    .await
}
