//! Group commit: concurrent writes of one process (`update_state`'s state changes,
//! `connect`'s new backends) are written in one statement and one transaction per batch.
//!
//! [`GroupCommit`] is the machinery, the same for both; what a batch writes is a
//! [`Statements`] implementation, kept next to its area: `update_state`'s in
//! `src/backend/state_write.rs` ([`StateChanges`](crate::backend::state_write::StateChanges)) and
//! `connect`'s in `src/connect/spawn.rs` ([`Spawns`](crate::connect::spawn::Spawns)).
//!
//! # How a batch forms
//! A call that finds nothing waiting and fewer than [`WriteBatchConfig::max_alone`] calls
//! writing alone writes its item at once, alone, in the caller's task: at low concurrency
//! calls wait for no company and pay for no hand-over. Beyond that, calls queue their item,
//! and the first to queue starts the batch writer, a task of its own (so that a caller whose
//! future is dropped cannot break a batch that others wait on). It takes a connection (and
//! sets [`WriteBatchConfig::lock_timeout`] on it for its run, put back before the connection
//! returns to the pool), then every item queued so far (at most
//! [`WriteBatchConfig::max_batch_size`]), writes them, answers each caller through its own
//! channel, lets them run (so that callers calling again at once join the next batch), and
//! goes on with what queued meanwhile; it stops when the queue is empty. One batch is in
//! flight at a time.
//!
//! The queue is bounded: group commit holds at most [`WriteBatchConfig::max_queued`] items
//! (queued, in a batch, or being written alone after one); a call that finds no room waits
//! for it, in call order. An item whose caller went away (its future dropped) before the
//! writer took it is not written.
//!
//! **Locks held elsewhere.** One batch in flight must not wait on one caller's row. So
//! `update_state`'s statement locks its backend rows with `SKIP LOCKED` and leaves the
//! changes of rows another transaction holds: those, and a batch that waited for some other
//! lock longer than the lock timeout (SQLSTATE 55P03) and was rolled back, go to **lone
//! writers**: one task per lock key, which writes that key's items alone, in call order, on
//! a pool connection of its own without the timeout, each waiting for its lock as a lone
//! call would. While a key has a lone writer, later items with that key join it instead of
//! a batch (or of writing alone), so that they come after the earlier ones.
//!
//! # What holds, as for one call alone
//! - **Each caller gets its own answer**: the statement says, per item, what it did.
//! - **Call order per row**: a statement holds at most one item per [`Statements::lock_key`]
//!   (a backend, a key). Further items with the same lock key go into the next statement of
//!   the same transaction, in call order, which sees the earlier ones: the result is exactly
//!   that of running them one after the other. An item left to a lone writer takes the
//!   later items of its key with it (out of this batch, and out of later ones while the
//!   writer runs). Within a statement items are sorted by lock key, so that concurrent
//!   batches of one kind (of this process or another) lock their rows in one order. Writers
//!   of other kinds lock in their own order (e.g. a state batch releasing keys by backend);
//!   should Postgres find a deadlock, it rolls one statement back, which is a refused batch.
//! - **A lock held elsewhere holds back that row's calls only**: see above. Other calls of
//!   the batch wait for it at most the lock timeout (`update_state`'s for its backend rows
//!   not at all).
//! - **Everything an item writes** (history rows, events through `plane_write_events`, key
//!   changes) comes from the same statement as the item itself.
//! - **A failing item fails only its own call.** Inputs the server is certain to refuse
//!   (a NUL in text) are refused before they are queued, with the error a lone call gets.
//!   When the server refuses the batch (the transaction rolled back, nothing of it was
//!   written), every item is written again alone by the lone writers (concurrently across
//!   lock keys, in call order within one), and each caller gets its own result or error.
//!   When the connection fails with an unknown outcome (the commit may or may not have
//!   happened), every caller of the batch gets an error, as a lone call would: nothing is
//!   written twice and nothing reported as written is lost.

