//! Running behind PgBouncer (issue 11) and connection hygiene, against a real PgBouncer
//! (`plane_db::testing::TestServer::pgbouncer`) in front of a private throwaway server.
//!
//! - Session mode, everything through PgBouncer: a backend's life with its status stream, and
//!   16 concurrent writers whose every event a subscriber receives exactly once.
//! - A transaction-mode PgBouncer with plane-db's database in session mode and the listening
//!   connection direct: the same.
//! - Transaction mode proper, on PgBouncer 1.18: why sqlx's queries cannot run through it
//!   (named statements collide, a statement cache of 0 does not help and leaks statements,
//!   unnamed statements return other clients' results), and how settings behave there (a
//!   `SET` leaks to other clients; the library sets none; server-side defaults apply).
//! - Hygiene: the pool's and the listener's `application_name`, `statement_timeout`,
//!   `idle_in_transaction_session_timeout`, and a listener that an `idle_session_timeout`
//!   does not end; and why settings are `SET` after connecting rather than startup
//!   parameters (PgBouncer refuses `options` and `extra_float_digits`, or drops `options`).
//! - The cost of PgBouncer (session mode) and of turning sqlx's statement cache off, measured
//!   on route lookups in one run (printed, not asserted).
//!
//! PgBouncer and the PostgreSQL binaries must be installed: the tests fail, saying so,
//! without them.

use crate::common::{drone, lifecycle, spawn};
use crate::support::*;
use futures_util::StreamExt;
use plane_db::backend::RouteInfoResult;
use plane_db::events::Lagged;
use plane_db::testing::{
    private_server, PgBouncerMode, PgBouncerOptions, TestPgBouncer, TestServer,
};
use plane_db::types::{BackendName, BackendState, BackendStatus};
use plane_db::{Error, OpenOptions, PlaneDatabase, PoolerMode};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 16;
const BACKENDS: usize = 64;
/// A subscriber that hears nothing for this long after the writers finished has lost events.
const IDLE: Duration = Duration::from_secs(15);

/// A private throwaway server with a fresh, migrated database, and possibly a PgBouncer in
/// front of it.
struct Fixture {
    server: Arc<TestServer>,
    bouncer: Option<TestPgBouncer>,
    database: String,
    direct_url: String,
    /// A small pool straight to the database, for looking at `pg_stat_activity`.
    observer: PgPool,
}

impl Fixture {
    /// `bouncer` picks the PgBouncer's options knowing the database's name (`None`: no
    /// PgBouncer).
    async fn start(bouncer: impl FnOnce(&str) -> Option<PgBouncerOptions>) -> Fixture {
        let server = tokio::task::spawn_blocking(private_server)
            .await
            .unwrap()
            .expect("a private throwaway server (needs the PostgreSQL server binaries)");
        let server = Arc::new(server);
        let database = server.create_database().await.unwrap();
        migrate(&database.url).await;
        let bouncer = match bouncer(&database.name) {
            Some(options) => {
                let s = server.clone();
                let started = tokio::task::spawn_blocking(move || s.pgbouncer(&options))
                    .await
                    .unwrap();
                Some(started.expect("a PgBouncer (needs the pgbouncer binary)"))
            }
            None => None,
        };
        let observer = PgPool::connect(&database.url).await.unwrap();
        Fixture {
            server,
            bouncer,
            database: database.name,
            direct_url: database.url,
            observer,
        }
    }

    fn bouncer(&self) -> &TestPgBouncer {
        self.bouncer.as_ref().expect("this fixture has a PgBouncer")
    }

    fn bouncer_url(&self) -> String {
        self.bouncer().url_for(&self.database)
    }

    /// Runs `scenario` bounded by [`SCENARIO_TIMEOUT`], then stops PgBouncer and the server.
    async fn run<Fut: Future<Output = ()>>(self, scenario: impl FnOnce(Arc<Fixture>) -> Fut) {
        let fixture = Arc::new(self);
        tokio::time::timeout(SCENARIO_TIMEOUT, scenario(fixture.clone()))
            .await
            .expect("scenario timed out");
        let fixture = Arc::into_inner(fixture).expect("the scenario kept no fixture");
        fixture.observer.close().await;
        tokio::task::spawn_blocking(move || {
            drop(fixture.bouncer);
            drop(fixture.server);
        })
        .await
        .unwrap();
    }

