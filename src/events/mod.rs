//! The event bus: persisted events written inside the caller's transaction, delivered to
//! every matching subscriber in the process, plus ephemeral (not persisted) messages.
//!
//! # How events travel
//! A writer inserts a row into `event` in the same transaction as the change it reports
//! ([`emit`]). A `NOTIFY plane_events` only wakes the readers: the table is the truth. Each
//! [`PlaneDatabase`](crate::PlaneDatabase) runs one bus task that, when woken (or every
//! [`BusConfig::poll_interval`] in case a wake-up was lost), reads the rows committed since its
//! previous read and hands each to the matching subscribers' queues.
//!
//! # Reading the table without gaps
//! Event ids come from a sequence at insert time, but transactions commit in another order,
//! so "ids above the highest seen" loses events. Instead each row records its writing
//! transaction (`xid`, an `xid8`), and the bus keeps the snapshot (`pg_snapshot`) of its
//! previous read. A row is new exactly when it is visible in the current snapshot but was not
//! visible in the previous one: its transaction was either in progress at the previous read
//! (listed in that snapshot's `xip`) or started after it (`xid >= xmax`). Nothing else can
//! have become visible. This is exact (no loss, no duplicates, no time window to tune), it
//! never waits for other transactions (a transaction left open elsewhere delays nobody but
//! itself), and each read touches only the rows of transactions that finished since the
//! previous read, through the index on `xid`. The cursor is process memory, independent of the
//! listening connection, so after a reconnect the next read returns everything missed.
//!
//! Snapshots compare only within one unbroken run of transaction ids. A server that comes
//! back with its counter behind the cursor (a failover to a replica that had not replayed
//! everything, or a crash that lost an unflushed abort) hands out ids the cursor counts as
//! read. The cursor therefore also records the server's start time; when that changes, the
//! next read also takes every row from a transaction at or above a floor computed from what
//! the bus has seen, with ordinary functions only (no `pg_control_checkpoint()`, so it works
//! for an unprivileged role): one above the highest transaction id of a row it has seen, or
//! lower if rows created since its previous read carry lower ids (the ids went back). Rows
//! above the floor that it already delivered are skipped by `(id, xid)`. After a restart,
//! crash recovery or a switchover the floor is exactly the first new id; nothing is read
//! twice. A server change between two pages of one read restarts that read, skipping what it
//! had already delivered. See `restart_floor` in the bus and RELIABILITY.md for the limits.
//!
//! # A slow subscriber
//! Each subscription has a queue of at most [`BusConfig::max_pending_per_subscription`]
//! events. When it is full the bus pauses the subscription at the event it could not queue;
//! once the consumer has read what the queue holds, the subscription reads the events it did
//! not get from the table (those the bus dispatched between the pause and the moment it
//! resumed, delimited by the snapshots of the bus's reads), a page at a time, and then
//! continues with its queue, which has been filling again since it resumed. Nothing is lost
//! or repeated and memory stays bounded. [`Lagged`] reports only what cannot be read back:
//! ephemeral messages, and stored events when the database server changed during the pause.

//! # Writer cost: coalesced wake-ups
//! Postgres serialises the commits of transactions that issued NOTIFY (a global lock on its
//! notification queue, held through the commit). So the crate's own writers (`update_state`,
//! `connect`) issue no NOTIFY: their statement sets `plane.event_wake = deferred` for the
//! transaction, which silences the `event` trigger. After the commit the writer wakes its own
//! process's bus directly, and one task per bus sends a single `NOTIFY plane_events` for all
//! of the process's commits since its previous one, at most one per
//! [`BusConfig::wake_interval`], so that buses in other processes wake too (a bus ignores its
//! own NOTIFYs: their payload is its random id). Every other insert into `event` ([`emit`] in
//! a caller's transaction, older versions, manual SQL) still wakes readers from the trigger,
//! one payload-free NOTIFY per transaction. [`BusConfig::coalesce_wakeups`] turns coalescing
//! off. Readers never depend on a wake-up's content, so all of this changes latency and
//! throughput only, never what is delivered; a lost wake-up costs at most one poll interval.
//!
//! The read itself is a prepared statement that Postgres may plan generically (without the
//! parameter values); it is written so that even that plan reads only the new rows through
//! the index on `xid` (see `read_new_events`).
//!
//! # Ephemeral messages
//! Backend metrics are sent with `pg_notify('plane_ephemeral', …)` and delivered live; they are
//! never stored.

mod bus;
mod stored;
mod subscription;
mod write;

pub use bus::BusConfig;
pub(crate) use bus::EventBus;
pub(crate) use stored::{events_since, latest_event_id};
pub use subscription::{EventSubscription, Lagged, Subscription};
pub use write::emit;
pub(crate) use write::{emit_ephemeral, EventBatch, EventWriter};

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

/// What events of one kind are keyed by (the `key` column of `event`). A payload type names
/// its key type ([`NotificationPayload::Key`]), so a writer and a keyed subscription of one
/// kind cannot disagree on what the key is.
pub trait EventKey: Send + Sync + 'static {
    /// The key as stored in `event.key`.
    fn to_event_key(&self) -> String;
}

impl EventKey for BackendName {
    fn to_event_key(&self) -> String {
        self.as_str().to_string()
    }
}

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
/// subscriptions.
pub trait NotificationPayload: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// What this kind's events are keyed by.
    type Key: EventKey;

    /// The event kind, e.g. `"backend_state"`.
    fn kind() -> &'static str;
}

impl NotificationPayload for BackendState {
    type Key = BackendName;

    fn kind() -> &'static str {
        "backend_state"
    }
}

impl NotificationPayload for BackendActionMessage {
    /// The drone that must carry the action out.
    type Key = NodeId;

    fn kind() -> &'static str {
        "backend_action"
    }
}

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

/// A decoded event delivered to a [`Subscription`].
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
