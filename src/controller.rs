//! Controllers: the processes that embed this crate report that they are alive.

use crate::context::Context;
use crate::error::{skip_undecodable, Error, Result};
use crate::limits::{self, limit};
use crate::types::ControllerName;
use chrono::{DateTime, Utc};

/// Controller heartbeats. Get one from [`PlaneDatabase::controller`](crate::PlaneDatabase::controller).
pub struct ControllerDatabase<'a> {
    ctx: &'a Context,
}

impl<'a> ControllerDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Records a heartbeat of `controller` (creating its row on first use). Send one
    /// periodically with `is_online = true`, and one with `false` on shutdown; drones of a
    /// controller that is offline or silent are not scheduled. The version and hash are at
    /// most [`PLANE_VERSION_BYTES`](crate::limits::PLANE_VERSION_BYTES) and
    /// [`PLANE_HASH_BYTES`](crate::limits::PLANE_HASH_BYTES).
    #[tracing::instrument(skip(self))]
    pub async fn heartbeat(
        &self,
        controller: &ControllerName,
        is_online: bool,
        plane_version: &str,
        plane_hash: &str,
    ) -> Result<()> {
        limits::check_text("plane_version", plane_version, limit!(PLANE_VERSION_BYTES))?;
        limits::check_text("plane_hash", plane_hash, limit!(PLANE_HASH_BYTES))?;
        sqlx::query!(
            r#"
            insert into controller (id, is_online, plane_version, plane_hash, last_heartbeat, ip)
            values ($1, $2, $3, $4, now(), inet_client_addr())
            on conflict (id) do update set
                is_online = excluded.is_online,
                plane_version = excluded.plane_version,
                plane_hash = excluded.plane_hash,
                last_heartbeat = excluded.last_heartbeat,
                ip = excluded.ip
            "#,
            controller.as_str(),
            is_online,
            plane_version,
            plane_hash,
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(())
    }

    /// The controllers that are online: their latest heartbeat said `is_online = true` and
    /// came within [`SchedulerConfig::controller_heartbeat_timeout`](crate::SchedulerConfig)
    /// (a controller that died without saying goodbye drops out once it falls silent).
    /// Ordered by name; rows that do not decode are skipped with a warning.
    #[tracing::instrument(skip(self))]
    pub async fn online_controllers(&self) -> Result<Vec<ControllerInfo>> {
        let timeout = self
            .ctx
            .config()
            .scheduler
            .controller_heartbeat_timeout
            .as_secs_f64();
        let rows = sqlx::query!(
            r#"
            select id, plane_version, plane_hash, first_seen, last_heartbeat,
                   now() as "as_of!"
            from controller
            where is_online and last_heartbeat > now() - make_interval(secs => $1)
            order by id
            "#,
            timeout,
        )
        .fetch_all(self.ctx.pool())
        .await?;
        Ok(skip_undecodable(rows.into_iter().map(|row| {
            Ok(ControllerInfo {
                name: ControllerName::try_from(row.id.clone())
                    .map_err(|e| Error::decode("controller", "id", &row.id, e))?,
                plane_version: row.plane_version,
                plane_hash: row.plane_hash,
                first_seen: row.first_seen,
                last_heartbeat: row.last_heartbeat,
                heartbeat_age: row.as_of - row.last_heartbeat,
            })
        })))
    }
}

/// An online controller, as listed by [`ControllerDatabase::online_controllers`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControllerInfo {
    /// Its name.
    pub name: ControllerName,
    /// The software version it runs.
    pub plane_version: String,
    /// The git hash of that version.
    pub plane_hash: String,
    /// When it first heartbeated.
    pub first_seen: DateTime<Utc>,
    /// When it last heartbeated.
    pub last_heartbeat: DateTime<Utc>,
    /// How long ago that was, by the database clock.
    /// Serialized as `heartbeat_age_seconds`.
    #[serde(
        rename = "heartbeat_age_seconds",
        serialize_with = "crate::serde_seconds::serialize"
    )]
    pub heartbeat_age: chrono::Duration,
}
