//! Nodes: drones, proxies and DNS servers as they connect to a controller.
//!
//! A node is *held* by the controller it is connected to. Each (re)connection gets a new
//! connection start time; [`NodeDatabase::mark_offline`] names the connection it ends, so a
//! controller whose connection was superseded (the node reconnected elsewhere) cannot mark
//! the node offline behind the newer connection's back.

use crate::context::Context;
use crate::error::{skip_undecodable, Error, Result};
use crate::events::{EventBatch, EventWriter, NotificationPayload};
use crate::replicas::ReadKind;
use crate::types::{AnyNodeName, ClusterName, ControllerName, NodeId, NodeKind};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::net::IpAddr;

/// Node registration and lookups. Get one from [`PlaneDatabase::node`](crate::PlaneDatabase::node).
pub struct NodeDatabase<'a> {
    ctx: &'a Context,
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
    /// Its cluster; `None` only for cross-cluster nodes (ACME DNS servers): a drone or proxy
    /// without one is refused.
    pub cluster: Option<&'r ClusterName>,
    /// The software version it runs. At most
    /// [`PLANE_VERSION_BYTES`](crate::limits::PLANE_VERSION_BYTES).
    pub plane_version: &'r str,
    /// The git hash of that version. At most
    /// [`PLANE_HASH_BYTES`](crate::limits::PLANE_HASH_BYTES).
    pub plane_hash: &'r str,
    /// Its address as seen by the controller.
    pub ip: IpAddr,
}

/// One connection of a node to a controller, returned by [`NodeDatabase::register`]. Keep
/// it to end exactly this connection with [`NodeDatabase::mark_offline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConnection {
    /// The node's id.
    pub id: NodeId,
    /// When this connection started (database clock); identifies the connection.
    pub connected_at: DateTime<Utc>,
}

/// Emitted (kind `node_connection`, keyed by the node id) when a node connects or is marked
/// offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConnectionStatusChange {
    /// The node.
    pub node_id: NodeId,
    /// True when it connected, false when it was marked offline.
    pub connected: bool,
}

impl NotificationPayload for NodeConnectionStatusChange {
    type Key = NodeId;

    fn kind() -> &'static str {
        "node_connection"
    }
}

/// A node as stored, with whether it is active.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// Its name, tagged with its kind.
    /// Serialized inline, as `kind` and `name`.
    #[serde(flatten)]
    pub name: AnyNodeName,
    /// Its cluster, if it belongs to one.
    pub cluster: Option<ClusterName>,
    /// The controller holding its connection, if any (online or not).
    pub controller: Option<ControllerName>,
    /// Whether the node is active: held by a controller that is online and has heartbeated
    /// within [`SchedulerConfig::controller_heartbeat_timeout`](crate::SchedulerConfig).
    pub active: bool,
    /// The software version it runs.
    pub plane_version: String,
    /// The git hash of that version.
    pub plane_hash: String,
    /// When its latest connection started.
    pub connected_at: Option<DateTime<Utc>>,
}

impl NodeInfo {
    /// The node's kind.
    pub fn kind(&self) -> NodeKind {
        self.name.kind()
    }
}

/// The columns every node lookup selects.
struct NodeRow {
    id: i32,
    kind: String,
    name: String,
    cluster: Option<String>,
    controller: Option<String>,
    active: bool,
    plane_version: String,
    plane_hash: String,
    connected_at: Option<DateTime<Utc>>,
}

impl TryFrom<NodeRow> for NodeInfo {
    type Error = Error;

    fn try_from(row: NodeRow) -> Result<Self> {
        let kind: NodeKind = row
            .kind
            .parse()
            .map_err(|e| Error::decode("node", "kind", row.id, e))?;
        let name = AnyNodeName::parse(kind, &row.name)
            .map_err(|e| Error::decode("node", "name", row.id, e))?;
        let cluster = row
            .cluster
            .map(ClusterName::try_from)
            .transpose()
            .map_err(|e| Error::decode("node", "cluster", row.id, e))?;
        let controller = row
            .controller
            .map(ControllerName::try_from)
            .transpose()
            .map_err(|e| Error::decode("node", "controller", row.id, e))?;
        Ok(NodeInfo {
            id: NodeId::from(row.id),
            name,
            cluster,
            controller,
            active: row.active,
            plane_version: row.plane_version,
            plane_hash: row.plane_hash,
            connected_at: row.connected_at,
        })
    }
}

