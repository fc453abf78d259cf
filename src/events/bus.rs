//! The bus task: one listening connection and one reader per `PlaneDatabase`, fanning events
//! out to subscriber queues.

use super::subscription::{Filter, SubQueue};
use super::{EphemeralEnvelope, Event, EPHEMERAL_CHANNEL, EVENTS_CHANNEL};
use crate::error::Result;
use crate::metrics as m;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify, OnceCell};

/// Tuning of the event bus. The defaults suit a controller; each knob says what it costs.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How often the bus reads the `event` table even without a wake-up. Wake-ups normally
    /// arrive within a millisecond; this only bounds the delay if one is lost. Defaults to 1 s;
    /// each poll is one cheap indexed query.
    pub poll_interval: Duration,
    /// How many undelivered events one subscription may hold. Beyond it the subscription is
    /// paused (nothing more is queued for it); once its consumer has read what it holds, it
    /// reads the stored events it did not get from the `event` table, a page at a time, and
    /// goes on live: nothing is lost, and memory stays bounded by this limit. Ephemeral
    /// messages dropped meanwhile are reported as [`Lagged`](super::Lagged). Memory is used
    /// only for events actually queued. Defaults to 10,000; 0 counts as 1.
    pub max_pending_per_subscription: usize,
    /// How many rows one read of the `event` table fetches at most; a larger backlog is read
    /// in several pages. Defaults to 1,000; values below 1 count as 1.
    pub fetch_batch_size: i64,
    /// The longest wait between reconnection attempts of the listening connection or retries
    /// of a failed read (the wait doubles from 50 ms up to this). Defaults to 5 s.
    pub max_backoff: Duration,
    /// Whether this process's own writers (`update_state`, `connect`) coalesce their
    /// wake-ups. When true (the default) their transactions issue no NOTIFY; after each
    /// commit the writer wakes this process's bus directly, and one background task sends a
    /// single `NOTIFY plane_events` (its payload only identifies this bus) for all commits
    /// since its previous one, so that other processes wake too. This takes Postgres's
    /// commit-time notification lock out of the writers' commits, which otherwise serialises
    /// concurrent writers. When false,
    /// every writing transaction notifies from the `event` trigger (one NOTIFY per commit).
    /// Either way readers take events from the table, so this changes latency and throughput,
    /// never what is delivered.
    pub coalesce_wakeups: bool,
    /// With [`coalesce_wakeups`](Self::coalesce_wakeups), the shortest time between two
    /// wake-ups this process sends to others: commits in between share the next one. Defaults
    /// to 1 ms, which bounds the NOTIFYs a busy process sends to about 1,000 per second (each
    /// one a transaction that takes Postgres's notification lock and wakes every listener)
    /// and adds at most about that much to the delivery latency seen by other processes
    /// (this process's own bus is woken at each commit, without waiting).
    pub wake_interval: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_pending_per_subscription: 10_000,
            fetch_batch_size: 1_000,
            max_backoff: Duration::from_secs(5),
            coalesce_wakeups: true,
            wake_interval: Duration::from_millis(1),
        }
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
    /// Bumped before and after every read that two snapshots do not describe (a read after a
    /// server change): a catch-up across such a read is not exact.
    epoch: u64,
}

