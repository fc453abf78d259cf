//! Drones: registration, heartbeats and picking one for a new backend.

use crate::error::{Error, Result};
use crate::types::{BackendStatus, ClusterName, DroneName, DronePoolName, NodeId};
use crate::PlaneDatabase;
use chrono::{DateTime, Utc};

/// Drone scheduling inputs. Get one from [`PlaneDatabase::drone`].
pub struct DroneDatabase<'a> {
    db: &'a PlaneDatabase,
}

/// The drone [`DroneDatabase::pick_for_spawn`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickedDrone {
    /// The drone's node id.
    pub id: NodeId,
    /// The drone's name.
    pub name: DroneName,
}

impl<'a> DroneDatabase<'a> {
    pub(crate) fn new(db: &'a PlaneDatabase) -> Self {
        Self { db }
    }

    /// Registers the drone of node `id` (see [`NodeDatabase::register`](crate::node::NodeDatabase::register))
    /// in `pool`, or updates its readiness and pool. Counts as a heartbeat.
    #[tracing::instrument(skip(self), fields(drone = %id), err)]
    pub async fn register(&self, id: NodeId, ready: bool, pool: &DronePoolName) -> Result<()> {
        sqlx::query!(
            r#"
            insert into drone (id, ready, pool, last_heartbeat)
            values ($1, $2, $3, now())
            on conflict (id) do update set
                ready = excluded.ready,
                pool = excluded.pool,
                last_heartbeat = excluded.last_heartbeat
            "#,
            id.as_i32(),
            ready,
            pool.as_str(),
        )
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Records a heartbeat with the drone's own clock. Returns false if no such drone.
    #[tracing::instrument(skip(self), fields(drone = %id), err)]
    pub async fn heartbeat(&self, id: NodeId, local_time: DateTime<Utc>) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            update drone set last_heartbeat = now(), last_local_time = $2
            where id = $1
            "#,
            id.as_i32(),
            local_time,
        )
        .execute(self.db.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Sets whether the drone accepts new backends. Returns false if no such drone.
    #[tracing::instrument(skip(self), fields(drone = %id), err)]
    pub async fn set_ready(&self, id: NodeId, ready: bool) -> Result<bool> {
        let result = sqlx::query!(
            "update drone set ready = $2 where id = $1",
            id.as_i32(),
            ready
        )
        .execute(self.db.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Picks a drone for a new backend in `cluster` and `pool`: ready, heard from within
    /// the heartbeat timeout, not draining, and held by a controller that is online and
    /// heartbeating. Among a random sample of [`SchedulerConfig::sample_size`](crate::SchedulerConfig)
    /// such drones, the one with the fewest live backends wins. `None` if no drone qualifies.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, pool = %pool), err)]
    pub async fn pick_for_spawn(
        &self,
        cluster: &ClusterName,
        pool: &DronePoolName,
    ) -> Result<Option<PickedDrone>> {
        let config = &self.db.config().scheduler;
        if config.sample_size < 1 {
            return Err(Error::InvalidArgument {
                argument: "scheduler.sample_size",
                reason: format!("must be at least 1, got {}", config.sample_size),
            });
        }
        let row = sqlx::query!(
            r#"
            with sample as (
                select d.id, n.name
                from drone d
                join node n on n.id = d.id
                join controller c on c.id = n.controller
                where n.cluster = $1
                  and d.pool = $2
                  and d.ready
                  and not d.draining
                  and d.last_heartbeat > now() - make_interval(secs => $3)
                  and c.is_online
                  and c.last_heartbeat > now() - make_interval(secs => $4)
                order by random()
                limit $5
            )
            select s.id, s.name
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
            config.sample_size,
            BackendStatus::Terminated.as_int(),
        )
        .fetch_optional(self.db.pool())
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