    /// `(application_name, pid)` of every other connection to the database, seen by the
    /// server.
    async fn sessions(&self) -> Vec<(String, i32, String)> {
        sqlx::query_as(
            "select coalesce(application_name, ''), pid, coalesce(query, '') from pg_stat_activity
             where datname = current_database() and pid <> pg_backend_pid()",
        )
        .fetch_all(&self.observer)
        .await
        .unwrap()
    }

    /// The pid of the connection named `name` that last ran a `LISTEN`.
    async fn listener_pid(&self, name: &str) -> Option<i32> {
        self.sessions()
            .await
            .into_iter()
            .find(|(app, _, query)| app == name && query.to_lowercase().starts_with("listen"))
            .map(|(_, pid, _)| pid)
    }
}

/// PgBouncer options for a mode, with room for the tests' connections.
fn bouncer_options(mode: PgBouncerMode, pool_size: u32) -> PgBouncerOptions {
    PgBouncerOptions {
        pool_size,
        ..PgBouncerOptions::new(mode)
    }
}

/// `(database, application_name)` of PgBouncer's clients, from its admin console.
async fn pgbouncer_clients(bouncer: &TestPgBouncer) -> Vec<(String, String)> {
    let options: PgConnectOptions = bouncer.admin_url().parse().unwrap();
    let mut admin = PgConnection::connect_with(&options.extra_float_digits(None))
        .await
        .unwrap_or_else(|e| panic!("PgBouncer's admin console: {e}\n{}", bouncer.log_tail()));
    let rows = admin.fetch_all("SHOW CLIENTS").await.unwrap();
    let clients = rows
        .iter()
        .map(|row| {
            (
                row.try_get::<String, _>("database").unwrap(),
                row.try_get::<String, _>("application_name").unwrap(),
            )
        })
        .collect();
    let _ = admin.close().await;
    clients
}

/// A connection through PgBouncer that sends no startup parameter PgBouncer refuses.
async fn raw_connection(url: &str, cache: Option<usize>) -> PgConnection {
    let mut options: PgConnectOptions = url.parse().unwrap();
    options = options.extra_float_digits(None);
    if let Some(capacity) = cache {
        options = options.statement_cache_capacity(capacity);
    }
    PgConnection::connect_with(&options).await.unwrap()
}

