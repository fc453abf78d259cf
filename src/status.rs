//! One overview of a plane-db database for an operator: who is online, what runs where,
//! what holds back the event bus, and how big the event table is. See
//! [`PlaneDatabase::status`](crate::PlaneDatabase::status).

use crate::context::Context;
use crate::controller::ControllerDatabase;
use crate::controller::ControllerInfo;
use crate::error::{Error, Result};
use crate::leader::LeaderInfo;
use crate::types::{BackendStatus, ClusterName, DronePoolName};
use chrono::{DateTime, Utc};

/// What [`PlaneDatabase::status`](crate::PlaneDatabase::status) found, as of one moment of the database clock (each part
/// is read by its own statement, so the parts may be a few milliseconds apart).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseStatus {
    /// The database clock when the overview was taken.
    pub as_of: DateTime<Utc>,
    /// The controllers that are online (as [`ControllerDatabase::online_controllers`](
    /// crate::controller::ControllerDatabase::online_controllers)).
    pub controllers: Vec<ControllerInfo>,
    /// How many drones there are per cluster, pool and condition; only non-zero counts,
    /// ordered by cluster, pool and condition.
    pub drones: Vec<DroneCount>,
    /// How many backends there are in each status (terminated ones until cleanup deletes
    /// them); only non-zero counts, in lifecycle order.
    /// Serialized as an object from status to count.
    #[serde(serialize_with = "serialize_counts")]
    pub backends: Vec<(BackendStatus, i64)>,
    /// The open transaction that holds back the event bus's horizon the most, if any (see
    /// [`OpenTransaction`]).
    pub oldest_transaction: Option<OpenTransaction>,
    /// The `event` table's size and its oldest row.
    pub events: EventTableStatus,
    /// The last completed cleanup run, `None` if none was recorded (cleanup never ran to
    /// completion since the schema records runs).
    pub last_cleanup: Option<CleanupRun>,
    /// Every leader lease by name (the cleanup loop's is
    /// [`CLEANUP_LEASE`](crate::leader::CLEANUP_LEASE)): who holds it, under which term,
    /// since when; an expired one ([`LeaderInfo::active`] false) names the last holder.
    pub leaders: Vec<LeaderInfo>,
    /// The server that answered: after a failover, a different address, a later start and
    /// (through a multi-host URL) the host the pool moved to.
    pub server: ServerInfo,
}

/// The server that answered a [`DatabaseStatus`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// Its address and port as the server sees them (`inet_server_addr()`,
    /// `inet_server_port()`); `None` over a Unix socket.
    pub address: Option<String>,
    /// Its port (see `address`).
    pub port: Option<i32>,
    /// Whether it is a standby (`pg_is_in_recovery()`): a status read through a URL that
    /// reached a standby.
    pub in_recovery: bool,
    /// When its postmaster started: a restart or a failover shows as a later time.
    pub started_at: DateTime<Utc>,
    /// `server_version`.
    pub version: String,
}

/// A completed cleanup run, as recorded by
/// [`run_cleanup`](crate::PlaneDatabase::run_cleanup).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CleanupRun {
    /// When it started (database clock).
    pub started_at: DateTime<Utc>,
    /// When it finished (database clock).
    pub finished_at: DateTime<Utc>,
    /// Terminated backends it deleted.
    pub backends: i64,
    /// Old events it deleted.
    pub events: i64,
    /// Expired tokens it deleted.
    pub tokens: i64,
}

/// What a drone can do right now, from the scheduler's point of view (the checks of
/// [`DroneDatabase::pick_for_spawn`](crate::drone::DroneDatabase::pick_for_spawn), in that
/// order: the first that fails names the condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DroneCondition {
    /// Ready, not draining, heartbeating, held by an online controller: it can be picked.
    Ready,
    /// Registered but not ready yet.
    NotReady,
    /// Draining: it keeps its backends and takes no new ones.
    Draining,
    /// Its own heartbeat is missing or older than the drone heartbeat timeout.
    Stale,
    /// No controller holds it, or its controller is offline or silent.
    Offline,
}

impl DroneCondition {
    /// The condition as a lower-case word (`ready`, `not-ready`, `draining`, `stale`,
    /// `offline`).
    pub fn as_str(self) -> &'static str {
        match self {
            DroneCondition::Ready => "ready",
            DroneCondition::NotReady => "not-ready",
            DroneCondition::Draining => "draining",
            DroneCondition::Stale => "stale",
            DroneCondition::Offline => "offline",
        }
    }
}

impl std::fmt::Display for DroneCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many drones of a cluster and pool are in a condition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DroneCount {
    /// Their cluster (`None` for a drone row without one, which plane-db never writes).
    pub cluster: Option<ClusterName>,
    /// Their pool.
    pub pool: DronePoolName,
    /// Their condition.
    /// Serialized as `state`.
    #[serde(rename = "state")]
    pub condition: DroneCondition,
    /// How many.
    pub count: i64,
}

