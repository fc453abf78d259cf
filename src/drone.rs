//! Drones: registration, heartbeats and picking one for a new backend.

use crate::context::Context;
use crate::error::{skip_undecodable, Error, Result};
use crate::limits::{self, limit};
use crate::types::{BackendStatus, ClusterName, ControllerName, DroneName, DronePoolName, NodeId};
use crate::validate::interval_secs;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Drone scheduling inputs. Get one from [`PlaneDatabase::drone`](crate::PlaneDatabase::drone).
pub struct DroneDatabase<'a> {
    ctx: &'a Context,
}

/// The drone [`DroneDatabase::pick_for_spawn`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickedDrone {
    /// The drone's node id.
    pub id: NodeId,
    /// The drone's name.
    pub name: DroneName,
}

/// A drone as listed by [`DroneDatabase::drones_for_pool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneInfo {
    /// The drone's node id.
    pub id: NodeId,
    /// Its name.
    pub name: DroneName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its pool.
    pub pool: DronePoolName,
    /// Whether it accepts new backends.
    pub ready: bool,
    /// Whether it is draining (never picked for new backends).
    pub draining: bool,
    /// When it last heartbeated (database clock).
    pub last_heartbeat: DateTime<Utc>,
    /// How long ago that was.
    pub heartbeat_age: chrono::Duration,
    /// The drone's own clock at its last heartbeat, if it sent one.
    pub last_local_time: Option<DateTime<Utc>>,
    /// The software version it runs.
    pub plane_version: String,
    /// The git hash of that version.
    pub plane_hash: String,
    /// The controller holding its connection, if any.
    pub controller: Option<ControllerName>,
    /// When its latest connection started.
    pub connected_at: Option<DateTime<Utc>>,
}

