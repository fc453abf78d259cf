//! Controllers: the processes that embed this crate report that they are alive.

use crate::error::Result;
use crate::types::ControllerName;
use crate::PlaneDatabase;

/// Controller heartbeats. Get one from [`PlaneDatabase::controller`].
pub struct ControllerDatabase<'a> {
    db: &'a PlaneDatabase,
}

impl<'a> ControllerDatabase<'a> {
    pub(crate) fn new(db: &'a PlaneDatabase) -> Self {
        Self { db }
    }

    /// Records a heartbeat of `controller` (creating its row on first use). Send one
    /// periodically with `is_online = true`, and one with `false` on shutdown; drones of a
    /// controller that is offline or silent are not scheduled.
    #[tracing::instrument(skip(self), err)]
    pub async fn heartbeat(
        &self,
        controller: &ControllerName,
        is_online: bool,
        plane_version: &str,
        plane_hash: &str,
    ) -> Result<()> {
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
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}
