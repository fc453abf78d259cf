//! Core value types of the data layer: entity names, cluster identifiers,
//! tokens, backend states and the messages exchanged with drones and proxies.
//!
//! Everything is re-exported here, so users write `types::BackendName`
//! rather than naming the submodules. JSON forms are compatible with
//! Plane 0.5.5.
//!
//! # Ids
//!
//! One rule names the fields that identify a backend or a node in the crate's public row
//! and message types: a type that *is* the thing calls its identifier `id`
//! ([`BackendRow::id`](crate::backend::BackendRow::id), [`NodeInfo::id`](crate::node::NodeInfo::id),
//! [`DroneInfo::id`](crate::drone::DroneInfo::id));
//! any other type that refers to it says whose id it is, `backend_id`, `drone_id` or
//! `node_id` ([`TerminationCandidate::backend_id`](crate::backend::TerminationCandidate::backend_id),
//! [`KeyHolder::backend_id`](crate::keys::KeyHolder::backend_id),
//! [`ConnectResponse::backend_id`](crate::connect::ConnectResponse::backend_id), [`BackendActionMessage`]'s `backend_id` and `drone_id`,
//! [`BackendRow::drone_id`](crate::backend::BackendRow::drone_id)). Parameters are named after the thing, without `_id`
//! (`backend: &BackendName`, `drone: NodeId`).

mod cluster;
mod messages;
mod names;
mod state;
mod tokens;

pub use cluster::{
    ClusterName, DronePoolName, InvalidClusterName, InvalidSubdomain, NodeId, Subdomain,
};
pub use messages::{
    AcquiredKey, BackendAction, BackendActionMessage, BackendMetricsMessage, KeyConfig,
    KeyDeadlines, PartialRouteInfo, RouteInfo,
};
pub use names::{
    AcmeDnsServerName, AnyNodeName, BackendActionName, BackendName, ControllerName, DroneName,
    InvalidNodeKind, NameError, NameErrorReason, NodeKind, ProxyName, MAX_NAME_LEN,
};
pub use state::{
    BackendAddr, BackendState, BackendStatus, BackendStatusStreamEntry, InvalidStatus,
    TerminationKind, TerminationReason,
};
pub use tokens::{BearerToken, SecretToken};