/// Where the bus stood when it dispatched a stored event: the read's previous and target
/// snapshots and the event's id. The rows that read dispatched are those visible in `target`
/// and not in `prev`, in id order; so two positions of the same epoch delimit exactly the
/// events dispatched between them (see `subscription::CatchUp`).
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
struct ReadSpan {
    prev: Arc<str>,
    target: Arc<str>,
    exact: bool,
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
    wake: Notify,
    /// Asks the waker task to send one NOTIFY for other processes (see
    /// [`BusConfig::coalesce_wakeups`]); requests made while one is being sent fold into the
    /// next.
    wake_others: Notify,
    /// The payload of this bus's own coalesced NOTIFYs. Its listener ignores them: this
    /// process's reader was already woken directly at each commit.
    wake_id: String,
    max_pending: usize,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the registry half-updated in a way
        // that matters (each operation is a single push/remove), so recover from poisoning.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Completes once the bus is shut down (at once if it already is).
    async fn closed(&self) {
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
    fn dispatch(&self, event: Arc<Event>, span: Option<&ReadSpan>) {
        let mut reg = self.registry();
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
        for q in &reg.all {
            q.push(event.clone(), position, self.max_pending);
        }
        if let Some(subs) = reg.by_kind.get(event.kind.as_str()) {
            for q in &subs.any_key {
                q.push(event.clone(), position, self.max_pending);
            }
            if let Some(key) = &event.key {
                if let Some(list) = subs.by_key.get(key) {
                    for q in list {
                        q.push(event.clone(), position, self.max_pending);
                    }
                }
            }
        }
    }

    /// Sets the gauges of the deepest queue and the paused subscriptions (one pass over the
    /// subscriptions, once per read).
    fn sample_queues(&self) {
        let reg = self.registry();
        let kinds = reg.by_kind.values();
        let queues = reg.all.iter().chain(kinds.flat_map(|k| {
            k.any_key
                .iter()
                .chain(k.by_key.values().flat_map(|list| list.iter()))
        }));
        let (mut deepest, mut paused) = (0_usize, 0_usize);
        for q in queues {
            let (len, is_paused) = q.depth();
            deepest = deepest.max(len);
            paused += usize::from(is_paused);
        }
        drop(reg);
        metrics::gauge!(m::BUS_DEEPEST_QUEUE_EVENTS).set(deepest as f64);
        metrics::gauge!(m::BUS_PAUSED_SUBSCRIPTIONS).set(paused as f64);
    }

    /// Marks the start or the end of a read that two snapshots do not describe.
    fn bump_epoch(&self) {
        self.registry().epoch += 1;
    }

    fn close(&self) {
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

/// The handle a `PlaneDatabase` keeps. Starting is lazy (on the first subscription) so that
/// building a `PlaneDatabase` stays synchronous and costs no connection.
pub(crate) struct EventBus {
    shared: Arc<Shared>,
    pool: PgPool,
    /// Where the listening connection comes from: a pool of one connection, which may reach
    /// Postgres another way than `pool` (see `PlaneDatabase::with_listener`).
    listener: PgPool,
    config: BusConfig,
    started: OnceCell<()>,
    waker_started: std::sync::OnceLock<()>,
}

impl EventBus {
    pub(crate) fn new(pool: PgPool, listener: PgPool, mut config: BusConfig) -> Self {
        // A page of zero rows never finishes a read (and a negative one is an SQL error).
        config.fetch_batch_size = config.fetch_batch_size.max(1);
        // Cheap, and makes the help texts reach a recorder installed before this bus.
        m::describe();
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            pool: pool.clone(),
            closed: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            wake: Notify::new(),
            wake_others: Notify::new(),
            wake_id: new_wake_id(),
            max_pending: config.max_pending_per_subscription.max(1),
        });
        Self {
            shared,
            pool,
            listener,
            config,
            started: OnceCell::new(),
            waker_started: std::sync::OnceLock::new(),
        }
    }

    /// What a writer of this process sets `plane.event_wake` to in a transaction that
    /// inserts events: `deferred` (the `event` trigger stays silent, and the writer calls
    /// [`committed`](Self::committed) after the commit) or `notify` (the trigger notifies).
    pub(crate) fn event_wake_setting(&self) -> &'static str {
        if self.config.coalesce_wakeups {
            "deferred"
        } else {
            "notify"
        }
    }

    /// Called by a writer after committing a transaction that inserted events with
    /// `plane.event_wake` set to [`event_wake_setting`](Self::event_wake_setting): wakes this
    /// process's reader at once and asks the waker task for one coalesced NOTIFY for other
    /// processes. Must be called from within the tokio runtime.
    ///
    /// If it is not called (e.g. the writer's future was dropped after the commit), readers
    /// still get the events at their next poll: a lost wake-up costs latency, not events.
    pub(crate) fn committed(&self) {
        if !self.config.coalesce_wakeups {
            return;
        }
        // Without a running reader this stores a permit, which costs one extra read later.
        self.shared.wake.notify_one();
        self.waker_started.get_or_init(|| {
            tokio::spawn(wake_others_loop(
                self.shared.clone(),
                self.pool.clone(),
                self.config.wake_interval,
            ));
        });
        self.shared.wake_others.notify_one();
    }