impl<'a> NodeDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Registers a node (or re-registers it on a new connection) and emits a
    /// [`NodeConnectionStatusChange`] with `connected: true`. The node is then held by
    /// `controller`, and the returned connection is the current one.
    #[tracing::instrument(skip_all, fields(name = registration.name, kind = ?registration.kind))]
    pub async fn register(&self, registration: &NodeRegistration<'_>) -> Result<NodeConnection> {
        AnyNodeName::parse(registration.kind, registration.name).map_err(|e| {
            Error::InvalidArgument {
                argument: "name",
                reason: e.to_string(),
            }
        })?;
        if registration.cluster.is_none() && registration.kind != NodeKind::AcmeDnsServer {
            return Err(Error::InvalidArgument {
                argument: "cluster",
                reason: format!("a {} node needs a cluster", registration.kind),
            });
        }
        crate::limits::check_text(
            "plane_version",
            registration.plane_version,
            crate::limits::limit!(PLANE_VERSION_BYTES),
        )?;
        crate::limits::check_text(
            "plane_hash",
            registration.plane_hash,
            crate::limits::limit!(PLANE_HASH_BYTES),
        )?;
        let writer = EventWriter::new(self.ctx.bus());
        let row = sqlx::query!(
            r#"
            with registered as (
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
                returning id, last_connection_start_time
            ),
            emitted as (
                -- The payload (a NodeConnectionStatusChange) is built here: the node's id
                -- comes from the sequence in this statement.
                select plane_write_events(array[$8], array[id::text],
                                          array[jsonb_build_object('node_id', id, 'connected', true)],
                                          $9)
                from registered
            )
            select id as "id!", last_connection_start_time as "connected_at!"
            from registered, emitted
            "#,
            registration.kind.as_str(),
            registration.name,
            registration.cluster.map(ClusterName::as_str),
            registration.plane_version,
            registration.plane_hash,
            registration.controller.as_str(),
            registration.ip.to_string(),
            NodeConnectionStatusChange::kind(),
            writer.wake(),
        )
        .fetch_one(self.ctx.pool())
        .await?;
        writer.committed();
        Ok(NodeConnection {
            id: NodeId::from(row.id),
            connected_at: row.connected_at,
        })
    }

    /// Marks a node offline (no longer held by any controller) if `connection` is still its
    /// current connection and `controller` still holds it, and then emits a
    /// [`NodeConnectionStatusChange`] with `connected: false`. Returns false, changing
    /// nothing, if the node has since reconnected (to this or another controller) or is
    /// unknown: the newer connection wins.
    #[tracing::instrument(skip(self), fields(node = %connection.id))]
    pub async fn mark_offline(
        &self,
        connection: NodeConnection,
        controller: &ControllerName,
    ) -> Result<bool> {
        let offline = NodeConnectionStatusChange {
            node_id: connection.id,
            connected: false,
        };
        let events = EventBatch::one(&connection.id, &offline)?;
        let writer = EventWriter::new(self.ctx.bus());
        let updated = sqlx::query_scalar!(
            r#"
            with updated as (
                update node set controller = null
                where id = $1 and controller = $2 and last_connection_start_time = $3
                returning id
            ),
            emitted as (
                select plane_write_events(array_agg(e.kind), array_agg(e.key), array_agg(e.data), $7)
                from unnest($4::text[], $5::text[], $6::jsonb[]) as e(kind, key, data)
                where exists (select 1 from updated)
            )
            select count(*) as "updated!" from updated, emitted
            "#,
            connection.id.as_i32(),
            controller.as_str(),
            connection.connected_at,
            events.kinds() as &[&str],
            events.keys(),
            events.payloads(),
            writer.wake(),
        )
        .fetch_one(self.ctx.pool())
        .await?;
        if updated > 0 {
            writer.committed();
        }
        Ok(updated > 0)
    }

    /// The id of the node called `name` in `cluster` (`None` for cross-cluster nodes), if
    /// it has registered. A name longer than any node's
    /// ([`NODE_NAME_BYTES`](crate::limits::NODE_NAME_BYTES)) or with a NUL is
    /// [`Error::InvalidArgument`].
    #[tracing::instrument(skip(self))]
    pub async fn id_of(&self, cluster: Option<&ClusterName>, name: &str) -> Result<Option<NodeId>> {
        // No node has a longer name (the `node` table checks it): refused like `register`.
        crate::limits::check_text("name", name, crate::limits::limit!(NODE_NAME_BYTES))?;
        let id = sqlx::query_scalar!(
            // Not `is not distinct from`, which cannot use the (cluster, name) index.
            "select id from node where (cluster = $1 or ($1 is null and cluster is null)) and name = $2",
            cluster.map(ClusterName::as_str),
            name,
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        Ok(id.map(NodeId::from))
    }

    /// The node with id `id`, if any. A row that does not decode is an error.
    #[tracing::instrument(skip(self), fields(node = %id))]
    pub async fn get(&self, id: NodeId) -> Result<Option<NodeInfo>> {
        let row = self.read(Some(id)).await?.pop();
        row.map(NodeInfo::try_from).transpose()
    }

    /// Every node, in id order, with whether it is active. Rows that do not decode are
    /// skipped with a warning. Served by a streaming replica when one is usable: then as the
    /// database was up to the replica lag bound ago (see [`replicas`](crate::replicas)).
    #[tracing::instrument(skip(self))]
    pub async fn list(&self) -> Result<Vec<NodeInfo>> {
        let rows = self
            .ctx
            .reads()
            .run(
                ReadKind::NodeList,
                |_| None,
                |pool| self.read_on(pool, None),
            )
            .await?;
        Ok(skip_undecodable(rows.into_iter().map(NodeInfo::try_from)))
    }

    /// The node with id `id`, or every node, read on the primary.
    async fn read(&self, id: Option<NodeId>) -> Result<Vec<NodeRow>> {
        self.read_on(self.ctx.pool().clone(), id).await
    }

    /// The node with id `id`, or every node (the table is small: one row per node ever
    /// registered), read on `pool`.
    async fn read_on(&self, pool: PgPool, id: Option<NodeId>) -> Result<Vec<NodeRow>> {
        let timeout = self
            .ctx
            .config()
            .scheduler
            .controller_heartbeat_timeout
            .as_secs_f64();
        let rows = sqlx::query_as!(
            NodeRow,
            r#"
            select n.id, n.kind, n.name, n.cluster, n.controller,
                   coalesce(c.is_online and c.last_heartbeat > now() - make_interval(secs => $2),
                            false) as "active!",
                   n.plane_version, n.plane_hash,
                   n.last_connection_start_time as connected_at
            from node n
            left join controller c on c.id = n.controller
            where $1::integer is null or n.id = $1
            order by n.id
            "#,
            id.map(NodeId::as_i32),
            timeout,
        )
        .fetch_all(&pool)
        .await?;
        Ok(rows)
    }
}
