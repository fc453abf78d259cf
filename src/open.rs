//! How a [`PlaneDatabase`](crate::PlaneDatabase) opens its connections: [`OpenOptions`] (the URLs, the pool's
//! size and timeouts, the settings every connection gets) and [`PoolerMode`] (what sits
//! between this process and Postgres).
//!
//! A process holds one pool (at most [`OpenOptions::max_connections`]) and one listening
//! connection for the event bus, opened on the first subscription. Each says who it is in
//! `pg_stat_activity.application_name`: `plane-db` and `plane-db-listener` by default (and
//! `plane-db-migrate` while migrations run). With streaming replicas, a pool per replica as
//! well, `plane-db-replica`.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::hosts::{parse_url, HostSet, HostWatch, ParsedUrl, PoolHosts};
use crate::migrate::migrate_on;
use crate::replicas::ReplicaPool;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The application name prefix when the caller sets none (neither with
/// [`OpenOptions::application_name`] nor in the URL nor in `PGAPPNAME`).
pub(crate) const DEFAULT_APPLICATION_NAME: &str = "plane-db";
const LISTENER_SUFFIX: &str = "-listener";
const MIGRATE_SUFFIX: &str = "-migrate";
const REPLICA_SUFFIX: &str = "-replica";
/// Postgres keeps the first 63 bytes of an application name (`NAMEDATALEN - 1`).
const MAX_APPLICATION_NAME: usize = 63;

/// What sits between this process and Postgres on the main URL.
///
/// PgBouncer (and poolers like it) hand each client connection a server connection either
/// for the client's whole session or for one transaction at a time. What the library does
/// differently in each case:
///
/// | | `Direct` | `Session` | `Transaction` |
/// |---|---|---|---|
/// | the bus's `LISTEN` connection | main URL | main URL, or the direct URL if given | the direct URL (required) |
/// | migrations ([`OpenOptions::open_and_migrate`]) | main URL | main URL | the direct URL |
/// | `statement_timeout`, `idle_in_transaction_session_timeout`, `jit = off` | `SET` on each new connection | `SET` on each new connection | not set: set them on the server (see below) |
/// | startup parameter `extra_float_digits` | sent (sqlx's default) | not sent | not sent |
///
/// **`Transaction` needs a pooler that supports protocol-level prepared statements**, such
/// as PgBouncer 1.21 or later with `max_prepared_statements` above 0 (the test suite runs
/// PgBouncer 1.18 only, so this combination is not tested here). sqlx prepares every
/// query as a named statement on the server connection and binds it in a second message
/// exchange; a transaction-mode pooler without that support (PgBouncer 1.18, as tested by
/// `tests/faults/pooler.rs`) lets another client's server connection receive the second
/// half. The result is `prepared statement "sqlx_s_1" already exists` / `does not exist`
/// errors with sqlx's default statement cache; a statement cache of 0 does not help (sqlx
/// 0.8 then still names every statement, and never deallocates them); and unnamed statements
/// (`persistent(false)`) silently return *another client's query's* results. With such a
/// pooler, put plane-db's database in session mode (`[databases] plane = … pool_mode=session`
/// in `pgbouncer.ini`) and use [`PoolerMode::Session`].
///
/// In transaction mode a `SET` would stay on the server connection and apply to whichever
/// client gets it next, so the library sets nothing; give plane-db's role its defaults on
/// the server instead, e.g. `ALTER ROLE plane SET statement_timeout = '30s'` and
/// `ALTER ROLE plane SET idle_in_transaction_session_timeout = '60s'` and
/// `ALTER ROLE plane SET jit = off` (they apply to every
/// new session of that role, direct or through the pooler). `application_name` is a startup
/// parameter that PgBouncer tracks per client, so it is right in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoolerMode {
    /// No pooler: the main URL reaches Postgres itself. The default.
    #[default]
    Direct,
    /// A pooler in session mode (PgBouncer `pool_mode = session`): a client connection keeps
    /// one server session until it closes, so everything works as direct, `LISTEN`
    /// included. Costs one server connection per pooled client connection: the pooler
    /// bounds and shares connections between processes, it does not multiplex them.
    Session,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`) that supports
    /// protocol-level prepared statements; see the type's documentation. Needs
    /// [`OpenOptions::direct_url`]: `LISTEN` and the migrations' advisory lock need a
    /// session of their own.
    Transaction,
}

/// How to open a [`PlaneDatabase`](crate::PlaneDatabase): the main URL and, behind a pooler, a direct one; the
/// pool's size and timeouts; the settings each connection gets; and the [`Config`].
/// Every default is documented on its setter, with its reason.
///
/// ```no_run
/// # async fn example() -> plane_db::Result<()> {
/// use plane_db::{OpenOptions, PoolerMode};
/// use std::time::Duration;
///
/// // Queries through PgBouncer; the event bus's LISTEN connection and the migrations
/// // straight to Postgres.
/// let db = OpenOptions::new("postgres://plane:secret@pgbouncer:6432/plane")?
///     .pooler(PoolerMode::Transaction)
///     .direct_url("postgres://plane:secret@db:5432/plane")?
///     .application_name("controller-eu1")
///     .max_connections(16)
///     .statement_timeout(Some(Duration::from_secs(10)))
///     .open_and_migrate()
///     .await?;
/// db.health_check().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct OpenOptions {
    main: ParsedUrl,
    direct: Option<ParsedUrl>,
    replicas: Vec<ParsedUrl>,
    host_check_interval: Duration,
    pooler: PoolerMode,
    application_name: Option<String>,
    max_connections: u32,
    acquire_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    statement_timeout: Option<Duration>,
    idle_in_transaction_session_timeout: Option<Duration>,
    config: Config,
}

