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
use crate::plane055::{self, PlaneConversionReport};
use crate::types::ClusterName;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// The schema migrations (`migrations/`), embedded at compile time.
///
/// Apply them with [`migrate`] (which [`connect_and_migrate`] calls): it lets a build run
/// against a database that a *newer* build has already migrated, which sqlx's own
/// `MIGRATOR.run(&pool)` refuses ("migration N was previously applied but is missing").
///
/// # Policy: migrations are additive
///
/// Controllers are upgraded one at a time, so for a while old and new builds share one
/// database, and an old one may restart after a new one migrated it. That works because
/// every migration only *expands* the schema: new tables, new nullable columns (or columns
/// with a default), new indexes, new functions. Whatever an old build reads or writes keeps
/// its meaning. Removing or renaming a column or table, tightening a constraint, or
/// changing what a column holds (the *contract* step) waits for a later release, once no
/// build that uses the old shape runs. Never edit a committed migration: its checksum is
/// recorded, and [`migrate`] refuses a database whose applied migration differs from the
/// build's.
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
    /// The cluster a backend is spawned in when its spawn config names none (Plane's
    /// controller option of the same name). Defaults to none: then a spawn config without
    /// a cluster is [`ConnectError::NoClusterProvided`](crate::ConnectError::NoClusterProvided).
    pub default_cluster: Option<ClusterName>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bus: BusConfig::default(),
            scheduler: SchedulerConfig::default(),
            key_lease: KeyLeaseConfig::default(),
            token_lifetime: Duration::from_secs(3600),
            default_cluster: None,
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

/// The lease of a backend's key, as deadlines relative to its scheduling or to a renewal.
///
/// The drone is told to renew at `renew_after`, to soft-terminate the backend at
/// `soft_terminate_after` and to hard-terminate it at `hard_terminate_after` if renewal
/// failed; the key itself expires (and may be taken over by a new backend) only
/// `expiration_margin` later, [`expires_after`](Self::expires_after) in all. As in Plane 0.5.5
/// (renew 30 s, soft 40 s, hard 50 s, expiry 60 s), a key outlives the hard-terminate
/// deadline, so a backend has been stopped before another can take its key, even if the
/// drone's clock or its connection lags a little.
#[derive(Debug, Clone)]
pub struct KeyLeaseConfig {
    /// When the drone should renew the key. Defaults to 30 s.
    pub renew_after: Duration,
    /// When the drone should soft-terminate the backend if renewal failed. Defaults to 40 s.
    pub soft_terminate_after: Duration,
    /// When the drone should hard-terminate it if renewal failed. Defaults to 50 s.
    pub hard_terminate_after: Duration,
    /// How long after the hard-terminate deadline the key stays held. Defaults to 10 s
    /// (Plane's margin). A renewal within it is granted; a `connect` for the key within it
    /// gets the existing backend. Zero makes the key expire at the hard-terminate deadline.
    pub expiration_margin: Duration,
}

impl KeyLeaseConfig {
    /// How long after its scheduling or renewal a key expires:
    /// `hard_terminate_after + expiration_margin` (60 s by default).
    pub fn expires_after(&self) -> Duration {
        self.hard_terminate_after
            .saturating_add(self.expiration_margin)
    }
}

