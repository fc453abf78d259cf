//! Streaming replicas for reads: which reads may go to one, how a replica is chosen, how its
//! lag is measured, and what happens when it is behind or gone.
//!
//! A [`PlaneDatabase`](crate::PlaneDatabase) opened with
//! [`OpenOptions::replica_url`](crate::OpenOptions::replica_url) keeps a pool per
//! replica (`application_name` `plane-db-replica`, opened lazily) and a background probe
//! that measures each replica's lag every [`ReplicaConfig::probe_interval`]. A read that may
//! go to a replica goes to the next *usable* one in turn (its last probe answered, it is in
//! recovery, its lag is within [`ReplicaConfig::max_lag`], and no read failed on it since),
//! or to the primary when none is usable.
//!
//! # Which reads, and what each guarantees
//!
//! | Read | On a replica | What the caller can rely on |
//! |---|---|---|
//! | [`route_info_for_token`](crate::backend::BackendDatabase::route_info_for_token), [`route_info_for_static_token`](crate::backend::BackendDatabase::route_info_for_static_token) | yes | `NotFound` and `Pending` are only ever the primary's answer: a replica's `NotFound` or `Pending` is asked again on the primary. So a token `connect` issued on the primary never reads as not found, and a backend the primary has ready never reads as pending. An `Available` answer may be stale by the replica's lag: a token revoked, or a backend that began terminating, less than `max_lag` ago may still route. |
//! | [`list`](crate::backend::BackendDatabase::list), [`list_backends`](crate::backend::BackendDatabase::list_backends), [`state_history`](crate::backend::BackendDatabase::state_history), [`node().list`](crate::node::NodeDatabase::list) | yes | A listing as the database was at most `max_lag` ago: no read-your-writes. |
//! | [`status_stream`](crate::backend::BackendDatabase::status_stream)'s history | yes, fenced | Complete as on the primary: after the stream's subscription is live, the primary's WAL insert position is read (one statement touching no table), and the history is read on the replica only if the replica has replayed up to it; else on the primary. The live part is the primary's event bus. |
//! | everything else: writes, `connect`, the event bus, [`backend`](crate::backend::BackendDatabase::backend), [`list_alive_backends_for_drone`](crate::backend::BackendDatabase::list_alive_backends_for_drone), [`termination_candidates`](crate::backend::BackendDatabase::termination_candidates), keys, drones, scheduling, cleanup | no | as without replicas |
//!
//! `list_alive_backends_for_drone` and `termination_candidates` stay on the primary because
//! their answers turn into actions: a backend missing from a drone's list, or one kept alive
//! a moment ago that reads as idle, would be terminated by mistake.
//!
//! # Lag
//!
//! Every probe interval, one task reads the primary's WAL write position
//! (`pg_current_wal_lsn()`) and remembers when it read it, and a task per replica reads the
//! replica's replay position (`pg_last_wal_replay_lsn()`). A replica's lag is the age of the
//! newest remembered primary position it has replayed: it holds every change the primary had
//! written at that moment. An idle primary's position does not move, so a replica that
//! replayed it has lag ≈ 0 however long ago the last write was (unlike
//! `now() - pg_last_xact_replay_timestamp()`, which grows on an idle primary). The
//! measurement is as fine as the probe interval: under steady writes a healthy replica
//! reads up to one interval behind. The lag in bytes (the primary's position less the
//! replica's) is reported beside it.
//!
//! A probe that measures lag `L` keeps the replica usable for `max_lag - L` from then, not
//! until the next probe: even if the replica stops replaying right after, or its next probe
//! hangs, no answer it serves is older than `max_lag`. With `synchronous_commit = off` on the
//! primary, a commit is visible before it is written, so the bound stretches by the WAL
//! writer's delay (`wal_writer_delay`, 200 ms by default).
//!
//! # Failures
//!
//! A read that fails on a replica with a database error (connection refused or lost,
//! recovery conflict, no connection within [`ReplicaConfig::acquire_timeout`]) is run again
//! on the primary, and the replica is not used again until its probe finds it answering, in
//! recovery and within the bound. A replica that goes down therefore costs the reads in
//! flight on it one more round trip (or up to `acquire_timeout`, when a new connection was
//! needed), then nothing but its share of the reads. A server that is not in recovery (e.g. a promoted replica) is not
//! used. Replica pools open lazily, so a replica down at start does not fail [`OpenOptions::open`](crate::OpenOptions::open).
//!
//! # Where each part lives
//!
//! - `routing`: `Reads`, the replicas in turn, and a read's way to a replica and back to
//!   the primary (`run`, `run_fenced`, the counters).
//! - `probe`: the lag probe (the primary's positions as samples, a task per replica) and what
//!   a probe's answer does to a replica.
//! - here: the public [`ReplicaStatus`], the read and fallback kinds (metric labels), and
//!   [`ReplicaConfig`], re-exported from `src/config/replicas.rs`.