/// The old name of [`OpenOptions`] (opening the database); `connect` now only means
/// [`PlaneDatabase::connect`](crate::PlaneDatabase::connect), getting or creating a backend.
#[deprecated(since = "0.2.0", note = "renamed to `OpenOptions`")]
pub type ConnectOptions = OpenOptions;

impl fmt::Debug for OpenOptions {
    // `PgConnectOptions`'s own `Debug` prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenOptions")
            .field("main", &described(&self.main))
            .field("direct", &self.direct.as_ref().map(described))
            .field(
                "replicas",
                &self.replicas.iter().map(described).collect::<Vec<_>>(),
            )
            .field("host_check_interval", &self.host_check_interval)
            .field("pooler", &self.pooler)
            .field("application_name", &self.application_prefix())
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_session_timeout",
                &self.idle_in_transaction_session_timeout,
            )
            .field("config", &self.config)
            .finish()
    }
}

impl OpenOptions {
    /// Options for the database at `url` (`postgres://user:password@host:port/database?…`,
    /// with libpq's parameters such as `sslmode`), with every default below.
    /// [`Error::InvalidArgument`] if it does not parse.
    ///
    /// The URL may list several hosts and say which fits, as libpq's do
    /// (`postgres://u:p@db1:5432,db2:5432/plane?target_session_attrs=read-write`): the
    /// pool then stays on a host that fits, moving when it fails over. The
    /// [`hosts`](crate::hosts) module says how; so does every other URL here.
    pub fn new(url: &str) -> Result<Self> {
        let mut options = Self::from_pg_options(PgConnectOptions::new_without_pgpass());
        options.main = parse_url("url", url)?;
        Ok(options)
    }

    /// Options for a database described by sqlx's options (for settings a URL cannot
    /// carry), with every default below.
    pub fn from_pg_options(options: PgConnectOptions) -> Self {
        Self {
            main: ParsedUrl {
                options,
                hosts: None,
            },
            direct: None,
            replicas: Vec::new(),
            host_check_interval: Duration::from_secs(1),
            pooler: PoolerMode::Direct,
            application_name: None,
            max_connections: 32,
            acquire_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            statement_timeout: Some(Duration::from_secs(30)),
            idle_in_transaction_session_timeout: Some(Duration::from_secs(60)),
            config: Config::default(),
        }
    }

