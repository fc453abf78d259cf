//! ACME DNS-01: the TXT record a cluster's certificate challenge needs, leased to one proxy
//! at a time so that two proxies never run a challenge for the same cluster at once.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::limits::{self, limit};
use crate::types::{ClusterName, NodeId};
use std::time::Duration;

/// A lease older than this may be taken over by another proxy (its holder is presumed gone).
pub const ACME_LEASE_TIMEOUT: Duration = Duration::from_secs(60);

/// ACME DNS-01 TXT records. Get one from [`PlaneDatabase::acme`](crate::PlaneDatabase::acme).
pub struct AcmeDatabase<'a> {
    ctx: &'a Context,
}

impl<'a> AcmeDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Tries to lease `cluster`'s TXT record to `proxy`. Succeeds (true) if nobody holds
    /// it, if `proxy` already holds it (the lease is refreshed and its value kept), or if the
    /// holder's lease is older than [`ACME_LEASE_TIMEOUT`] (taken over; the old value is
    /// cleared). False if another proxy holds a fresh lease. An unknown `proxy` that would
    /// get the lease is [`Error::NotFound`].
    ///
    /// Unlike Plane 0.5.5, which refuses the holder too until its lease is a minute old, the
    /// holder's request is granted and restarts the minute: a proxy that retries after a
    /// lost answer gets the lease it holds instead of waiting it out, and a challenge that
    /// takes longer than a minute can be kept from being taken over. Plane 0.5.5's proxies
    /// ask again within the minute only when an answer went missing (they wait a minute
    /// after a refusal, five after a failed challenge, and never release a lease), so
    /// otherwise they see the same answers from both.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, proxy = %proxy))]
    pub async fn lease(&self, cluster: &ClusterName, proxy: NodeId) -> Result<bool> {
        let result = sqlx::query!(
            r#"
            insert into acme_txt_entries (cluster, leased_at, leased_by)
            values ($1, now(), $2)
            on conflict (cluster) do update set
                leased_at = now(),
                leased_by = excluded.leased_by,
                txt_value = case when acme_txt_entries.leased_by = excluded.leased_by
                                 then acme_txt_entries.txt_value end
            where acme_txt_entries.leased_by = excluded.leased_by
               or acme_txt_entries.leased_at <= now() - make_interval(secs => $3)
            "#,
            cluster.as_str(),
            proxy.as_i32(),
            ACME_LEASE_TIMEOUT.as_secs_f64(),
        )
        .execute(self.ctx.pool())
        .await;
        match result {
            Ok(result) => Ok(result.rows_affected() > 0),
            Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => Err(Error::NotFound {
                what: "node",
                id: proxy.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the TXT value of `cluster`, only if `proxy` holds its lease. Returns false,
    /// changing nothing, if it does not. The value is at most
    /// [`ACME_TXT_VALUE_BYTES`](crate::limits::ACME_TXT_VALUE_BYTES).
    #[tracing::instrument(skip(self, value), fields(cluster = %cluster, proxy = %proxy))]
    pub async fn set_txt(&self, cluster: &ClusterName, proxy: NodeId, value: &str) -> Result<bool> {
        limits::check_text("value", value, limit!(ACME_TXT_VALUE_BYTES))?;
        let result = sqlx::query!(
            "update acme_txt_entries set txt_value = $3 where cluster = $1 and leased_by = $2",
            cluster.as_str(),
            proxy.as_i32(),
            value,
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The TXT value to serve for `cluster`, if one is set.
    #[tracing::instrument(skip(self), fields(cluster = %cluster))]
    pub async fn txt(&self, cluster: &ClusterName) -> Result<Option<String>> {
        let value = sqlx::query_scalar!(
            "select txt_value from acme_txt_entries where cluster = $1",
            cluster.as_str(),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        Ok(value.flatten())
    }

    /// Releases `proxy`'s lease on `cluster` (and its value). Returns false if `proxy` did
    /// not hold it.
    #[tracing::instrument(skip(self), fields(cluster = %cluster, proxy = %proxy))]
    pub async fn release(&self, cluster: &ClusterName, proxy: NodeId) -> Result<bool> {
        let result = sqlx::query!(
            "delete from acme_txt_entries where cluster = $1 and leased_by = $2",
            cluster.as_str(),
            proxy.as_i32(),
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }
}
