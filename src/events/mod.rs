//! The event bus: persisted events written inside the caller's transaction, delivered to
//! every matching subscriber in the process, plus ephemeral (not persisted) messages.
//!
//! # Promises
//! Stated here once; the rest of the module points here.
//!
//! 1. **Written with the change.** An event is a row of `event` inserted in the transaction
//!    of the change it reports ([`emit`]): it exists exactly when that change committed.
//! 2. **Nothing lost, nothing repeated.** A [`Subscription`] or [`EventSubscription`] receives
//!    every matching stored event committed after it was created exactly once, in the order
//!    the bus read them (commit order, not id order), under any number of concurrent writers
//!    in any number of processes.
//! 3. **Live on return.** When `subscribe*` returns, the bus is listening and its cursor is
//!    set: every event committed from then on will be delivered.
//! 4. **Survives the connection and the server.** A lost listening connection, a failed
//!    read, a restart of the server or a switchover to another one loses and repeats nothing
//!    (RELIABILITY.md gives the limits).
//! 5. **A slow subscriber catches up, in bounded memory.** A subscription holds at most
//!    [`BusConfig::max_pending_per_subscription`] events, and memory only for what it holds;
//!    beyond that it is paused and later reads what it missed from the table. [`Lagged`]
//!    reports only what cannot be read back: ephemeral messages, and stored events when the
//!    database server changed during the pause.
//! 6. **Ephemeral messages** (backend metrics) are delivered live to current subscribers and
//!    never stored.
//! 7. **Wake-ups change latency, never content.** Readers take events from the table; a lost
//!    wake-up costs at most one [`BusConfig::poll_interval`].
//! 8. **Keys are typed.** Each payload kind names its key type
//!    ([`NotificationPayload::Key`]); writer and subscriber use it, so they agree.
//!
//! A subscription ends (`None`) only when its [`PlaneDatabase`](crate::PlaneDatabase) is
//! dropped, or when the bus's tasks died (they run on the runtime of the first subscription:
//! if that runtime shuts down, its subscriptions end rather than wait forever, and the next
//! subscription starts the tasks again on its own runtime).
//!
//! # Where each part lives
//! Imports run one way, from the bus down to the event types; nothing imports the bus.
//!
//! - `event`: payload kinds and their keys ([`NotificationPayload`], [`EventKey`]), the
//!   [`Event`] as read, the decoded [`Notification`], the channels.
//! - `registry`: subscribers' queues by filter, the dispatch of each event to them, the
//!   position the bus has reached, and the state shared by the tasks and subscriptions.
//! - `reader`: the read statement, its cursor, the restart floor, the rows it remembers.
//! - `listener`: the listening connection, its reconnection, the coalesced wake-up task.
//! - `subscription`: the [`Subscription`] and [`EventSubscription`] handles and the catch-up
//!   of a paused one.
//! - `bus`: the handle a [`PlaneDatabase`](crate::PlaneDatabase) keeps, which starts the
//!   listener and the reader. `backoff` holds the retry delays. The knobs, [`BusConfig`],
//!   live with the rest of the configuration (`src/config/bus.rs`).
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
//! have become visible. This is exact (no time window to tune), it never waits for other
//! transactions (a transaction left open elsewhere delays nobody but itself), and each read
//! touches only the rows of transactions that finished since the previous read, through the
//! index on `xid`. The cursor is process memory, independent of the listening connection, so
//! after a reconnect the next read returns everything missed.
//!
//! Snapshots compare only within one unbroken run of transaction ids. A server that comes
//! back with its counter behind the cursor (a failover to a replica that had not replayed
//! everything, crash recovery that lost an unflushed abort or an asynchronous commit) hands
//! out ids the cursor counts as read. Every read therefore also returns, from the same
//! statement as its snapshot, the server's start time (a restart, another server) and the
//! id in `plane_server_incarnation`, an UNLOGGED one-row table that crash recovery in place
//! and a promoted standby both leave empty (the postmaster, and so the start time, survives
//! the crash of one server process). When either differs from the cursor's, the bus writes a
//! new incarnation if the table is empty and reads, in a new snapshot, also every row from a
//! transaction at or above a floor computed in that same snapshot from what the bus has
//! seen, with ordinary functions only (no `pg_control_checkpoint()`, so it works for an
//! unprivileged role): one above the highest transaction id of a row it has seen, or lower
//! if rows created since its previous read carry lower ids (the ids went back). Rows above
//! the floor that it already delivered are skipped by `(id, xid, created_at)`. After a
//! restart, crash recovery with synchronous commits or a switchover the floor is exactly the
//! first new id; nothing is read twice. A server change between two pages of one read
//! restarts that read, skipping what it had already delivered. See `restart_floor` in the
//! reader and RELIABILITY.md for the limits.
//!
//! A read's first page comes from the read statement; beyond it, the read lists the rest of
//! its ids once and fetches them by primary key, so a backlog costs time linear in its size.
//!
//! # A slow subscriber
//! When a subscription's queue is full the bus pauses it at the event it could not queue;
//! once the consumer has read what the queue holds, the subscription reads the events it did
//! not get from the table (those the bus dispatched between the pause and the moment it
//! resumed, delimited by the snapshots of the bus's reads), a page at a time, and then
//! continues with its queue, which has been filling again since it resumed.
//!
//! # Writing: one path, coalesced wake-ups
//! Every event the crate writes goes through one database function, `plane_write_events`
//! (see `write`), called from the statement that makes the change, with payloads serialised
//! by serde. Postgres serialises the commits of transactions that issued NOTIFY (a global
//! lock on its notification queue, held through the commit), so that function first sets
//! `plane.event_wake = deferred` for the transaction, which silences the `event` trigger:
//! none of the crate's writers (`connect`, `update_state`, marking backends lost, node
//! registration and going offline, termination requests) issues a NOTIFY in its
//! transaction. After the commit the writer wakes its own process's bus directly, and one
//! task per bus sends a single `NOTIFY plane_events` for all of the process's commits since
//! its previous one, at most one per [`BusConfig::wake_interval`], so that buses in other
//! processes wake too (a bus ignores its own NOTIFYs: their payload is its random id). An
//! event written in a caller's own transaction ([`emit`], whose commit the crate does not
//! see), by older versions or by manual SQL still wakes readers from the trigger, one
//! payload-free NOTIFY per transaction. [`BusConfig::coalesce_wakeups`] turns coalescing off.
//!
//! The read itself is a prepared statement that Postgres may plan generically (without the
//! parameter values); it is written so that even that plan reads only the new rows through
//! the index on `xid` (see `read_new_events` in the reader).
//!
//! # Ephemeral messages
//! Backend metrics are sent with `pg_notify('plane_ephemeral', …)` and delivered live; they are
//! never stored.

mod backoff;
mod bus;
mod event;
mod listener;
mod reader;
mod registry;
mod stored;
mod subscription;
mod write;

pub use crate::config::BusConfig;
pub(crate) use bus::EventBus;
pub(crate) use event::CRATE_KINDS;
pub use event::{Event, EventKey, Notification, NotificationPayload};
/// The read statement once, for the bench (`testing::bench`).
#[cfg(feature = "testing")]
pub(crate) use reader::read_once;
/// The reader's three statements once each, for the bench's plans (`testing::bench`).
#[cfg(feature = "testing")]
pub(crate) use reader::{bench_read_page, bench_read_page_by_ids, bench_read_span_ids};
pub(crate) use stored::{events_since, latest_event_id};
pub use subscription::{EventSubscription, Lagged, Subscription};
pub use write::{emit, emit_in_two_phase};
pub(crate) use write::{emit_ephemeral, EventBatch, EventWriter};
