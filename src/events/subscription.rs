//! Subscriptions: a queue per subscriber that grows with what it holds (nothing is reserved
//! up front), up to a limit; beyond it the subscriber is paused and later catches up from the
//! `event` table, exactly where its queue overflowed.

use super::bus::{Position, Shared};
use super::{decode, Event, Notification, NotificationPayload};
use crate::metrics as m;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Which events a subscription receives.
pub(crate) enum Filter {
    All,
    Kind(&'static str),
    KindKey(&'static str, String),
}

impl Filter {
    /// The `kind` label of its subscriptions' gauge.
    fn label(&self) -> &'static str {
        match self {
            Filter::All => "all",
            Filter::Kind(kind) | Filter::KindKey(kind, _) => m::kind_label(kind),
        }
    }

    fn kind(&self) -> Option<&'static str> {
        match self {
            Filter::All => None,
            Filter::Kind(kind) | Filter::KindKey(kind, _) => Some(kind),
        }
    }

    fn key(&self) -> Option<&str> {
        match self {
            Filter::KindKey(_, key) => Some(key),
            _ => None,
        }
    }
}

/// One subscriber's queue. The bus pushes, the subscription pops.
pub(crate) struct SubQueue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Arc<Event>>,
    /// Set when the queue was full as the bus dispatched a stored event: the position of that
    /// event. From then on the bus queues nothing more until the subscriber has drained the
    /// queue and resumed (see [`Registration::resume`]).
    paused_at: Option<Position>,
    /// Stored events not queued since the pause.
    dropped: u64,
    /// Ephemeral messages not queued (they are not stored, so no catch-up brings them back).
    dropped_ephemeral: u64,
    closed: bool,
}

/// What the queue has for its subscriber.
enum Next {
    Event(Arc<Event>),
    /// The queue is drained and paused: time to catch up from the table.
    Paused,
    /// Ephemeral messages were dropped.
    Lagged(u64),
    Closed,
}

impl SubQueue {
    fn new() -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section is a single push/pop; a poisoned lock holds a usable queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event (`position` is where the bus stands, for a stored event). A subscriber
    /// that already holds `max_pending` undelivered events is paused instead: it keeps what it
    /// holds, and later reads what it did not get from the table.
    pub(crate) fn push(&self, event: Arc<Event>, position: Option<&Position>, max_pending: usize) {
        {
            let mut st = self.state();
            if st.closed {
                return;
            }
            match position {
                None if st.paused_at.is_some() || st.items.len() >= max_pending => {
                    st.dropped_ephemeral += 1;
                }
                None => st.items.push_back(event),
                Some(_) if st.paused_at.is_some() => st.dropped += 1,
                Some(position) if st.items.len() >= max_pending => {
                    st.paused_at = Some(position.clone());
                    st.dropped += 1;
                }
                Some(_) => st.items.push_back(event),
            }
        }
        self.ready.notify_one();
    }

