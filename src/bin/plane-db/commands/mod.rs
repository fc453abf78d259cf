//! The commands, one file per group, and what they share: reading the names the command
//! line gives (backends, clusters, drones).

pub mod backends;
pub mod cleanup;
pub mod events;
pub mod migrate;
pub mod nodes;
pub mod repair;
pub mod status;

use crate::failure::Failure;
use crate::output::printable;
use plane_db::types::{AnyNodeName, BackendName, ClusterName, DroneName, NodeId};
use plane_db::PlaneDatabase;

/// The backend id given on the command line.
fn backend_name(id: &str) -> Result<BackendName, Failure> {
    id.parse()
        .map_err(|e| Failure::Usage(format!("invalid backend id {:?}: {e}", printable(id))))
}

/// The cluster given on the command line, if one is.
fn cluster_name(name: Option<&str>) -> Result<Option<ClusterName>, Failure> {
    name.map(|name| {
        name.parse()
            .map_err(|e| Failure::Usage(format!("invalid cluster {:?}: {e}", printable(name))))
    })
    .transpose()
}

/// The drone given as a numeric node id, or by name within `cluster`: one lookup either way.
async fn find_drone(
    db: &PlaneDatabase,
    cluster: Option<&ClusterName>,
    drone: &str,
) -> Result<NodeId, Failure> {
    if let Ok(id) = drone.parse::<i32>() {
        let id = NodeId::from(id);
        let node = db
            .node()
            .get(id)
            .await?
            .ok_or_else(|| Failure::NotFound(format!("drone {id} not found")))?;
        return match node.name {
            AnyNodeName::Drone(_) => Ok(id),
            other => Err(Failure::Usage(format!(
                "node {id} is a {}, not a drone",
                other.kind()
            ))),
        };
    }
    let name: DroneName = drone
        .parse()
        .map_err(|e| Failure::Usage(format!("invalid drone {:?}: {e}", printable(drone))))?;
    let cluster = cluster.ok_or_else(|| {
        Failure::Usage(format!(
            "drone {name} is a name: pass its --cluster too (or the drone's numeric id)"
        ))
    })?;
    let id = db
        .node()
        .id_of(Some(cluster), name.as_str())
        .await?
        .ok_or_else(|| Failure::NotFound(format!("drone {name} not found in cluster {cluster}")))?;
    Ok(id)
}
