//! Group commit: concurrent writes of one process (`update_state`'s state changes,
//! `connect`'s new backends) are written in one statement and one transaction per batch.
//!
//! [`GroupCommit`] is the machinery, the same for both; what a batch writes is a
//! [`Statements`] implementation: [`state::StateChanges`] and [`spawn::Spawns`].
//!
//! # How a batch forms
//! A call that finds nothing waiting and fewer than [`WriteBatchConfig::max_alone`] calls
//! writing alone writes its item at once, alone, in the caller's task: at low concurrency
//! calls wait for no company and pay for no hand-over. Beyond that, calls queue their item,
//! and the first to queue starts the batch writer, a task of its own (so that a caller whose
//! future is dropped cannot break a batch that others wait on). It takes a connection, then
//! every item queued so far (at most [`WriteBatchConfig::max_batch_size`]), writes them,
//! answers each caller through its own channel, lets them run (so that callers calling
//! again at once join the next batch), and goes on with what queued meanwhile; it stops
//! when the queue is empty. One batch is in flight at a time.
//!
//! # What holds, as for one call alone
//! - **Each caller gets its own answer**: the statement says, per item, what it did.
//! - **Call order per row**: a statement holds at most one item per [`Statements::lock_key`]
//!   (a backend, a key). Further items with the same lock key go into the next statement of
//!   the same transaction, in call order, which sees the earlier ones: the result is exactly
//!   that of running them one after the other. Within a statement items are sorted by lock
//!   key, so that concurrent batches of one kind (of this process or another) lock their
//!   rows in one order. Writers of other kinds lock in their own order (e.g. a state batch
//!   releasing keys by backend); should Postgres find a deadlock, it rolls one statement
//!   back, which is a refused batch: its items are written again one by one.
//! - **Everything an item writes** (history rows, events through `plane_write_events`, key
//!   changes) comes from the same statement as the item itself.
//! - **A failing item fails only its own call.** When the server refuses the batch (the
//!   transaction rolled back, nothing of it was written), every item is written again
//!   alone, in call order, and each caller gets its own result or error. When the connection
//!   fails with an unknown outcome (the commit may or may not have happened), every caller
//!   of the batch gets an error, as a lone call would: nothing is written twice and nothing
//!   reported as written is lost.

pub(crate) mod spawn;
pub(crate) mod state;

