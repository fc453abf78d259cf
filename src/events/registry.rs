//! The registry: every subscriber's queue by filter, the dispatch of each event to the
//! matching queues, and the position the bus has reached (what a paused subscription
//! catches up to). Also the state the bus's tasks and the subscriptions share. See the
//! [module docs](super) for what this serves.

use super::event::Event;
use crate::metrics as m;
use sqlx::PgPool;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{watch, Notify};

/// Which events a subscription receives.
pub(crate) enum Filter {
    All,
    Kind(&'static str),
    KindKey(&'static str, String),
}

impl Filter {
    /// The `kind` label of its subscriptions' gauge.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Filter::All => "all",
            Filter::Kind(kind) | Filter::KindKey(kind, _) => m::kind_label(kind),
        }
    }

    pub(super) fn kind(&self) -> Option<&'static str> {
        match self {
            Filter::All => None,
            Filter::Kind(kind) | Filter::KindKey(kind, _) => Some(kind),
        }
    }

    pub(super) fn key(&self) -> Option<&str> {
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
    /// queue and resumed (see [`SubQueue::unpause`]). Boxed: pausing is rare, and every
    /// subscription's queue would otherwise carry a position's worth of bytes.
    paused_at: Option<Box<Position>>,
    /// Stored events not queued since the pause.
    dropped: u64,
    /// Ephemeral messages not queued (they are not stored, so no catch-up brings them back).
    dropped_ephemeral: u64,
    closed: bool,
    /// Whether the queue is in [`Registry::backlog`].
    in_backlog: bool,
}

/// What the queue has for its subscriber.
pub(super) enum Next {
    Event(Arc<Event>),
    /// The queue is drained and paused: time to catch up from the table.
    Paused,
    /// Ephemeral messages were dropped.
    Lagged(u64),
    Closed,
}

impl SubQueue {
    pub(super) fn new() -> Self {
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
    ///
    /// `true` if the queue is to be added to [`Registry::backlog`]: it holds events or is
    /// paused now, and was not there yet. The caller holds the registry lock.
    #[must_use]
    pub(crate) fn push(
        &self,
        event: Arc<Event>,
        position: Option<&Position>,
        max_pending: usize,
    ) -> bool {
        let join_backlog;
        {
            let mut st = self.state();
            if st.closed {
                return false;
            }
            match position {
                None if st.paused_at.is_some() || st.items.len() >= max_pending => {
                    st.dropped_ephemeral += 1;
                }
                None => st.items.push_back(event),
                Some(_) if st.paused_at.is_some() => st.dropped += 1,
                Some(position) if st.items.len() >= max_pending => {
                    st.paused_at = Some(Box::new(position.clone()));
                    st.dropped += 1;
                }
                Some(_) => st.items.push_back(event),
            }
            join_backlog = !st.in_backlog && (!st.items.is_empty() || st.paused_at.is_some());
            st.in_backlog |= join_backlog;
        }
        self.ready.notify_one();
        join_backlog
    }

    /// How many events it holds and whether it is paused, or `None` (and it leaves the
    /// backlog) if it holds none and is not paused. The caller holds the registry lock.
    fn sample(&self) -> Option<(usize, bool)> {
        let mut st = self.state();
        let (len, paused) = (st.items.len(), st.paused_at.is_some());
        if len == 0 && !paused {
            st.in_backlog = false;
            return None;
        }
        Some((len, paused))
    }

    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
    }