    /// Starts the bus if it is not running, and returns once it is: the listening connection
    /// is listening and the read cursor is set, so every event committed from now on will be
    /// delivered to subscribers registered from now on. Fails fast if the database cannot be
    /// reached; a later call tries again.
    pub(crate) async fn ensure_started(&self) -> Result<Arc<Shared>> {
        self.started
            .get_or_try_init(|| async {
                let listener = connect_listener(&self.listener).await?;
                let (cursor, seen) = current_cursor(&self.pool).await?;
                tokio::spawn(listen_loop(
                    self.shared.clone(),
                    self.listener.clone(),
                    listener,
                    self.config.max_backoff,
                ));
                tokio::spawn(read_loop(
                    self.shared.clone(),
                    self.pool.clone(),
                    cursor,
                    seen,
                    self.config.clone(),
                ));
                Ok::<_, crate::Error>(())
            })
            .await?;
        Ok(self.shared.clone())
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// Opens the listening connection from its own pool (`EventBus::listener`).
async fn connect_listener(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // `listen_loop` replaces a listener whose connection was lost: it must give its
    // connection back rather than open another one from the small pool by itself.
    listener.eager_reconnect(false);
    listener
        .listen_all([EVENTS_CHANNEL, EPHEMERAL_CHANNEL])
        .await?;
    Ok(listener)
}

/// Where the reader stands: the snapshot of its previous read, the start time of the server
/// that took it, and when it was taken (the server's clock).
///
/// Snapshots are only comparable on one unbroken run of transaction ids. A restarted server
/// (crash recovery) or another server (a promoted replica after a failover) may hand out
/// again transaction ids that the previous snapshot already counts as finished; the start
/// time tells the reader that this happened (see [`read_new_events`]).
#[derive(Clone)]
struct Cursor {
    snapshot: String,
    server_started: DateTime<Utc>,
    taken_at: DateTime<Utc>,
}

/// How many recently dispatched events the reader remembers (id and transaction id), to
/// skip them if a read after a server change meets them again. 16 bytes each.
const RECENT_EVENTS: usize = 65_536;

/// What the reader knows about the rows it has seen, for the read after a server change (see
/// [`restart_floor`]).
#[derive(Default)]
struct Seen {
    /// The highest transaction id of a row visible in the cursor's snapshot (when the bus
    /// started, or dispatched since).
    high_xid: Option<i64>,
    /// The most recently dispatched rows, `(id, xid)`, oldest first, at most
    /// [`RECENT_EVENTS`].
    recent: VecDeque<(i64, i64)>,
}

impl Seen {
    fn record(&mut self, id: i64, xid: i64) {
        self.high_xid = Some(self.high_xid.map_or(xid, |h| h.max(xid)));
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((id, xid));
    }
}

/// The lower bound a read after a server change applies, and the dispatched rows at or above
/// it that the read must skip.
#[derive(Clone)]
struct RestartFloor {
    /// As `xid8` text.
    xid: String,
    skip: Arc<HashSet<(i64, i64)>>,
}

/// A read of several pages that has not finished: the snapshot it reads up to (once its first
/// page is read), the last id it dispatched, and the restart floor it uses; and the reads that
/// a server change cut short, whose dispatched rows it must not dispatch again (see
/// [`read_new_events`]).
#[derive(Default)]
struct Progress {
    target: Option<Cursor>,
    after: i64,
    restart_floor: Option<RestartFloor>,
    cut_short: CutShort,
}

/// Reads cut short by a server change: each one's target snapshot and the last id it
/// dispatched. It had dispatched exactly its target's visible rows up to that id.
#[derive(Default, Clone)]
struct CutShort {
    targets: Vec<String>,
    afters: Vec<i64>,
}

/// The cursor to start from (the current snapshot), and the highest transaction id of a row
/// visible in it: read backwards on the `xid` index, skipping the rows of transactions still
/// in progress.
async fn current_cursor(pool: &PgPool) -> Result<(Cursor, Seen)> {
    let row = sqlx::query!(
        r#"
        select
            pg_current_snapshot()::text as "snapshot!",
            pg_postmaster_start_time() as "started!",
            statement_timestamp() as "taken_at!",
            (select xid::text::bigint from event
             where pg_visible_in_snapshot(xid, pg_current_snapshot())
             order by xid desc limit 1) as high_xid
        "#
    )
    .fetch_one(pool)
    .await?;
    let cursor = Cursor {
        snapshot: row.snapshot,
        server_started: row.started,
        taken_at: row.taken_at,
    };
    let seen = Seen {
        high_xid: row.high_xid,
        recent: VecDeque::new(),
    };
    Ok((cursor, seen))
}

/// The lowest transaction id that a server which restarted or replaced the one `prev` was
/// taken on may have handed out again (as `xid8` text), and the dispatched rows at or above
/// it, which the read after the change must skip.
///
/// It is the least of three bounds, all computed with ordinary functions (no
/// `pg_control_checkpoint()`, no WAL functions, so it works for an unprivileged role and on
/// any server):
///
/// 1. One above the highest transaction id of a row the reader has seen visible. A new
///    server's first transaction id is above every transaction whose commit it has: after a
///    restart or crash recovery, every commit the reader saw (durable commits; see
///    RELIABILITY.md on `synchronous_commit`), and after a switchover, everything. This bound
///    alone is exact in those cases: nothing the reader has seen lies above it.
/// 2. The lowest transaction id of a row created (by the server's clock) at or after the
///    previous read's snapshot was taken: a row visible in that snapshot was created before
///    it (`created_at` is its transaction's start), so such a row is new. This catches rows
///    that reused ids *below* the first bound, which happens when the new server lost
///    transactions the reader had seen (a replica that had not replayed the tail) or its
///    counter was moved back. It assumes the new server's clock is not behind the old one's
///    by more than the time the change took (a failover takes seconds; a restart keeps the
///    clock).
/// 3. The oldest transaction still running, so that transactions of the new server that
///    commit later are covered too.
///
/// When the second bound is the lowest, rows the reader already dispatched may lie above the
/// floor: they are skipped by `(id, xid)`, as far as the reader remembers them
/// ([`RECENT_EVENTS`]).
async fn restart_floor(pool: &PgPool, prev: &Cursor, seen: &Seen) -> Result<RestartFloor> {
    let row = sqlx::query!(
        r#"
        select
            least(
                ($1::bigint + 1)::text::xid8,
                (select min(xid) from event
                 where created_at >= $2
                   and pg_visible_in_snapshot(xid, pg_current_snapshot())),
                pg_snapshot_xmin(pg_current_snapshot())
            )::text::bigint as "floor!"
        "#,
        seen.high_xid,
        prev.taken_at,
    )
    .fetch_one(pool)
    .await?;
    let skip: HashSet<(i64, i64)> = seen
        .recent
        .iter()
        .copied()
        .filter(|&(_, xid)| xid >= row.floor)
        .collect();
    let went_back = seen.high_xid.is_some_and(|high| row.floor <= high);
    let bound = if went_back {
        "ids_went_back"
    } else {
        "precise"
    };
    metrics::counter!(m::BUS_RESTART_READS_TOTAL, "bound" => bound).increment(1);
    if went_back {
        let oldest_remembered = seen.recent.front().map(|&(_, xid)| xid);
        tracing::warn!(
            floor = row.floor,
            highest_seen = seen.high_xid,
            skipping = skip.len(),
            "event bus: the new server reuses transaction ids of rows already read; \
             re-reading from the first reused id, skipping the events already delivered"
        );
        if oldest_remembered.is_some_and(|oldest| oldest > row.floor)
            && seen.recent.len() == RECENT_EVENTS
        {
            tracing::warn!(
                "event bus: the re-read reaches below the events remembered; \
                 older events in it may be delivered again"
            );
        }
    } else {
        tracing::info!(
            floor = row.floor,
            "event bus: the database server restarted or changed; reading from the first \
             transaction id it may have reused"
        );
    }
    Ok(RestartFloor {
        xid: row.floor.to_string(),
        skip: Arc::new(skip),
    })
}

/// Exponential backoff from 50 ms up to a cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::START,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Self::START;
    }

