//! # plane-db
//!
//! The Postgres-backed data layer of a session-backend orchestrator (Plane-compatible). A
//! controller embeds it to schedule per-user session backends onto drones, track each
//! backend's lifecycle, turn bearer tokens into routes for proxies, find backends to
//! terminate, clean up old rows, and stream status changes over LISTEN/NOTIFY.
//!
//! Open it with [`connect_and_migrate`] (or [`connect`](fn@connect), or [`ConnectOptions`] to
//! size the pool, set timeouts or run behind PgBouncer, or [`PlaneDatabase::new`] on a pool
//! of your own), then use the facades: [`PlaneDatabase::backend`], [`PlaneDatabase::drone`],
//! [`PlaneDatabase::node`], [`PlaneDatabase::controller`], [`PlaneDatabase::keys`],
//! [`PlaneDatabase::backend_actions`], [`PlaneDatabase::acme`], [`PlaneDatabase::cluster`],
//! and [`PlaneDatabase::connect`] to get or create a backend for a key. A database that
//! Plane 0.5.5 migrated is converted in place when migrated (see [`migrate`]). Run
//! [`PlaneDatabase::run_cleanup`] (or [`PlaneDatabase::spawn_cleanup_loop`]) to delete old
//! rows.
//!
//! ## Guarantees
//! - **Events exist exactly when their change committed**: they are written in the same
//!   transaction ([`events::emit`]).
//! - **Nothing lost, nothing duplicated**: each subscriber receives every matching event once,
//!   under any number of concurrent writers on any number of controllers. The bus reads the
//!   `event` table by transaction visibility, not by id (see [`events`]).
//! - **Live on return**: when `subscribe*` returns, every event committed afterwards will be
//!   delivered to it.
//! - **Survives the connection**: a lost listening connection is re-established with backoff
//!   and whatever was committed meanwhile is read from the table.
//! - **A slow subscriber catches up**: a subscription whose queue is full is paused, and once
//!   it has read what it holds it reads what it missed from the `event` table, exactly where
//!   it stopped, then carries on live. Only what cannot be read back is reported as
//!   [`events::Lagged`] (ephemeral messages, or a server change during the pause);
//!   [`backend::BackendDatabase::status_stream`] then re-reads the history, so it never ends
//!   early.
//! - **Forward-only states**: [`backend::BackendDatabase::update_state`] refuses transitions
//!   that do not move a backend forward.
//! - **One backend per key**: concurrent [`PlaneDatabase::connect`] calls for a key create
//!   exactly one backend and all return it.
//! - **Tokens are stored as digests**: a dump of the `token` table cannot be used to connect.

#![warn(missing_docs)]

pub mod acme;
pub mod actions;
pub mod backend;
mod cleanup;
pub mod cluster;
pub mod connect;
mod connection;
pub mod controller;
mod database;
pub mod drone;
pub mod error;
pub mod events;
pub mod keys;
pub mod metrics;
pub mod node;
mod plane055;
mod serde_seconds;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;

pub use cleanup::{CleanupConfig, CleanupPhase, CleanupProgress, CleanupSummary, CleanupTask};
pub use connection::{ConnectOptions, PoolerMode};
pub use database::{
    connect, connect_and_migrate, Config, KeyLeaseConfig, PlaneDatabase, SchedulerConfig, MIGRATOR,
};
pub use database::{migrate, MigrationReport};
pub use error::{ConnectError, Error, Result};
pub use plane055::PlaneConversionReport;

/// The README's example runs as a doctest, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
