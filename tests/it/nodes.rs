//! Drones, nodes, controllers and cluster state.

use crate::common::*;
use plane_db::node::{NodeConnectionStatusChange, NodeRegistration};
use plane_db::types::{
    AnyNodeName, ControllerName, DroneName, DronePoolName, NodeId, NodeKind, ProxyName,
};
use plane_db::{Error, PlaneDatabase};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn registration<'r>(
    controller: &'r ControllerName,
    kind: NodeKind,
    name: &'r str,
    cluster: &'r plane_db::types::ClusterName,
) -> NodeRegistration<'r> {
    NodeRegistration {
        controller,
        kind,
        name,
        cluster: Some(cluster),
        plane_version: "0.1.0",
        plane_hash: "abc",
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

async fn online_controller(db: &PlaneDatabase) -> ControllerName {
    let controller = ControllerName::new_random();
    db.controller()
        .heartbeat(&controller, true, "0.1.0", "abc")
        .await
        .unwrap();
    controller
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_says_whether_it_started_draining() {
    with_db(|db| async move {
        let d = drone(&db).await;
        assert!(
            db.drone().drain(d.id).await.unwrap(),
            "first drain starts it"
        );
        assert!(!db.drone().drain(d.id).await.unwrap(), "already draining");
        assert!(matches!(
            db.drone().drain(NodeId::from(987_654)).await,
            Err(Error::NotFound { what: "drone", .. })
        ));
        // A draining drone is never picked.
        assert_eq!(
            db.drone()
                .pick_for_spawn(&cluster(), &DronePoolName::default())
                .await
                .unwrap(),
            None
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_drains_report_one_start() {
    with_db(|db| async move {
        let d = drone(&db).await;
        let drains = (0..8).map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.drone().drain(d.id).await.unwrap() })
        });
        let mut started = 0;
        for drain in drains {
            if drain.await.unwrap() {
                started += 1;
            }
        }
        assert_eq!(started, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drones_pool_and_the_drones_of_a_pool() {
    with_db(|db| async move {
        let gpu = DronePoolName::from("gpu");
        let a = drone_in(&db, &cluster(), &gpu).await;
        let b = drone_in(&db, &cluster(), &gpu).await;
        let other = drone(&db).await;
        let silent = drone_in(&db, &cluster(), &gpu).await;
        exec(
            &db,
            &format!(
                "update drone set last_heartbeat = now() - interval '10 minutes' where id = {}",
                silent.id
            ),
        )
        .await;

        assert_eq!(db.drone().pool(a.id).await.unwrap(), gpu);
        assert_eq!(
            db.drone().pool(other.id).await.unwrap(),
            DronePoolName::default()
        );
        assert!(matches!(
            db.drone().pool(NodeId::from(987_654)).await,
            Err(Error::NotFound { what: "drone", .. })
        ));

        db.drone().set_ready(b.id, false).await.unwrap();
        let now = chrono::Utc::now();
        assert!(db.drone().heartbeat(a.id, now).await.unwrap());
        let listed = db
            .drone()
            .drones_for_pool(&cluster(), &gpu, Duration::from_secs(60))
            .await
            .unwrap();
        let ids: Vec<NodeId> = listed.iter().map(|d| d.id).collect();
        assert_eq!(
            ids,
            [b.id, a.id],
            "newest first; the silent and other-pool drones left out"
        );
        let listed_a = &listed[1];
        assert_eq!(listed_a.name, a.name);
        assert!(listed_a.ready);
        assert!(!listed[0].ready);
        assert_eq!(listed_a.controller.as_ref(), Some(&a.controller));
        assert_eq!(listed_a.plane_version, "0.1.0");
        assert!(listed_a.heartbeat_age < chrono::Duration::seconds(60));
        assert!(listed_a.heartbeat_age >= chrono::Duration::zero());
        // Postgres keeps microseconds.
        assert_eq!(
            listed_a.last_local_time.map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros())
        );
        // A wider window brings the silent drone back.
        let all = db
            .drone()
            .drones_for_pool(&cluster(), &gpu, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(all.len(), 3);
        assert!(all[0].heartbeat_age >= chrono::Duration::minutes(9));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_drone_is_never_picked() {
    with_db(|db| async move {
        let controller = online_controller(&db).await;
        let name = DroneName::new_random();
        let connection = db
            .node()
            .register(&registration(
                &controller,
                NodeKind::Drone,
                name.as_str(),
                &cluster(),
            ))
            .await
            .unwrap();
        db.drone()
            .register(connection.id, true, &DronePoolName::default())
            .await
            .unwrap();
        let pool = DronePoolName::default();
        assert!(db
            .drone()
            .pick_for_spawn(&cluster(), &pool)
            .await
            .unwrap()
            .is_some());
        assert!(db
            .node()
            .mark_offline(connection, &controller)
            .await
            .unwrap());
        assert_eq!(
            db.drone().pick_for_spawn(&cluster(), &pool).await.unwrap(),
            None,
            "a drone no controller holds is orphaned"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_offline_by_a_stale_connection_is_refused() {
    with_db(|db| async move {
        let first_controller = online_controller(&db).await;
        let second_controller = online_controller(&db).await;
        let name = ProxyName::new_random();
        let mut events = db.subscribe::<NodeConnectionStatusChange>().await.unwrap();

        let old = db
            .node()
            .register(&registration(
                &first_controller,
                NodeKind::Proxy,
                name.as_str(),
                &cluster(),
            ))
            .await
            .unwrap();
        // The proxy reconnects through another controller.
        let new = db
            .node()
            .register(&registration(
                &second_controller,
                NodeKind::Proxy,
                name.as_str(),
                &cluster(),
            ))
            .await
            .unwrap();
        assert_eq!(old.id, new.id);
        // It reconnects once more through the second controller; the cleanup of the
        // connection it replaced runs late. Same controller, stale connection: refused.
        let newer = db
            .node()
            .register(&registration(
                &second_controller,
                NodeKind::Proxy,
                name.as_str(),
                &cluster(),
            ))
            .await
            .unwrap();
        assert!(!db
            .node()
            .mark_offline(new, &second_controller)
            .await
            .unwrap());
        let new = newer;

        // The first controller notices its (old) connection dropped: refused.
        assert!(!db
            .node()
            .mark_offline(old, &first_controller)
            .await
            .unwrap());
        // The right connection but the wrong controller: refused.
        assert!(!db
            .node()
            .mark_offline(new, &first_controller)
            .await
            .unwrap());
        let node = db.node().get(new.id).await.unwrap().expect("node");
        assert_eq!(node.controller.as_ref(), Some(&second_controller));
        assert!(node.active);

        assert!(db
            .node()
            .mark_offline(new, &second_controller)
            .await
            .unwrap());
        let node = db.node().get(new.id).await.unwrap().expect("node");
        assert_eq!(node.controller, None);
        assert!(!node.active);
        assert!(
            !db.node()
                .mark_offline(new, &second_controller)
                .await
                .unwrap(),
            "already offline"
        );

        // Three connects and one disconnect were emitted, in order, keyed by the node.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let event = events.next().await.expect("open").expect("not lagged");
            assert_eq!(event.key.as_deref(), Some(new.id.to_string().as_str()));
            seen.push(event.payload);
        }
        let connected: Vec<bool> = seen.iter().map(|e| e.connected).collect();
        assert_eq!(connected, [true, true, true, false]);
        assert!(seen.iter().all(|e| e.node_id == new.id));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lookups_and_the_active_list() {
    with_db(|db| async move {
        let online = online_controller(&db).await;
        let silent = online_controller(&db).await;
        let gone = online_controller(&db).await;
        exec(
            &db,
            &format!(
                "update controller set last_heartbeat = now() - interval '10 minutes' where id = '{silent}'"
            ),
        )
        .await;
        db.controller()
            .heartbeat(&gone, false, "0.1.0", "abc")
            .await
            .unwrap();

        let names: Vec<ProxyName> = (0..3).map(|_| ProxyName::new_random()).collect();
        let mut ids = Vec::new();
        for (controller, name) in [&online, &silent, &gone].into_iter().zip(&names) {
            let connection = db
                .node()
                .register(&registration(
                    controller,
                    NodeKind::Proxy,
                    name.as_str(),
                    &cluster(),
                ))
                .await
                .unwrap();
            ids.push(connection.id);
        }

        assert_eq!(
            db.node()
                .id_of(Some(&cluster()), names[1].as_str())
                .await
                .unwrap(),
            Some(ids[1])
        );
        assert_eq!(
            db.node()
                .id_of(Some(&"other.test".parse().unwrap()), names[1].as_str())
                .await
                .unwrap(),
            None,
            "names are per cluster"
        );
        assert_eq!(db.node().id_of(None, "px-nobody").await.unwrap(), None);
        assert_eq!(db.node().get(NodeId::from(987_654)).await.unwrap(), None);

        // Only DNS servers may go without a cluster.
        let proxy = ProxyName::new_random();
        assert!(matches!(
            db.node()
                .register(&NodeRegistration {
                    cluster: None,
                    ..registration(&online, NodeKind::Proxy, proxy.as_str(), &cluster())
                })
                .await,
            Err(Error::InvalidArgument { argument: "cluster", .. })
        ));

        let node = db.node().get(ids[0]).await.unwrap().expect("node");
        assert_eq!(node.name, AnyNodeName::Proxy(names[0].clone()));
        assert_eq!(node.kind(), NodeKind::Proxy);
        assert_eq!(node.cluster, Some(cluster()));
        assert!(node.connected_at.is_some());

        let list = db.node().list().await.unwrap();
        let active: Vec<(NodeId, bool)> = list.iter().map(|n| (n.id, n.active)).collect();
        assert_eq!(
            active,
            [(ids[0], true), (ids[1], false), (ids[2], false)],
            "active only with an online controller that heartbeats"
        );

        // A row that does not decode is skipped by the list and an error from get.
        exec(&db, &format!("update node set name = 'dr-WRONG' where id = {}", ids[2])).await;
        assert_eq!(db.node().list().await.unwrap().len(), 2);
        assert!(matches!(
            db.node().get(ids[2]).await,
            Err(Error::Decode { table: "node", column: "name", .. })
        ));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_controllers_leave_out_the_offline_and_the_silent() {
    with_db(|db| async move {
        let online = online_controller(&db).await;
        let shut_down = online_controller(&db).await;
        let silent = online_controller(&db).await;
        db.controller()
            .heartbeat(&shut_down, false, "0.1.0", "abc")
            .await
            .unwrap();
        exec(
            &db,
            &format!(
                "update controller set last_heartbeat = now() - interval '10 minutes' where id = '{silent}'"
            ),
        )
        .await;
        let listed = db.controller().online_controllers().await.unwrap();
        let names: Vec<&ControllerName> = listed.iter().map(|c| &c.name).collect();
        assert_eq!(names, [&online]);
        assert_eq!(listed[0].plane_version, "0.1.0");
        assert!(listed[0].heartbeat_age < chrono::Duration::seconds(30));
        assert!(listed[0].first_seen <= listed[0].last_heartbeat);

        // Coming back online puts it back.
        db.controller()
            .heartbeat(&shut_down, true, "0.1.1", "def")
            .await
            .unwrap();
        let listed = db.controller().online_controllers().await.unwrap();
        assert_eq!(listed.len(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_lists_connected_drones_and_proxies() {
    with_db(|db| async move {
        let busy = drone(&db).await;
        let idle = drone(&db).await;
        db.drone().drain(idle.id).await.unwrap();
        // A drone in another cluster is not listed.
        drone_in(
            &db,
            &"other.test".parse().unwrap(),
            &DronePoolName::default(),
        )
        .await;
        let controller = online_controller(&db).await;
        let proxy = ProxyName::new_random();
        let proxy_connection = db
            .node()
            .register(&registration(
                &controller,
                NodeKind::Proxy,
                proxy.as_str(),
                &cluster(),
            ))
            .await
            .unwrap();
        // Two live backends on the busy drone and one terminated one.
        let mut backends = Vec::new();
        for _ in 0..3 {
            let response = spawn(&db).await;
            assert_eq!(response.drone.as_ref(), Some(&busy.name));
            backends.push(response.backend_id);
        }
        for state in lifecycle() {
            db.backend()
                .update_state(&backends[0], &state)
                .await
                .unwrap();
        }

        let state = db.cluster().state(&cluster()).await.unwrap();
        let drones: Vec<(NodeId, bool, bool, i64)> = state
            .drones
            .iter()
            .map(|d| (d.node.id, d.ready, d.draining, d.backend_count))
            .collect();
        assert_eq!(
            drones,
            [(busy.id, true, false, 2), (idle.id, true, true, 0)]
        );
        assert_eq!(state.drones[0].node.controller, busy.controller);
        assert_eq!(
            state.drones[0].node.name,
            AnyNodeName::Drone(busy.name.clone())
        );
        assert!(
            state.drones[0].last_heartbeat_age.expect("heartbeat") < chrono::Duration::seconds(30)
        );
        assert_eq!(state.proxies.len(), 1);
        assert_eq!(state.proxies[0].id, proxy_connection.id);
        assert!(state.proxies[0].controller_heartbeat_age < chrono::Duration::seconds(30));

        // A proxy marked offline drops out.
        db.node()
            .mark_offline(proxy_connection, &controller)
            .await
            .unwrap();
        let state = db.cluster().state(&cluster()).await.unwrap();
        assert!(state.proxies.is_empty());
        assert_eq!(
            db.cluster()
                .state(&"empty.test".parse().unwrap())
                .await
                .unwrap(),
            Default::default()
        );
    })
    .await
}