    /// A URL that reaches Postgres itself, for the connections that need a session of their
    /// own when the main URL goes through a pooler: the event bus's `LISTEN` connection and
    /// the migrations. Required with [`PoolerMode::Transaction`]; with
    /// [`PoolerMode::Session`] it moves the listening connection off the pooler. None by
    /// default (everything uses the main URL).
    pub fn direct_url(mut self, url: &str) -> Result<Self> {
        self.direct = Some(parse_url("direct_url", url)?);
        Ok(self)
    }

    /// [`direct_url`](Self::direct_url), given as sqlx's options.
    pub fn direct_pg_options(mut self, options: PgConnectOptions) -> Self {
        self.direct = Some(ParsedUrl {
            options,
            hosts: None,
        });
        self
    }

    /// Adds a streaming replica of the main database (hot standby) that may serve route
    /// lookups, listings and status stream histories; call once per replica. Reads go to the
    /// replicas in turn, each skipped while its lag exceeds
    /// [`ReplicaConfig::max_lag`](crate::ReplicaConfig::max_lag) or after a read failed on
    /// it, and answers that could be a replica's lag (an unknown token, a pending backend)
    /// are read again on the primary: the [`replicas`](crate::replicas) module says exactly
    /// what is guaranteed. Writes, `connect` and the event bus stay on the main URL.
    ///
    /// Each replica gets a pool like the main one (same size, timeouts and settings, but
    /// [`ReplicaConfig::acquire_timeout`](crate::ReplicaConfig::acquire_timeout); named after
    /// the application name followed by `-replica`, `plane-db-replica` by default), opened
    /// lazily: a replica that is down when the database is opened does not fail
    /// [`open`](Self::open); reads go to the primary until its probe finds it. None by
    /// default.
    pub fn replica_url(mut self, url: &str) -> Result<Self> {
        self.replicas.push(parse_url("replica_url", url)?);
        Ok(self)
    }

    /// [`replica_url`](Self::replica_url), given as sqlx's options.
    pub fn replica_pg_options(mut self, options: PgConnectOptions) -> Self {
        self.replicas.push(ParsedUrl {
            options,
            hosts: None,
        });
        self
    }

    /// How often the host in use is checked, for each URL that lists several hosts (or
    /// gives `target_session_attrs`), on a connection of its own: the longest a pool keeps
    /// using a host after it failed or stopped fitting, before a search for another begins
    /// (new connections are checked as they open, whatever this is). Defaults to 1 s: a
    /// one-row query per second, against HA engines that take seconds to fail over.
    pub fn host_check_interval(mut self, interval: Duration) -> Self {
        self.host_check_interval = interval;
        self
    }

    /// What sits between this process and Postgres on the main URL. Defaults to
    /// [`PoolerMode::Direct`].
    pub fn pooler(mut self, mode: PoolerMode) -> Self {
        self.pooler = mode;
        self
    }

    /// The `application_name` of the pool's connections; the listening connection gets
    /// this name followed by `-listener`, and the migrations' connection `-migrate`, so that
    /// `pg_stat_activity` tells them apart. Defaults to the URL's `application_name` (or
    /// the `PGAPPNAME` environment variable), else `plane-db`. Cut to 54 bytes, so that the
    /// suffixes fit in Postgres's 63.
    pub fn application_name(mut self, name: &str) -> Self {
        self.application_name = Some(name.to_string());
        self
    }