mod probe;
mod routing;

pub use crate::config::ReplicaConfig;
pub(crate) use probe::ProbeTask;
pub(crate) use routing::Reads;

use sqlx::PgPool;
use std::time::Duration;

/// One replica as [`PlaneDatabase::replicas`](crate::PlaneDatabase::replicas) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Its place in the order the replicas were given (the `replica` label of its metrics).
    pub index: usize,
    /// `user@host:port/database` (no password).
    pub endpoint: String,
    /// Whether reads go to it now: its last probe answered, it is in recovery, its lag is
    /// within the bound, and no read has failed on it since.
    pub usable: bool,
    /// The lag its last successful probe measured; `None` before one, or when it was behind
    /// every primary position the probe remembers (then it is not usable). The replica
    /// stays usable until `lag` plus [`last_probe_age`](Self::last_probe_age) reaches
    /// [`ReplicaConfig::max_lag`], unless a newer probe measures less.
    pub lag: Option<Duration>,
    /// How long ago its last successful probe answered.
    pub last_probe_age: Option<Duration>,
    /// How far its replay position was behind the primary's write position at its last
    /// successful probe, in bytes of WAL.
    pub lag_bytes: Option<u64>,
    /// Reads it answered.
    pub reads: u64,
    /// Reads it answered that were asked again on the primary (a `NotFound` or `Pending`
    /// route, a status history it had not replayed far enough for), or that failed on it.
    pub fallbacks: u64,
    /// Reads that failed on it.
    pub errors: u64,
    /// Why it was last found unusable (a probe or read error, not in recovery, lag), if it
    /// has been.
    pub last_problem: Option<String>,
}

/// A read that may be served by a replica (the `read` label of the read metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    RouteInfoForToken,
    RouteInfoForStaticToken,
    BackendList,
    StateHistory,
    NodeList,
    StatusStreamHistory,
}

impl ReadKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReadKind::RouteInfoForToken => "route_info_for_token",
            ReadKind::RouteInfoForStaticToken => "route_info_for_static_token",
            ReadKind::BackendList => "backend_list",
            ReadKind::StateHistory => "state_history",
            ReadKind::NodeList => "node_list",
            ReadKind::StatusStreamHistory => "status_stream_history",
        }
    }
}

/// Why a read a replica answered was asked again on the primary (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// A route lookup found nothing: the token may be newer than the replica.
    NotFound,
    /// A route lookup found the backend pending: the primary may have it ready.
    Pending,
    /// The replica had not replayed up to the primary's position (status stream history).
    Behind,
    /// The read failed on the replica.
    Error,
}

impl Fallback {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fallback::NotFound => "not_found",
            Fallback::Pending => "pending",
            Fallback::Behind => "behind",
            Fallback::Error => "error",
        }
    }
}

/// A replica's pool as opened by [`OpenOptions`](crate::OpenOptions), with its
/// endpoint for reports.
pub(crate) struct ReplicaPool {
    pub endpoint: String,
    pub pool: PgPool,
}
