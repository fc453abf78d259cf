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

/// The kind of every [`NotificationPayload`] this crate implements (the impls are below and
/// in `node.rs`). The metrics label events by these; any other kind counts as `other`.
/// Adding a payload type to the crate means adding its kind here (and to METRICS.md):
/// `every_payload_kind_in_src_is_listed` fails until it is.
pub(crate) const CRATE_KINDS: [&str; 4] = [
    "backend_state",
    "backend_action",
    "backend_metrics",
    "node_connection",
];

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

    /// Every payload type of the crate, by type: its kind is listed.
    #[test]
    fn the_crate_payload_kinds_are_listed() {
        let kinds = [
            BackendState::kind(),
            BackendActionMessage::kind(),
            BackendMetricsMessage::kind(),
            crate::node::NodeConnectionStatusChange::kind(),
        ];
        assert_eq!(kinds, CRATE_KINDS);
    }

    /// Every `impl NotificationPayload for …` in `src/` returns from `kind()` a string
    /// literal that [`CRATE_KINDS`] lists, and the list holds nothing else: a payload type
    /// added without its kind (which the metrics would count as `other`) fails here.
    #[test]
    fn every_payload_kind_in_src_is_listed() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        for file in rust_files(&src) {
            let text = std::fs::read_to_string(&file).unwrap();
            found.extend(payload_kinds(&text, &file.display().to_string()));
        }
        for (ty, kind) in &found {
            assert!(
                CRATE_KINDS.contains(&kind.as_str()),
                "{ty}'s kind {kind:?} is not in events::event::CRATE_KINDS: add it there (and \
                 to METRICS.md), or the metrics count its events as `other`"
            );
        }
        let mut kinds: Vec<&str> = found.iter().map(|(_, kind)| kind.as_str()).collect();
        kinds.sort_unstable();
        let mut listed = CRATE_KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(
            kinds, listed,
            "CRATE_KINDS lists exactly the crate's payload kinds, once"
        );
    }

    /// METRICS.md names every kind label.
    #[test]
    fn metrics_md_names_every_kind() {
        let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("METRICS.md");
        let doc = std::fs::read_to_string(doc).unwrap();
        for kind in CRATE_KINDS {
            assert!(
                doc.contains(&format!("`{kind}`")),
                "METRICS.md does not name {kind}"
            );
        }
    }

    /// The scanner finds impls written in any of the usual ways, and refuses a `kind()`
    /// it cannot read rather than skipping it.
    #[test]
    fn the_payload_scanner_reads_impls() {
        let text = concat!(
            "impl NotificationPayload for A {\n    type Key = String;\n\n",
            "    fn kind() -> &'static str {\n        \"a\"\n    }\n}\n",
            "impl crate::events::",
            "NotificationPayload for B<T> {\n",
            "    type Key = String;\n    fn kind() -> &'static str { \"b\" }\n}\n",
            "// impl NotificationPayload for C {}\n",
        );
        assert_eq!(
            payload_kinds(text, "t.rs"),
            [
                ("A".to_string(), "a".to_string()),
                ("B<T>".to_string(), "b".to_string())
            ]
        );
        let unreadable = concat!(
            "impl NotificationPayload for D {\n    fn kind() -> &'static str {\n",
            "        KIND\n    }\n}\n",
        );
        let result = std::panic::catch_unwind(|| payload_kinds(unreadable, "t.rs"));
        assert!(result.is_err());
    }

    fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(rust_files(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files
    }

    /// `(type, kind)` of every `impl … NotificationPayload for Type` in `text`, the kind
    /// being the string literal that its `fn kind()` returns. Panics on an impl whose kind
    /// is not a literal (a new way of writing it must be taught here, not skipped).
    fn payload_kinds(text: &str, file: &str) -> Vec<(String, String)> {
        let needle = concat!("Notification", "Payload for ");
        let lines: Vec<&str> = text.lines().collect();
        let mut found = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim_start();
            let Some(at) = line.find(needle).filter(|_| line.starts_with("impl")) else {
                continue;
            };
            let ty = line[at + needle.len()..]
                .trim_end_matches('{')
                .trim()
                .to_string();
            // The rest of the impl: up to the first line that closes it at column 0.
            let body: String = lines[i..]
                .iter()
                .skip(1)
                .take_while(|l| !l.starts_with('}'))
                .map(|l| format!("{l}\n"))
                .collect();
            let kind = body
                .find("fn kind()")
                .map(|at| &body[at..])
                .and_then(|rest| rest.find('{').map(|open| rest[open + 1..].trim_start()))
                .and_then(|value| value.strip_prefix('"'))
                .and_then(|value| value.find('"').map(|end| value[..end].to_string()));
            let Some(kind) = kind else {
                panic!("{file}: impl NotificationPayload for {ty}: kind() does not return a string literal this test can read");
            };
            found.push((ty, kind));
        }
        found
    }

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