    /// The most connections the pool opens. Defaults to 32: the benchmarks reach the
    /// library's write throughput with 32 concurrent writers, and 3 controllers (3 × 33
    /// connections with their listeners) stay within Postgres's default `max_connections`
    /// of 100. Each connection costs a Postgres backend process (a few MB).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// How long a call waits for a free connection of the pool (or for a new one to open)
    /// before failing with a pool timeout. Defaults to 10 s: long enough to ride out a
    /// burst or a brief restart, short enough that a caller gets an error rather than a
    /// hang when the database is unreachable or the pool is exhausted.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long a pooled connection may sit unused before the pool closes it. Defaults to
    /// 10 minutes (sqlx's default): a quiet controller gives its connections back to the
    /// server (and to a pooler) without reopening them for every burst. `None` keeps them.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a pooled connection lives before the pool replaces it (when it is next
    /// returned). Defaults to 30 minutes (sqlx's default): bounds the memory a long-lived
    /// Postgres backend accumulates (caches, prepared statements), and moves connections to a
    /// new server behind a changed DNS name or load balancer. `None` keeps them.
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// `statement_timeout` on each connection: Postgres cancels a statement (lock waits
    /// included) that runs longer, with SQLSTATE 57014. Defaults to 30 s: the library's own
    /// statements take milliseconds (a cleanup batch or an event page at most a few hundred),
    /// so only a stuck one reaches it, and it then frees its pool slot and its locks instead
    /// of holding them until someone notices. Raise it if you run long queries of your own
    /// through [`PlaneDatabase::pool`](crate::PlaneDatabase::pool). `None` leaves the server's setting (for the role or
    /// database); `Some(Duration::ZERO)` turns it off. Migrations run without it. Not set in
    /// [`PoolerMode::Transaction`] (see there).
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// `idle_in_transaction_session_timeout` on each connection: Postgres ends a session
    /// whose transaction sits idle (no statement running) for longer, releasing its locks
    /// and letting vacuum clean up behind it. Defaults to 60 s: the library's transactions
    /// never wait between statements, so only a caller's forgotten transaction (or a hung
    /// process) reaches it. The listening connection is never inside a transaction, so this
    /// cannot end it. `None` leaves the server's setting; `Some(Duration::ZERO)` turns it
    /// off. Not set in [`PoolerMode::Transaction`] (see there).
    pub fn idle_in_transaction_session_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_in_transaction_session_timeout = timeout;
        self
    }

    /// The scheduling, key, token and event-bus tuning. Defaults to `Config::default()`.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Opens the pool (one connection right away, so that a wrong URL or an unreachable
    /// server fails here) and prepares the listener's pool (connected on first use); what
    /// [`open`](Self::open) wraps into a database.
    pub(crate) async fn open_pools(self) -> Result<Opened> {
        self.check()?;
        let mut watch = HostWatch::default();
        let main_options = self.main_options();
        // With several hosts, the search runs first, so that no host fitting fails here
        // with every host's reason.
        let (main_set, found) = match &self.main.hosts {
            Some(list) => {
                let (conn, index) = crate::hosts::connect_fitting(list, &main_options).await?;
                let set = HostSet::new(list.clone(), "main".to_string(), index);
                (Some(set), Some(conn))
            }
            None => (None, None),
        };
        let main_hosts = main_set.as_ref().map(|set| PoolHosts {
            set: set.clone(),
            base: main_options.clone(),
        });
        let pool = hooked(
            self.pool_options(),
            self.pool_settings(),
            main_hosts.as_ref(),
        )
        .connect_with(
            main_hosts
                .as_ref()
                .map_or(main_options.clone(), PoolHosts::options),
        )
        .await?;
        let (listener, listener_hosts) = self.listener_pool(main_set.as_ref());
        let listener_moves = listener_hosts.as_ref().map(|hosts| hosts.set.moves());
        let mut main_pools = vec![(pool.clone(), main_options.clone())];
        match listener_hosts {
            Some(hosts)
                if main_set
                    .as_ref()
                    .is_some_and(|set| Arc::ptr_eq(set, &hosts.set)) =>
            {
                main_pools.push((listener.clone(), hosts.base));
            }
            Some(hosts) => {
                let monitor = hosts.base.clone();
                let pools = vec![(listener.clone(), hosts.base)];
                watch.watch(hosts.set, pools, monitor, None, self.host_check_interval);
            }
            None => {}
        }
        if let Some(set) = main_set {
            watch.watch(
                set,
                main_pools,
                main_options,
                found,
                self.host_check_interval,
            );
        }
        let replicas = self.replica_pools(&mut watch);
        let mut config = self.config;
        if self.pooler == PoolerMode::Transaction {
            // Group commit's lock timeout is a session setting of the batch writer's
            // connection, which would stay on the pooler's server connection for other
            // clients: it is off here (`update_state`'s batches still skip locked rows).
            config.write_batching.lock_timeout = Duration::ZERO;
        }
        Ok(Opened {
            pool,
            listener,
            replicas,
            config,
            hosts: watch,
            listener_moves,
        })
    }

    /// Applies the schema migrations (see [`open_and_migrate`](Self::open_and_migrate))
    /// and then [`open_pools`](Self::open_pools).
    pub(crate) async fn migrate_and_open_pools(self) -> Result<Opened> {
        self.check()?;
        self.migrate().await?;
        self.open_pools().await
    }

    /// Refuses a configuration that cannot work, before any connection is made.
    fn check(&self) -> Result<()> {
        self.config.validate()?;
        if self.pooler == PoolerMode::Transaction && self.direct.is_none() {
            return Err(Error::InvalidArgument {
                argument: "direct_url",
                reason: "PoolerMode::Transaction needs a direct URL to Postgres for the event \
                         bus's LISTEN connection and the migrations (a transaction-mode \
                         pooler shares sessions between clients)"
                    .to_string(),
            });
        }
        if self.max_connections == 0 {
            return Err(Error::InvalidArgument {
                argument: "max_connections",
                reason: "must be at least 1".to_string(),
            });
        }
        Ok(())
    }

    /// The application name prefix: the caller's, the URL's (or `PGAPPNAME`), or the default.
    fn application_prefix(&self) -> String {
        let name = self
            .application_name
            .as_deref()
            .or(self.main.options.get_application_name())
            .filter(|name| !name.is_empty())
            .unwrap_or(DEFAULT_APPLICATION_NAME);
        truncate(name, MAX_APPLICATION_NAME - LISTENER_SUFFIX.len()).to_string()
    }

    fn through_pooler(&self) -> bool {
        self.pooler != PoolerMode::Direct
    }

    fn main_options(&self) -> PgConnectOptions {
        let options = self
            .main
            .options
            .clone()
            .application_name(&self.application_prefix());
        if self.through_pooler() {
            // PgBouncer refuses startup parameters it does not know unless told to ignore
            // them. Postgres 12 and later print floats exactly without it.
            options.extra_float_digits(None)
        } else {
            options
        }
    }

    /// Where the connections that need a session of their own go.
    fn session_target(&self) -> &ParsedUrl {
        self.direct.as_ref().unwrap_or(&self.main)
    }

    /// The pool's size and timeouts, without hooks (see [`hooked`]).
    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(self.idle_timeout)
            .max_lifetime(self.max_lifetime)
    }

    /// What runs on each new connection of the pool.
    fn pool_settings(&self) -> String {
        match self.pooler {
            // A SET would stay on the pooler's server connection, for other clients.
            PoolerMode::Transaction => String::new(),
            PoolerMode::Direct | PoolerMode::Session => {
                let mut settings = session_settings(&[
                    ("statement_timeout", self.statement_timeout),
                    (
                        "idle_in_transaction_session_timeout",
                        self.idle_in_transaction_session_timeout,
                    ),
                ]);
                // The library's statements read a handful of rows each. Once the history
                // tables reach millions of rows, the planner's cost estimates pass the JIT
                // thresholds and compiling takes most of a statement's time (the bench's
                // `growth` section: the bus's read of one new event at 10^7 history rows took
                // 61 ms with JIT, 46 ms of them compiling, and 1.6 ms without). For the same
                // reason no statement gets parallel workers: the bus read's generic plan at
                // 10^6 event rows gathered one row from two workers, 13.8 ms of a 13.9 ms
                // execution spent in the `Gather Merge` (the rows it read took 0.03 ms).
                settings.push_str("SET jit = off; SET max_parallel_workers_per_gather = 0;");
                settings
            }
        }
    }

    /// A pool per replica, like the main pool but opened lazily, named `…-replica`. A
    /// replica URL with several hosts gets a watch of its own in `watch` (started here, so
    /// within a Tokio runtime).
    fn replica_pools(&self, watch: &mut HostWatch) -> Vec<ReplicaPool> {
        let name = format!("{}{REPLICA_SUFFIX}", self.application_prefix());
        self.replicas
            .iter()
            .enumerate()
            .map(|(index, url)| {
                let options = url.options.clone().application_name(&name);
                let options = if self.through_pooler() {
                    options.extra_float_digits(None)
                } else {
                    options
                };
                let hosts = url.hosts.clone().map(|list| PoolHosts {
                    set: HostSet::new(list, format!("replica {}", index + 1), 0),
                    base: options.clone(),
                });
                let pool = hooked(
                    self.pool_options()
                        .acquire_timeout(self.config.replicas.acquire_timeout),
                    self.pool_settings(),
                    hosts.as_ref(),
                )
                .connect_lazy_with(hosts.as_ref().map_or(options.clone(), PoolHosts::options));
                if let Some(hosts) = hosts {
                    let pools = vec![(pool.clone(), hosts.base.clone())];
                    watch.watch(hosts.set, pools, hosts.base, None, self.host_check_interval);
                }
                ReplicaPool {
                    endpoint: described(url),
                    pool,
                }
            })
            .collect()
    }

    /// The listener's pool, and its hosts when its URL lists several: those of `main_set`
    /// when it connects through the main URL.
    fn listener_pool(&self, main_set: Option<&Arc<HostSet>>) -> (PgPool, Option<PoolHosts>) {
        let target = self.session_target();
        let options = target
            .options
            .clone()
            .application_name(&format!("{}{LISTENER_SUFFIX}", self.application_prefix()))
            .extra_float_digits(None);
        let set = match (&self.direct, main_set) {
            (None, Some(set)) => Some(set.clone()),
            _ => target
                .hosts
                .clone()
                .map(|list| HostSet::new(list, "direct".to_string(), 0)),
        };
        let hosts = set.map(|set| PoolHosts {
            set,
            base: options.clone(),
        });
        // The same timeouts as the pool (harmless: the connection only runs LISTEN and is
        // never inside a transaction), and no idle-session timeout, which would end it.
        let settings = session_settings(&[
            ("statement_timeout", self.statement_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout,
            ),
        ]);
        let pool = listener_pool(options, settings, self.acquire_timeout, hosts.as_ref());
        (pool, hosts)
    }

    async fn migrate(&self) -> Result<()> {
        let target = self.session_target();
        let options = target
            .options
            .clone()
            .application_name(&format!("{}{MIGRATE_SUFFIX}", self.application_prefix()))
            .extra_float_digits(None);
        let mut conn = match &target.hosts {
            Some(list) => crate::hosts::connect_fitting(list, &options).await?.0,
            None => PgConnection::connect_with(&options).await?,
        };
        // A migration may rewrite a table or build an index: no statement timeout (a role
        // default included) may cut it short.
        let settings = session_settings(&[
            ("statement_timeout", Some(Duration::ZERO)),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout,
            ),
        ]);
        conn.execute(settings.as_str()).await?;
        // A connection of its own, closed afterwards (which also releases the migration lock
        // if unlocking failed).
        let (migrated, _) = migrate_on(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        Ok(())
    }
}

