//! The `PlaneDatabase` facade: owns the pool and the event bus, hands out one small facade
//! per area.

use crate::acme::AcmeDatabase;
use crate::actions::BackendActionDatabase;
use crate::backend::BackendDatabase;
use crate::cluster::ClusterDatabase;
use crate::connection::{
    listener_options_for, listener_pool, ConnectOptions, DEFAULT_APPLICATION_NAME,
};
use crate::controller::ControllerDatabase;
use crate::drone::DroneDatabase;
use crate::error::{check_non_negative, Result};
use crate::events::{
    BusConfig, Event, EventBus, EventSubscription, NotificationPayload, Subscription,
};
use crate::keys::KeysDatabase;
use crate::node::NodeDatabase;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// The schema migrations, embedded at compile time. [`connect_and_migrate`] applies them;
/// run `MIGRATOR.run(&pool)` yourself to migrate a pool you built. Concurrent runs from
/// several controllers are safe (sqlx takes an advisory lock).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Tuning for scheduling, keys and tokens, and the event bus. `Config::default()` suits a
/// controller; each field documents its default.
#[derive(Debug, Clone)]
pub struct Config {
    /// How the event bus reads and delivers events.
    pub bus: BusConfig,
    /// How drones are picked for new backends.
    pub scheduler: SchedulerConfig,
    /// Key lease durations handed to drones with each spawn.
    pub key_lease: KeyLeaseConfig,
    /// How long a bearer token issued by `connect` routes. Defaults to 1 hour.
    pub token_lifetime: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bus: BusConfig::default(),
            scheduler: SchedulerConfig::default(),
            key_lease: KeyLeaseConfig::default(),
            token_lifetime: Duration::from_secs(3600),
        }
    }
}

/// How [`DroneDatabase::pick_for_spawn`] chooses a drone.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How many eligible drones are sampled at random; the least loaded of them wins.
    /// Defaults to 2 ("the power of two choices": near-even load without every controller
    /// piling onto the same least-loaded drone). 1 is purely random.
    pub sample_size: i64,
    /// A drone not heard from for this long is not picked. Defaults to 30 s.
    pub drone_heartbeat_timeout: Duration,
    /// A drone whose controller has not heartbeated for this long is not picked. Defaults
    /// to 30 s.
    pub controller_heartbeat_timeout: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            sample_size: 2,
            drone_heartbeat_timeout: Duration::from_secs(30),
            controller_heartbeat_timeout: Duration::from_secs(30),
        }
    }
}

/// The lease a new backend's key starts with, as deadlines relative to its scheduling.
/// The key expires (may be taken over) at `hard_terminate_after`.
#[derive(Debug, Clone)]
pub struct KeyLeaseConfig {
    /// When the drone should renew the key. Defaults to 30 s.
    pub renew_after: Duration,
    /// When the drone should soft-terminate the backend if renewal failed. Defaults to 40 s.
    pub soft_terminate_after: Duration,
    /// When the drone should hard-terminate it, and when the key expires. Defaults to 50 s.
    pub hard_terminate_after: Duration,
}

impl Default for KeyLeaseConfig {
    fn default() -> Self {
        Self {
            renew_after: Duration::from_secs(30),
            soft_terminate_after: Duration::from_secs(40),
            hard_terminate_after: Duration::from_secs(50),
        }
    }
}

/// Opens a pool on `url` (not migrated) with the default [`ConnectOptions`]: 32 connections,
/// `application_name` `plane-db` (the listening connection `plane-db-listener`), a 30 s
/// `statement_timeout`. See [`connect_and_migrate`], and [`ConnectOptions`] to change them
/// or to run behind a pooler.
// The URL is not recorded: it may hold a password.
#[tracing::instrument(skip_all)]
pub async fn connect(url: &str) -> Result<PlaneDatabase> {
    ConnectOptions::new(url)?.connect().await
}

/// Applies the schema migrations on `url`, then opens a pool on it, with the default
/// [`ConnectOptions`] (see [`connect`]).
///
/// ```no_run
/// # async fn example() -> plane_db::Result<()> {
/// let db = plane_db::connect_and_migrate("postgres://postgres@127.0.0.1/plane").await?;
/// db.health_check().await?;
/// # Ok(()) }
/// ```
#[tracing::instrument(skip_all)]
pub async fn connect_and_migrate(url: &str) -> Result<PlaneDatabase> {
    ConnectOptions::new(url)?.connect_and_migrate().await
}

/// The data layer of a controller: cheap to clone (all clones share one pool and one event
/// bus). The bus stops when the last clone is dropped, which ends every subscription.
#[derive(Clone)]
pub struct PlaneDatabase {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    bus: EventBus,
    config: Config,
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
    /// on it. [`ConnectOptions`] builds both for you.
    pub fn with_listener(pool: PgPool, listener: PgConnectOptions, config: Config) -> Self {
        let listener = match listener.get_application_name() {
            Some(name) if !name.is_empty() => listener,
            _ => listener.application_name(&format!("{DEFAULT_APPLICATION_NAME}-listener")),
        };
        let acquire_timeout = pool.options().get_acquire_timeout();
        let listener = listener_pool(listener, String::new(), acquire_timeout);
        Self::with_listener_pool(pool, listener, config)
    }