use crate::config::WriteBatchConfig;
use crate::metrics::{self, Operation};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The statements a [`GroupCommit`] writes its items with.
pub(crate) trait Statements: Send + Sync + 'static {
    /// What a call hands in.
    type Item: Send + Sync + 'static;
    /// What a call gets back when its item was written.
    type Output: Send + 'static;
    /// The operation whose pool waits the metrics record.
    const OPERATION: Operation;

    /// The row `item` changes: two items with the same lock key never share a statement.
    fn lock_key(item: &Self::Item) -> &str;

    /// Writes one item in a statement of its own (cheaper than a batch of one), waiting for
    /// its row locks as long as they are held: the statement of a call written alone.
    fn write_one(
        &self,
        conn: &mut PgConnection,
        item: &Self::Item,
    ) -> impl Future<Output = Result<Self::Output, sqlx::Error>> + Send;

    /// Writes `items` (distinct lock keys, sorted by them) in one statement of the batch
    /// writer; one answer per item, in the same order. `None`: the item's row is locked by
    /// another transaction and the statement left it alone (nothing of it was written); it
    /// is written alone, on a connection of its own.
    fn write_many(
        &self,
        conn: &mut PgConnection,
        items: &[&Self::Item],
    ) -> impl Future<Output = Result<Vec<Option<Self::Output>>, sqlx::Error>> + Send;
}

/// A queued item and the channel its caller waits on.
struct Waiting<S: Statements> {
    item: S::Item,
    reply: oneshot::Sender<Result<S::Output, sqlx::Error>>,
    /// Its place among the [`WriteBatchConfig::max_queued`] calls group commit holds; given
    /// back when the item is answered or dropped.
    _room: OwnedSemaphorePermit,
}

/// The queue shared by the callers, the batch writer and the lone writers.
struct Queue<S: Statements> {
    waiting: VecDeque<Waiting<S>>,
    /// Calls writing their own item alone right now.
    alone: usize,
    /// Whether a batch writer runs. Whenever items wait, one does.
    batching: bool,
    /// Items handed out of a batch to be written alone (their row was locked elsewhere, or
    /// their batch was refused), by lock key, in call order; each key's items are written by
    /// a task of their own ([`LoneWriter`]). While a key is here, later items with that key
    /// join it instead of a batch, so that they are written after the earlier ones.
    lone: HashMap<String, VecDeque<Waiting<S>>>,
}

/// What the callers, the batch writer and the lone writers share.
struct Shared<S: Statements> {
    pool: PgPool,
    statements: S,
    max_batch_size: usize,
    /// [`WriteBatchConfig::lock_timeout`], as Postgres takes it; none for zero (no timeout).
    lock_timeout: Option<String>,
    queue: Mutex<Queue<S>>,
    /// [`WriteBatchConfig::max_queued`] permits: a call queues its item only with one.
    room: Arc<Semaphore>,
}

/// Writes items alone or in batches ([`WriteBatchConfig`]). One per kind of write per
/// [`Context`](crate::context::Context), shared by every clone of a `PlaneDatabase`.
pub(crate) struct GroupCommit<S: Statements> {
    shared: Arc<Shared<S>>,
    enabled: bool,
    /// [`WriteBatchConfig::max_alone`], at least 1.
    max_alone: usize,
}