/// `user@host:port/database`: where `options` connect, without the password.
fn endpoint(options: &PgConnectOptions) -> String {
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    )
}

/// [`endpoint`], with every host when the URL lists several (`user@h1:p1,h2:p2/database`).
fn described(url: &ParsedUrl) -> String {
    let options = &url.options;
    match &url.hosts {
        None => endpoint(options),
        Some(list) => format!(
            "{}@{}/{}",
            options.get_username(),
            (0..list.hosts.len())
                .map(|index| list.describe(index))
                .collect::<Vec<_>>()
                .join(","),
            options.get_database().unwrap_or("")
        ),
    }
}

/// `SET name = value;` for each setting given, value in milliseconds (a non-zero duration
/// below 1 ms counts as 1 ms, since 0 turns the timeout off; Postgres takes at most
/// `i32::MAX` ms, about 24.8 days). Run with the simple query protocol, in one round trip.
fn session_settings(settings: &[(&str, Option<Duration>)]) -> String {
    let mut sql = String::new();
    for (name, value) in settings {
        if let Some(value) = value {
            sql.push_str(&format!("SET {name} = {};", millis(*value)));
        }
    }
    sql
}

fn millis(duration: Duration) -> u64 {
    if duration.is_zero() {
        return 0;
    }
    let ms = duration.as_nanos().div_ceil(1_000_000);
    ms.clamp(1, i32::MAX as u128) as u64
}

