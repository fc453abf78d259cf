//! Keys: the leases through which at most one live backend holds a key.
//!
//! [`PlaneDatabase::connect`](crate::PlaneDatabase::connect) acquires a key for the backend it
//! creates; the backend's drone then renews it before each deadline
//! ([`KeyLeaseConfig`](crate::KeyLeaseConfig)). The key expires
//! [`expiration_margin`](crate::KeyLeaseConfig::expiration_margin) after the hard-terminate
//! deadline (60 s after scheduling or renewal by default, as in Plane 0.5.5). A key whose
//! lease ran out may be taken over by a new backend, which gets a larger fencing token, so
//! that anything still acting for the old holder can be told apart; until then, its holder's
//! renewal revives it (as Plane's `renew_key` does). Termination releases the key.

use crate::backend::BackendIdentity;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::limits::{self, limit};
use crate::types::{
    AcquiredKey, BackendName, BackendStatus, BearerToken, ClusterName, KeyConfig, KeyDeadlines,
    Subdomain,
};
use crate::validate::interval_secs;
use chrono::{DateTime, Utc};

/// Key leases. Get one from [`PlaneDatabase::key`](crate::PlaneDatabase::key).
pub struct KeysDatabase<'a> {
    ctx: &'a Context,
}

/// The outcome of [`KeysDatabase::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRenewal {
    /// The lease was extended; the drone should act on these deadlines.
    Renewed(AcquiredKey),
    /// Renewal was prevented ([`KeysDatabase::prevent_renew`]): the backend should wind down
    /// by its current deadlines.
    Prevented,
    /// The backend holds no key: it never had one, it terminated, its key was removed
    /// ([`KeysDatabase::remove_if_expired`]), or another backend took the key over after
    /// the lease ran out. (A lease that ran out but that nobody took over is revived.)
    NotHeld,
}

/// A key and the backend holding it, as read by [`KeysDatabase::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The backend holding the key (named `backend_id`, as every reference to a backend
    /// from a type other than the backend's own row: see [`types`](crate::types#ids)).
    pub backend_id: BackendName,
    /// The key (namespace, name, and the tag it was acquired with).
    pub key: KeyConfig,
    /// The fencing token of this acquisition.
    pub fencing_token: i64,
    /// The backend's status.
    pub status: BackendStatus,
    /// The backend's cluster.
    pub cluster: ClusterName,
    /// The backend's subdomain, if it has one.
    pub subdomain: Option<Subdomain>,
    /// The backend's static token, if it was created with one.
    pub static_token: Option<BearerToken>,
    /// When the lease runs out unless renewed.
    pub expires_at: DateTime<Utc>,
    /// When this was read (database clock), to judge `expires_at` against.
    pub as_of: DateTime<Utc>,
}

impl KeyHolder {
    /// Whether the lease was still running when this was read. A key whose lease ran out
    /// may be taken over by a new backend.
    pub fn is_live(&self) -> bool {
        self.as_of < self.expires_at
    }
}

