//! The `PlaneDatabase` facade: owns the [`Context`] (pool, configuration, event bus) and
//! lists every operation, each one hop away: an area handle (`backend()`, `drone()`…) or a
//! method that hands the context to its area.

use crate::acme::AcmeDatabase;
use crate::actions::BackendActionDatabase;
use crate::backend::BackendDatabase;
use crate::cleanup::{Cleanup, CleanupProgress, CleanupSummary, CleanupTask, Fence};
use crate::cluster::ClusterDatabase;
use crate::config::{CleanupConfig, Config};
use crate::connect::{ConnectRequest, ConnectResponse, Connector};
use crate::context::Context;
use crate::controller::ControllerDatabase;
use crate::drone::DroneDatabase;
use crate::error::{ConnectError, Result};
use crate::events::{Event, EventBus, EventSubscription, NotificationPayload, Subscription};
use crate::keys::KeysDatabase;
use crate::leader::{holder_for_this_process, LeaderElection, LeaderInfo, LeaseDatabase};
use crate::node::NodeDatabase;
use crate::open::{
    listener_options_for, listener_pool, OpenOptions, Opened, DEFAULT_APPLICATION_NAME,
};
use crate::replicas::{Reads, ReplicaPool, ReplicaStatus};
use crate::status::{DatabaseStatus, StatusReader};
use crate::types::BackendName;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// Opens a pool on `url` (not migrated) with the default [`OpenOptions`]: 32 connections,
/// `application_name` `plane-db` (the listening connection `plane-db-listener`), a 30 s
/// `statement_timeout`. See [`open_and_migrate`], and [`OpenOptions`] to change them
/// or to run behind a pooler.
// The URL is not recorded: it may hold a password.
#[tracing::instrument(skip_all)]
pub async fn open(url: &str) -> Result<PlaneDatabase> {
    OpenOptions::new(url)?.open().await
}

/// Applies the schema migrations on `url` with the rules of [`migrate`](crate::migrate()) (so it also starts
/// against a database that a newer build migrated, converts one that Plane 0.5.5 migrated,
/// and needs no DDL privilege when the schema is up to date), then opens a pool on it, with the default [`OpenOptions`] (see
/// [`open`](fn@open)).
///
/// ```no_run
/// # async fn example() -> plane_db::Result<()> {
/// let db = plane_db::open_and_migrate("postgres://postgres@127.0.0.1/plane").await?;
/// db.health_check().await?;
/// # Ok(()) }
/// ```
#[tracing::instrument(skip_all)]
pub async fn open_and_migrate(url: &str) -> Result<PlaneDatabase> {
    OpenOptions::new(url)?.open_and_migrate().await
}

/// The old name of [`open`](fn@open) (opening the database); `connect` now only means
/// [`PlaneDatabase::connect`], getting or creating a backend.
#[deprecated(since = "0.2.0", note = "renamed to `plane_db::open`")]
pub async fn connect(url: &str) -> Result<PlaneDatabase> {
    open(url).await
}

/// The old name of [`open_and_migrate`].
#[deprecated(since = "0.2.0", note = "renamed to `plane_db::open_and_migrate`")]
pub async fn connect_and_migrate(url: &str) -> Result<PlaneDatabase> {
    open_and_migrate(url).await
}

impl OpenOptions {
    /// Opens the pool (one connection right away, so that a wrong URL or an unreachable
    /// server fails here) and returns the database; the listening connection opens on the
    /// first subscription. Does not migrate.
    #[tracing::instrument(skip_all)]
    pub async fn open(self) -> Result<PlaneDatabase> {
        Ok(PlaneDatabase::with_opened(self.open_pools().await?))
    }

    /// Applies the schema migrations with the rules of [`migrate`](crate::migrate()) (on a
    /// connection of their own, without a statement timeout, through the direct URL in
    /// [`PoolerMode::Transaction`](crate::PoolerMode::Transaction); a database that Plane
    /// 0.5.5 migrated is converted), then [`open`](Self::open)s.
    #[tracing::instrument(skip_all)]
    pub async fn open_and_migrate(self) -> Result<PlaneDatabase> {
        Ok(PlaneDatabase::with_opened(
            self.migrate_and_open_pools().await?,
        ))
    }

    /// The old name of [`open`](Self::open).
    #[deprecated(since = "0.2.0", note = "renamed to `OpenOptions::open`")]
    pub async fn connect(self) -> Result<PlaneDatabase> {
        self.open().await
    }