impl<S: Statements> GroupCommit<S> {
    pub(crate) fn new(pool: PgPool, statements: S, config: &WriteBatchConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                statements,
                max_batch_size: config.max_batch_size.max(1),
                lock_timeout: lock_timeout_setting(config.lock_timeout),
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    alone: 0,
                    batching: false,
                    lone: HashMap::new(),
                }),
                room: Arc::new(Semaphore::new(
                    config.max_queued.clamp(1, Semaphore::MAX_PERMITS),
                )),
            }),
            enabled: config.enabled,
            max_alone: config.max_alone.max(1),
        }
    }

    /// The statements it writes with (for the test hooks that run them directly).
    #[cfg(feature = "testing")]
    pub(crate) fn statements(&self) -> &S {
        &self.shared.statements
    }

    /// Writes `item`, alone or in a batch, and returns what its statement said of it.
    pub(crate) async fn write(&self, item: S::Item) -> Result<S::Output, sqlx::Error> {
        if !self.enabled {
            return self.write_one(&item).await;
        }
        let alone = {
            let mut queue = lock(&self.shared.queue);
            // An item whose key is being written alone after a batch goes after those.
            let alone = queue.waiting.is_empty()
                && queue.alone < self.max_alone
                && !queue.lone.contains_key(S::lock_key(&item));
            if alone {
                queue.alone += 1;
            }
            alone
        };
        if alone {
            // A lone call pays for no hand-over.
            let _alone = Alone {
                queue: &self.shared.queue,
            };
            return self.write_one(&item).await;
        }
        // A place in the queue: at once if there is room, else once an earlier call is
        // answered (the semaphore hands out places in the order they were asked for). The
        // semaphore is never closed; should it be, the call fails rather than queue past
        // the bound.
        let room = match self.shared.room.clone().try_acquire_owned() {
            Ok(room) => room,
            Err(TryAcquireError::NoPermits) => self
                .shared
                .room
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| sqlx::Error::WorkerCrashed)?,
            Err(TryAcquireError::Closed) => return Err(sqlx::Error::WorkerCrashed),
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.shared.queue);
            queue.waiting.push_back(Waiting {
                item,
                reply,
                _room: room,
            });
            !std::mem::replace(&mut queue.batching, true)
        };
        if start {
            self.start_batch_writer();
        }
        answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?
    }

    /// Writes one item in a statement of its own.
    async fn write_one(&self, item: &S::Item) -> Result<S::Output, sqlx::Error> {
        let mut conn = acquire(S::OPERATION, &self.shared.pool).await?;
        metrics::write_batch(S::OPERATION, 1);
        self.shared.statements.write_one(&mut conn, item).await
    }

    /// Starts the batch writer in a task of its own, so that a caller whose future is
    /// dropped cannot break a batch that others wait on. With no runtime to run it on (it is
    /// shutting down), the waiting calls are answered with an error (the writer's drop
    /// drops their senders) rather than left waiting.
    fn start_batch_writer(&self) {
        let batches = BatchWriter {
            shared: self.shared.clone(),
            armed: true,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(batches.run());
            }
            Err(_) => drop(batches),
        }
    }
}

/// `lock_timeout` as Postgres's setting takes it (milliseconds, at least 1, at most its
/// limit); none for zero, which leaves the session's own setting.
fn lock_timeout_setting(timeout: Duration) -> Option<String> {
    if timeout.is_zero() {
        return None;
    }
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    Some(format!("{ms}ms"))
}

/// Takes a connection, recording the wait; the error as sqlx's.
async fn acquire(
    operation: Operation,
    pool: &PgPool,
) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    metrics::acquire(operation, pool)
        .await
        .map_err(|e| match e {
            crate::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })
}

/// Held by a call that writes its own item alone; gives its place back when the call ends
/// or its future is dropped.
struct Alone<'a, S: Statements> {
    queue: &'a Mutex<Queue<S>>,
}

impl<S: Statements> Drop for Alone<'_, S> {
    fn drop(&mut self) {
        lock(self.queue).alone -= 1;
    }
}

/// Locks the queue. A panic while it was held cannot leave it inconsistent (every change to
/// it is a single push, pop, insert, removal, count or flag), so a poisoned lock is used as
/// is.
fn lock<S: Statements>(queue: &Mutex<Queue<S>>) -> std::sync::MutexGuard<'_, Queue<S>> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The batch writer's connection, with the lock timeout of its statements set for the
/// session. The setting is put back before the connection returns to the pool; a
/// connection dropped without that (the writer's task dropped, the restore failed) is
/// closed instead, so that no other user of the pool inherits the timeout.
struct BatchConnection {
    conn: Option<PoolConnection<Postgres>>,
    /// The session's own `lock_timeout`, to put back; none when nothing was changed.
    restore: Option<String>,
}

impl BatchConnection {
    /// Takes a connection and sets the lock timeout (one round trip, once per run of the
    /// batch writer, not per batch).
    async fn acquire<S: Statements>(shared: &Shared<S>) -> Result<Self, sqlx::Error> {
        let mut conn = acquire(S::OPERATION, &shared.pool).await?;
        let Some(timeout) = &shared.lock_timeout else {
            return Ok(Self {
                conn: Some(conn),
                restore: None,
            });
        };
        // The old value is read before the new one is set (left to right in one row).
        let set: Result<(String, String), sqlx::Error> = sqlx::query_as(
            "select current_setting('lock_timeout'), set_config('lock_timeout', $1, false)",
        )
        .bind(timeout)
        .fetch_one(&mut *conn)
        .await;
        match set {
            Ok((old, _)) => Ok(Self {
                conn: Some(conn),
                restore: Some(old),
            }),
            Err(error) => {
                conn.close_on_drop();
                Err(error)
            }
        }
    }

