//! The one path by which events are written.
//!
//! Every event goes through the database function `plane_write_events` (migration
//! `20261130020000_write_events`), called from the same statement as the change it reports.
//! That function sets the transaction's `plane.event_wake` before it inserts, so no writer can
//! insert an event and forget the wake-up. On the Rust side:
//!
//! - [`EventBatch`] serialises payloads with serde into the function's arrays, keyed by the
//!   payload's own key type; a statement filters them in SQL to the rows it changed.
//! - [`EventWriter`] says what the wake-up should be and, after the commit, wakes this
//!   process's bus and asks for the one coalesced NOTIFY (see "Writer cost" in
//!   [`events`](crate::events)).
//!
//! Where a payload needs a value that only exists inside the statement (an id from a
//! sequence, a fencing token, a deadline on the database clock), the statement builds that
//! payload in SQL next to the call, and says why in a comment.

use super::event::{EphemeralEnvelope, EventKey, NotificationPayload, EPHEMERAL_CHANNEL};
use super::EventBus;
use crate::error::{to_json, Error, Result};
use crate::limits::{self, limit};
use sqlx::PgConnection;

/// Postgres refuses NOTIFY payloads of 8000 bytes or more.
const MAX_NOTIFY_PAYLOAD: usize = 7999;

/// `plane.event_wake` for a caller's own transaction, whose commit the crate does not see: the
/// wake trigger notifies.
const WAKE_BY_TRIGGER: &str = "notify";

/// `plane.event_wake` for a transaction prepared for two-phase commit, which may not
/// `NOTIFY`: the wake trigger stays silent and readers find the event at their next read.
const WAKE_BY_POLL: &str = "deferred";

/// Events for one statement, as the parallel arrays `plane_write_events` takes.
#[derive(Debug, Default)]
pub(crate) struct EventBatch {
    kinds: Vec<&'static str>,
    keys: Vec<String>,
    payloads: Vec<serde_json::Value>,
}

impl EventBatch {
    /// A batch of one event.
    pub(crate) fn one<T: NotificationPayload>(key: &T::Key, payload: &T) -> Result<Self> {
        let mut batch = Self::default();
        batch.push(key, payload)?;
        Ok(batch)
    }

    /// Adds an event of kind `T::kind()`, its payload serialised with serde.
    pub(crate) fn push<T: NotificationPayload>(&mut self, key: &T::Key, payload: &T) -> Result<()> {
        self.push_raw(key.to_event_key(), payload)
    }

    /// Adds an event keyed by a key as read from the database, for a row whose stored key
    /// does not parse as `T::Key` (odd data is still reported, under the key it has).
    pub(crate) fn push_raw<T: NotificationPayload>(
        &mut self,
        key: String,
        payload: &T,
    ) -> Result<()> {
        self.payloads.push(to_json(T::kind(), payload)?);
        self.kinds.push(T::kind());
        self.keys.push(key);
        Ok(())
    }

    /// Appends `other`'s events after this batch's.
    pub(crate) fn extend(&mut self, other: &EventBatch) {
        self.kinds.extend_from_slice(&other.kinds);
        self.keys.extend_from_slice(&other.keys);
        self.payloads.extend_from_slice(&other.payloads);
    }

    /// The kinds, for the statement's `kinds` argument.
    pub(crate) fn kinds(&self) -> &[&'static str] {
        &self.kinds
    }

    /// The keys, for the statement's `keys` argument.
    pub(crate) fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The payloads, for the statement's `payloads` argument.
    pub(crate) fn payloads(&self) -> &[serde_json::Value] {
        &self.payloads
    }
}

/// The wake-up side of the write path, for the crate's own statements.
pub(crate) struct EventWriter<'a> {
    bus: &'a EventBus,
}

impl<'a> EventWriter<'a> {
    pub(crate) fn new(bus: &'a EventBus) -> Self {
        Self { bus }
    }

    /// The `wake` argument of `plane_write_events` for a statement of ours: `deferred` (this
    /// process sends a coalesced NOTIFY after the commit) unless coalescing is turned off.
    pub(crate) fn wake(&self) -> &'static str {
        self.bus.event_wake_setting()
    }

    /// To call after the commit of a statement that wrote events with [`wake`](Self::wake).
    /// If it is not called (the future was dropped after the commit), readers still get the
    /// events at their next poll: a lost wake-up costs latency, never events.
    pub(crate) fn committed(&self) {
        self.bus.committed();
    }
}

