//! Nodes: drones, proxies and DNS servers as they connect to a controller.

use crate::error::{Error, Result};
use crate::types::{
    AcmeDnsServerName, ClusterName, ControllerName, DroneName, NodeId, NodeKind, ProxyName,
};
use crate::PlaneDatabase;
use std::net::IpAddr;

/// Node registration. Get one from [`PlaneDatabase::node`].
pub struct NodeDatabase<'a> {
    db: &'a PlaneDatabase,
}

/// A node connecting to a controller, as passed to [`NodeDatabase::register`].
#[derive(Debug, Clone)]
pub struct NodeRegistration<'r> {
    /// The controller the node is connected to.
    pub controller: &'r ControllerName,
    /// What kind of node it is; `name` must carry the matching prefix.
    pub kind: NodeKind,
    /// The node's name (`dr-…`, `px-…` or `ns-…`).
    pub name: &'r str,
    /// Its cluster; `None` only for cross-cluster nodes (ACME DNS servers).
    pub cluster: Option<&'r ClusterName>,
    /// The software version it runs.
    pub plane_version: &'r str,
    /// The git hash of that version.
    pub plane_hash: &'r str,
    /// Its address as seen by the controller.
    pub ip: IpAddr,
}

impl<'a> NodeDatabase<'a> {
    pub(crate) fn new(db: &'a PlaneDatabase) -> Self {
        Self { db }
    }

    /// Registers a node (or re-registers it on a new connection) and returns its id. The
    /// node is then held by `controller`, and its connection start time is now.
    #[tracing::instrument(skip_all, fields(name = registration.name, kind = ?registration.kind), err)]
    pub async fn register(&self, registration: &NodeRegistration<'_>) -> Result<NodeId> {
        check_node_name(registration.kind, registration.name)?;
        let id = sqlx::query_scalar!(
            r#"
            insert into node (kind, name, cluster, plane_version, plane_hash, controller, ip,
                              last_connection_start_time)
            values ($1, $2, $3, $4, $5, $6, $7::text::inet, now())
            on conflict on constraint node_cluster_name_key do update set
                kind = excluded.kind,
                plane_version = excluded.plane_version,
                plane_hash = excluded.plane_hash,
                controller = excluded.controller,
                ip = excluded.ip,
                last_connection_start_time = excluded.last_connection_start_time
            returning id
            "#,
            registration.kind.as_str(),
            registration.name,
            registration.cluster.map(ClusterName::as_str),
            registration.plane_version,
            registration.plane_hash,
            registration.controller.as_str(),
            registration.ip.to_string(),
        )
        .fetch_one(self.db.pool())
        .await?;
        Ok(NodeId::from(id))
    }
}

/// A node's name must be a valid name of its kind.
fn check_node_name(kind: NodeKind, name: &str) -> Result<()> {
    let checked = match kind {
        NodeKind::Drone => DroneName::try_from(name.to_string()).map(drop),
        NodeKind::Proxy => ProxyName::try_from(name.to_string()).map(drop),
        NodeKind::AcmeDnsServer => AcmeDnsServerName::try_from(name.to_string()).map(drop),
    };
    checked.map_err(|e| Error::InvalidArgument {
        argument: "name",
        reason: e.to_string(),
    })
}