    async fn wait(&mut self, shared: &Shared) {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.closed() => {}
        }
    }
}

/// Owns the listening connection. Wakes the reader on `plane_events`, delivers ephemeral
/// messages directly (ignoring the wake-ups this bus sent itself, whose payload is its own
/// wake id), and on a lost connection reconnects with backoff. After every
/// (re)connection it wakes the reader once more, because notifications sent while the
/// connection was down are gone; the reader's cursor recovers the events themselves.
async fn listen_loop(
    shared: Arc<Shared>,
    pool: PgPool,
    mut listener: PgListener,
    max_backoff: Duration,
) {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                _ = shared.closed() => return,
            };
            match received {
                Ok(Some(notification)) => {
                    backoff.reset();
                    if notification.channel() == EPHEMERAL_CHANNEL {
                        deliver_ephemeral(&shared, notification.payload());
                    } else if notification.payload() != shared.wake_id {
                        shared.wake.notify_one();
                    }
                }
                Ok(None) => {
                    tracing::info!("event bus: listening connection lost; reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "event bus: listening connection failed; reconnecting");
                    break;
                }
            }
        }
        metrics::counter!(m::BUS_LISTENER_DISCONNECTS_TOTAL).increment(1);
        if shared.is_closed() {
            return;
        }
        listener = loop {
            backoff.wait(&shared).await;
            if shared.is_closed() {
                return;
            }
            match connect_listener(&pool).await {
                Ok(l) => break l,
                Err(error) => {
                    tracing::warn!(%error, "event bus: could not reconnect the listener");
                }
            }
        };
        tracing::info!("event bus: listening again");
        metrics::counter!(m::BUS_LISTENER_RECONNECTS_TOTAL).increment(1);
        shared.wake.notify_one();
    }
}