    /// `listener`: a pool of one connection (see [`listener_pool`]).
    pub(crate) fn with_listener_pool(pool: PgPool, listener: PgPool, config: Config) -> Self {
        let bus = EventBus::new(pool.clone(), listener, config.bus.clone());
        Self {
            inner: Arc::new(Inner { pool, bus, config }),
        }
    }

    /// The pool, for callers that run their own queries or transactions (e.g. to
    /// [`emit`](crate::events::emit) an event together with their own change).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Checks that the database answers.
    #[tracing::instrument(skip(self))]
    pub async fn health_check(&self) -> Result<()> {
        sqlx::query!("select 1 as one")
            .fetch_one(self.pool())
            .await?;
        Ok(())
    }

    /// The `plane.event_wake` value for a transaction of ours that inserts events (see
    /// [`BusConfig::coalesce_wakeups`]).
    pub(crate) fn event_wake_setting(&self) -> &'static str {
        self.inner.bus.event_wake_setting()
    }

    /// To call after committing a transaction that set `plane.event_wake` to
    /// [`event_wake_setting`](Self::event_wake_setting) and inserted events.
    pub(crate) fn events_committed(&self) {
        self.inner.bus.committed();
    }

    /// Backends: lifecycle, routes, keepalives, termination candidates, cleanup.
    pub fn backend(&self) -> BackendDatabase<'_> {
        BackendDatabase::new(self)
    }

    /// Drones: registration, heartbeats, scheduling.
    pub fn drone(&self) -> DroneDatabase<'_> {
        DroneDatabase::new(self)
    }

    /// Nodes (drones, proxies, DNS servers) as registered with a controller.
    pub fn node(&self) -> NodeDatabase<'_> {
        NodeDatabase::new(self)
    }

    /// Controllers' heartbeats.
    pub fn controller(&self) -> ControllerDatabase<'_> {
        ControllerDatabase::new(self)
    }

    /// Key leases: renew, prevent renewal, remove expired, look up the holder.
    pub fn keys(&self) -> KeysDatabase<'_> {
        KeysDatabase::new(self)
    }

    /// Actions queued for drones: termination requests, pending actions, acknowledgements.
    pub fn backend_actions(&self) -> BackendActionDatabase<'_> {
        BackendActionDatabase::new(self)
    }

    /// ACME DNS-01 TXT records, leased to one proxy at a time.
    pub fn acme(&self) -> AcmeDatabase<'_> {
        AcmeDatabase::new(self)
    }

    /// Cluster overviews: connected drones and proxies.
    pub fn cluster(&self) -> ClusterDatabase<'_> {
        ClusterDatabase::new(self)
    }

    /// Subscribes to every event of type `T`. When this returns, the subscription is live:
    /// every such event committed afterwards will be delivered.
    #[tracing::instrument(skip(self), fields(kind = T::kind()))]
    pub async fn subscribe<T: NotificationPayload>(&self) -> Result<Subscription<T>> {
        let shared = self.inner.bus.ensure_started().await?;
        Ok(Subscription::new(shared, None))
    }

    /// Subscribes to events of type `T` with the given key (e.g. one backend's states).
    /// Live on return, like [`subscribe`](Self::subscribe).
    #[tracing::instrument(skip(self), fields(kind = T::kind()))]
    pub async fn subscribe_with_key<T: NotificationPayload>(
        &self,
        key: &str,
    ) -> Result<Subscription<T>> {
        let shared = self.inner.bus.ensure_started().await?;
        Ok(Subscription::new(shared, Some(key.to_string())))
    }

    /// Subscribes to every event of every kind, undecoded. Live on return.
    #[tracing::instrument(skip(self))]
    pub async fn subscribe_all_events(&self) -> Result<EventSubscription> {
        let shared = self.inner.bus.ensure_started().await?;
        Ok(EventSubscription::new(shared))
    }

    /// The id of the newest stored event, `None` if there are none: where to start
    /// [`get_events_since`](Self::get_events_since) to read only what is stored from now on.
    #[tracing::instrument(skip(self))]
    pub async fn latest_event_id(&self) -> Result<Option<i64>> {
        // Reads the primary key index backwards: one row, whatever the table's size.
        let id = sqlx::query_scalar!("select max(id) from event")
            .fetch_one(self.pool())
            .await?;
        Ok(id)
    }

    /// Persisted events with an id greater than `since`, in id order, at most `limit`.
    ///
    /// Ids are assigned at insert time, not at commit, so an event committed later may carry
    /// a smaller id than one already returned: use this to backfill history (e.g. resume a
    /// stream), and a subscription for what happens next.
    #[tracing::instrument(skip(self))]
    pub async fn get_events_since(&self, since: i64, limit: i64) -> Result<Vec<Event>> {
        check_non_negative("limit", limit)?;
        let rows = sqlx::query!(
            r#"
            select id, kind, key, created_at, data
            from event
            where id > $1
            order by id
            limit $2
            "#,
            since,
            limit,
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| Event {
                id: Some(row.id),
                kind: row.kind,
                key: row.key,
                created_at: row.created_at,
                data: row.data,
            })
            .collect())
    }
}
