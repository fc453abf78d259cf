//! The demo drone: a stand-in that runs no process but reports states as a drone does.

use super::error::error_chain;
use super::{HEARTBEAT_INTERVAL, VERSION};
use chrono::Utc;
use plane_db::node::NodeRegistration;
use plane_db::types::{
    BackendAction, BackendActionMessage, BackendAddr, BackendName, BackendState, ClusterName,
    ControllerName, DroneName, DronePoolName, NodeId, NodeKind, TerminationKind, TerminationReason,
};
use plane_db::PlaneDatabase;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A stand-in drone, so the controller can be tried without one: it takes the backends
/// scheduled on it through their start-up and carries out termination requests, writing
/// each state as a real drone reports it (`update_state`), and renews their keys.
#[derive(Debug, Clone)]
pub struct DemoDrone {
    /// Its node id.
    pub id: NodeId,
    /// Its name.
    pub name: DroneName,
    /// Its cluster.
    pub cluster: ClusterName,
}

impl DemoDrone {
    /// Registers a ready drone in `cluster` (default pool), connected to `controller`.
    pub async fn register(
        db: &PlaneDatabase,
        controller: &ControllerName,
        cluster: &ClusterName,
    ) -> plane_db::Result<DemoDrone> {
        let name = DroneName::new_random();
        let id = db
            .node()
            .register(&NodeRegistration {
                controller,
                kind: NodeKind::Drone,
                name: name.as_str(),
                cluster: Some(cluster),
                plane_version: VERSION,
                plane_hash: "example",
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
            .await?
            .id;
        db.drone()
            .register(id, true, &DronePoolName::default())
            .await?;
        Ok(DemoDrone {
            id,
            name,
            cluster: cluster.clone(),
        })
    }

    /// Runs the drone until the database's event bus stops: carries out its queued actions
    /// as they arrive, moving each new backend one status further every `step`, and
    /// heartbeats. A failed round is logged and retried.
    pub async fn run(self, db: PlaneDatabase, step: Duration) {
        let mut actions = loop {
            match db
                .subscribe_with_key::<BackendActionMessage>(&self.id)
                .await
            {
                Ok(subscription) => break subscription,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "demo drone could not subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            // Queued actions are read from the table, so none is missed while subscribing or
            // after a failed round; the subscription only says when to look again.
            if let Err(error) = self.take_actions(&db, step).await {
                tracing::warn!(error = %error_chain(&error), "demo drone round failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            tokio::select! {
                next = actions.next() => if next.is_none() { return },
                _ = heartbeat.tick() => {
                    if let Err(error) = self.heartbeat(&db).await {
                        tracing::warn!(error = %error_chain(&error), "demo drone heartbeat failed");
                    }
                }
            }
        }
    }

    /// Acknowledges and carries out the actions queued for this drone.
    async fn take_actions(&self, db: &PlaneDatabase, step: Duration) -> plane_db::Result<()> {
        for message in db.backend_action().pending(self.id, 100).await? {
            // Acknowledged first: an action is carried out once, even if the next round
            // reads the queue before it is done.
            if !db.backend_action().ack(&message.action_id, self.id).await? {
                continue;
            }
            let backend = message.backend_id;
            match message.action {
                BackendAction::Spawn { .. } => {
                    tokio::spawn(start_backend(db.clone(), backend, step));
                }
                BackendAction::Terminate { kind, reason } => {
                    tokio::spawn(stop_backend(db.clone(), backend, kind, reason, step));
                }
            }
        }
        Ok(())
    }

    /// Heartbeats as a drone, and renews the keys of its live backends (which would
    /// otherwise lapse and let another backend take them).
    async fn heartbeat(&self, db: &PlaneDatabase) -> plane_db::Result<()> {
        db.drone().heartbeat(self.id, Utc::now()).await?;
        for backend in db.backend().list_alive_backends_for_drone(self.id).await? {
            db.key().renew(&backend.id, Utc::now()).await?;
        }
        Ok(())
    }
}

/// Takes a new backend through loading, starting and waiting to ready, one `step` apart.
/// Stops early when a state is refused (the backend is terminating meanwhile).
async fn start_backend(db: PlaneDatabase, backend: BackendName, step: Duration) {
    // Nothing listens there: this drone only pretends.
    let address = BackendAddr(SocketAddr::from(([127, 0, 0, 1], 18080)));
    let waiting = BackendState::Starting.to_waiting(address.0);
    for state in [
        BackendState::Loading,
        BackendState::Starting,
        waiting.clone(),
        waiting.to_ready(address),
    ] {
        tokio::time::sleep(step).await;
        match db.backend().update_state(&backend, &state).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%backend, error = %error_chain(&error), "demo drone could not report a state");
                return;
            }
        }
    }
}

/// Terminates a backend as asked: terminating (soft or hard), then terminated one `step`
/// later, with exit code 0 for soft and 137 (killed) for hard.
async fn stop_backend(
    db: PlaneDatabase,
    backend: BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
    step: Duration,
) {
    if let Err(error) = report_termination(&db, &backend, kind, reason, step).await {
        tracing::warn!(%backend, error = %error_chain(&error), "demo drone could not terminate a backend");
    }
}

async fn report_termination(
    db: &PlaneDatabase,
    backend: &BackendName,
    kind: TerminationKind,
    reason: TerminationReason,
    step: Duration,
) -> plane_db::Result<()> {
    let Some(row) = db.backend().backend(backend).await? else {
        return Ok(());
    };
    let (terminating, exit_code) = match kind {
        TerminationKind::Soft => (row.state.to_terminating(reason), 0),
        TerminationKind::Hard => (row.state.to_hard_terminating(reason), 137),
    };
    db.backend().update_state(backend, &terminating).await?;
    tokio::time::sleep(step).await;
    db.backend()
        .update_state(backend, &terminating.to_terminated(Some(exit_code)))
        .await?;
    Ok(())
}
