//! Cluster state: the connected drones and proxies of a cluster, for dashboards and
//! operators.

use crate::context::Context;
use crate::error::{skip_undecodable, Error, Result};
use crate::types::{AnyNodeName, BackendStatus, ClusterName, ControllerName, NodeId, NodeKind};

/// Cluster overviews. Get one from [`PlaneDatabase::cluster`](crate::PlaneDatabase::cluster).
pub struct ClusterDatabase<'a> {
    ctx: &'a Context,
}

/// The connected nodes of one cluster, from [`ClusterDatabase::state`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterState {
    /// Its drones, in node id order.
    pub drones: Vec<DroneState>,
    /// Its proxies, in node id order.
    pub proxies: Vec<NodeState>,
}

/// A node held by a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The node's id.
    pub id: NodeId,
    /// Its name.
    pub name: AnyNodeName,
    /// The software version it runs.
    pub plane_version: String,
    /// The git hash of that version.
    pub plane_hash: String,
    /// The controller holding its connection.
    pub controller: ControllerName,
    /// How long ago that controller last heartbeated (database clock).
    pub controller_heartbeat_age: chrono::Duration,
}

/// A drone held by a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneState {
    /// The node part.
    pub node: NodeState,
    /// Whether it accepts new backends (false until it has registered as a drone).
    pub ready: bool,
    /// Whether it is draining.
    pub draining: bool,
    /// How many of its backends have not terminated.
    pub backend_count: i64,
    /// How long ago it last heartbeated, if it has.
    pub last_heartbeat_age: Option<chrono::Duration>,
}

impl<'a> ClusterDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// The drones (readiness, draining, live backend count, heartbeat ages, controller) and
    /// proxies of `cluster` that are held by a controller. Nodes marked offline are left out;
    /// rows that do not decode are skipped with a warning.
    #[tracing::instrument(skip(self), fields(cluster = %cluster))]
    pub async fn state(&self, cluster: &ClusterName) -> Result<ClusterState> {
        let rows = sqlx::query!(
            r#"
            select n.id, n.kind, n.name, n.plane_version, n.plane_hash,
                   c.id as controller, c.last_heartbeat as controller_heartbeat,
                   d.ready as "ready?", d.draining as "draining?",
                   d.last_heartbeat as drone_heartbeat,
                   (select count(*) from backend b
                    where b.drone_id = n.id and b.last_status_number < $2) as "backend_count!",
                   now() as "as_of!"
            from node n
            join controller c on c.id = n.controller
            left join drone d on d.id = n.id
            where n.cluster = $1
            order by n.id
            "#,
            cluster.as_str(),
            BackendStatus::Terminated.as_int(),
        )
        .fetch_all(self.ctx.pool())
        .await?;
        let nodes = skip_undecodable(rows.into_iter().map(|row| {
            let kind: NodeKind = row
                .kind
                .parse()
                .map_err(|e| Error::decode("node", "kind", row.id, e))?;
            let node = NodeState {
                id: NodeId::from(row.id),
                name: AnyNodeName::parse(kind, &row.name)
                    .map_err(|e| Error::decode("node", "name", row.id, e))?,
                plane_version: row.plane_version,
                plane_hash: row.plane_hash,
                controller: ControllerName::try_from(row.controller)
                    .map_err(|e| Error::decode("node", "controller", row.id, e))?,
                controller_heartbeat_age: row.as_of - row.controller_heartbeat,
            };
            Ok(match kind {
                NodeKind::Drone => Some(ClusterNode::Drone(DroneState {
                    node,
                    ready: row.ready.unwrap_or(false),
                    draining: row.draining.unwrap_or(false),
                    backend_count: row.backend_count,
                    last_heartbeat_age: row.drone_heartbeat.map(|at| row.as_of - at),
                })),
                NodeKind::Proxy => Some(ClusterNode::Proxy(node)),
                // DNS servers serve every cluster and have none of their own.
                NodeKind::AcmeDnsServer => None,
            })
        }));
        let mut state = ClusterState::default();
        for node in nodes.into_iter().flatten() {
            match node {
                ClusterNode::Drone(drone) => state.drones.push(drone),
                ClusterNode::Proxy(proxy) => state.proxies.push(proxy),
            }
        }
        Ok(state)
    }
}

/// A decoded node of a cluster, before it is sorted into drones and proxies.
enum ClusterNode {
    Drone(DroneState),
    Proxy(NodeState),
}