    /// How many events it holds, and whether it is paused.
    pub(crate) fn depth(&self) -> (usize, bool) {
        let st = self.state();
        (st.items.len(), st.paused_at.is_some())
    }

    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
    }

    /// The next queued event; `Paused` once a paused queue is drained; `Closed` once the bus
    /// shut down and the queue is drained.
    async fn next(&self) -> Next {
        loop {
            {
                let mut st = self.state();
                if st.dropped_ephemeral > 0 && st.paused_at.is_none() {
                    return Next::Lagged(std::mem::take(&mut st.dropped_ephemeral));
                }
                if let Some(event) = st.items.pop_front() {
                    return Next::Event(event);
                }
                if st.closed {
                    return Next::Closed;
                }
                if st.paused_at.is_some() {
                    return Next::Paused;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push between the check
            // above and this await is not missed.
            self.ready.notified().await;
        }
    }
}

/// The stored events a paused subscription did not get: those the bus dispatched from the
/// pause position `from` (inclusive) to the position `to` it had reached when the subscription
/// resumed (inclusive), read from the table a page at a time.
///
/// A read dispatches the rows visible in its target snapshot and not in its previous one, in
/// id order, and each read's previous snapshot is the last one's target; so the span is the
/// rows visible in `to.target` and not in `from.prev`, less those of `from`'s read below
/// `from.id` and those of `to`'s read above `to.id`.
struct CatchUp {
    from: Position,
    to: Position,
    /// The last id handed out.
    after: i64,
    page: VecDeque<Arc<Event>>,
    done: bool,
}

/// How many events one catch-up read fetches.
const CATCH_UP_PAGE: i64 = 500;

impl CatchUp {
    async fn fetch(&mut self, shared: &Shared, filter: &Filter) -> crate::Result<()> {
        let rows = sqlx::query!(
            r#"
            select id, kind, key, created_at, data
            from event
            where xid >= pg_snapshot_xmin($1::text::pg_snapshot)
              and xid < pg_snapshot_xmax($4::text::pg_snapshot)
              and pg_visible_in_snapshot(xid, $4::text::pg_snapshot)
              and not pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
              and not (pg_visible_in_snapshot(xid, $2::text::pg_snapshot) and id < $3)
              and not (not pg_visible_in_snapshot(xid, $5::text::pg_snapshot) and id > $6)
              and ($7::text is null or kind = $7)
              and ($8::text is null or key = $8)
              and id > $9
            order by id
            limit $10
            "#,
            &*self.from.prev,
            &*self.from.target,
            self.from.id,
            &*self.to.target,
            &*self.to.prev,
            self.to.id,
            filter.kind(),
            filter.key(),
            self.after,
            CATCH_UP_PAGE,
        )
        .fetch_all(&shared.pool)
        .await?;
        self.done = (rows.len() as i64) < CATCH_UP_PAGE;
        metrics::counter!(m::BUS_EVENTS_CAUGHT_UP_TOTAL).increment(rows.len() as u64);
        for row in rows {
            self.after = row.id;
            self.page.push_back(Arc::new(Event {
                id: Some(row.id),
                kind: row.kind,
                key: row.key,
                created_at: row.created_at,
                data: row.data,
            }));
        }
        Ok(())
    }
}

/// A subscription fell behind in a way it could not make up for: `missed` events were not
/// delivered to it. Stored events normally are not lost this way (a subscriber whose queue is
/// full is paused and then catches up from the `event` table, exactly where it stopped); this
/// is reported for ephemeral messages dropped from a full queue (they are not stored), and for
/// stored events when the database server changed while the subscriber was paused (the
/// catch-up could not be delimited exactly: resynchronise from the table if they matter).
/// Delivery continues with newer events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscription lagged: {missed} events were dropped from its queue")]
pub struct Lagged {
    /// How many events were dropped.
    pub missed: u64,
}

/// Records a [`Lagged`] report.
fn lagged(cause: &'static str, missed: u64) {
    metrics::counter!(m::BUS_LAGGED_TOTAL, "cause" => cause).increment(1);
    metrics::counter!(m::BUS_EVENTS_MISSED_TOTAL, "cause" => cause).increment(missed);
}

/// The registration shared by typed and untyped subscriptions; unregisters on drop.
struct Registration {
    shared: Arc<Shared>,
    filter: Filter,
    queue: Arc<SubQueue>,
    catch_up: Option<CatchUp>,
}

impl Registration {
    fn new(shared: Arc<Shared>, filter: Filter) -> Self {
        let queue = Arc::new(SubQueue::new());
        shared.register(&filter, queue.clone());
        metrics::gauge!(m::BUS_SUBSCRIPTIONS, "kind" => filter.label()).increment(1.0);
        Self {
            shared,
            filter,
            queue,
            catch_up: None,
        }
    }

    /// The next event: first what a catch-up still has to read, then the queue.
    async fn next(&mut self) -> Option<Result<Arc<Event>, Lagged>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if let Some(catch_up) = &mut self.catch_up {
                if let Some(event) = catch_up.page.pop_front() {
                    return Some(Ok(event));
                }
                if !catch_up.done {
                    if let Err(error) = catch_up.fetch(&self.shared, &self.filter).await {
                        // The events are in the table; try again until the database answers
                        // (new events queue up meanwhile, or pause the queue again).
                        tracing::warn!(%error, "subscription: catching up failed; retrying");
                        if self.shared.is_closed() {
                            return None;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    continue;
                }
                self.catch_up = None;
            }
            match self.queue.next().await {
                Next::Event(event) => return Some(Ok(event)),
                Next::Lagged(missed) => {
                    lagged("ephemeral", missed);
                    return Some(Err(Lagged { missed }));
                }
                Next::Closed => return None,
                Next::Paused => {
                    if let Err(report) = self.resume() {
                        lagged("server_changed", report.missed);
                        return Some(Err(report));
                    }
                }
            }
        }
    }

    /// Un-pauses a drained queue and sets up the catch-up of what it did not get: from its
    /// pause position to the bus's current position, taken under the registry lock so that
    /// every later event is queued. `Err` if that span cannot be read exactly (the server
    /// changed in between).
    fn resume(&mut self) -> Result<(), Lagged> {
        let reg = self.shared.registry();
        let mut st = self.queue.state();
        let Some(from) = st.paused_at.take() else {
            return Ok(());
        };
        let dropped = std::mem::take(&mut st.dropped);
        let to = reg.last.clone().unwrap_or_else(|| from.clone());
        if !(from.exact && to.exact && from.epoch == to.epoch) {
            return Err(Lagged { missed: dropped });
        }
        metrics::counter!(m::BUS_CATCH_UPS_TOTAL).increment(1);
        self.catch_up = Some(CatchUp {
            from,
            to,
            after: 0,
            page: VecDeque::new(),
            done: false,
        });
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(&self.filter, &self.queue);
        metrics::gauge!(m::BUS_SUBSCRIPTIONS, "kind" => self.filter.label()).decrement(1.0);
    }
}

/// A live subscription to events of one payload type (optionally with one key), created by
/// [`PlaneDatabase::subscribe`](crate::PlaneDatabase::subscribe) or
/// [`PlaneDatabase::subscribe_with_key`](crate::PlaneDatabase::subscribe_with_key).
///
/// Every matching event committed after the subscription was created is delivered exactly
/// once, in the order the bus read them (commit order, not id order). Dropping it
/// unsubscribes.
pub struct Subscription<T> {
    registration: Registration,
    _payload: PhantomData<fn() -> T>,
}

impl<T: NotificationPayload> Subscription<T> {
    pub(crate) fn new(shared: Arc<Shared>, key: Option<String>) -> Self {
        let filter = match key {
            Some(key) => Filter::KindKey(T::kind(), key),
            None => Filter::Kind(T::kind()),
        };
        Self {
            registration: Registration::new(shared, filter),
            _payload: PhantomData,
        }
    }

    /// Waits for the next event. `Some(Err(Lagged))` says events were dropped because this
    /// subscriber fell behind; `None` means the `PlaneDatabase` was dropped. An event whose
    /// payload does not decode as `T` is skipped with a warning.
    pub async fn next(&mut self) -> Option<Result<Notification<T>, Lagged>> {
        loop {
            match self.registration.next().await? {
                Err(lagged) => return Some(Err(lagged)),
                Ok(event) => match decode::<T>(&event) {
                    Ok(notification) => return Some(Ok(notification)),
                    Err(error) => tracing::warn!(
                        %error,
                        id = ?event.id,
                        kind = %event.kind,
                        "skipping an event whose payload does not decode"
                    ),
                },
            }
        }
    }
}

/// A subscription to every event of every kind, undecoded (see
/// [`PlaneDatabase::subscribe_all_events`](crate::PlaneDatabase::subscribe_all_events)).
pub struct EventSubscription {
    registration: Registration,
}

impl EventSubscription {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            registration: Registration::new(shared, Filter::All),
        }
    }

    /// Waits for the next event; see [`Subscription::next`].
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, Lagged>> {
        self.registration.next().await
    }
}