    /// The old name of [`open_and_migrate`](Self::open_and_migrate).
    #[deprecated(since = "0.2.0", note = "renamed to `OpenOptions::open_and_migrate`")]
    pub async fn connect_and_migrate(self) -> Result<PlaneDatabase> {
        self.open_and_migrate().await
    }
}

/// The data layer of a controller: cheap to clone (all clones share one pool and one event
/// bus). The bus stops when the last clone is dropped, which ends every subscription.
#[derive(Clone)]
pub struct PlaneDatabase {
    inner: Arc<Context>,
}

impl std::fmt::Debug for PlaneDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneDatabase").finish_non_exhaustive()
    }
}

impl PlaneDatabase {
    /// Wraps an existing (migrated) pool with the default [`Config`]. Opens no connection;
    /// the event bus starts on the first subscription.
    ///
    /// The bus's listening connection is one more connection, outside the pool, opened with
    /// the pool's connect options and named after its `application_name` (or `plane-db`)
    /// followed by `-listener`. Use [`with_listener`](Self::with_listener) when the pool goes
    /// through a transaction-mode pooler.
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, Config::default())
    }

    /// Wraps an existing (migrated) pool with the given configuration (see
    /// [`new`](Self::new)).
    pub fn with_config(pool: PgPool, config: Config) -> Self {
        let listener = listener_options_for(&pool);
        Self::with_listener(pool, listener, config)
    }

    /// Wraps an existing (migrated) pool; the event bus's listening connection uses
    /// `listener`, e.g. straight to Postgres while the pool goes through a transaction-mode
    /// pooler (`LISTEN` needs a session of its own). Its `application_name` is
    /// `plane-db-listener` unless `listener` sets one; `idle_session_timeout` is turned off
    /// on it. [`OpenOptions`] builds both for you.
    pub fn with_listener(pool: PgPool, listener: PgConnectOptions, config: Config) -> Self {
        let listener = match listener.get_application_name() {
            Some(name) if !name.is_empty() => listener,
            _ => listener.application_name(&format!("{DEFAULT_APPLICATION_NAME}-listener")),
        };
        let acquire_timeout = pool.options().get_acquire_timeout();
        let listener = listener_pool(listener, String::new(), acquire_timeout, None);
        Self::with_parts(pool, listener, Vec::new(), config)
    }

    /// What [`OpenOptions`] opened (with replicas, within a Tokio runtime: see
    /// [`with_parts`](Self::with_parts)).
    fn with_opened(opened: Opened) -> Self {
        let bus = EventBus::new(
            opened.pool.clone(),
            opened.listener,
            opened.config.bus.clone(),
        )
        .following(opened.listener_moves);
        let reads = Reads::new(
            opened.pool.clone(),
            opened.replicas,
            opened.config.replicas.clone(),
        );
        let context = Context::new(opened.pool, opened.config, bus, reads).watching(opened.hosts);
        Self {
            inner: Arc::new(context),
        }
    }

    /// `listener`: a pool of one connection (see [`listener_pool`]); `replicas`: a pool per
    /// streaming replica, whose probe this starts (so, with replicas, it must be called
    /// within a Tokio runtime).
    pub(crate) fn with_parts(
        pool: PgPool,
        listener: PgPool,
        replicas: Vec<ReplicaPool>,
        config: Config,
    ) -> Self {
        let bus = EventBus::new(pool.clone(), listener, config.bus.clone());
        let reads = Reads::new(pool.clone(), replicas, config.replicas.clone());
        Self {
            inner: Arc::new(Context::new(pool, config, bus, reads)),
        }
    }

    /// The pool, for callers that run their own queries or transactions (e.g. to
    /// [`emit`](crate::events::emit) an event together with their own change).
    pub fn pool(&self) -> &PgPool {
        self.inner.pool()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// The shared state, for the test hooks that run the crate's statements directly.
    #[cfg(feature = "testing")]
    pub(crate) fn context(&self) -> &Context {
        &self.inner
    }

    /// The streaming replicas named with
    /// [`OpenOptions::replica_url`](crate::OpenOptions::replica_url), in that order:
    /// whether reads go to each, its lag, and how many reads it served. Empty without
    /// replicas. See [`replicas`](crate::replicas) for which reads they serve.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.inner.reads().status()
    }

    /// Checks that the database answers.
    #[tracing::instrument(skip(self))]
    pub async fn health_check(&self) -> Result<()> {
        sqlx::query!("select 1 as one")
            .fetch_one(self.pool())
            .await?;
        Ok(())
    }

    /// Backends: lifecycle, routes, keepalives, termination candidates, cleanup.
    pub fn backend(&self) -> BackendDatabase<'_> {
        BackendDatabase::new(&self.inner)
    }

    /// Drones: registration, heartbeats, scheduling.
    pub fn drone(&self) -> DroneDatabase<'_> {
        DroneDatabase::new(&self.inner)
    }

    /// Nodes (drones, proxies, DNS servers) as registered with a controller.
    pub fn node(&self) -> NodeDatabase<'_> {
        NodeDatabase::new(&self.inner)
    }

    /// Controllers' heartbeats.
    pub fn controller(&self) -> ControllerDatabase<'_> {
        ControllerDatabase::new(&self.inner)
    }

    /// Key leases: renew, prevent renewal, remove expired, look up the holder.
    pub fn key(&self) -> KeysDatabase<'_> {
        KeysDatabase::new(&self.inner)
    }

    /// Actions queued for drones: termination requests, pending actions, acknowledgements.
    pub fn backend_action(&self) -> BackendActionDatabase<'_> {
        BackendActionDatabase::new(&self.inner)
    }

    /// Renamed to [`key`](Self::key): every area accessor is singular, like
    /// [`backend`](Self::backend) and [`drone`](Self::drone).
    #[deprecated(since = "0.2.0", note = "renamed to `key()`")]
    pub fn keys(&self) -> KeysDatabase<'_> {
        self.key()
    }

    /// Renamed to [`backend_action`](Self::backend_action): every area accessor is
    /// singular, like [`backend`](Self::backend) and [`drone`](Self::drone).
    #[deprecated(since = "0.2.0", note = "renamed to `backend_action()`")]
    pub fn backend_actions(&self) -> BackendActionDatabase<'_> {
        self.backend_action()
    }

    /// ACME DNS-01 TXT records, leased to one proxy at a time.
    pub fn acme(&self) -> AcmeDatabase<'_> {
        AcmeDatabase::new(&self.inner)
    }

    /// Leader leases: acquire, renew, resign, and who leads (see [`leader`](crate::leader)).
    /// [`spawn_leader_election`](Self::spawn_leader_election) runs these for you.
    pub fn leader_lease(&self) -> LeaseDatabase<'_> {
        LeaseDatabase::new(&self.inner)
    }

    /// Who holds lease `lease` (e.g. [`CLEANUP_LEASE`](crate::leader::CLEANUP_LEASE)), since
    /// when and until when; `None` if it was never taken. An expired lease is returned too,
    /// with [`LeaderInfo::active`] false: nobody leads.
    ///
    /// ```no_run
    /// # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
    /// if let Some(leader) = db.leader(plane_db::leader::CLEANUP_LEASE).await? {
    ///     println!("{} leads cleanup since {} (term {})", leader.holder, leader.elected_at, leader.term);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn leader(&self, lease: &str) -> Result<Option<LeaderInfo>> {
        self.leader_lease().leader(lease).await
    }

    /// Starts an election for lease `lease` with [`Config::leader`](crate::Config::leader):
    /// a background task takes the lease when it is free, renews it while it holds it, and
    /// resigns when the returned [`LeaderElection`] is resigned or dropped. The holder is
    /// named after this host and process (`host:pid:random`). Must be called within a Tokio
    /// runtime. The configuration is checked first ([`LeaderConfig::validate`](crate::LeaderConfig::validate)).
    pub fn spawn_leader_election(&self, lease: &str) -> Result<LeaderElection> {
        LeaderElection::spawn(
            self.pool().clone(),
            self.inner.bus().listener_options(),
            lease,
            holder_for_this_process(),
            self.config().leader.clone(),
        )
    }

    /// Cluster overviews: connected drones and proxies.
    pub fn cluster(&self) -> ClusterDatabase<'_> {
        ClusterDatabase::new(&self.inner)
    }

    /// Subscribes to every event of type `T`. When this returns, the subscription is live:
    /// every such event committed afterwards will be delivered.
    #[tracing::instrument(skip(self), fields(kind = T::kind()))]
    pub async fn subscribe<T: NotificationPayload>(&self) -> Result<Subscription<T>> {
        let shared = self.inner.bus().ensure_started().await?;
        Ok(Subscription::new(shared, None))
    }

    /// Subscribes to events of type `T` with the given key, of `T`'s key type
    /// ([`NotificationPayload::Key`]): e.g. one backend's states by its
    /// [`BackendName`](crate::types::BackendName), one drone's actions by its
    /// [`NodeId`](crate::types::NodeId). Live on return, like [`subscribe`](Self::subscribe).
    #[tracing::instrument(
        skip_all,
        fields(kind = T::kind(), key = ?crate::events::EventKey::to_event_key(key))
    )]
    pub async fn subscribe_with_key<T: NotificationPayload>(
        &self,
        key: &T::Key,
    ) -> Result<Subscription<T>> {
        let key = crate::events::EventKey::to_event_key(key);
        let shared = self.inner.bus().ensure_started().await?;
        Ok(Subscription::new(shared, Some(key)))
    }

    /// Subscribes to every event of every kind, undecoded. Live on return.
    #[tracing::instrument(skip(self))]
    pub async fn subscribe_all_events(&self) -> Result<EventSubscription> {
        let shared = self.inner.bus().ensure_started().await?;
        Ok(EventSubscription::new(shared))
    }

    /// The id of the newest stored event, `None` if there are none: where to start
    /// [`get_events_since`](Self::get_events_since) to read only what is stored from now on.
    pub async fn latest_event_id(&self) -> Result<Option<i64>> {
        crate::events::latest_event_id(self.pool()).await
    }

    /// Persisted events with an id greater than `since`, in id order, at most `limit`.
    ///
    /// Ids are assigned at insert time, not at commit, so an event committed later may carry
    /// a smaller id than one already returned: use this to backfill history (e.g. resume a
    /// stream), and a subscription for what happens next.
    pub async fn get_events_since(&self, since: i64, limit: i64) -> Result<Vec<Event>> {
        crate::events::events_since(self.pool(), since, limit).await
    }

    /// Gets or creates the backend for a key (namespace, name, tag).
    ///
    /// - A live backend holds the key with the same tag: it is returned, with a new token.
    /// - It holds the key with another tag: [`ConnectError::KeyHeld`], with both tags.
    /// - No live backend holds it (none, or its lease expired): with a spawn config a new
    ///   backend is scheduled on a drone picked by [`DroneDatabase::pick_for_spawn`](crate::drone::DroneDatabase::pick_for_spawn),
    ///   taking the key over; without one, [`ConnectError::NoSpawnConfig`]. It is spawned in
    ///   the spawn config's cluster, or [`Config::default_cluster`](crate::Config::default_cluster)
    ///   ([`ConnectError::NoClusterProvided`] without both), under the spawn config's `id` if
    ///   it gives one ([`ConnectError::BackendIdTaken`] if a backend has that name).
    ///
    /// Creating a backend is one atomic statement: the backend row, its `scheduled` history
    /// row and event, the key (with a new fencing token), the spawn action for the drone and
    /// its event, and the token. Concurrent connects for one key, from any number of
    /// controllers, end with exactly one backend, and every caller gets that backend.
    /// Concurrent connects of one process that create backends share that statement and
    /// its transaction (group commit, [`Config::write_batching`](crate::Config::write_batching));
    /// each still gets its own answer.
    pub async fn connect(&self, request: &ConnectRequest) -> Result<ConnectResponse, ConnectError> {
        Connector::new(&self.inner).connect(request).await
    }

    /// Revokes every token issued to `user` for `backend`. Returns how many were revoked.
    pub async fn revoke(&self, backend: &BackendName, user: &str) -> Result<u64> {
        Connector::new(&self.inner).revoke(backend, user).await
    }

    /// One overview for an operator; see [`DatabaseStatus`].
    pub async fn status(&self) -> Result<DatabaseStatus> {
        StatusReader::new(&self.inner).status().await
    }

    /// One full cleanup: old terminated backends (as
    /// [`BackendDatabase::cleanup_terminated`] deletes them), events older than
    /// [`CleanupConfig::event_min_age`], then expired tokens, each in batches of one
    /// transaction. The run is recorded for [`status`](Self::status).
    ///
    /// ```no_run
    /// # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
    /// let summary = db.run_cleanup(&plane_db::CleanupConfig::default()).await?;
    /// println!("deleted {} backends, {} events", summary.backends.backends, summary.events);
    /// # Ok(()) }
    /// ```
    pub async fn run_cleanup(&self, config: &CleanupConfig) -> Result<CleanupSummary> {
        Cleanup::new(&self.inner).run(config, &mut |_| {}).await
    }

    /// [`run_cleanup`](Self::run_cleanup), calling `progress` after every batch, e.g. to
    /// show an operator how far a long first cleanup has got.
    ///
    /// ```no_run
    /// # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
    /// let config = plane_db::CleanupConfig::default();
    /// let summary = db
    ///     .run_cleanup_with_progress(&config, |p| eprintln!("{}: {} deleted", p.phase, p.deleted))
    ///     .await?;
    /// println!("{} expired tokens deleted", summary.tokens);
    /// # Ok(()) }
    /// ```
    pub async fn run_cleanup_with_progress(
        &self,
        config: &CleanupConfig,
        mut progress: impl FnMut(CleanupProgress) + Send,
    ) -> Result<CleanupSummary> {
        Cleanup::new(&self.inner).run(config, &mut progress).await
    }

    /// [`run_cleanup`](Self::run_cleanup) as the leader of lease `lease` under `term` (from
    /// a [`LeaderElection`]): every batch deletes only if the lease still carries `term` and
    /// has not expired, checked in the batch's own statement, which holds the lease row
    /// until it commits so that no takeover commits in between. Once the check fails the run
    /// stops with [`Error::NotLeader`](crate::Error::NotLeader); batches already committed
    /// stay.
    pub async fn run_cleanup_fenced(
        &self,
        config: &CleanupConfig,
        lease: &str,
        term: i64,
    ) -> Result<CleanupSummary> {
        let fence = Fence {
            lease: lease.to_string(),
            term,
            state: None,
        };
        Cleanup::fenced(&self.inner, fence)
            .run(config, &mut |_| {})
            .await
    }

    /// Creates partitions of `event` and `backend_state` ahead of their sequences, keeping
    /// `config.partitions_ahead` empty ones of `config.partition_rows` ids above each (see
    /// [`crate::partition`]); [`run_cleanup`](Self::run_cleanup) does this first. An
    /// open-ended partition that writes already reached (nothing maintained the partitions
    /// for a while) is split first: given an upper bound above the sequence, without moving
    /// its rows. Returns how many partitions it created. Needs the privileges of the tables'
    /// owner (DDL).
    pub async fn maintain_partitions(&self, config: &CleanupConfig) -> Result<u64> {
        Ok(crate::partition::Partitions::new(&self.inner)
            .ensure_ahead(config)
            .await?
            .created)
    }

    /// Deletes events older than `min_age`, `batch_size` per transaction until none are
    /// left, row by row (whatever their partition). Returns how many were deleted.
    pub async fn cleanup_events(&self, min_age: Duration, batch_size: i32) -> Result<u64> {
        Cleanup::new(&self.inner)
            .events(min_age, batch_size, &mut |_| {})
            .await
    }

    /// Deletes expired tokens, 1,000 per transaction until none are left. Returns how many
    /// were deleted.
    pub async fn cleanup_tokens(&self) -> Result<u64> {
        Cleanup::new(&self.inner).tokens(&mut |_| {}).await
    }

    /// Renamed to [`cleanup_tokens`](Self::cleanup_tokens), like
    /// [`cleanup_events`](Self::cleanup_events).
    #[deprecated(since = "0.2.0", note = "renamed to `cleanup_tokens`")]
    pub async fn clean_up_tokens(&self) -> Result<u64> {
        self.cleanup_tokens().await
    }

    /// Runs [`run_cleanup`](Self::run_cleanup) every `interval` in a background task, on one
    /// controller of the fleet only: the task takes part in the election for the
    /// [`CLEANUP_LEASE`](crate::leader::CLEANUP_LEASE) (with [`Config::leader`](crate::Config::leader))
    /// and cleans up only while it leads, every batch fenced with its term
    /// ([`run_cleanup_fenced`](Self::run_cleanup_fenced)); the others wait and take over when
    /// the leader resigns or its lease expires. A new leader keeps the fleet's schedule: its
    /// first run comes `interval` after the last recorded run (at once if there was none
    /// within it). A failed run is logged and retried at the next interval. The task keeps
    /// this database's pool and bus alive and stops when the returned [`CleanupTask`] is
    /// dropped ([`CleanupTask::shutdown`] also hands the lease on at once). Must be called
    /// within a Tokio runtime, on a database migrated by this version (the lease's table).
    ///
    /// An `interval` of zero, or an invalid [`Config::leader`](crate::Config::leader), is
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    pub fn spawn_cleanup_loop(
        &self,
        interval: Duration,
        config: CleanupConfig,
    ) -> Result<CleanupTask> {
        Cleanup::spawn_loop(self.inner.clone(), interval, config)
    }
}