use crate::config::WriteBatchConfig;
use crate::metrics::{self, Operation};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

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

    /// Writes one item in a statement of its own (cheaper than a batch of one).
    fn write_one(
        &self,
        conn: &mut PgConnection,
        item: &Self::Item,
    ) -> impl Future<Output = Result<Self::Output, sqlx::Error>> + Send;

    /// Writes `items` (distinct lock keys, sorted by them) in one statement; one output per
    /// item, in the same order.
    fn write_many(
        &self,
        conn: &mut PgConnection,
        items: &[&Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Output>, sqlx::Error>> + Send;
}

/// A queued item and the channel its caller waits on.
struct Waiting<S: Statements> {
    item: S::Item,
    reply: oneshot::Sender<Result<S::Output, sqlx::Error>>,
}

/// The queue shared by the callers and the batch writer.
struct Queue<S: Statements> {
    waiting: VecDeque<Waiting<S>>,
    /// Calls writing their own item alone right now.
    alone: usize,
    /// Whether a batch writer runs. Whenever items wait, one does.
    batching: bool,
}

/// Writes items alone or in batches ([`WriteBatchConfig`]). One per kind of write per
/// [`Context`](crate::context::Context), shared by every clone of a `PlaneDatabase`.
pub(crate) struct GroupCommit<S: Statements> {
    pool: PgPool,
    statements: Arc<S>,
    enabled: bool,
    max_batch_size: usize,
    /// [`WriteBatchConfig::max_alone`], at least 1.
    max_alone: usize,
    queue: Arc<Mutex<Queue<S>>>,
}

/// What a call does with its item.
enum Route<I, O> {
    /// Writes it alone, at once: nothing waits and fewer than `max_alone` calls write alone.
    Alone(I),
    /// Queued; this call starts the batch writer, and waits for its answer here.
    StartBatch(oneshot::Receiver<O>),
    /// Queued for the running batch writer; the answer comes here.
    Queued(oneshot::Receiver<O>),
}

impl<S: Statements> GroupCommit<S> {
    pub(crate) fn new(pool: PgPool, statements: S, config: &WriteBatchConfig) -> Self {
        Self {
            pool,
            statements: Arc::new(statements),
            enabled: config.enabled,
            max_batch_size: config.max_batch_size.max(1),
            max_alone: config.max_alone.max(1),
            queue: Arc::new(Mutex::new(Queue {
                waiting: VecDeque::new(),
                alone: 0,
                batching: false,
            })),
        }
    }

    /// Writes `item`, alone or in a batch, and returns what its statement said of it.
    pub(crate) async fn write(&self, item: S::Item) -> Result<S::Output, sqlx::Error> {
        if !self.enabled {
            return self.write_one(&item).await;
        }
        let route = {
            let mut queue = lock(&self.queue);
            if queue.waiting.is_empty() && queue.alone < self.max_alone {
                queue.alone += 1;
                Route::Alone(item)
            } else {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Waiting { item, reply });
                if std::mem::replace(&mut queue.batching, true) {
                    Route::Queued(answer)
                } else {
                    Route::StartBatch(answer)
                }
            }
        };
        let answer = match route {
            Route::Alone(item) => {
                // A lone call pays for no hand-over.
                let _alone = Alone { queue: &self.queue };
                return self.write_one(&item).await;
            }
            Route::StartBatch(answer) => {
                self.start_batch_writer();
                answer
            }
            Route::Queued(answer) => answer,
        };
        answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?
    }

    /// Writes one item in a statement of its own.
    async fn write_one(&self, item: &S::Item) -> Result<S::Output, sqlx::Error> {
        let mut conn = acquire(S::OPERATION, &self.pool).await?;
        metrics::write_batch(S::OPERATION, 1);
        self.statements.write_one(&mut conn, item).await
    }

    /// Starts the batch writer in a task of its own, so that a caller whose future is
    /// dropped cannot break a batch others wait on. With no runtime to run it on (it is
    /// shutting down), the waiting calls are answered with an error (the writer's drop
    /// drops their senders) rather than left waiting.
    fn start_batch_writer(&self) {
        let batches = BatchWriter {
            pool: self.pool.clone(),
            statements: self.statements.clone(),
            max_batch_size: self.max_batch_size,
            queue: self.queue.clone(),
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
/// it is a single push, pop, count or flag), so a poisoned lock is used as is.
fn lock<S: Statements>(queue: &Mutex<Queue<S>>) -> std::sync::MutexGuard<'_, Queue<S>> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The task that writes batches while items are queued.
struct BatchWriter<S: Statements> {
    pool: PgPool,
    statements: Arc<S>,
    max_batch_size: usize,
    queue: Arc<Mutex<Queue<S>>>,
    /// Until the writer stops normally. If it is dropped before (its runtime shut down), the
    /// queued calls are answered with an error rather than left waiting.
    armed: bool,
}

impl<S: Statements> Drop for BatchWriter<S> {
    fn drop(&mut self) {
        if self.armed {
            let mut queue = lock(&self.queue);
            queue.batching = false;
            // Dropping the senders answers their callers with an error.
            queue.waiting.clear();
        }
    }
}

impl<S: Statements> BatchWriter<S> {
    async fn run(mut self) {
        let mut conn: Option<PoolConnection<Postgres>> = None;
        loop {
            if conn.is_none() {
                match acquire(S::OPERATION, &self.pool).await {
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
                return;
            }
            let Some(c) = conn.as_mut() else { continue };
            if !write_batch(&*self.statements, c, &self.pool, batch).await {
                // The connection failed: it goes back closed, and the next batch takes
                // another.
                if let Some(mut c) = conn.take() {
                    c.close_on_drop();
                }
            }
            // Let the callers just answered run first: those that call again at once join
            // the next batch instead of leaving it to the one or two that queued meanwhile.
            tokio::task::yield_now().await;
        }
    }

    /// Takes the next batch; if there is none, the writer stops (under the same lock, so a
    /// call queued after this starts a new one).
    fn take(&mut self) -> Vec<Waiting<S>> {
        let mut queue = lock(&self.queue);
        let n = queue.waiting.len().min(self.max_batch_size);
        if n == 0 {
            queue.batching = false;
            self.armed = false;
        }
        queue.waiting.drain(..n).collect()
    }
}

/// Writes one batch and answers its callers. Returns false if the connection failed.
async fn write_batch<S: Statements>(
    statements: &S,
    conn: &mut PgConnection,
    pool: &PgPool,
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
        tracing::Instrument::instrument(write_in_order(statements, conn, &items), span).await;
    match written {
        Ok(outputs) => {
            for (waiting, output) in batch.into_iter().zip(outputs) {
                let _ = waiting.reply.send(Ok(output));
            }
            true
        }
        Err(error) if batch.len() == 1 => {
            let usable = rolled_back(&error);
            if let Some(waiting) = batch.into_iter().next() {
                let _ = waiting.reply.send(Err(error));
            }
            usable
        }
        Err(error) if !rolled_back(&error) => {
            tracing::debug!(%error, items = batch.len(), "a batch's connection failed");
            for waiting in batch {
                let _ = waiting.reply.send(Err(copy_error(&error)));
            }
            false
        }
        Err(error) => {
            // The server refused the batch and rolled it back: write each item alone, in
            // call order, so that only the bad one fails.
            tracing::debug!(%error, items = batch.len(), "batch refused; writing its items one by one");
            metrics::write_batch_split(S::OPERATION);
            let mut usable = true;
            for waiting in batch {
                let result = if usable {
                    statements.write_one(conn, &waiting.item).await
                } else {
                    match pool.acquire().await {
                        Ok(mut c) => statements.write_one(&mut c, &waiting.item).await,
                        Err(error) => Err(error),
                    }
                };
                if let Err(error) = &result {
                    usable = usable && rolled_back(error);
                }
                let _ = waiting.reply.send(result);
            }
            usable
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
/// successive statements. Returns one output per item.
async fn write_in_order<S: Statements>(
    statements: &S,
    conn: &mut PgConnection,
    items: &[&S::Item],
) -> Result<Vec<S::Output>, sqlx::Error> {
    if let [one] = items {
        return Ok(vec![statements.write_one(conn, one).await?]);
    }
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
    if let [round] = rounds.as_slice() {
        write_round(statements, conn, items, round, &mut outputs).await?;
    } else {
        let mut txn = sqlx::Connection::begin(conn).await?;
        for round in &rounds {
            write_round(statements, &mut txn, items, round, &mut outputs).await?;
        }
        txn.commit().await?;
    }
    // Every item is in exactly one round, and each round's statement answers for each of
    // its items; a statement that answered for fewer is a bug, reported as an error rather
    // than a panic.
    outputs
        .into_iter()
        .map(|o| o.ok_or_else(|| sqlx::Error::Protocol("a batch statement skipped an item".into())))
        .collect()
}

/// Writes one round (items with distinct lock keys) in one statement, in lock-key order.
async fn write_round<S: Statements>(
    statements: &S,
    conn: &mut PgConnection,
    items: &[&S::Item],
    round: &[usize],
    outputs: &mut [Option<S::Output>],
) -> Result<(), sqlx::Error> {
    let mut chosen = round.to_vec();
    chosen.sort_by(|a, b| S::lock_key(items[*a]).cmp(S::lock_key(items[*b])));
    let round_items: Vec<&S::Item> = chosen.iter().map(|i| items[*i]).collect();
    let written = statements.write_many(conn, &round_items).await?;
    for (i, output) in chosen.into_iter().zip(written) {
        outputs[i] = Some(output);
    }
    Ok(())
}