impl<'a> KeysDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Extends the lease of the key held by `backend` by the configured
    /// [`KeyLeaseConfig`](crate::KeyLeaseConfig) from now, and returns the new deadlines,
    /// counted from `drone_local_time` (the drone's clock when it asked): the drone acts on
    /// them by its own clock, so a skewed clock does not stretch the lease. Refused
    /// ([`KeyRenewal::Prevented`]) once renewal has been prevented.
    ///
    /// As in Plane 0.5.5, a lease that has run out is **revived** as long as the backend
    /// still holds the key, i.e. no other backend has taken it over (and it was not
    /// removed): nobody else acquired the key in between, so the backend keeps its fencing
    /// token. Once another backend has taken the key over, the old holder's renewal is
    /// [`KeyRenewal::NotHeld`]. A renewal and a takeover never both succeed: the takeover
    /// needs the lease to have run out when it locks the key's row, the renewal needs the
    /// row to still name this backend when it locks it.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn renew(
        &self,
        backend: &BackendName,
        drone_local_time: DateTime<Utc>,
    ) -> Result<KeyRenewal> {
        let lease = &self.ctx.config().key_lease;
        // Computed before the update, so a bad time changes nothing. A date near the end of
        // chrono's range must not overflow into a panic.
        let after = |d: std::time::Duration| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| drone_local_time.checked_add_signed(d))
                .ok_or_else(|| Error::InvalidArgument {
                    argument: "drone_local_time",
                    reason: format!("{drone_local_time} plus the key lease is out of range"),
                })
        };
        let deadlines = KeyDeadlines {
            renew_at: after(lease.renew_after)?,
            soft_terminate_at: after(lease.soft_terminate_after)?,
            hard_terminate_at: after(lease.hard_terminate_after)?,
        };
        // The update's own condition decides, so a renewal and a takeover can never both
        // succeed: a takeover rewrites the row's id (and waits for a renewal holding the
        // row, then sees the renewed lease and gives up); a renewal waiting for a takeover
        // re-reads the row and finds another id. No expiry condition: an expired lease
        // that is still this backend's is revived, with its fencing token.
        let renewed = sqlx::query!(
            r#"
            update backend_key set expires_at = now() + make_interval(secs => $2)
            where id = $1 and allow_renew
            returning namespace, key_name, tag, fencing_token
            "#,
            backend.as_str(),
            interval_secs(lease.expires_after()),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        if let Some(row) = renewed {
            return Ok(KeyRenewal::Renewed(AcquiredKey {
                key: KeyConfig {
                    name: row.key_name,
                    namespace: row.namespace,
                    tag: row.tag,
                },
                deadlines,
                token: row.fencing_token,
            }));
        }
        // Why not: read after the update (not in its statement, whose snapshot predates a
        // concurrent prevent_renew that it waited for).
        let allow_renew = sqlx::query_scalar!(
            "select allow_renew from backend_key where id = $1",
            backend.as_str(),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        Ok(match allow_renew {
            Some(false) => KeyRenewal::Prevented,
            _ => KeyRenewal::NotHeld,
        })
    }

    /// Prevents further renewals of the key held by `backend`, so that it lapses at its
    /// current deadlines (how a backend is wound down through its key). Returns true if
    /// this call prevented it, false if renewal was already prevented or there is no key.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn prevent_renew(&self, backend: &BackendName) -> Result<bool> {
        let result = sqlx::query!(
            "update backend_key set allow_renew = false where id = $1 and allow_renew",
            backend.as_str(),
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Deletes the key held by `backend`, but only if its lease has run out (a live lease
    /// is never removed). Returns true if a key was deleted.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub async fn remove_if_expired(&self, backend: &BackendName) -> Result<bool> {
        let result = sqlx::query!(
            "delete from backend_key where id = $1 and expires_at <= now()",
            backend.as_str(),
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The backend holding `key` (matched by namespace and name; the tag is returned, not
    /// compared), with its status, cluster, subdomain and static token. `None` if no backend
    /// holds it. Check [`KeyHolder::is_live`]: an expired holder may be replaced at any time.
    #[tracing::instrument(skip(self), fields(namespace = %key.namespace, key = %key.name))]
    pub async fn lookup(&self, key: &KeyConfig) -> Result<Option<KeyHolder>> {
        limits::check_text("key.namespace", &key.namespace, limit!(KEY_NAMESPACE_BYTES))?;
        limits::check_text("key.name", &key.name, limit!(KEY_NAME_BYTES))?;
        let row = sqlx::query!(
            r#"
            select k.id, k.namespace, k.key_name, k.tag, k.fencing_token, k.expires_at,
                   b.last_status_number, b.cluster, b.subdomain, b.static_token,
                   now() as "as_of!"
            from backend_key k
            join backend b on b.id = k.id
            where k.namespace = $1 and k.key_name = $2
            "#,
            key.namespace,
            key.name,
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let identity =
            BackendIdentity::decode(row.id, row.last_status_number, row.cluster, row.subdomain)?;
        Ok(Some(KeyHolder {
            backend_id: identity.id,
            key: KeyConfig {
                name: row.key_name,
                namespace: row.namespace,
                tag: row.tag,
            },
            fencing_token: row.fencing_token,
            status: identity.status,
            cluster: identity.cluster,
            subdomain: identity.subdomain,
            static_token: row.static_token.map(BearerToken::from),
            expires_at: row.expires_at,
            as_of: row.as_of,
        }))
    }
}