impl Default for KeyLeaseConfig {
    fn default() -> Self {
        Self {
            renew_after: Duration::from_secs(30),
            soft_terminate_after: Duration::from_secs(40),
            hard_terminate_after: Duration::from_secs(50),
            expiration_margin: Duration::from_secs(10),
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

/// Applies the schema migrations on `url` with the rules of [`migrate`] (so it also starts
/// against a database that a newer build migrated, converts one that Plane 0.5.5 migrated,
/// and needs no DDL privilege when the schema is up to date), then opens a pool on it, with the default [`ConnectOptions`] (see
/// [`connect`]).
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

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[derive(serde::Serialize)]
pub struct MigrationReport {
    /// The versions this call applied, in order; empty when the schema was up to date.
    pub applied: Vec<i64>,
    /// Versions applied in the database that this build does not know, all newer than its
    /// own: a newer build migrated the database (an upgrade is under way, or was rolled
    /// back). Empty otherwise.
    pub newer_unknown: Vec<i64>,
    /// This build's newest migration (applied now); `None` if it has none.
    /// Serialized as `schema_version`.
    #[serde(rename = "schema_version")]
    pub latest_known: Option<i64>,
    /// Set when this call converted a database that Plane 0.5.5 migrated: what it copied.
    /// `None` otherwise (also when another controller converted it first).
    pub converted_from_plane: Option<PlaneConversionReport>,
}

/// Applies the migrations of [`MIGRATOR`] that the database lacks, under the additive policy
/// described there:
///
/// - an applied migration that this build does not know is accepted when it is newer than
///   all of this build's (a newer controller migrated the database); it is logged as a
///   warning and listed in [`MigrationReport::newer_unknown`];
/// - one that is older than this build's newest is refused
///   ([`SchemaError::UnknownOlder`](crate::error::SchemaError::UnknownOlder)): the database
///   and the build have diverging histories;
/// - so is a database that has such newer migrations but lacks one of this build's
///   ([`SchemaError::MissingBeforeNewer`](crate::error::SchemaError::MissingBeforeNewer));
/// - an applied migration whose text differs from this build's is refused
///   ([`SchemaError::ChecksumMismatch`](crate::error::SchemaError::ChecksumMismatch)).
///
/// A database that **Plane 0.5.5** migrated (its `_sqlx_migrations` holds exactly Plane
/// 0.5.5's versions and checksums) is converted in place first, in one transaction: its
/// tables are replaced by plane-db's, with every row copied over (bearer tokens become their
/// SHA-256 digests, so every token Plane issued still routes; backend names, keys, fencing
/// tokens, actions and events are kept), and then this build's later migrations are applied
/// as usual ([`MigrationReport::converted_from_plane`] says what was copied). A conversion
/// that fails changes nothing ([`Error::PlaneConversion`](crate::Error::PlaneConversion)).
/// A database with only the first of Plane 0.5.5's migrations (an older Plane) is refused
/// ([`SchemaError::PlaneOlder`](crate::error::SchemaError::PlaneOlder)), and so is one
/// with other Plane migrations, unknown ones or edited ones
/// ([`SchemaError::PlaneUnrecognized`](crate::error::SchemaError::PlaneUnrecognized)). See
/// the README, "Moving from Plane 0.5.5".
///
/// When every migration of this build is applied, it only reads `_sqlx_migrations`: an
/// application role without DDL privileges can run it. Otherwise it takes sqlx's advisory
/// lock (the one `MIGRATOR.run` takes) and reads again under it, so controllers migrating one
/// database at the same time apply each migration once (and convert a Plane database once).
#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> Result<MigrationReport> {
    let mut conn = pool.acquire().await?;
    let (result, poisoned) = migrate_on(&mut conn).await;
    if poisoned {
        // It may still hold the advisory lock: closing it releases the lock.
        conn.close_on_drop();
    }
    result
}

/// [`migrate`] on one connection. The flag says the connection must not be reused (it failed,
/// or could not release the migration lock, which belongs to the session).
pub(crate) async fn migrate_on(conn: &mut sqlx::PgConnection) -> (Result<MigrationReport>, bool) {
    match migrate_inner(conn).await {
        Ok((report, poisoned)) => (Ok(report), poisoned),
        Err(error) => (Err(error), true),
    }
}

async fn migrate_inner(conn: &mut sqlx::PgConnection) -> Result<(MigrationReport, bool)> {
    use sqlx::migrate::Migrate;
    let known: Vec<&sqlx::migrate::Migration> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let mut poisoned = false;
    let up_to_date = match applied_migrations(&mut *conn).await? {
        // Plane 0.5.5's database: converted under the lock.
        Some(applied) if plane055::is_plane_055(&applied)? => None,
        Some(applied) => Some(plan(&known, &applied)?).filter(|plan| plan.to_apply.is_empty()),
        None => None,
    };
    let report = match up_to_date {
        Some(plan) => plan.report(Vec::new(), None),
        None => {
            conn.lock().await?;
            let outcome = apply_locked(&mut *conn, &known).await?;
            // The advisory lock belongs to the session: a connection that could not release
            // it is closed (which releases it) rather than reused.
            poisoned = conn.unlock().await.is_err();
            outcome
        }
    };
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, "applied schema migrations");
    }
    if !report.newer_unknown.is_empty() {
        tracing::warn!(
            newer = ?report.newer_unknown,
            latest_known = ?report.latest_known,
            "the database has migrations newer than this build's (a newer build applied them); \
             carrying on, since migrations only add to the schema"
        );
    }
    Ok((report, poisoned))
}

