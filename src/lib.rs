//! # plane-db
//!
//! The Postgres-backed data layer of a session-backend orchestrator (Plane-compatible). A
//! controller embeds it to schedule per-user session backends onto drones, track each
//! backend's lifecycle, turn bearer tokens into routes for proxies, find backends to
//! terminate, clean up old rows, and stream status changes over LISTEN/NOTIFY.
//!
//! Open it with [`open_and_migrate`] (or [`open`](fn@open), or [`OpenOptions`] to
//! size the pool, set timeouts or run behind PgBouncer, or [`PlaneDatabase::new`] on a pool
//! of your own), then use the facades: [`PlaneDatabase::backend`], [`PlaneDatabase::drone`],
//! [`PlaneDatabase::node`], [`PlaneDatabase::controller`], [`PlaneDatabase::key`],
//! [`PlaneDatabase::backend_action`], [`PlaneDatabase::acme`], [`PlaneDatabase::cluster`],
//! and [`PlaneDatabase::connect`] to get or create a backend for a key. A database that
//! Plane 0.5.5 migrated is converted in place when migrated (see [`migrate`](fn@migrate)). Run
//! [`PlaneDatabase::run_cleanup`] (or [`PlaneDatabase::spawn_cleanup_loop`]) to delete old
//! rows.
//!
//! ## Guarantees
//! - **The event bus**: an event exists exactly when its change committed, and each
//!   subscriber receives every matching one once, from the moment `subscribe*` returns,
//!   across lost connections and server restarts, catching up from the table when slow. The
//!   promises are stated once, in [`events`](events#promises).
//!   [`backend::BackendDatabase::status_stream`] re-reads the history after an
//!   [`events::Lagged`], so it never ends early.
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
mod config;
pub mod connect;
mod context;
pub mod controller;
mod database;
pub mod drone;
pub mod error;
pub mod events;
mod group_commit;
pub mod hosts;
pub mod keys;
pub mod leader;
pub mod limits;
pub mod metrics;
mod migrate;
pub mod node;
mod open;
pub mod partition;
mod plane055;
pub mod replicas;
mod serde_seconds;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;
mod validate;

pub use cleanup::{CleanupPhase, CleanupProgress, CleanupReport, CleanupSummary, CleanupTask};
pub use config::{
    CleanupConfig, Config, KeyLeaseConfig, LeaderConfig, SchedulerConfig, WriteBatchConfig,
    LONGEST_DURATION,
};
#[allow(deprecated)]
pub use database::{connect, connect_and_migrate};
pub use database::{open, open_and_migrate, PlaneDatabase};
pub use error::{ConnectError, Error, Result};
pub use migrate::{migrate, MigrationReport, MIGRATOR};
#[allow(deprecated)]
pub use open::ConnectOptions;
pub use open::{OpenOptions, PoolerMode};
pub use plane055::PlaneConversionReport;
pub use replicas::{ReplicaConfig, ReplicaStatus};

/// The README's example runs as a doctest, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
