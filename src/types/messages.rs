//! Messages exchanged between the controller and drones/proxies, in the JSON
//! formats of Plane 0.5.5.

use super::cluster::{ClusterName, NodeId, Subdomain};
use super::names::{BackendActionName, BackendName};
use super::state::{BackendAddr, TerminationKind, TerminationReason};
use super::tokens::{BearerToken, SecretToken};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Identifies the key a backend holds: at most one backend holds a given key
/// (name and namespace) at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyConfig {
    /// The key's name. At most [`KEY_NAME_BYTES`](crate::limits::KEY_NAME_BYTES).
    pub name: String,
    /// The key's namespace; empty for the default namespace. At most
    /// [`KEY_NAMESPACE_BYTES`](crate::limits::KEY_NAMESPACE_BYTES).
    #[serde(default)]
    pub namespace: String,
    /// A tag that a backend must match to be handed an existing key; empty
    /// for none. At most [`KEY_TAG_BYTES`](crate::limits::KEY_TAG_BYTES).
    #[serde(default)]
    pub tag: String,
}

impl KeyConfig {
    /// A fresh key (`lk-` and 14 random characters) in the default namespace, with no tag.
    pub fn new_random() -> Self {
        Self {
            name: format!(
                "lk-{}",
                super::tokens::random_alphanumeric(14, super::tokens::LOWER_ALPHANUMERIC)
            ),
            ..Self::default()
        }
    }
}

/// When the holder of a key must act to keep or release it. Each deadline is
/// serialized as integer milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyDeadlines {
    /// When the drone should renew the key.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub renew_at: DateTime<Utc>,
    /// When the backend must be soft-terminated if the key was not renewed.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub soft_terminate_at: DateTime<Utc>,
    /// When the backend must be hard-terminated if the key was not renewed.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub hard_terminate_at: DateTime<Utc>,
}

/// A key held by a backend, with its deadlines and fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AcquiredKey {
    /// The key.
    pub key: KeyConfig,
    /// The key's current deadlines.
    pub deadlines: KeyDeadlines,
    /// The fencing token: increases every time the key changes hands, so that
    /// a stale holder can be told apart from the current one.
    pub token: i64,
}

/// An action the controller asks a drone to perform on a backend.
///
/// Serialized externally tagged: `{"Spawn":{...}}` or
/// `{"Terminate":{"kind":"soft","reason":"external"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BackendAction {
    /// Start the backend.
    Spawn {
        /// The executor configuration (image, environment, resource limits,
        /// ...), passed through as JSON.
        executable: serde_json::Value,
        /// The key the backend holds.
        key: AcquiredKey,
        /// The backend's static bearer token, if it has one.
        static_token: Option<BearerToken>,
    },
    /// Terminate the backend.
    Terminate {
        /// Soft or hard termination.
        kind: TerminationKind,
        /// Why the backend is terminated.
        reason: TerminationReason,
    },
}

/// An action for a drone, addressed to one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendActionMessage {
    /// The action's id, used to acknowledge it.
    pub action_id: BackendActionName,
    /// The backend the action is about.
    pub backend_id: BackendName,
    /// The drone that must perform the action.
    pub drone_id: NodeId,
    /// The action.
    pub action: BackendAction,
}

/// Resource usage of a backend, reported by its drone. Memory values are in
/// bytes; CPU values are cumulative counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendMetricsMessage {
    /// The backend the metrics are about.
    pub backend_id: BackendName,
    /// Memory in use.
    pub mem_used: u64,
    /// Total memory available.
    pub mem_total: u64,
    /// Active memory.
    pub mem_active: u64,
    /// Inactive memory.
    pub mem_inactive: u64,
    /// Unevictable memory.
    pub mem_unevictable: u64,
    /// Memory limit of the backend.
    pub mem_limit: u64,
    /// CPU time used by the backend.
    pub cpu_used: u64,
    /// CPU time used by the whole system.
    pub sys_cpu: u64,
}

/// Everything about a route except the address, which is known once the backend is ready
/// ([`RouteInfoResult::Pending`](crate::backend::RouteInfoResult::Pending)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialRouteInfo {
    /// The backend to route to.
    pub backend_id: BackendName,
    /// The secret the proxy passes to the backend with each request (empty for static
    /// tokens).
    pub secret_token: SecretToken,
    /// The cluster the backend belongs to.
    pub cluster: ClusterName,
    /// The user the connection was authorized for, if any.
    pub user: Option<String>,
    /// Arbitrary data attached to the connection, if any.
    pub user_data: Option<serde_json::Value>,
    /// The subdomain the backend must be reached through, if any.
    pub subdomain: Option<Subdomain>,
}

