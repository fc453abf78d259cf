//! Subscriptions: the public handles, each reading its queue in the registry, and the
//! catch-up of a paused subscription from the `event` table, exactly where its queue
//! overflowed. The [module docs](super) state what a subscription is promised.

use super::event::{decode, Event, Notification, NotificationPayload};
use super::registry::{Filter, Next, Position, Shared, SubQueue};
use crate::metrics as m;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

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
    /// The wait before retrying a failed read.
    retry_delay: Duration,
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

    /// Reads the next page; if that fails, waits before the caller tries again. `false` if the
    /// bus shut down meanwhile.
    async fn fetch_or_wait(&mut self, shared: &Shared, filter: &Filter) -> bool {
        match self.fetch(shared, filter).await {
            Ok(()) => self.retry_delay = FIRST_RETRY_DELAY,
            Err(error) => {
                // The events are in the table; try again until the database answers
                // (new events queue up meanwhile, or pause the queue again).
                tracing::warn!(%error, "subscription: catching up failed; retrying");
                if shared.is_closed() {
                    return false;
                }
                tokio::time::sleep(self.retry_delay).await;
                self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(5));
            }
        }
        true
    }
}

/// The first wait before retrying a failed catch-up read.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);

/// A subscription fell behind in a way it could not make up for: `missed` events were not
/// delivered to it. [The promises](super#promises) say when this can happen (ephemeral
/// messages dropped from a full queue; stored events when the database server changed while
/// the subscriber was paused: resynchronise from the table if they matter). Delivery
/// continues with newer events.
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
    /// Boxed, like everything on the catch-up path: it is rare, and every subscription (and
    /// status stream, and the task that owns it) would otherwise carry its size.
    catch_up: Option<Box<CatchUp>>,
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
        loop {
            if let Some(catch_up) = &mut self.catch_up {
                if let Some(event) = catch_up.page.pop_front() {
                    return Some(Ok(event));
                }
                if !catch_up.done {
                    // Boxed: the read, its error and the retry's timer inline would make
                    // every waiting subscription's (and status stream's) state that much
                    // larger.
                    if !Box::pin(catch_up.fetch_or_wait(&self.shared, &self.filter)).await {
                        return None;
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
        let Some((from, dropped)) = self.queue.unpause() else {
            return Ok(());
        };
        let to = reg.last.clone().unwrap_or_else(|| from.clone());
        // The registry's current epoch, not only `to`'s: a read after a server change may
        // have begun (bumping the epoch) without having dispatched anything yet, and what it
        // will dispatch is not delimited by snapshots either.
        if !(from.exact && to.exact && from.epoch == to.epoch && reg.epoch() == from.epoch) {
            return Err(Lagged { missed: dropped });
        }
        metrics::counter!(m::BUS_CATCH_UPS_TOTAL).increment(1);
        self.catch_up = Some(Box::new(CatchUp {
            from,
            to,
            after: 0,
            page: VecDeque::new(),
            done: false,
            retry_delay: FIRST_RETRY_DELAY,
        }));
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
/// What it delivers, and when, is stated once in [the promises](super#promises). Dropping it
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