/// A random identifier for this bus's own wake-ups (not a secret; it only lets the bus
/// recognise its own NOTIFYs). Never empty, so it never matches the trigger's empty payload.
fn new_wake_id() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // Without OS randomness, the process id and the clock are unique enough here: a
        // collision would only make two processes ignore each other's wake-ups and poll.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        u64::from(std::process::id()) ^ nanos
    });
    format!("w{random:016x}")
}

/// Sends one `NOTIFY plane_events` per batch of this process's commits, so
/// that event buses in other processes wake up. Its payload is only this bus's
/// [`new_wake_id`], which other buses treat like any wake-up. At most one NOTIFY is in
/// flight, and consecutive ones are at least `interval` apart; the commits that finish
/// meanwhile are covered by the next one (`Notify` keeps one permit).
/// The NOTIFY runs in its own transaction, after the commits it reports, so a process woken
/// by it reads them. If sending fails, other processes find the events at their next poll.
async fn wake_others_loop(shared: Arc<Shared>, pool: PgPool, interval: Duration) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shared.wake_others.notified() => {}
            _ = shared.closed() => return,
        }
        if let Some(last) = last_sent {
            // Commits that finish meanwhile leave a permit that this NOTIFY covers.
            tokio::select! {
                _ = tokio::time::sleep_until(last + interval) => {}
                _ = shared.closed() => return,
            }
        }
        // Consume a permit stored during the wait: the NOTIFY below covers those commits.
        let _ = futures_util::FutureExt::now_or_never(shared.wake_others.notified());
        last_sent = Some(tokio::time::Instant::now());
        // The same statement as ephemeral messages (one prepared statement, one `.sqlx` entry).
        let sent = sqlx::query!("select pg_notify($1, $2)", EVENTS_CHANNEL, &shared.wake_id)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, "event bus: could not send a wake-up; other processes will poll");
            tokio::select! {
                _ = tokio::time::sleep(Backoff::START) => {}
                _ = shared.closed() => return,
            }
        }
    }
}

fn deliver_ephemeral(shared: &Shared, payload: &str) {
    match serde_json::from_str::<EphemeralEnvelope>(payload) {
        Ok(envelope) => shared.dispatch(
            Arc::new(Event {
                id: None,
                kind: envelope.kind,
                key: envelope.key,
                created_at: Utc::now(),
                data: envelope.data,
            }),
            None,
        ),
        Err(error) => tracing::warn!(%error, "event bus: ignoring malformed ephemeral message"),
    }
}