/// Runs `settings` (if any) on every new connection of the pool; with `hosts`, checks the
/// connection's host first and retires connections to a host left behind (see
/// [`PoolHosts::hook`]).
fn hooked(options: PgPoolOptions, settings: String, hosts: Option<&PoolHosts>) -> PgPoolOptions {
    let settings: Arc<str> = settings.into();
    if let Some(hosts) = hosts {
        return hosts.hook(options, settings);
    }
    if settings.is_empty() {
        return options;
    }
    options.after_connect(move |conn, _| apply_settings(conn, settings.clone()))
}

fn apply_settings(conn: &mut PgConnection, settings: Arc<str>) -> BoxFuture<'_, sqlx::Result<()>> {
    Box::pin(async move {
        // A string without arguments runs with the simple query protocol: no prepared
        // statement, all statements in one round trip.
        conn.execute(&*settings).await?;
        Ok(())
    })
}

/// The pool of the event bus's listening connection: one connection, opened on the first
/// subscription (and again after a loss), never closed for being idle or old. Room for two:
/// a listener whose connection failed with a server error (e.g. terminated) still holds it
/// while the bus opens the next one; the dead one is closed when it is given back. `settings`
/// run on it first, then `idle_session_timeout` (Postgres 14 and later) is turned off: the
/// connection is idle by design, between notifications.
pub(crate) fn listener_pool(
    options: PgConnectOptions,
    settings: String,
    acquire_timeout: Duration,
    hosts: Option<&PoolHosts>,
) -> PgPool {
    let settings = format!(
        "{settings}SELECT set_config(name, '0', false) FROM pg_settings \
         WHERE name = 'idle_session_timeout';"
    );
    let pool_options = PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(acquire_timeout);
    let options = hosts.map_or(options, PoolHosts::options);
    hooked(pool_options, settings, hosts).connect_lazy_with(options)
}