    fn get(&mut self) -> Option<&mut PgConnection> {
        self.conn.as_deref_mut()
    }

    /// Gives the connection back to the pool with its own lock timeout, or closed if that
    /// cannot be put back.
    async fn release(mut self) {
        let (Some(old), Some(conn)) = (self.restore.take(), self.conn.as_mut()) else {
            return;
        };
        let restored = sqlx::query("select set_config('lock_timeout', $1, false)")
            .bind(old)
            .execute(&mut **conn)
            .await;
        if restored.is_err() {
            conn.close_on_drop();
        }
    }

    /// The connection failed: it goes back closed.
    fn discard(mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl Drop for BatchConnection {
    fn drop(&mut self) {
        if self.restore.is_some() {
            if let Some(conn) = self.conn.as_mut() {
                conn.close_on_drop();
            }
        }
    }
}

/// The task that writes batches while items are queued.
struct BatchWriter<S: Statements> {
    shared: Arc<Shared<S>>,
    /// Until the writer stops normally. If it is dropped before (its runtime shut down), the
    /// queued calls are answered with an error rather than left waiting.
    armed: bool,
}

impl<S: Statements> Drop for BatchWriter<S> {
    fn drop(&mut self) {
        if self.armed {
            let mut queue = lock(&self.shared.queue);
            queue.batching = false;
            // Dropping the senders answers their callers with an error.
            queue.waiting.clear();
        }
    }
}

impl<S: Statements> BatchWriter<S> {
    async fn run(mut self) {
        let mut conn: Option<BatchConnection> = None;
        loop {
            if conn.is_none() {
                match BatchConnection::acquire(&*self.shared).await {
                    Ok(c) => conn = Some(c),
                    Err(error) => {
                        // Nothing was sent: every waiting caller gets the error, as it would
                        // have from its own acquire.
                        let batch = self.take();
                        if batch.is_empty() {
                            return;
                        }
                        for waiting in batch {
                            let _ = waiting.reply.send(Err(copy_error(&error)));
                        }
                        continue;
                    }
                }
            }
            let batch = self.take();
            if batch.is_empty() {
                if let Some(c) = conn.take() {
                    c.release().await;
                }
                return;
            }
            let Some(c) = conn.as_mut().and_then(BatchConnection::get) else {
                continue;
            };
            if !write_batch(&self.shared, c, batch).await {
                // The connection failed: it goes back closed, and the next batch takes
                // another.
                if let Some(c) = conn.take() {
                    c.discard();
                }
            }
            // Let the callers just answered run first: those that call again at once join
            // the next batch instead of leaving it to the one or two that queued meanwhile.
            tokio::task::yield_now().await;
        }
    }

    /// Takes the next batch; if there is none, the writer stops (under the same lock, so a
    /// call queued after this starts a new one). Items whose caller went away (its future
    /// dropped) are not written; items whose key is being written alone join those.
    fn take(&mut self) -> Vec<Waiting<S>> {
        let mut guard = lock(&self.shared.queue);
        let queue = &mut *guard;
        let mut batch = Vec::new();
        while batch.len() < self.shared.max_batch_size {
            let Some(waiting) = queue.waiting.pop_front() else {
                break;
            };
            if waiting.reply.is_closed() {
                continue;
            }
            if let Some(lone) = queue.lone.get_mut(S::lock_key(&waiting.item)) {
                lone.push_back(waiting);
                continue;
            }
            batch.push(waiting);
        }
        if batch.is_empty() {
            queue.batching = false;
            self.armed = false;
        }
        batch
    }
}

/// Writes one batch and answers its callers. Items the statement left alone (their row is
/// locked elsewhere) and the items of a batch the server refused are handed to lone
/// writers. Returns false if the connection failed.
async fn write_batch<S: Statements>(
    shared: &Arc<Shared<S>>,
    conn: &mut PgConnection,
    batch: Vec<Waiting<S>>,
) -> bool {
    let items: Vec<&S::Item> = batch.iter().map(|w| &w.item).collect();
    metrics::write_batch(S::OPERATION, items.len());
    let span = tracing::debug_span!(
        "write_batch",
        operation = S::OPERATION.name(),
        items = items.len()
    );
    let written =
        tracing::Instrument::instrument(write_in_order(&shared.statements, conn, &items), span)
            .await;
    match written {
        Ok(outputs) => {
            let mut left = Vec::new();
            for (waiting, output) in batch.into_iter().zip(outputs) {
                match output {
                    Some(output) => {
                        let _ = waiting.reply.send(Ok(output));
                    }
                    None => left.push(waiting),
                }
            }
            if !left.is_empty() {
                tracing::debug!(
                    items = left.len(),
                    "rows locked elsewhere; writing their items alone"
                );
                write_alone(shared, left);
            }
            true
        }
        Err(error) if !rolled_back(&error) => {
            tracing::debug!(%error, items = batch.len(), "a batch's connection failed");
            for waiting in batch {
                let _ = waiting.reply.send(Err(copy_error(&error)));
            }
            false
        }
        // One item, refused for itself (not for waiting on a lock past the batch's
        // timeout): its error is the one it would get alone.
        Err(error) if batch.len() == 1 && !lock_timed_out(&error) => {
            if let Some(waiting) = batch.into_iter().next() {
                let _ = waiting.reply.send(Err(error));
            }
            true
        }
        Err(error) => {
            // The server refused the batch and rolled it back (a bad item, or a lock held
            // elsewhere past the lock timeout): each item is written alone, so that only a
            // bad one fails and only an item whose row is locked waits for it. Items with
            // different lock keys are written concurrently, each on its own connection;
            // items with the same key one after the other, in call order.
            tracing::debug!(%error, items = batch.len(), "batch refused; writing its items alone");
            metrics::write_batch_split(S::OPERATION);
            write_alone(shared, batch);
            true
        }
    }
}

/// Hands `items` (in call order) to the lone writers of their lock keys, starting one for
/// each key that has none.
fn write_alone<S: Statements>(shared: &Arc<Shared<S>>, items: Vec<Waiting<S>>) {
    let mut start = Vec::new();
    {
        let mut queue = lock(&shared.queue);
        for waiting in items {
            let key = S::lock_key(&waiting.item);
            match queue.lone.get_mut(key) {
                Some(lone) => lone.push_back(waiting),
                None => {
                    let key = key.to_owned();
                    start.push(key.clone());
                    queue.lone.insert(key, VecDeque::from([waiting]));
                }
            }
        }
    }
    for key in start {
        let writer = LoneWriter {
            shared: shared.clone(),
            key,
            armed: true,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(writer.run());
            }
            // No runtime (it is shutting down): the drop answers the callers with an error.
            Err(_) => drop(writer),
        }
    }
}

/// The task that writes one lock key's items alone, in call order, on a connection of its
/// own and without the batch's lock timeout: each waits for its row as a lone call would.
struct LoneWriter<S: Statements> {
    shared: Arc<Shared<S>>,
    key: String,
    /// Until the writer stops normally; dropped before, its callers get an error.
    armed: bool,
}

impl<S: Statements> Drop for LoneWriter<S> {
    fn drop(&mut self) {
        if self.armed {
            // Dropping the senders answers their callers with an error.
            lock(&self.shared.queue).lone.remove(&self.key);
        }
    }
}

impl<S: Statements> LoneWriter<S> {
    async fn run(mut self) {
        let mut conn: Option<PoolConnection<Postgres>> = None;
        while let Some(waiting) = self.next() {
            if conn.is_none() {
                match acquire(S::OPERATION, &self.shared.pool).await {
                    Ok(c) => conn = Some(c),
                    Err(error) => {
                        let _ = waiting.reply.send(Err(error));
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            // Counted in its batch's metric already.
            let result = self.shared.statements.write_one(c, &waiting.item).await;
            if let Err(error) = &result {
                if !rolled_back(error) {
                    if let Some(mut c) = conn.take() {
                        c.close_on_drop();
                    }
                }
            }
            let _ = waiting.reply.send(result);
        }
    }

    /// The key's next item whose caller still waits; none ends the writer (and the key's
    /// entry, under the same lock, so that a later item starts a batch or a new writer).
    fn next(&mut self) -> Option<Waiting<S>> {
        let mut queue = lock(&self.shared.queue);
        loop {
            let next = queue.lone.get_mut(&self.key).and_then(VecDeque::pop_front);
            match next {
                Some(waiting) if waiting.reply.is_closed() => continue,
                Some(waiting) => return Some(waiting),
                None => {
                    queue.lone.remove(&self.key);
                    self.armed = false;
                    return None;
                }
            }
        }
    }
}

/// Whether the server answered `error` for a statement that it rolled back, on a connection
/// that is still usable: the item was certainly not written. Any other failure (the
/// connection lost, the server shutting down or terminating the session) may have come
/// after the commit.
fn rolled_back(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else {
        return false;
    };
    match e.code() {
        // connection_exception, operator_intervention (admin/crash shutdown, cannot connect
        // now; a cancelled statement, 57014, did roll back).
        Some(code) => !(code.starts_with("08") || code.starts_with("57P")),
        None => false,
    }
}

/// Whether `error` is Postgres's lock_not_available (55P03): the batch waited for a lock
/// longer than its [`WriteBatchConfig::lock_timeout`].
fn lock_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
}

/// The same failure for another caller of the batch (sqlx's errors cannot be cloned): the
/// variants without data as they are, others as an I/O error carrying the message.
fn copy_error(error: &sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Protocol(message) => sqlx::Error::Protocol(message.clone()),
        sqlx::Error::Io(e) => sqlx::Error::Io(std::io::Error::new(e.kind(), e.to_string())),
        other => sqlx::Error::Io(std::io::Error::other(format!(
            "a batch of writes failed: {other}"
        ))),
    }
}

/// Writes `items` in call order, one transaction: items with the same lock key go into
/// successive statements. Returns one answer per item; `None` for an item left to be
/// written alone (its row was locked elsewhere, or an earlier item with its key was).
async fn write_in_order<S: Statements>(
    statements: &S,
    conn: &mut PgConnection,
    items: &[&S::Item],
) -> Result<Vec<Option<S::Output>>, sqlx::Error> {
    // Round r holds the (r+1)-th item of each lock key.
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let round = seen.entry(S::lock_key(item)).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    let mut outputs: Vec<Option<S::Output>> = items.iter().map(|_| None).collect();
    // Keys whose item a statement left alone: their later items are not written in this
    // batch either (they must come after it).
    let mut left: HashSet<&str> = HashSet::new();
    if let [round] = rounds.as_slice() {
        write_round(statements, conn, items, round, &mut outputs, &mut left).await?;
    } else {
        let mut txn = sqlx::Connection::begin(conn).await?;
        for round in &rounds {
            let round: Vec<usize> = round
                .iter()
                .copied()
                .filter(|i| !left.contains(S::lock_key(items[*i])))
                .collect();
            if !round.is_empty() {
                write_round(statements, &mut txn, items, &round, &mut outputs, &mut left).await?;
            }
        }
        txn.commit().await?;
    }
    Ok(outputs)
}

/// Writes one round (items with distinct lock keys) in one statement, in lock-key order,
/// noting the keys of the items it left alone in `left`.
async fn write_round<'a, S: Statements>(
    statements: &S,
    conn: &mut PgConnection,
    items: &[&'a S::Item],
    round: &[usize],
    outputs: &mut [Option<S::Output>],
    left: &mut HashSet<&'a str>,
) -> Result<(), sqlx::Error> {
    let mut chosen = round.to_vec();
    chosen.sort_by(|a, b| S::lock_key(items[*a]).cmp(S::lock_key(items[*b])));
    let round_items: Vec<&S::Item> = chosen.iter().map(|i| items[*i]).collect();
    let written = statements.write_many(conn, &round_items).await?;
    // Each statement answers for each of its items; one that answered for fewer is a bug,
    // reported as an error rather than a panic (the transaction rolls back).
    if written.len() != chosen.len() {
        return Err(sqlx::Error::Protocol(
            "a batch statement skipped an item".into(),
        ));
    }
    for (i, output) in chosen.into_iter().zip(written) {
        match output {
            Some(output) => outputs[i] = Some(output),
            None => {
                left.insert(S::lock_key(items[i]));
            }
        }
    }
    Ok(())
}