/// Reads newly committed events whenever woken (or every poll interval) and dispatches them.
async fn read_loop(
    shared: Arc<Shared>,
    pool: PgPool,
    mut cursor: Cursor,
    mut seen: Seen,
    config: BusConfig,
) {
    let mut backoff = Backoff::new(config.max_backoff);
    let mut progress = None;
    loop {
        let read = read_new_events(
            &shared,
            &pool,
            &cursor,
            &mut seen,
            &mut progress,
            config.fetch_batch_size,
        );
        let started = std::time::Instant::now();
        let read = read.await;
        let outcome = match &read {
            Ok(Some(_)) => "ok",
            Ok(None) => "server_changed",
            Err(_) => "error",
        };
        m::bus_read(started.elapsed(), outcome);
        m::sample_pool(&pool);
        shared.sample_queues();
        match read {
            Ok(None) => {
                tracing::warn!(
                    "event bus: the database server changed during a read; reading again"
                );
            }
            Ok(Some(next)) => {
                cursor = next;
                backoff.reset();
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(config.poll_interval) => {}
                    _ = shared.closed() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "event bus: reading events failed; retrying");
                backoff.wait(&shared).await;
            }
        }
        if shared.is_closed() {
            return;
        }
    }
}

/// Dispatches every event committed after the snapshot `prev` and returns the cursor to
/// continue from. See the module docs for why this loses nothing and repeats nothing.
///
/// Pages of `batch` rows are read against one fixed target snapshot (the first page's), so a
/// large backlog is read in bounded steps and the cursor only advances once it is all read.
/// `progress` keeps the target and the last id dispatched across calls: a read that fails
/// between pages (a dropped connection) resumes where it stopped instead of dispatching the
/// pages already dispatched again.
///
/// If the server was restarted or replaced since `prev` (its start time changed), transaction
/// ids may have gone back: a failover to a replica that had not replayed everything, or a
/// crash that lost the record of an aborted transaction, hands the same ids out again, and
/// rows written with them would look already read. The read then also takes every row from a
/// transaction at or after [`restart_floor`], skipping the rows above it that were already
/// dispatched. `None` if the server changed between two pages of one read: the caller reads
/// again from `prev` (the restart path then applies), and that read skips the rows the
/// cut-short one dispatched (those visible in its target up to its last id, below the restart
/// floor, where transaction ids are still the old server's).
///
/// The statement is prepared once per connection, and after five runs Postgres may switch to
/// a generic plan that does not know the parameters. Two details keep that plan on the `xid`
/// index, touching only the new rows: the range `xid >= least(xmax(prev), restart floor)`
/// also gets its (implied) upper bound `xid < xmax(snap)` (a visible row's transaction is
/// below the snapshot's `xmax`), which Postgres estimates as narrow; and the page cursor and
/// order use `id + 0`, which the primary key cannot serve. With a plain `order by id … limit` the generic plan
/// walked the primary key through the whole table (83 ms per read at 145,000 events, against
/// 0.14 ms), and a plain `id > $3` added a scan of the whole primary-key index.
async fn read_new_events(
    shared: &Shared,
    pool: &PgPool,
    prev: &Cursor,
    seen: &mut Seen,
    progress: &mut Option<Progress>,
    batch: i64,
) -> Result<Option<Cursor>> {
    let Progress {
        mut target,
        mut after,
        mut restart_floor,
        mut cut_short,
    } = progress.take().unwrap_or_default();
    let mut restart_checked = false;
    // Whether this call marked the start of an inexact read (see `Registry::epoch`); a read
    // resumed by a later call marks it again, which only makes more positions inexact.
    let mut epoch_bumped = false;
    loop {
        // If the query below fails, the next call resumes this read from here (dispatching
        // is synchronous, so `after` is exact at every await).
        if target.is_some() || !cut_short.targets.is_empty() {
            *progress = Some(Progress {
                target: target.clone(),
                after,
                restart_floor: restart_floor.clone(),
                cut_short: cut_short.clone(),
            });
        }
        let rows = sqlx::query!(
            r#"
            select
                s.snap::text as "snapshot!",
                s.started as "started!",
                s.taken_at as "taken_at!",
                e.id as "id?",
                e.xid::text::bigint as "xid?",
                e.kind as "kind?",
                e.key as "key?",
                e.created_at as "created_at?",
                e.data as "data?"
            from (
                select
                    coalesce($2::text::pg_snapshot, pg_current_snapshot()) as snap,
                    $1::text::pg_snapshot as prev,
                    pg_postmaster_start_time() as started,
                    statement_timestamp() as taken_at
            ) s
            left join lateral (
                select id, xid, kind, key, created_at, data
                from event
                where ((xid >= least(pg_snapshot_xmax(s.prev), $5::text::xid8)
                        and xid < pg_snapshot_xmax(s.snap))
                       or xid = any(array(select pg_snapshot_xip(s.prev))))
                  and pg_visible_in_snapshot(xid, s.snap)
                  and id + 0 > $3
                  and not exists (
                      select 1 from unnest($6::text[], $7::bigint[]) as c(target, upto)
                      where id <= c.upto
                        and pg_visible_in_snapshot(xid, c.target::pg_snapshot)
                        and ($5::text is null or xid < $5::text::xid8)
                  )
                order by id + 0
                limit $4
            ) e on true
            order by e.id
            "#,
            prev.snapshot,
            target.as_ref().map(|t| t.snapshot.as_str()),
            after,
            batch,
            restart_floor.as_ref().map(|f| f.xid.as_str()),
            &cut_short.targets,
            &cut_short.afters,
        )
        .fetch_all(pool)
        .await?;

        // The query always returns a row (a left join on a one-row select), carrying the
        // snapshot and the server's start time even when no event is new.
        let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        match &target {
            None if first.started != prev.server_started && !restart_checked => {
                restart_checked = true;
                restart_floor = Some(self::restart_floor(pool, prev, seen).await?);
                continue;
            }
            None => {
                target = Some(Cursor {
                    snapshot: first.snapshot.clone(),
                    server_started: first.started,
                    taken_at: first.taken_at,
                })
            }
            Some(t) if t.server_started != first.started => {
                // Read again from `prev` (the restart path then applies), skipping what this
                // read already dispatched: its rows are those visible in its target up to
                // `after`, as long as their transaction ids were not reused.
                cut_short.targets.push(t.snapshot.clone());
                cut_short.afters.push(after);
                *progress = Some(Progress {
                    cut_short,
                    ..Progress::default()
                });
                return Ok(None);
            }
            Some(_) => {}
        }

        let span = match &target {
            Some(t) => ReadSpan {
                prev: prev.snapshot.as_str().into(),
                target: t.snapshot.as_str().into(),
                exact: restart_floor.is_none() && cut_short.targets.is_empty(),
            },
            None => return Err(sqlx::Error::RowNotFound.into()),
        };
        if !span.exact && !epoch_bumped {
            epoch_bumped = true;
            shared.bump_epoch();
        }
        let mut count = 0_i64;
        // The delay from commit to dispatch, measured from the event's `created_at` (its
        // transaction's start on the server's clock: the commit time is not recorded) to now.
        let delay = metrics::histogram!(m::BUS_DELIVERY_DELAY_SECONDS);
        let now = Utc::now();
        let mut kinds = m::KindTally::default();
        for row in rows {
            let (Some(id), Some(xid), Some(kind), Some(created_at), Some(data)) =
                (row.id, row.xid, row.kind, row.created_at, row.data)
            else {
                continue;
            };
            count += 1;
            after = id;
            if restart_floor
                .as_ref()
                .is_some_and(|f| f.skip.contains(&(id, xid)))
            {
                // Already dispatched before the server change (its id was reused below).
                continue;
            }
            seen.record(id, xid);
            kinds.add(&kind);
            delay.record((now - created_at).to_std().map_or(0.0, |d| d.as_secs_f64()));
            shared.dispatch(
                Arc::new(Event {
                    id: Some(id),
                    kind,
                    key: row.key,
                    created_at,
                    data,
                }),
                Some(&span),
            );
        }
        kinds.flush(m::BUS_EVENTS_READ_TOTAL);
        if count < batch {
            *progress = None;
            if epoch_bumped {
                shared.bump_epoch();
            }
            if let Some(xmax) = target.as_ref().and_then(|t| snapshot_xmax(&t.snapshot)) {
                // Rows above the new cursor's `xmax` are not visible in it (after transaction
                // ids went back, rows of the old server's may lie there).
                seen.high_xid = seen.high_xid.map(|high| high.min(xmax - 1));
            }
            return Ok(target);
        }
    }
}

/// The `xmax` of a snapshot in Postgres's text form (`xmin:xmax:xip,…`).
fn snapshot_xmax(snapshot: &str) -> Option<i64> {
    snapshot.split(':').nth(1)?.parse().ok()
}