    /// The next queued event; `Paused` once a paused queue is drained; `Closed` once the bus
    /// shut down and the queue is drained.
    pub(super) async fn next(&self) -> Next {
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

    /// Un-pauses the queue: the position it paused at and how many stored events it did not
    /// queue since, or `None` if it is not paused. The caller holds the registry lock (see
    /// [`Shared::registry`]), so that the bus's position it reads with it is consistent with
    /// what the queue gets from then on.
    pub(super) fn unpause(&self) -> Option<(Position, u64)> {
        let mut st = self.state();
        let from = st.paused_at.take()?;
        Some((*from, std::mem::take(&mut st.dropped)))
    }
}

/// Subscriber queues by filter, and where the bus stands in its dispatching (kept under the
/// same lock, so that a subscription resuming after a pause sees a position and the events
/// dispatched after it consistently).
#[derive(Default)]
pub(crate) struct Registry {
    all: Vec<Arc<SubQueue>>,
    by_kind: HashMap<&'static str, KindSubs>,
    /// The position of the last stored event dispatched.
    pub(crate) last: Option<Position>,
    /// Every queue that holds events or is paused (and some that no longer do, until the next
    /// [`Shared::sample_queues`]): the only ones whose depth the gauges need, so that sampling
    /// them costs what is queued, not one visit per subscription. A queue joins when the bus
    /// pushes to it (pushing and pausing happen under the registry lock, so the sample sees
    /// every queue that can hold anything) and leaves when a sample finds it empty.
    backlog: Vec<Arc<SubQueue>>,
    /// Bumped before and after every read that two snapshots do not describe (a read after a
    /// server change): a catch-up across such a read is not exact.
    epoch: u64,
}

impl Registry {
    /// The current epoch (see the field): a resume compares its positions with it.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Where the bus stood when it dispatched a stored event: the read's previous and target
/// snapshots and the event's id. The rows that read dispatched are those visible in `target`
/// and not in `prev`, in id order; so two positions of the same epoch delimit exactly the
/// events dispatched between them (see the catch-up in `subscription`).
#[derive(Clone, Debug)]
pub(crate) struct Position {
    pub(crate) prev: Arc<str>,
    pub(crate) target: Arc<str>,
    pub(crate) id: i64,
    pub(crate) epoch: u64,
    /// False for positions inside a read after a server change.
    pub(crate) exact: bool,
}

/// The read being dispatched, as [`Position`]s are built from it.
pub(super) struct ReadSpan {
    pub(super) prev: Arc<str>,
    pub(super) target: Arc<str>,
    pub(super) exact: bool,
}

#[derive(Default)]
struct KindSubs {
    any_key: Vec<Arc<SubQueue>>,
    by_key: HashMap<String, Vec<Arc<SubQueue>>>,
}

/// State shared by the bus tasks, the `EventBus` handle and every subscription.
pub(crate) struct Shared {
    registry: Mutex<Registry>,
    /// For subscriptions' catch-up reads.
    pub(crate) pool: PgPool,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Wakes the reader.
    pub(super) wake: Notify,
    /// Asks the waker task to send one NOTIFY for other processes (see
    /// [`BusConfig::coalesce_wakeups`](super::BusConfig::coalesce_wakeups)); requests made
    /// while one is being sent fold into the next.
    pub(super) wake_others: Notify,
    /// The payload of this bus's own coalesced NOTIFYs. Its listener ignores them: this
    /// process's reader was already woken directly at each commit.
    pub(super) wake_id: String,
    max_pending: usize,
}

impl Shared {
    /// `max_pending`: the queue limit (at least 1); `wake_id`: see [`Shared::wake_id`].
    pub(super) fn new(pool: PgPool, max_pending: usize, wake_id: String) -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            pool,
            closed: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            wake: Notify::new(),
            wake_others: Notify::new(),
            wake_id,
            max_pending,
        }
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the registry half-updated in a way
        // that matters (each operation is a single push/remove), so recover from poisoning.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Completes once the bus is shut down (at once if it already is).
    pub(super) async fn closed(&self) {
        let mut rx = self.shutdown.subscribe();
        // An error means the sender is gone, which also means shutdown.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    pub(crate) fn register(&self, filter: &Filter, queue: Arc<SubQueue>) {
        let mut reg = self.registry();
        match filter {
            Filter::All => reg.all.push(queue),
            Filter::Kind(kind) => reg.by_kind.entry(kind).or_default().any_key.push(queue),
            Filter::KindKey(kind, key) => reg
                .by_kind
                .entry(kind)
                .or_default()
                .by_key
                .entry(key.clone())
                .or_default()
                .push(queue),
        }
        // A subscription made after shutdown ends at once instead of waiting forever.
        if self.is_closed() {
            close_all(&mut reg);
        }
    }

    pub(crate) fn unregister(&self, filter: &Filter, queue: &Arc<SubQueue>) {
        fn remove(list: &mut Vec<Arc<SubQueue>>, queue: &Arc<SubQueue>) {
            if let Some(pos) = list.iter().position(|q| Arc::ptr_eq(q, queue)) {
                list.swap_remove(pos);
            }
        }
        let mut reg = self.registry();
        if queue.state().in_backlog {
            remove(&mut reg.backlog, queue);
        }
        match filter {
            Filter::All => remove(&mut reg.all, queue),
            Filter::Kind(kind) => {
                if let Some(subs) = reg.by_kind.get_mut(kind) {
                    remove(&mut subs.any_key, queue);
                }
            }
            Filter::KindKey(kind, key) => {
                if let Some(subs) = reg.by_kind.get_mut(kind) {
                    if let Some(list) = subs.by_key.get_mut(key) {
                        remove(list, queue);
                        if list.is_empty() {
                            subs.by_key.remove(key);
                        }
                    }
                }
            }
        }
    }

    /// Hands one event to every matching subscriber. `span` is the read a stored event came
    /// from (`None` for an ephemeral message).
    pub(super) fn dispatch(&self, event: Arc<Event>, span: Option<&ReadSpan>) {
        let mut guard = self.registry();
        let reg = &mut *guard;
        let position = match (span, event.id) {
            (Some(span), Some(id)) => {
                let position = Position {
                    prev: span.prev.clone(),
                    target: span.target.clone(),
                    id,
                    epoch: reg.epoch,
                    exact: span.exact,
                };
                reg.last = Some(position.clone());
                Some(position)
            }
            _ => None,
        };
        let position = position.as_ref();
        let max_pending = self.max_pending;
        let backlog = &mut reg.backlog;
        let mut push = |q: &Arc<SubQueue>| {
            if q.push(event.clone(), position, max_pending) {
                backlog.push(q.clone());
            }
        };
        reg.all.iter().for_each(&mut push);
        if let Some(subs) = reg.by_kind.get(event.kind.as_str()) {
            subs.any_key.iter().for_each(&mut push);
            if let Some(list) = event.key.as_ref().and_then(|key| subs.by_key.get(key)) {
                list.iter().for_each(&mut push);
            }
        }
    }