/// Drops every prepared statement of the (one) server connection behind `url`.
async fn deallocate_all(url: &str) {
    let mut conn = raw_connection(url, None).await;
    conn.execute("deallocate all").await.unwrap();
    let _ = conn.close().await;
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(e) => e.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// A backend's life with its status stream, then `WRITERS` concurrent writers moving
/// `BACKENDS` backends through their lives while a subscriber counts every event id.
async fn lifecycle_and_bus(db: &PlaneDatabase, label: &str) {
    // One backend's life, followed on its status stream.
    drone(db).await;
    let backend = spawn(db).await.backend_id;
    let stream = db.backend().status_stream(&backend).await.unwrap();
    for state in lifecycle() {
        assert!(db.backend().update_state(&backend, &state).await.unwrap());
    }
    let statuses: Vec<BackendStatus> = tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|entry| entry.status).collect::<Vec<_>>(),
    )
    .await
    .expect("the status stream ends after terminated");
    let mut expected = vec![BackendStatus::Scheduled];
    expected.extend(lifecycle().iter().map(|s| s.status()));
    assert_eq!(statuses, expected, "{label}: the status stream");

    // Many writers, one subscriber: every event exactly once.
    let mut backends = Vec::new();
    for _ in 0..BACKENDS {
        backends.push(spawn(db).await.backend_id);
    }
    let before = db.latest_event_id().await.unwrap().unwrap_or(0);
    let mut sub = db.subscribe::<BackendState>().await.unwrap();
    let total = BACKENDS * full_life().len();
    let collector = tokio::spawn(async move {
        let (mut by_id, mut lagged) = (HashMap::<i64, u32>::new(), 0);
        // Events committed before the subscription may be delivered too (the bus may not
        // have read them yet): only what came after counts.
        let mut count = |id: Option<i64>| match id.expect("persisted") {
            id if id > before => *by_id.entry(id).or_default() += 1,
            _ => {}
        };
        let mut seen = 0;
        while seen < total {
            match tokio::time::timeout(IDLE, sub.next()).await {
                Ok(Some(Ok(n))) => {
                    seen += usize::from(n.id.is_some_and(|id| id > before));
                    count(n.id);
                }
                Ok(Some(Err(Lagged { missed }))) => lagged += missed,
                Ok(None) | Err(_) => break,
            }
        }
        // Anything delivered twice arrives right behind the first copy.
        while let Ok(Some(Ok(n))) =
            tokio::time::timeout(Duration::from_millis(300), sub.next()).await
        {
            count(n.id);
        }
        (by_id, lagged)
    });
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            let mine: Vec<BackendName> =
                backends.iter().skip(w).step_by(WRITERS).cloned().collect();
            tokio::spawn(async move {
                for status in full_life() {
                    for backend in &mine {
                        let state = state_for(status);
                        let applied = db.backend().update_state(backend, &state).await;
                        assert!(applied.unwrap(), "{backend} to {status:?}");
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let written = started.elapsed();
    let (by_id, lagged) = collector.await.unwrap();
    let table: Vec<i64> = table_event_ids(db, "backend_state", None)
        .await
        .into_iter()
        .filter(|id| *id > before)
        .collect();
    let lost = table.iter().filter(|id| !by_id.contains_key(id)).count();
    let duplicated: u32 = by_id.values().map(|n| n - 1).sum();
    let unknown = by_id.keys().filter(|id| !table.contains(id)).count();
    figures(
        &format!("pooler_{label}"),
        &[
            ("writers", WRITERS.to_string()),
            ("state_changes", table.len().to_string()),
            ("received", by_id.len().to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
            ("written_ms", ms(written)),
        ],
    );
    assert_eq!(
        table.len(),
        total,
        "{label}: every update committed one event"
    );
    assert_eq!(lagged, 0, "{label}: the subscriber kept up");
    assert_eq!(
        (lost, duplicated, unknown),
        (0, 0, 0),
        "{label}: each event once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_everything_through_pgbouncer() {
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Session, 40))).await;
    fixture
        .run(|fx| async move {
            let db = OpenOptions::new(&fx.bouncer_url())
                .unwrap()
                .pooler(PoolerMode::Session)
                .max_connections(WRITERS as u32)
                .open()
                .await
                .unwrap();
            lifecycle_and_bus(&db, "session_mode").await;

            // Both the pool and the listening connection are PgBouncer's clients.
            let clients = pgbouncer_clients(fx.bouncer()).await;
            let names: HashSet<&str> = clients
                .iter()
                .filter(|(database, _)| *database == fx.database)
                .map(|(_, name)| name.as_str())
                .collect();
            assert!(names.contains("plane-db"), "{clients:?}");
            assert!(names.contains("plane-db-listener"), "{clients:?}");
            db.pool().close().await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_pgbouncer_with_plane_db_in_session_mode_and_listener_direct() {
    // PgBouncer 1.18 cannot run sqlx's queries in transaction mode (see below): the recipe
    // for a PgBouncer that runs in transaction mode for others is plane-db's database in
    // session mode, and the listening connection straight to Postgres.
    let fixture = Fixture::start(|database| {
        Some(PgBouncerOptions {
            databases: vec![(database.to_string(), "pool_mode=session".to_string())],
            ..bouncer_options(PgBouncerMode::Transaction, 40)
        })
    })
    .await;
    fixture
        .run(|fx| async move {
            let db = OpenOptions::new(&fx.bouncer_url())
                .unwrap()
                .pooler(PoolerMode::Session)
                .direct_url(&fx.direct_url)
                .unwrap()
                .max_connections(WRITERS as u32)
                .open()
                .await
                .unwrap();
            lifecycle_and_bus(&db, "transaction_mode_db_in_session_mode").await;

            // The pool goes through PgBouncer, the listening connection does not.
            let clients = pgbouncer_clients(fx.bouncer()).await;
            let names: HashSet<&str> = clients.iter().map(|(_, name)| name.as_str()).collect();
            assert!(names.contains("plane-db"), "{clients:?}");
            assert!(!names.contains("plane-db-listener"), "{clients:?}");
            assert!(
                fx.listener_pid("plane-db-listener").await.is_some(),
                "the listener is connected directly: {:?}",
                fx.sessions().await
            );
            db.pool().close().await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_named_statements_collide_even_without_a_cache() {
    // One server connection, so that every client's statements meet on it.
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Transaction, 1))).await;
    fixture
        .run(|fx| async move {
            let url = fx.bouncer_url();

            // sqlx's defaults: `a` prepares `sqlx_s_1` on the server connection and keeps it;
            // `b` prepares its own first statement under the same name, on the same one.
            let mut a = raw_connection(&url, None).await;
            let mut b = raw_connection(&url, None).await;
            let one: i32 = sqlx::query_scalar("select $1::int4 + 1")
                .bind(1)
                .fetch_one(&mut a)
                .await
                .unwrap();
            assert_eq!(one, 2);
            let error = sqlx::query_scalar::<_, String>("select $1::text")
                .bind("x")
                .fetch_one(&mut b)
                .await
                .expect_err("b's statement name is taken on the shared server connection");
            assert_eq!(sqlstate(&error).as_deref(), Some("42P05"), "{error}");
            assert!(
                error.to_string().contains("\"sqlx_s_1\" already exists"),
                "{error}"
            );
            drop((a, b));

            // Each part starts from a server connection without prepared statements.
            deallocate_all(&url).await;

            // A statement cache of 0 still names every statement (sqlx 0.8's `prepare`
            // names all persistent queries; the cache only decides whether it is reused),
            // and nothing deallocates them: the names collide just the same.
            let mut c = raw_connection(&url, Some(0)).await;
            let mut d = raw_connection(&url, Some(0)).await;
            for i in 0..3 {
                let _: i32 = sqlx::query_scalar("select $1::int4")
                    .bind(i)
                    .fetch_one(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("c's query {i}: {e}"));
            }
            let error = sqlx::query_scalar::<_, i32>("select $1::int4")
                .bind(7)
                .fetch_one(&mut d)
                .await
                .expect_err("d's statement name is taken on the shared server connection");
            assert_eq!(sqlstate(&error).as_deref(), Some("42P05"), "{error}");
            drop((c, d));

            // The leak, on a direct connection: one prepared statement per execution.
            let mut direct = raw_connection(&fx.direct_url, Some(0)).await;
            for i in 0..20 {
                let _: i32 = sqlx::query_scalar("select $1::int4")
                    .bind(i)
                    .fetch_one(&mut direct)
                    .await
                    .unwrap();
            }
            let prepared: i64 = sqlx::query_scalar("select count(*) from pg_prepared_statements")
                .fetch_one(&mut direct)
                .await
                .unwrap();
            assert!(prepared >= 20, "{prepared} statements left prepared");
            let _ = direct.close().await;

            // The library in transaction mode on this PgBouncer: migrations and the
            // listener go direct, but the queries collide the same way, with a typed error.
            deallocate_all(&url).await;
            let open = || async {
                OpenOptions::new(&url)
                    .unwrap()
                    .pooler(PoolerMode::Transaction)
                    .direct_url(&fx.direct_url)
                    .unwrap()
                    .max_connections(1)
                    .open_and_migrate()
                    .await
                    .unwrap()
            };
            let (first, second) = (open().await, open().await);
            first
                .health_check()
                .await
                .expect("the first client's statement is prepared");
            let error = second
                .health_check()
                .await
                .expect_err("the second client's statement name is taken");
            let code = match &error {
                Error::Database(e) => sqlstate(e),
                other => panic!("not a database error: {other}"),
            };
            assert_eq!(code.as_deref(), Some("42P05"), "{error:?}");
            figures(
                "pooler_transaction_mode_named_statements",
                &[
                    ("default_cache", "42P05 already exists".to_string()),
                    ("cache_0", "42P05 already exists".to_string()),
                    ("cache_0_leaked_per_20_runs", prepared.to_string()),
                    ("library_second_client", "42P05 already exists".to_string()),
                ],
            );
            first.pool().close().await;
            second.pool().close().await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_unnamed_statements_run_other_clients_queries() {
    // Unnamed statements (`persistent(false)`) avoid the name collisions, but sqlx prepares
    // and binds them in two exchanges, and PgBouncer 1.18 may hand the server connection to
    // another client in between: the bind then runs that client's statement. With 8 clients
    // on 2 server connections this happens within a few hundred queries (not a timing
    // assertion: the count only has to be above zero, and it is in the hundreds).
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Transaction, 2))).await;
    fixture
        .run(|fx| async move {
            const CLIENTS: i32 = 8;
            const QUERIES: i32 = 200;
            let options: PgConnectOptions = fx.bouncer_url().parse().unwrap();
            let pool = PgPoolOptions::new()
                .max_connections(CLIENTS as u32)
                .connect_with(options.extra_float_digits(None))
                .await
                .unwrap();
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|client| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let mut outcomes = BTreeMap::<String, u32>::new();
                        for i in 0..QUERIES {
                            let x = client * 1_000 + i;
                            let (sql, want) = match (client + i) % 3 {
                                0 => ("select $1::int4 + 1", x + 1),
                                1 => ("select $1::int4 * 2", x * 2),
                                _ => ("select $1::int4 - 7", x - 7),
                            };
                            let got = sqlx::query_scalar::<_, i32>(sql)
                                .bind(x)
                                .persistent(false)
                                .fetch_one(&pool)
                                .await;
                            let outcome = match got {
                                Ok(v) if v == want => "right".to_string(),
                                Ok(_) => "wrong".to_string(),
                                Err(e) => sqlstate(&e).unwrap_or_else(|| e.to_string()),
                            };
                            *outcomes.entry(outcome).or_default() += 1;
                        }
                        outcomes
                    })
                })
                .collect();
            let mut outcomes = BTreeMap::<String, u32>::new();
            for task in tasks {
                for (outcome, n) in task.await.unwrap() {
                    *outcomes.entry(outcome).or_default() += n;
                }
            }
            pool.close().await;
            figures(
                "pooler_transaction_mode_unnamed_statements",
                &[
                    ("queries", (CLIENTS * QUERIES).to_string()),
                    ("outcomes", format!("{outcomes:?}")),
                ],
            );
            let wrong = outcomes.get("wrong").copied().unwrap_or(0);
            assert!(
                wrong > 0,
                "expected some results of another client's query: {outcomes:?}"
            );
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_settings_leak_so_the_library_sets_none() {
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Transaction, 1))).await;
    fixture
        .run(|fx| async move {
            let url = fx.bouncer_url();
            // The documented recipe: defaults on the server, for new sessions (the one
            // server connection PgBouncer opens for this database comes later).
            fx.observer
                .execute(
                    format!(
                        "alter database \"{}\" set statement_timeout = '250ms'",
                        fx.database
                    )
                    .as_str(),
                )
                .await
                .unwrap();

            // It applies through the pooler (simple queries: no prepared statement).
            let mut a = raw_connection(&url, None).await;
            let error = a
                .execute("select pg_sleep(1)")
                .await
                .expect_err("the server's statement_timeout cancels it");
            assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");

            // The library in transaction mode sets nothing on the shared server connection.
            let db = OpenOptions::new(&url)
                .unwrap()
                .pooler(PoolerMode::Transaction)
                .direct_url(&fx.direct_url)
                .unwrap()
                .statement_timeout(Some(Duration::from_secs(30)))
                .open()
                .await
                .unwrap();
            let shown: String = a.fetch_one("show statement_timeout").await.unwrap().get(0);
            assert_eq!(
                shown, "250ms",
                "the library's 30 s did not reach the server"
            );

            // What a SET after connecting would do: it stays on the server connection, and
            // the next client (here `b`) runs with it.
            let mut b = raw_connection(&url, None).await;
            a.execute("set statement_timeout = 1234").await.unwrap();
            let shown: String = b.fetch_one("show statement_timeout").await.unwrap().get(0);
            assert_eq!(shown, "1234ms", "a's SET leaked to b");
            db.pool().close().await;
        })
        .await;
}

/// Application names, the timeouts, and a listener that `idle_session_timeout` does not end,
/// direct (default names) and through a session-mode PgBouncer (a caller's prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_hygiene_direct_and_through_pgbouncer() {
    for through_pgbouncer in [false, true] {
        let fixture = Fixture::start(|_| {
            through_pgbouncer.then(|| bouncer_options(PgBouncerMode::Session, 20))
        })
        .await;
        fixture
            .run(|fx| async move {
                let (url, mode, prefix) = if through_pgbouncer {
                    (fx.bouncer_url(), PoolerMode::Session, "ctl-7")
                } else {
                    (fx.direct_url.clone(), PoolerMode::Direct, "plane-db")
                };
                let label = if through_pgbouncer {
                    "session"
                } else {
                    "direct"
                };
                // Sessions idle for 400 ms end: the listener must not be one of them.
                fx.observer
                    .execute(
                        format!(
                            "alter database \"{}\" set idle_session_timeout = '400ms'",
                            fx.database
                        )
                        .as_str(),
                    )
                    .await
                    .unwrap();
                let mut options = OpenOptions::new(&url)
                    .unwrap()
                    .pooler(mode)
                    .statement_timeout(Some(Duration::from_millis(300)))
                    .idle_in_transaction_session_timeout(Some(Duration::from_millis(300)));
                if through_pgbouncer {
                    options = options.application_name(prefix);
                }
                let db = options.open().await.unwrap();
                let mut sub = db.subscribe::<BackendState>().await.unwrap();
                let listener = format!("{prefix}-listener");

                // pg_stat_activity tells the pool's connections from the listener.
                let names: HashSet<String> = fx
                    .sessions()
                    .await
                    .into_iter()
                    .map(|(name, _, _)| name)
                    .collect();
                assert!(names.contains(prefix), "{label}: {names:?}");
                assert!(names.contains(&listener), "{label}: {names:?}");
                let listener_pid = fx.listener_pid(&listener).await;
                assert!(listener_pid.is_some(), "{label}: {:?}", fx.sessions().await);

                // statement_timeout: a statement longer than it fails with a typed error.
                let shown: String = sqlx::query_scalar("show statement_timeout")
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
                assert_eq!(shown, "300ms", "{label}");
                let error = sqlx::query("select pg_sleep(2)")
                    .execute(db.pool())
                    .await
                    .map_err(Error::from)
                    .expect_err("cancelled by statement_timeout");
                match &error {
                    Error::Database(e) => {
                        assert_eq!(sqlstate(e).as_deref(), Some("57014"), "{label}: {e}")
                    }
                    other => panic!("{label}: not a database error: {other}"),
                }

                // idle_in_transaction_session_timeout: a transaction left idle is ended.
                let mut tx = db.pool().begin().await.unwrap();
                tx.execute("select 1").await.unwrap();
                tokio::time::sleep(Duration::from_millis(900)).await;
                let after = tx.execute("select 1").await;
                assert!(
                    after.is_err(),
                    "{label}: the idle transaction's session ended"
                );
                drop(tx);

                // The listener outlived idle_session_timeout (same session) and delivers.
                tokio::time::sleep(Duration::from_millis(600)).await;
                drone(&db).await;
                let backend = spawn(&db).await.backend_id;
                assert!(db
                    .backend()
                    .update_state(&backend, &BackendState::Loading)
                    .await
                    .unwrap());
                let delivered = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match sub.next().await {
                            Some(Ok(n)) if n.key.as_deref() == Some(backend.as_str()) => {
                                if n.payload.status() == BackendStatus::Loading {
                                    return true;
                                }
                            }
                            Some(_) => {}
                            None => return false,
                        }
                    }
                })
                .await;
                assert_eq!(delivered, Ok(true), "{label}: delivered");
                assert_eq!(
                    fx.listener_pid(&listener).await,
                    listener_pid,
                    "{label}: the listening session was not ended and replaced"
                );
                db.pool().close().await;
            })
            .await;
    }
}