impl PartialRouteInfo {
    /// Completes the route with the backend's address.
    pub fn with_address(self, address: BackendAddr) -> RouteInfo {
        RouteInfo {
            route: self,
            address,
        }
    }
}

/// What a proxy needs to route a client's request to a backend: the [`PartialRouteInfo`] and
/// the address. Its JSON is Plane's: one object with the route's fields and `address` side by
/// side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// Everything but the address.
    #[serde(flatten)]
    pub route: PartialRouteInfo,
    /// The backend's address.
    pub address: BackendAddr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn ms(millis: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(millis).unwrap()
    }

    fn acquired_key() -> AcquiredKey {
        AcquiredKey {
            key: KeyConfig {
                name: "doc-1".to_string(),
                namespace: "ns".to_string(),
                tag: String::new(),
            },
            deadlines: KeyDeadlines {
                renew_at: ms(1_700_000_030_000),
                soft_terminate_at: ms(1_700_000_040_000),
                hard_terminate_at: ms(1_700_000_050_001),
            },
            token: 7,
        }
    }

    #[test]
    fn key_config_defaults() {
        let parsed: KeyConfig = serde_json::from_str(r#"{"name":"k"}"#).unwrap();
        assert_eq!(
            parsed,
            KeyConfig {
                name: "k".to_string(),
                namespace: String::new(),
                tag: String::new(),
            }
        );
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            json!({"name": "k", "namespace": "", "tag": ""})
        );
        assert!(serde_json::from_str::<KeyConfig>(r#"{"namespace":"x"}"#).is_err());
        assert_eq!(KeyConfig::default().name, "");
    }

    #[test]
    fn acquired_key_json() {
        let key = acquired_key();
        let value = serde_json::to_value(&key).unwrap();
        assert_eq!(
            value,
            json!({
                "key": {"name": "doc-1", "namespace": "ns", "tag": ""},
                "deadlines": {
                    "renew_at": 1_700_000_030_000_i64,
                    "soft_terminate_at": 1_700_000_040_000_i64,
                    "hard_terminate_at": 1_700_000_050_001_i64,
                },
                "token": 7,
            })
        );
        let back: AcquiredKey = serde_json::from_value(value).unwrap();
        assert_eq!(back, key);
    }

    #[test]
    fn terminate_action_json() {
        let action = BackendAction::Terminate {
            kind: TerminationKind::Soft,
            reason: TerminationReason::External,
        };
        let json = serde_json::to_string(&action).unwrap();
        assert_eq!(json, r#"{"Terminate":{"kind":"soft","reason":"external"}}"#);
        let back: BackendAction = serde_json::from_str(&json).unwrap();
        assert_eq!(back, action);
        assert!(serde_json::from_str::<BackendAction>(
            r#"{"terminate":{"kind":"soft","reason":"external"}}"#
        )
        .is_err());
    }

    #[test]
    fn spawn_action_json() {
        let action = BackendAction::Spawn {
            executable: json!({"image": "ghcr.io/example/app:latest", "env": {"A": "1"}}),
            key: acquired_key(),
            static_token: Some(BearerToken::from("s.abc123")),
        };
        let value = serde_json::to_value(&action).unwrap();
        assert_eq!(
            value,
            json!({
                "Spawn": {
                    "executable": {"image": "ghcr.io/example/app:latest", "env": {"A": "1"}},
                    "key": {
                        "key": {"name": "doc-1", "namespace": "ns", "tag": ""},
                        "deadlines": {
                            "renew_at": 1_700_000_030_000_i64,
                            "soft_terminate_at": 1_700_000_040_000_i64,
                            "hard_terminate_at": 1_700_000_050_001_i64,
                        },
                        "token": 7,
                    },
                    "static_token": "s.abc123",
                }
            })
        );
        let back: BackendAction = serde_json::from_value(value).unwrap();
        assert_eq!(back, action);

        let without_token = BackendAction::Spawn {
            executable: json!({}),
            key: acquired_key(),
            static_token: None,
        };
        let value = serde_json::to_value(&without_token).unwrap();
        assert_eq!(value["Spawn"]["static_token"], serde_json::Value::Null);
        let back: BackendAction = serde_json::from_value(value).unwrap();
        assert_eq!(back, without_token);
    }

    #[test]
    fn action_message_json() {
        let message = BackendActionMessage {
            action_id: "ak-123".parse().unwrap(),
            backend_id: "ba-abc".parse().unwrap(),
            drone_id: NodeId::from(3),
            action: BackendAction::Terminate {
                kind: TerminationKind::Hard,
                reason: TerminationReason::Swept,
            },
        };
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(
            json,
            r#"{"action_id":"ak-123","backend_id":"ba-abc","drone_id":3,"action":{"Terminate":{"kind":"hard","reason":"swept"}}}"#
        );
        let back: BackendActionMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, message);

        // Names are validated on the way in.
        let bad = json.replace("\"ba-abc\"", "\"ba_abc\"");
        let err = serde_json::from_str::<BackendActionMessage>(&bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid backend name: character '_' at position 2"),
            "{err}"
        );
        let bad = json.replace("\"ak-123\"", "\"123\"");
        let err = serde_json::from_str::<BackendActionMessage>(&bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid backend action name: expected prefix \"ak-\""),
            "{err}"
        );
    }

    /// Plane 0.5.5 makes backend names without a prefix (14 characters from `[a-z0-9]`):
    /// every message that carries one is read and written back unchanged.
    #[test]
    fn plane_made_backend_names_in_every_message() {
        let plane = "5gnlc2uthninii";
        let action = format!(
            r#"{{"action_id":"ak-h3ez8rlgt1cmjv","backend_id":"{plane}","drone_id":7,"action":{{"Terminate":{{"kind":"soft","reason":"keyexpired"}}}}}}"#
        );
        let message: BackendActionMessage = serde_json::from_str(&action).unwrap();
        assert_eq!(message.backend_id.as_str(), plane);
        assert_eq!(serde_json::to_string(&message).unwrap(), action);

        let metrics = format!(
            r#"{{"backend_id":"{plane}","mem_used":1,"mem_total":2,"mem_active":3,"mem_inactive":4,"mem_unevictable":5,"mem_limit":6,"cpu_used":7,"sys_cpu":8}}"#
        );
        let message: BackendMetricsMessage = serde_json::from_str(&metrics).unwrap();
        assert_eq!(message.backend_id.as_str(), plane);
        assert_eq!(serde_json::to_string(&message).unwrap(), metrics);

        let route = json!({
            "backend_id": plane,
            "address": "10.0.0.5:8080",
            "secret_token": "sekrit",
            "cluster": "plane.test",
            "user": null,
            "user_data": null,
            "subdomain": null,
        });
        let info: RouteInfo = serde_json::from_value(route.clone()).unwrap();
        assert_eq!(info.route.backend_id.as_str(), plane);
        assert_eq!(serde_json::to_value(&info).unwrap(), route);
    }

    #[test]
    fn metrics_message_json() {
        let message = BackendMetricsMessage {
            backend_id: "ba-m".parse().unwrap(),
            mem_used: 1,
            mem_total: 2,
            mem_active: 3,
            mem_inactive: 4,
            mem_unevictable: 5,
            mem_limit: 6,
            cpu_used: 7,
            sys_cpu: u64::MAX,
        };
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(
            json,
            r#"{"backend_id":"ba-m","mem_used":1,"mem_total":2,"mem_active":3,"mem_inactive":4,"mem_unevictable":5,"mem_limit":6,"cpu_used":7,"sys_cpu":18446744073709551615}"#
        );
        let back: BackendMetricsMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, message);
        assert!(serde_json::from_str::<BackendMetricsMessage>(
            &json.replace("\"mem_used\":1", "\"mem_used\":-1")
        )
        .is_err());
    }

    #[test]
    fn route_info_json() {
        let route = PartialRouteInfo {
            backend_id: "ba-route".parse().unwrap(),
            secret_token: SecretToken::from("sekrit"),
            cluster: "plane.test:9090".parse().unwrap(),
            user: Some("alice".to_string()),
            user_data: Some(json!({"role": "admin"})),
            subdomain: Some("team-a".parse().unwrap()),
        }
        .with_address(BackendAddr("10.0.0.5:8080".parse().unwrap()));
        let value = serde_json::to_value(&route).unwrap();
        assert_eq!(
            value,
            json!({
                "backend_id": "ba-route",
                "address": "10.0.0.5:8080",
                "secret_token": "sekrit",
                "cluster": "plane.test:9090",
                "user": "alice",
                "user_data": {"role": "admin"},
                "subdomain": "team-a",
            })
        );
        let back: RouteInfo = serde_json::from_value(value).unwrap();
        assert_eq!(back, route);

        let minimal = PartialRouteInfo {
            user: None,
            user_data: None,
            subdomain: None,
            ..route.route.clone()
        }
        .with_address(route.address);
        let value = serde_json::to_value(&minimal).unwrap();
        assert_eq!(value["user"], serde_json::Value::Null);
        assert_eq!(value["subdomain"], serde_json::Value::Null);
        let back: RouteInfo = serde_json::from_value(value).unwrap();
        assert_eq!(back, minimal);

        // The secret stays out of Debug output.
        assert!(!format!("{route:?}").contains("sekrit"));

        // An invalid subdomain is rejected.
        let mut bad = serde_json::to_value(&route).unwrap();
        bad["subdomain"] = json!("not.a.label");
        assert!(serde_json::from_value::<RouteInfo>(bad).is_err());
    }
}