impl<'a> DroneDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Registers the drone of node `id` (see [`NodeDatabase::register`](crate::node::NodeDatabase::register))
    /// in `pool`, or updates its readiness and pool. Counts as a heartbeat; the drone's clock
    /// is unknown again until its next [`heartbeat`](Self::heartbeat). The pool's name is at
    /// most [`DRONE_POOL_BYTES`](crate::limits::DRONE_POOL_BYTES) (a longer one is
    /// [`Error::InvalidArgument`] here and in the lookups by pool).
    #[tracing::instrument(skip(self), fields(drone = %id))]
    pub async fn register(&self, id: NodeId, ready: bool, pool: &DronePoolName) -> Result<()> {
        limits::check_text("pool", pool.as_str(), limit!(DRONE_POOL_BYTES))?;
        sqlx::query!(
            r#"
            insert into drone (id, ready, pool, last_heartbeat)
            values ($1, $2, $3, now())
            on conflict (id) do update set
                ready = excluded.ready,
                pool = excluded.pool,
                last_heartbeat = excluded.last_heartbeat,
                last_local_time = null
            "#,
            id.as_i32(),
            ready,
            pool.as_str(),
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(())
    }

    /// Records a heartbeat with the drone's own clock. Returns false if no such drone.
    #[tracing::instrument(skip(self), fields(drone = %id))]
    pub async fn heartbeat(&self, id: NodeId, local_time: DateTime<Utc>) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            update drone set last_heartbeat = now(), last_local_time = $2
            where id = $1
            "#,
            id.as_i32(),
            local_time,
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Sets whether the drone accepts new backends. Returns false if no such drone.
    #[tracing::instrument(skip(self), fields(drone = %id))]
    pub async fn set_ready(&self, id: NodeId, ready: bool) -> Result<bool> {
        let result = sqlx::query!(
            "update drone set ready = $2 where id = $1",
            id.as_i32(),
            ready
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Puts the drone into draining: it keeps its backends but is never picked for a new
    /// one. Returns true if this call started the draining, false if it was already
    /// draining. An unknown drone is [`Error::NotFound`].
    #[tracing::instrument(skip(self), fields(drone = %id))]
    pub async fn drain(&self, id: NodeId) -> Result<bool> {
        // `not draining` in the update's own condition (not a read of the old row) keeps
        // concurrent drains honest: Postgres re-checks it after waiting for the row lock, so
        // exactly one of them reports that it started the draining.
        let row = sqlx::query!(
            r#"
            with updated as (
                update drone set draining = true
                where id = $1 and not draining
                returning id
            )
            select exists (select 1 from updated) as "started!",
                   exists (select 1 from drone where id = $1) as "known!"
            "#,
            id.as_i32(),
        )
        .fetch_one(self.ctx.pool())
        .await?;
        if !row.known {
            return Err(Error::NotFound {
                what: "drone",
                id: id.to_string(),
            });
        }
        Ok(row.started)
    }

    /// The pool the drone belongs to. An unknown drone is [`Error::NotFound`].
    #[tracing::instrument(skip(self), fields(drone = %id))]
    pub async fn pool(&self, id: NodeId) -> Result<DronePoolName> {
        let pool = sqlx::query_scalar!("select pool from drone where id = $1", id.as_i32())
            .fetch_optional(self.ctx.pool())
            .await?;
        pool.map(DronePoolName::from)
            .ok_or_else(|| Error::NotFound {
                what: "drone",
                id: id.to_string(),
            })
    }

    /// The drones of `cluster` in `pool` heard from within `seen_within` (any length; about
    /// 100 years or more means all), most recently added first, with their versions, controller, readiness and heartbeat ages
    /// (by the database clock). Rows that do not decode are skipped with a warning.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, pool = %pool))]
    pub async fn drones_for_pool(
        &self,
        cluster: &ClusterName,
        pool: &DronePoolName,
        seen_within: Duration,
    ) -> Result<Vec<DroneInfo>> {
        limits::check_text("pool", pool.as_str(), limit!(DRONE_POOL_BYTES))?;
        let rows = sqlx::query!(
            r#"
            select d.id, n.name, n.cluster as "cluster!", d.pool, d.ready, d.draining,
                   d.last_heartbeat as "last_heartbeat!", d.last_local_time,
                   n.plane_version, n.plane_hash, n.controller,
                   n.last_connection_start_time, now() as "as_of!"
            from drone d
            join node n on n.id = d.id
            where n.cluster = $1
              and d.pool = $2
              and d.last_heartbeat > now() - make_interval(secs => $3)
            order by d.id desc
            "#,
            cluster.as_str(),
            pool.as_str(),
            interval_secs(seen_within),
        )
        .fetch_all(self.ctx.pool())
        .await?;
        Ok(skip_undecodable(rows.into_iter().map(|row| {
            Ok(DroneInfo {
                id: NodeId::from(row.id),
                name: DroneName::try_from(row.name)
                    .map_err(|e| Error::decode("node", "name", row.id, e))?,
                cluster: ClusterName::try_from(row.cluster)
                    .map_err(|e| Error::decode("node", "cluster", row.id, e))?,
                pool: DronePoolName::from(row.pool),
                ready: row.ready,
                draining: row.draining,
                last_heartbeat: row.last_heartbeat,
                heartbeat_age: row.as_of - row.last_heartbeat,
                last_local_time: row.last_local_time,
                plane_version: row.plane_version,
                plane_hash: row.plane_hash,
                controller: row
                    .controller
                    .map(ControllerName::try_from)
                    .transpose()
                    .map_err(|e| Error::decode("node", "controller", row.id, e))?,
                connected_at: row.last_connection_start_time,
            })
        })))
    }

    /// Picks a drone for a new backend in `cluster` and `pool`: ready, heard from within
    /// the heartbeat timeout, not draining, and held by a controller that is online and
    /// heartbeating. Among a random sample of [`SchedulerConfig::sample_size`](crate::SchedulerConfig)
    /// such drones, the one with the fewest live backends wins. `None` if no drone qualifies.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, pool = %pool))]
    pub async fn pick_for_spawn(
        &self,
        cluster: &ClusterName,
        pool: &DronePoolName,
    ) -> Result<Option<PickedDrone>> {
        limits::check_text("pool", pool.as_str(), limit!(DRONE_POOL_BYTES))?;
        let config = &self.ctx.config().scheduler;
        let sample_size = config.checked_sample_size()?;
        // `connect`'s spawn statements pick the same way, inside the statement, from the same
        // view (`plane_schedulable_drone`: the eligibility rules, written once);
        // tests/it/scheduling.rs checks all three against the same drones.
        let row = sqlx::query!(
            r#"
            with sample as (
                select d.id, d.name
                from plane_schedulable_drone d
                where d.cluster = $1
                  and d.pool = $2
                  and d.drone_heartbeat > now() - make_interval(secs => $3)
                  and d.controller_heartbeat > now() - make_interval(secs => $4)
                order by random()
                limit $5
            )
            select s.id as "id!", s.name as "name!"
            from sample s
            order by (
                select count(*) from backend b
                where b.drone_id = s.id and b.last_status_number < $6
            ), random()
            limit 1
            "#,
            cluster.as_str(),
            pool.as_str(),
            config.drone_heartbeat_timeout.as_secs_f64(),
            config.controller_heartbeat_timeout.as_secs_f64(),
            sample_size,
            BackendStatus::Terminated.as_int(),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let name =
            DroneName::try_from(row.name).map_err(|e| Error::decode("node", "name", row.id, e))?;
        Ok(Some(PickedDrone {
            id: NodeId::from(row.id),
            name,
        }))
    }
}