/// Route lookups direct, direct with sqlx's statement cache off, and through a session-mode
/// PgBouncer, interleaved in one run. Printed (and recorded in the README), not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_of_pgbouncer_and_of_no_statement_cache() {
    const LOOKUPS: u32 = 1_000;
    const ROUNDS: u32 = 3;
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Session, 20))).await;
    fixture
        .run(|fx| async move {
            let direct = OpenOptions::new(&fx.direct_url)
                .unwrap()
                .max_connections(2)
                .open()
                .await
                .unwrap();
            let no_cache_options: PgConnectOptions = fx.direct_url.parse().unwrap();
            let no_cache =
                OpenOptions::from_pg_options(no_cache_options.statement_cache_capacity(0))
                    .max_connections(2)
                    .open()
                    .await
                    .unwrap();
            let bounced = OpenOptions::new(&fx.bouncer_url())
                .unwrap()
                .pooler(PoolerMode::Session)
                .max_connections(2)
                .open()
                .await
                .unwrap();
            drone(&direct).await;
            let response = spawn(&direct).await;
            for state in &lifecycle()[..4] {
                direct
                    .backend()
                    .update_state(&response.backend_id, state)
                    .await
                    .unwrap();
            }
            let token = response.token;
            let configs = [
                ("direct", &direct),
                ("no_cache", &no_cache),
                ("pgbouncer_session", &bounced),
            ];
            let mut totals = [Duration::ZERO; 3];
            for round in 0..=ROUNDS {
                for (i, (name, db)) in configs.iter().enumerate() {
                    let started = Instant::now();
                    for _ in 0..LOOKUPS {
                        let route = db.backend().route_info_for_token(&token).await.unwrap();
                        assert!(matches!(route, RouteInfoResult::Available(_)), "{name}");
                    }
                    // Round 0 warms up.
                    if round > 0 {
                        totals[i] += started.elapsed();
                    }
                }
            }
            let per_lookup = |total: Duration| total / (LOOKUPS * ROUNDS);
            let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
            let ratio =
                |i: usize| format!("{:.2}", totals[i].as_secs_f64() / totals[0].as_secs_f64());
            figures(
                "pooler_cost",
                &[
                    ("lookups_each", (LOOKUPS * ROUNDS).to_string()),
                    ("direct_us", us(per_lookup(totals[0]))),
                    ("no_statement_cache_us", us(per_lookup(totals[1]))),
                    ("pgbouncer_session_us", us(per_lookup(totals[2]))),
                    ("no_statement_cache_ratio", ratio(1)),
                    ("pgbouncer_session_ratio", ratio(2)),
                ],
            );
            for db in [direct, no_cache, bounced] {
                db.pool().close().await;
            }
        })
        .await;
}