/// The migrations recorded as applied, or `None` when `_sqlx_migrations` does not exist yet
/// (a fresh database).
async fn applied_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<Vec<sqlx::migrate::AppliedMigration>>> {
    use sqlx::migrate::{Migrate, MigrateError};
    /// Postgres' `undefined_table` error code.
    const UNDEFINED_TABLE: &str = "42P01";
    match conn.list_applied_migrations().await {
        Ok(applied) => Ok(Some(applied)),
        Err(MigrateError::Execute(sqlx::Error::Database(error)))
            if error.code().as_deref() == Some(UNDEFINED_TABLE) =>
        {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// Under the migration lock: creates `_sqlx_migrations` if needed, plans against what is
/// applied now, and applies what is missing, each migration in its own transaction.
async fn apply_locked(
    conn: &mut sqlx::PgConnection,
    known: &[&sqlx::migrate::Migration],
) -> Result<MigrationReport> {
    use sqlx::migrate::{Migrate, MigrateError};
    conn.ensure_migrations_table().await?;
    if let Some(version) = conn.dirty_version().await? {
        return Err(MigrateError::Dirty(version).into());
    }
    let mut applied = conn.list_applied_migrations().await?;
    // Read under the lock: another controller may have converted it meanwhile.
    let converted = if plane055::is_plane_055(&applied)? {
        let report = plane055::convert(&mut *conn, known).await?;
        applied = conn.list_applied_migrations().await?;
        Some(report)
    } else {
        None
    };
    let plan = plan(known, &applied)?;
    let mut done = Vec::with_capacity(plan.to_apply.len());
    for migration in &plan.to_apply {
        conn.apply(migration).await?;
        done.push(migration.version);
    }
    Ok(plan.report(done, converted))
}

/// What to apply, and the applied migrations newer than this build's.
#[derive(Debug)]
struct Plan<'a> {
    to_apply: Vec<&'a sqlx::migrate::Migration>,
    newer_unknown: Vec<i64>,
    latest_known: Option<i64>,
}

impl Plan<'_> {
    fn report(
        self,
        applied: Vec<i64>,
        converted_from_plane: Option<PlaneConversionReport>,
    ) -> MigrationReport {
        MigrationReport {
            applied,
            newer_unknown: self.newer_unknown,
            latest_known: self.latest_known,
            converted_from_plane,
        }
    }
}

/// Compares this build's migrations with the applied ones (see [`migrate`] for the rules).
fn plan<'a>(
    known: &[&'a sqlx::migrate::Migration],
    applied: &[sqlx::migrate::AppliedMigration],
) -> Result<Plan<'a>, crate::error::SchemaError> {
    use crate::error::SchemaError;
    let latest_known = known.iter().map(|m| m.version).max();
    let mut newer_unknown = Vec::new();
    for record in applied {
        match (
            known.iter().find(|m| m.version == record.version),
            latest_known,
        ) {
            (Some(migration), _) if migration.checksum != record.checksum => {
                return Err(SchemaError::ChecksumMismatch {
                    version: record.version,
                    description: migration.description.to_string(),
                });
            }
            (Some(_), _) => {}
            (None, Some(latest)) if record.version < latest => {
                return Err(SchemaError::UnknownOlder {
                    version: record.version,
                    latest_known: latest,
                });
            }
            (None, _) => newer_unknown.push(record.version),
        }
    }
    newer_unknown.sort_unstable();
    let mut to_apply: Vec<&sqlx::migrate::Migration> = known
        .iter()
        .filter(|m| !applied.iter().any(|record| record.version == m.version))
        .copied()
        .collect();
    to_apply.sort_by_key(|m| m.version);
    if let (Some(missing), Some(&newer)) = (to_apply.first(), newer_unknown.first()) {
        return Err(SchemaError::MissingBeforeNewer {
            version: missing.version,
            newer,
        });
    }
    Ok(Plan {
        to_apply,
        newer_unknown,
        latest_known,
    })
}

#[cfg(test)]
mod migration_plan_tests {
    use super::plan;
    use crate::error::SchemaError;
    use sqlx::migrate::{AppliedMigration, Migration, MigrationType};

    fn migration(version: i64, sql: &'static str) -> Migration {
        Migration::new(
            version,
            format!("m{version}").into(),
            MigrationType::Simple,
            sql.into(),
            false,
        )
    }

    fn applied(migration: &Migration) -> AppliedMigration {
        AppliedMigration {
            version: migration.version,
            checksum: migration.checksum.clone(),
        }
    }

    fn unknown(version: i64) -> AppliedMigration {
        applied(&migration(version, "select 'not ours'"))
    }

    #[test]
    fn a_fresh_database_gets_everything_in_order() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let plan = plan(&[&b, &a], &[]).unwrap();
        let versions: Vec<i64> = plan.to_apply.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![1, 2]);
        assert!(plan.newer_unknown.is_empty());
        assert_eq!(plan.latest_known, Some(2));
    }

    #[test]
    fn newer_unknown_migrations_are_accepted_and_listed() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let plan = plan(
            &[&a, &b],
            &[applied(&a), applied(&b), unknown(3), unknown(4)],
        )
        .unwrap();
        assert!(plan.to_apply.is_empty());
        assert_eq!(plan.newer_unknown, vec![3, 4]);
    }

    #[test]
    fn an_unknown_migration_older_than_ours_is_refused() {
        let (a, c) = (migration(1, "a"), migration(3, "c"));
        let error = plan(&[&a, &c], &[applied(&a), unknown(2), applied(&c)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::UnknownOlder {
                version: 2,
                latest_known: 3
            }
        );
        // Also when ours is not applied yet.
        let error = plan(&[&a, &c], &[applied(&a), unknown(2)]).unwrap_err();
        assert!(matches!(
            error,
            SchemaError::UnknownOlder { version: 2, .. }
        ));
    }

    #[test]
    fn a_missing_migration_under_a_newer_schema_is_refused() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let error = plan(&[&a, &b], &[applied(&a), unknown(3)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::MissingBeforeNewer {
                version: 2,
                newer: 3
            }
        );
    }

    #[test]
    fn an_edited_migration_is_refused() {
        let a = migration(1, "a");
        let edited = migration(1, "a, edited");
        let error = plan(&[&a], &[applied(&edited)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::ChecksumMismatch {
                version: 1,
                description: "m1".into()
            }
        );
        assert!(error.to_string().contains("checksum"), "{error}");
    }
}