/// An open transaction, as `pg_stat_activity` shows it.
///
/// The event bus reads up to the oldest transaction that holds a transaction id
/// (`backend_xid`: it has written something) and has not finished: events committed after it
/// are read, but the bus's snapshot cannot move past it, so a transaction left open keeps
/// the bus re-examining its window and keeps `VACUUM` from removing dead rows. A session
/// with only a snapshot (`backend_xmin`: a long query or a repeatable-read transaction) holds
/// back `VACUUM` but not the bus; one is reported only when no session holds an id.
///
/// All sessions of the server are considered (transaction ids are shared by every
/// database), except the one asking. A role without `pg_read_all_stats` sees these columns
/// only for sessions of its own role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenTransaction {
    /// The server process id (`pg_terminate_backend` takes it).
    pub pid: i32,
    /// The session's `application_name` (plane-db's own connections are `plane-db`,
    /// `plane-db-listener` and `plane-db-migrate` unless configured otherwise).
    pub application_name: Option<String>,
    /// The database the session is connected to.
    pub database: Option<String>,
    /// The role the session runs as.
    pub user: Option<String>,
    /// `active`, `idle in transaction`, … (`pg_stat_activity.state`).
    pub state: Option<String>,
    /// When its transaction started, if the server says.
    pub transaction_start: Option<DateTime<Utc>>,
    /// How long its transaction has been open (database clock), if known.
    /// Serialized as `age_seconds`.
    #[serde(
        rename = "age_seconds",
        serialize_with = "crate::serde_seconds::serialize_option"
    )]
    pub age: Option<chrono::Duration>,
    /// Its transaction id, when it holds one (it has written).
    pub xid: Option<i64>,
    /// Its snapshot's horizon (`backend_xmin`), when it holds a snapshot.
    pub xmin: Option<i64>,
    /// How many transactions have started since its `xid` (or, without one, its `xmin`).
    pub xid_age: Option<i32>,
}

impl OpenTransaction {
    /// Whether it holds back the event bus (it has a transaction id), rather than only
    /// `VACUUM` (a snapshot).
    pub fn holds_bus(&self) -> bool {
        self.xid.is_some()
    }
}

/// The `event` table's size and its oldest row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventTableStatus {
    /// Postgres's estimate of its row count (`pg_class.reltuples`, or the statistics
    /// collector's live-row count before the first `ANALYZE`, summed over its partitions);
    /// `None` when neither knows.
    pub rows_estimate: Option<i64>,
    /// Its size on disk with indexes and TOAST (`pg_total_relation_size`, summed over its
    /// partitions).
    pub bytes: i64,
    /// The id of the oldest event (by creation time), if any.
    pub oldest_id: Option<i64>,
    /// When the oldest event was written.
    pub oldest_at: Option<DateTime<Utc>>,
}

/// Reads the [`DatabaseStatus`]. Reached through
/// [`PlaneDatabase::status`](crate::PlaneDatabase::status).
pub(crate) struct StatusReader<'a> {
    ctx: &'a Context,
}

