//! Subscriptions: a queue per subscriber that grows with what it holds (nothing is reserved
//! up front), with an explicit signal when it overflows.

use super::bus::Shared;
use super::{decode, Event, Notification, NotificationPayload};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Which events a subscription receives.
pub(crate) enum Filter {
    All,
    Kind(&'static str),
    KindKey(&'static str, String),
}

/// One subscriber's queue. The bus pushes, the subscription pops.
pub(crate) struct SubQueue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Arc<Event>>,
    /// Events dropped since the subscriber last heard about it.
    missed: u64,
    closed: bool,
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

    /// Queues an event. A subscriber that already holds `max_pending` undelivered events is
    /// not kept up to date silently: its queue is emptied and it is told how many it missed.
    pub(crate) fn push(&self, event: Arc<Event>, max_pending: usize) {
        {
            let mut st = self.state();
            if st.closed {
                return;
            }
            if st.items.len() >= max_pending {
                st.missed += st.items.len() as u64 + 1;
                st.items = VecDeque::new();
            } else {
                st.items.push_back(event);
            }
        }
        self.ready.notify_one();
    }

    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
    }

    /// The next event, `Err(Lagged)` if events were dropped, `None` once the bus shut down and
    /// the queue is drained.
    async fn next(&self) -> Option<Result<Arc<Event>, Lagged>> {
        loop {
            {
                let mut st = self.state();
                if st.missed > 0 {
                    let missed = std::mem::take(&mut st.missed);
                    return Some(Err(Lagged { missed }));
                }
                if let Some(event) = st.items.pop_front() {
                    return Some(Ok(event));
                }
                if st.closed {
                    return None;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push between the check
            // above and this await is not missed.
            self.ready.notified().await;
        }
    }
}

/// A subscription fell too far behind: `missed` events were dropped from its queue. The
/// events are still in the `event` table (or, for ephemeral messages, gone); resynchronise
/// from the table if they matter. Delivery continues with newer events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscription lagged: {missed} events were dropped from its queue")]
pub struct Lagged {
    /// How many events were dropped.
    pub missed: u64,
}

/// The registration shared by typed and untyped subscriptions; unregisters on drop.
struct Registration {
    shared: Arc<Shared>,
    filter: Filter,
    queue: Arc<SubQueue>,
}

impl Registration {
    fn new(shared: Arc<Shared>, filter: Filter) -> Self {
        let queue = Arc::new(SubQueue::new());
        shared.register(&filter, queue.clone());
        Self {
            shared,
            filter,
            queue,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(&self.filter, &self.queue);
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
            match self.registration.queue.next().await? {
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
        self.registration.queue.next().await
    }
}
