//! Core value types of the data layer: entity names, cluster identifiers,
//! tokens, backend states and the messages exchanged with drones and proxies.
//!
//! Everything is re-exported here, so users write `types::BackendName`
//! rather than naming the submodules. JSON forms are compatible with
//! Plane 0.5.5.

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