/// Writes an event in the caller's transaction (or connection). Subscribers see it once, and
/// only if, that transaction commits. Returns the event id. Its wake-up comes from the
/// `event` trigger at the commit (the crate does not see the caller's commit).
///
/// The kind, key and serialized payload are at most
/// [`EVENT_KIND_BYTES`](crate::limits::EVENT_KIND_BYTES),
/// [`EVENT_KEY_BYTES`](crate::limits::EVENT_KEY_BYTES) and
/// [`EVENT_PAYLOAD_BYTES`](crate::limits::EVENT_PAYLOAD_BYTES): a larger one is
/// [`Error::InvalidArgument`] before anything is sent, and the caller's transaction is
/// left as it was.
///
/// That wake-up is a `NOTIFY`, which Postgres refuses in a transaction that is then
/// prepared for two-phase commit (`PREPARE TRANSACTION` fails with "cannot PREPARE a
/// transaction that has executed LISTEN, UNLISTEN, or NOTIFY"): use
/// [`emit_in_two_phase`] there.
///
/// ```no_run
/// # async fn example(db: &plane_db::PlaneDatabase) -> plane_db::Result<()> {
/// use plane_db::types::{BackendName, BackendState};
/// let backend = BackendName::new_random();
/// let mut txn = db.pool().begin().await?;
/// // ... the caller's own changes ...
/// plane_db::events::emit(&mut txn, Some(&backend), &BackendState::Loading).await?;
/// txn.commit().await?;
/// # Ok(()) }
/// ```
#[tracing::instrument(skip(conn, key, payload), fields(kind = T::kind()))]
pub async fn emit<T: NotificationPayload>(
    conn: &mut PgConnection,
    key: Option<&T::Key>,
    payload: &T,
) -> Result<i64> {
    write_one_event(conn, key, payload, WAKE_BY_TRIGGER).await
}

/// [`emit`] for a transaction that will be prepared for two-phase commit (`PREPARE
/// TRANSACTION`): the same row, without the `NOTIFY` that Postgres refuses to prepare.
/// Subscribers see the event once, and only if the prepared transaction is committed
/// (`COMMIT PREPARED`), at their next read: within [`BusConfig::poll_interval`](super::BusConfig::poll_interval)
/// of the commit, or at once if anything else wakes them.
///
/// ```no_run
/// # async fn example(db: &plane_db::PlaneDatabase) -> plane_db::Result<()> {
/// use plane_db::types::{BackendName, BackendState};
/// let backend = BackendName::new_random();
/// let mut conn = db.pool().acquire().await?;
/// sqlx::raw_sql("begin").execute(&mut *conn).await?;
/// plane_db::events::emit_in_two_phase(&mut conn, Some(&backend), &BackendState::Loading).await?;
/// sqlx::raw_sql("prepare transaction 'plane-example'").execute(&mut *conn).await?;
/// // ... later, from any session, once the other participants are prepared too:
/// sqlx::raw_sql("commit prepared 'plane-example'").execute(db.pool()).await?;
/// # Ok(()) }
/// ```
#[tracing::instrument(skip(conn, key, payload), fields(kind = T::kind()))]
pub async fn emit_in_two_phase<T: NotificationPayload>(
    conn: &mut PgConnection,
    key: Option<&T::Key>,
    payload: &T,
) -> Result<i64> {
    write_one_event(conn, key, payload, WAKE_BY_POLL).await
}

/// Writes one event through `plane_write_events` with the given `plane.event_wake`.
async fn write_one_event<T: NotificationPayload>(
    conn: &mut PgConnection,
    key: Option<&T::Key>,
    payload: &T,
    wake: &str,
) -> Result<i64> {
    // The kind, key and payload come from the caller: bounded (see `limits`) and without a
    // NUL, refused before the statement rather than by the server mid-transaction (which
    // would abort the caller's transaction).
    limits::check_text("kind", T::kind(), limit!(EVENT_KIND_BYTES))?;
    let key = key.map(EventKey::to_event_key);
    if let Some(key) = &key {
        limits::check_text("key", key, limit!(EVENT_KEY_BYTES))?;
    }
    let data = to_json(T::kind(), payload)?;
    limits::check_json("payload", &data, limit!(EVENT_PAYLOAD_BYTES))?;
    let ids = sqlx::query_scalar!(
        r#"select plane_write_events(array[$1], array[$2], array[$3::jsonb], $4) as "ids!""#,
        T::kind(),
        key as Option<String>,
        data,
        wake,
    )
    .fetch_one(&mut *conn)
    .await?;
    ids.first().copied().ok_or_else(|| Error::InvalidArgument {
        argument: "payload",
        reason: "plane_write_events wrote no event".to_string(),
    })
}

/// Sends an ephemeral message: delivered live to current subscribers, never stored.
pub(crate) async fn emit_ephemeral<'c, T: NotificationPayload>(
    executor: impl sqlx::PgExecutor<'c>,
    key: Option<&T::Key>,
    payload: &T,
) -> Result<()> {
    let envelope = EphemeralEnvelope {
        kind: T::kind().to_string(),
        key: key.map(EventKey::to_event_key),
        data: to_json(T::kind(), payload)?,
    };
    let text = serde_json::to_string(&envelope).map_err(|source| Error::Serialize {
        what: T::kind(),
        source,
    })?;
    if text.len() > MAX_NOTIFY_PAYLOAD {
        return Err(Error::InvalidArgument {
            argument: "payload",
            reason: format!(
                "ephemeral message is {} bytes; NOTIFY takes at most {MAX_NOTIFY_PAYLOAD}",
                text.len()
            ),
        });
    }
    sqlx::query!("select pg_notify($1, $2)", EPHEMERAL_CHANNEL, text)
        .execute(executor)
        .await?;
    Ok(())
}