    /// Sets the gauges of the deepest queue and the paused subscriptions (once per read).
    pub(super) fn sample_queues(&self) {
        let (deepest, paused) = self.queue_depths();
        metrics::gauge!(m::BUS_DEEPEST_QUEUE_EVENTS).set(deepest as f64);
        metrics::gauge!(m::BUS_PAUSED_SUBSCRIPTIONS).set(paused as f64);
    }

    /// The most events one queue holds, and how many queues are paused: one visit per queue
    /// in the backlog (which holds every queue that has events or is paused), not per
    /// subscription.
    fn queue_depths(&self) -> (usize, usize) {
        let (mut deepest, mut paused) = (0_usize, 0_usize);
        self.registry().backlog.retain(|q| match q.sample() {
            Some((len, is_paused)) => {
                deepest = deepest.max(len);
                paused += usize::from(is_paused);
                true
            }
            None => false,
        });
        (deepest, paused)
    }

    /// Marks the start or the end of a read that two snapshots do not describe.
    pub(super) fn bump_epoch(&self) {
        self.registry().epoch += 1;
    }

    /// Ends every current subscription (once drained), without shutting the bus down: its
    /// tasks died (their runtime shut down, or a panic), so nothing would feed them. A later
    /// subscription starts the tasks again.
    pub(super) fn end_subscriptions(&self) {
        let mut reg = self.registry();
        close_all(&mut reg);
        // Positions from before cannot delimit a catch-up across the restart.
        reg.epoch += 1;
    }

    /// Shuts the bus down: its tasks stop, and every subscription ends once drained.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
        close_all(&mut self.registry());
    }
}

fn close_all(reg: &mut Registry) {
    let kinds = reg.by_kind.values();
    let queues = reg.all.iter().chain(kinds.flat_map(|k| {
        k.any_key
            .iter()
            .chain(k.by_key.values().flat_map(|list| list.iter()))
    }));
    for q in queues {
        q.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, key: &str) -> Arc<Event> {
        Arc::new(Event {
            id: Some(id),
            kind: "backend_state".into(),
            key: Some(key.into()),
            created_at: chrono::Utc::now(),
            data: serde_json::Value::Null,
        })
    }

    /// The gauges' figures come from the backlog alone, and match a visit of every queue.
    #[tokio::test]
    async fn queue_depths_see_every_queue_that_holds_anything() {
        let pool = sqlx::PgPool::connect_lazy("postgres://plane@127.0.0.1:1/plane")
            .unwrap_or_else(|e| panic!("lazy pool: {e}"));
        let shared = Shared::new(pool, 2, "test".into());
        let span = ReadSpan {
            prev: "1:1:".into(),
            target: "1:2:".into(),
            exact: true,
        };
        let queues: Vec<(Filter, Arc<SubQueue>)> = (0..100)
            .map(|i| {
                let filter = Filter::KindKey("backend_state", format!("ba-{i}"));
                let queue = Arc::new(SubQueue::new());
                shared.register(&filter, queue.clone());
                (filter, queue)
            })
            .collect();
        assert_eq!(shared.queue_depths(), (0, 0));
        shared.dispatch(event(1, "ba-3"), Some(&span));
        shared.dispatch(event(2, "ba-3"), Some(&span));
        shared.dispatch(event(3, "ba-7"), Some(&span));
        assert_eq!(shared.queue_depths(), (2, 0));
        assert_eq!(shared.registry().backlog.len(), 2);
        // A third event for ba-3 pauses it (max_pending 2).
        shared.dispatch(event(4, "ba-3"), Some(&span));
        assert_eq!(shared.queue_depths(), (2, 1));
        // ba-7 drained: it leaves the backlog; ba-3 drained but paused: it stays.
        assert!(matches!(queues[7].1.next().await, Next::Event(_)));
        for _ in 0..2 {
            assert!(matches!(queues[3].1.next().await, Next::Event(_)));
        }
        assert_eq!(shared.queue_depths(), (0, 1));
        assert_eq!(shared.registry().backlog.len(), 1);
        assert!(queues[3].1.unpause().is_some());
        assert_eq!(shared.queue_depths(), (0, 0));
        assert!(shared.registry().backlog.is_empty());
        // A queue unregistered while in the backlog leaves it.
        shared.dispatch(event(5, "ba-9"), Some(&span));
        shared.unregister(&queues[9].0, &queues[9].1);
        assert!(shared.registry().backlog.is_empty());
        assert_eq!(shared.queue_depths(), (0, 0));
    }
}