impl<'a> StatusReader<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// One overview for an operator: online controllers, drones by cluster, pool and
    /// condition, backends by status, the open transaction that holds back the event bus
    /// the most (see [`OpenTransaction`]), and the `event` table's size and oldest row.
    ///
    /// A handful of small statements on the pool: counting backends reads the `backend`
    /// table once (an index-only scan of `backend_status_time_idx` when visibility allows);
    /// the other parts read catalogues and indexes only, the last row of `cleanup_run`, and
    /// `leader_lease` (a row per lease).
    #[tracing::instrument(skip(self))]
    pub(crate) async fn status(&self) -> Result<DatabaseStatus> {
        let controllers = ControllerDatabase::new(self.ctx)
            .online_controllers()
            .await?;
        let scheduler = &self.ctx.config().scheduler;
        let drone_rows = sqlx::query!(
            r#"
            select n.cluster, d.pool,
                   coalesce(c.is_online and c.last_heartbeat > now() - make_interval(secs => $1),
                            false) as "controller_online!",
                   coalesce(d.last_heartbeat > now() - make_interval(secs => $2), false)
                       as "heartbeat_fresh!",
                   d.ready, d.draining,
                   count(*) as "count!"
            from drone d
            join node n on n.id = d.id
            left join controller c on c.id = n.controller
            group by 1, 2, 3, 4, 5, 6
            "#,
            scheduler.controller_heartbeat_timeout.as_secs_f64(),
            scheduler.drone_heartbeat_timeout.as_secs_f64(),
        )
        .fetch_all(self.ctx.pool())
        .await?;
        let mut drones: Vec<DroneCount> = Vec::new();
        for row in drone_rows {
            let condition = if !row.controller_online {
                DroneCondition::Offline
            } else if !row.heartbeat_fresh {
                DroneCondition::Stale
            } else if row.draining {
                DroneCondition::Draining
            } else if !row.ready {
                DroneCondition::NotReady
            } else {
                DroneCondition::Ready
            };
            let cluster = match row.cluster {
                Some(name) => match ClusterName::try_from(name.clone()) {
                    Ok(cluster) => Some(cluster),
                    Err(error) => {
                        let error = Error::decode("node", "cluster", &name, error);
                        tracing::warn!(%error, "skipping drones whose cluster does not decode");
                        continue;
                    }
                },
                None => None,
            };
            let pool = DronePoolName::from(row.pool);
            match drones
                .iter_mut()
                .find(|d| d.cluster == cluster && d.pool == pool && d.condition == condition)
            {
                Some(existing) => existing.count += row.count,
                None => drones.push(DroneCount {
                    cluster,
                    pool,
                    condition,
                    count: row.count,
                }),
            }
        }
        drones.sort_by(|a, b| {
            (&a.cluster, &a.pool, a.condition).cmp(&(&b.cluster, &b.pool, b.condition))
        });

        let status_rows = sqlx::query!(
            r#"
            select last_status_number, count(*) as "count!"
            from backend
            group by last_status_number
            order by last_status_number
            "#
        )
        .fetch_all(self.ctx.pool())
        .await?;
        let mut backends = Vec::new();
        for row in status_rows {
            match BackendStatus::from_int(row.last_status_number) {
                Some(status) => backends.push((status, row.count)),
                None => {
                    let error = Error::decode(
                        "backend",
                        "last_status_number",
                        row.last_status_number,
                        format!("{} is not a status number", row.last_status_number),
                    );
                    tracing::warn!(%error, count = row.count, "skipping backends of an unknown status");
                }
            }
        }

        let oldest = sqlx::query!(
            r#"
            select pid as "pid!", application_name, datname::text as database,
                   usename::text as user_name, state, xact_start,
                   now() as "as_of!",
                   backend_xid::text::bigint as xid, backend_xmin::text::bigint as xmin,
                   coalesce(age(backend_xid), age(backend_xmin)) as xid_age
            from pg_stat_activity
            where pid is not null and pid <> pg_backend_pid()
              and (backend_xid is not null or backend_xmin is not null)
            order by backend_xid is null, coalesce(age(backend_xid), age(backend_xmin)) desc,
                     xact_start
            limit 1
            "#
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        let oldest_transaction = oldest.map(|row| OpenTransaction {
            pid: row.pid,
            application_name: row.application_name,
            database: row.database,
            user: row.user_name,
            state: row.state,
            transaction_start: row.xact_start,
            age: row.xact_start.map(|start| row.as_of - start),
            xid: row.xid,
            xmin: row.xmin,
            xid_age: row.xid_age,
        });

        let events = sqlx::query!(
            r#"
            -- Summed over the table's partitions (the table itself, before it was
            -- partitioned: pg_partition_tree lists a plain table as its own leaf).
            with parts as (
                select coalesce(nullif(c.reltuples, -1)::bigint, s.n_live_tup) as rows_estimate,
                       pg_total_relation_size(c.oid) as bytes
                from pg_partition_tree('event') t
                join pg_class c on c.oid = t.relid
                left join pg_stat_all_tables s on s.relid = c.oid
                where t.isleaf
            )
            select (select sum(rows_estimate)::bigint from parts) as rows_estimate,
                   (select coalesce(sum(bytes), 0)::bigint from parts) as "bytes!",
                   o.id as "oldest_id?", o.created_at as "oldest_at?",
                   now() as "as_of!"
            from (select 1) one
            left join lateral (
                select id, created_at from event order by created_at, id limit 1
            ) o on true
            "#
        )
        .fetch_one(self.ctx.pool())
        .await?;
        let last_cleanup = sqlx::query_as!(
            CleanupRun,
            r#"
            select started_at, finished_at, backends, events, tokens
            from cleanup_run
            order by id desc
            limit 1
            "#
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        let leaders = crate::leader::leaders(self.ctx.pool()).await?;
        let server = sqlx::query_as!(
            ServerInfo,
            r#"
            select host(inet_server_addr()) as address,
                   inet_server_port() as port,
                   pg_is_in_recovery() as "in_recovery!",
                   pg_postmaster_start_time() as "started_at!",
                   current_setting('server_version') as "version!"
            "#
        )
        .fetch_one(self.ctx.pool())
        .await?;
        Ok(DatabaseStatus {
            last_cleanup,
            leaders,
            server,
            as_of: events.as_of,
            controllers,
            drones,
            backends,
            oldest_transaction,
            events: EventTableStatus {
                rows_estimate: events.rows_estimate,
                bytes: events.bytes,
                oldest_id: events.oldest_id,
                oldest_at: events.oldest_at,
            },
        })
    }
}

/// Serializes [`DatabaseStatus::backends`] as an object from status to count
/// (`{"scheduled": 1, "ready": 2}`), in the list's order.
fn serialize_counts<S: serde::Serializer>(
    counts: &[(BackendStatus, i64)],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_map(counts.iter().map(|(status, count)| (status, count)))
}
