//! What travels on the bus: payload kinds and their typed keys, the event as read, the
//! decoded notification, and the two channels. Depends on nothing else in `events`.

use crate::types::{
    BackendActionMessage, BackendMetricsMessage, BackendName, BackendState, NodeId,
};
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The wake-up channel: the `event` trigger notifies it with an empty payload, a bus's
/// coalesced wake-ups with that bus's id.
pub(crate) const EVENTS_CHANNEL: &str = "plane_events";
/// The channel that carries ephemeral messages (payload = [`EphemeralEnvelope`]).
pub(crate) const EPHEMERAL_CHANNEL: &str = "plane_ephemeral";

/// What events of one kind are keyed by (the `key` column of `event`). The writer and the
/// subscriber of a kind both name its [`NotificationPayload::Key`], so the compiler checks
/// that they agree.
pub trait EventKey: Send + Sync + 'static {
    /// The key as stored in `event.key`.
    fn to_event_key(&self) -> String;
}

impl EventKey for BackendName {
    fn to_event_key(&self) -> String {
        self.as_str().to_string()
    }
}

/// The id as decimal text, as the crate's SQL writes it (`id::text`).
impl EventKey for NodeId {
    fn to_event_key(&self) -> String {
        self.as_i32().to_string()
    }
}

/// Free-form keys, for callers' own payload types.
impl EventKey for String {
    fn to_event_key(&self) -> String {
        self.clone()
    }
}

/// A type that can travel on the event bus. `kind()` names it in the `event` table and in
/// subscriptions; `Key` is what its events are keyed by.
pub trait NotificationPayload: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// What this kind's events are keyed by.
    type Key: EventKey;

    /// The event kind, e.g. `"backend_state"`.
    fn kind() -> &'static str;
}

/// Keyed by the backend.
impl NotificationPayload for BackendState {
    type Key = BackendName;

    fn kind() -> &'static str {
        "backend_state"
    }
}

/// Keyed by the drone the action is for.
impl NotificationPayload for BackendActionMessage {
    type Key = NodeId;

    fn kind() -> &'static str {
        "backend_action"
    }
}

/// Keyed by the backend.
impl NotificationPayload for BackendMetricsMessage {
    type Key = BackendName;

    fn kind() -> &'static str {
        "backend_metrics"
    }
}

/// An event as it travels on the bus, before decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The row id in `event`; `None` for ephemeral messages.
    pub id: Option<i64>,
    /// The event kind ([`NotificationPayload::kind`]).
    pub kind: String,
    /// The event's key, if any (a backend name, a drone id…).
    pub key: Option<String>,
    /// When it was written (database clock) or, for ephemeral messages, received.
    pub created_at: DateTime<Utc>,
    /// The payload as JSON.
    pub data: serde_json::Value,
}

/// A decoded event delivered to a [`Subscription`](super::Subscription).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification<T> {
    /// The row id in `event`; `None` for ephemeral messages.
    pub id: Option<i64>,
    /// The event's key, if any.
    pub key: Option<String>,
    /// When the event was written (database clock).
    pub timestamp: DateTime<Utc>,
    /// The decoded payload.
    pub payload: T,
}

/// What an ephemeral NOTIFY carries.
#[derive(Serialize, Deserialize)]
pub(crate) struct EphemeralEnvelope {
    pub kind: String,
    pub key: Option<String>,
    pub data: serde_json::Value,
}

/// Decodes an event's payload into `T`.
pub(crate) fn decode<T: NotificationPayload>(
    event: &Event,
) -> Result<Notification<T>, serde_json::Error> {
    Ok(Notification {
        id: event.id,
        key: event.key.clone(),
        timestamp: event.created_at,
        payload: T::deserialize(&event.data)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys are exactly what the crate's SQL stores (`id::text`, the name as is).
    #[test]
    fn keys_are_stored_text() {
        assert_eq!(NodeId::from(10).to_event_key(), "10");
        assert_eq!(NodeId::from(-3).to_event_key(), "-3");
        let name: BackendName = "ba-abc".parse().unwrap();
        assert_eq!(name.to_event_key(), "ba-abc");
        assert_eq!("free form".to_string().to_event_key(), "free form");
    }
}