/// Why the library leaves out `extra_float_digits` behind a pooler and applies its settings
/// with `SET` rather than the `options` startup parameter: PgBouncer refuses both by
/// default, and with `ignore_startup_parameters = options` it drops the settings silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_refuses_or_drops_startup_parameters() {
    let fixture = Fixture::start(|_| Some(bouncer_options(PgBouncerMode::Session, 5))).await;
    fixture
        .run(|fx| async move {
            let url: PgConnectOptions = fx.bouncer_url().parse().unwrap();
            // sqlx sends extra_float_digits by default.
            let refused = PgConnection::connect_with(&url).await.err();
            let refused = refused.expect("PgBouncer refuses extra_float_digits");
            assert!(
                refused
                    .to_string()
                    .contains("unsupported startup parameter"),
                "{refused}"
            );
            let with_options = url
                .clone()
                .extra_float_digits(None)
                .options([("statement_timeout", "5000")]);
            let refused = PgConnection::connect_with(&with_options).await.err();
            let refused = refused.expect("PgBouncer refuses options");
            assert!(
                refused
                    .to_string()
                    .contains("unsupported startup parameter: options"),
                "{refused}"
            );

            // Told to ignore `options`, PgBouncer lets the client in without its settings.
            let s = fx.server.clone();
            let ignoring = tokio::task::spawn_blocking(move || {
                s.pgbouncer(&PgBouncerOptions {
                    settings: vec![("ignore_startup_parameters".into(), "options".into())],
                    ..bouncer_options(PgBouncerMode::Session, 5)
                })
            })
            .await
            .unwrap()
            .unwrap();
            let url: PgConnectOptions = ignoring.url_for(&fx.database).parse().unwrap();
            let mut conn = PgConnection::connect_with(
                &url.extra_float_digits(None)
                    .options([("statement_timeout", "5000")]),
            )
            .await
            .unwrap();
            let shown: String = conn
                .fetch_one("show statement_timeout")
                .await
                .unwrap()
                .get(0);
            assert_eq!(shown, "0", "the setting was dropped");
            let _ = conn.close().await;
            tokio::task::spawn_blocking(move || drop(ignoring))
                .await
                .unwrap();
        })
        .await;
}