/// The listening connection's options for a pool built by the caller: the pool's, named
/// after its application name (or `plane-db`) followed by `-listener`.
pub(crate) fn listener_options_for(pool: &PgPool) -> PgConnectOptions {
    let options = pool.connect_options().as_ref().clone();
    let prefix = options
        .get_application_name()
        .filter(|name| !name.is_empty())
        .unwrap_or(DEFAULT_APPLICATION_NAME);
    let name = format!(
        "{}{LISTENER_SUFFIX}",
        truncate(prefix, MAX_APPLICATION_NAME - LISTENER_SUFFIX.len())
    );
    options.application_name(&name)
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A pool, the listener's pool and the replicas' pools, opened by [`OpenOptions`], with
/// the configuration.
pub(crate) struct Opened {
    pub(crate) pool: PgPool,
    pub(crate) listener: PgPool,
    pub(crate) replicas: Vec<ReplicaPool>,
    pub(crate) config: Config,
    /// The tasks that keep multi-host pools on a fitting host.
    pub(crate) hosts: HostWatch,
    /// Changes when the listener's pool moves to another host.
    pub(crate) listener_moves: Option<watch::Receiver<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 0);
        assert_eq!(
            millis(Duration::from_micros(1)),
            1,
            "never 0, which means off"
        );
        assert_eq!(millis(Duration::from_micros(1_500)), 2);
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::from_secs(u64::MAX)), i32::MAX as u64);
        assert_eq!(
            session_settings(&[
                ("statement_timeout", Some(Duration::from_secs(30))),
                ("idle_in_transaction_session_timeout", None),
            ]),
            "SET statement_timeout = 30000;"
        );
        assert_eq!(session_settings(&[("statement_timeout", None)]), "");
    }

    #[test]
    fn application_names() {
        let options = OpenOptions::new("postgres://u@h/db").unwrap();
        // PGAPPNAME, when the test runner has it, is the caller's choice like the URL's.
        let expected = std::env::var("PGAPPNAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "plane-db".to_string());
        assert_eq!(options.application_prefix(), expected);
        let options = OpenOptions::new("postgres://u@h/db?application_name=ctl").unwrap();
        assert_eq!(options.application_prefix(), "ctl");
        assert_eq!(
            options.application_name("mine").application_prefix(),
            "mine"
        );
        let long = "é".repeat(40);
        let options = OpenOptions::new("postgres://u@h/db")
            .unwrap()
            .application_name(&long);
        let prefix = options.application_prefix();
        assert!(prefix.len() <= 54 && prefix.len() >= 53, "{}", prefix.len());
        assert!(long.starts_with(&prefix));
    }

    #[test]
    fn bad_urls_and_settings_are_refused() {
        assert!(matches!(
            OpenOptions::new("mysql://h/db"),
            Err(Error::InvalidArgument {
                argument: "url",
                ..
            })
        ));
        let options = OpenOptions::new("postgres://u@h/db").unwrap();
        assert!(matches!(
            options.clone().direct_url("not a url"),
            Err(Error::InvalidArgument {
                argument: "direct_url",
                ..
            })
        ));
        assert!(matches!(
            options.clone().pooler(PoolerMode::Transaction).check(),
            Err(Error::InvalidArgument {
                argument: "direct_url",
                ..
            })
        ));
        assert!(matches!(
            options.clone().replica_url("mysql://r/db"),
            Err(Error::InvalidArgument {
                argument: "replica_url",
                ..
            })
        ));
        assert!(matches!(
            options.clone().max_connections(0).check(),
            Err(Error::InvalidArgument {
                argument: "max_connections",
                ..
            })
        ));
        assert!(options.check().is_ok());
    }

    #[test]
    fn debug_hides_the_password() {
        let options = OpenOptions::new("postgres://u:hunter2@h/db")
            .unwrap()
            .direct_url("postgres://u:hunter3@d/db")
            .unwrap()
            .replica_url("postgres://u:hunter4@r/db")
            .unwrap();
        let text = format!("{options:?}");
        assert!(!text.contains("hunter"), "{text}");
        assert!(text.contains("u@h:5432/db"), "{text}");
        assert!(text.contains("u@r:5432/db"), "{text}");
    }

    #[tokio::test]
    async fn replica_pools_are_named_and_lazy() {
        let options = OpenOptions::new("postgres://u:secret@h/db")
            .unwrap()
            .application_name("ctl")
            .replica_url("postgres://u:secret@r1/db")
            .unwrap()
            .replica_url("postgres://u:secret@r2:5433/db")
            .unwrap();
        let replicas = options.replica_pools(&mut HostWatch::default());
        let endpoints: Vec<&str> = replicas.iter().map(|r| r.endpoint.as_str()).collect();
        assert_eq!(endpoints, ["u@r1:5432/db", "u@r2:5433/db"]);
        for replica in &replicas {
            let connect = replica.pool.connect_options();
            assert_eq!(connect.get_application_name(), Some("ctl-replica"));
            // Lazy: nothing was opened (nothing listens at r1 or r2).
            assert_eq!(replica.pool.size(), 0);
            assert_eq!(
                replica.pool.options().get_acquire_timeout(),
                crate::ReplicaConfig::default().acquire_timeout
            );
        }
    }
}
