//! `connect`: get or create the backend for a key, and hand out a token to reach it.

pub(crate) mod spawn;

use crate::backend::BackendIdentity;
use crate::connect::spawn::{NewBackend, SpawnOutcome};
use crate::context::Context;
use crate::error::{ConnectError, Error, Result};
use crate::events::EventWriter;
use crate::limits::{self, limit};
use crate::types::{
    BackendActionName, BackendName, BackendStatus, BearerToken, ClusterName, DroneName,
    DronePoolName, KeyConfig, SecretToken, Subdomain,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How many times `connect` re-reads a key that changes hands under it before giving up.
const MAX_ATTEMPTS: u32 = 5;

/// A request for a backend, as a client sends it to a controller.
///
/// Its text and JSON are bounded (see [`limits`]): a request with a value
/// over its limit is refused with [`Error::InvalidArgument`] (in [`ConnectError::Other`])
/// naming the field, before any query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// The key to get or create a backend for. Without a key a new backend is always
    /// created (under a fresh random key).
    #[serde(default)]
    pub key: Option<KeyConfig>,
    /// How to create a backend if no live backend holds the key. Without it, only an
    /// existing backend can be returned.
    #[serde(default)]
    pub spawn_config: Option<SpawnConfig>,
    /// The user the token is issued to; passed to the backend with each request. At most
    /// [`USER_BYTES`](crate::limits::USER_BYTES).
    #[serde(default)]
    pub user: Option<String>,
    /// Arbitrary JSON passed to the backend with each request made with the token. At most
    /// [`AUTH_BYTES`](crate::limits::AUTH_BYTES) serialized.
    #[serde(default)]
    pub auth: Map<String, Value>,
}

/// How to create a backend (Plane 0.5.5's `SpawnConfig`, same JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnConfig {
    /// The name to give the new backend. Without it a fresh `ba-…` name is generated, which
    /// is what most callers want. A name an existing backend has (running, or terminated but
    /// not yet cleaned up) is [`ConnectError::BackendIdTaken`]. Any valid
    /// [`BackendName`] is accepted, including Plane's prefix-less names.
    #[serde(default)]
    pub id: Option<BackendName>,
    /// The cluster to run it in. Without it, [`Config::default_cluster`](crate::Config::default_cluster);
    /// without both, [`ConnectError::NoClusterProvided`] (only when a backend must be
    /// spawned: connecting to a live backend by its key needs no cluster).
    #[serde(default)]
    pub cluster: Option<ClusterName>,
    /// The drone pool to run it in (default pool: empty string). At most
    /// [`DRONE_POOL_BYTES`](crate::limits::DRONE_POOL_BYTES).
    #[serde(default)]
    pub pool: DronePoolName,
    /// What the drone should run (opaque to the database; passed in the spawn action). At
    /// most [`EXECUTABLE_BYTES`](crate::limits::EXECUTABLE_BYTES) serialized.
    pub executable: Value,
    /// If set, the backend becomes a termination candidate this long after scheduling.
    #[serde(default)]
    pub lifetime_limit_seconds: Option<i32>,
    /// If set, the backend becomes a termination candidate after this long without a
    /// keepalive.
    #[serde(default)]
    pub max_idle_seconds: Option<i32>,
    /// Give the backend one static token (`s.…`) instead of a token per connect.
    #[serde(default)]
    pub use_static_token: bool,
    /// The subdomain to serve the backend on.
    #[serde(default)]
    pub subdomain: Option<Subdomain>,
}

/// What `connect` returns: the backend and a token to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectResponse {
    /// The backend.
    pub backend_id: BackendName,
    /// Whether this call created it.
    pub spawned: bool,
    /// Its status when the call returned.
    pub status: BackendStatus,
    /// Its cluster.
    pub cluster: ClusterName,
    /// The bearer token to present to a proxy (the static token for static backends).
    pub token: BearerToken,
    /// The secret the backend receives with each request made with `token` (none for
    /// static tokens).
    pub secret_token: Option<SecretToken>,
    /// Its subdomain, if any.
    pub subdomain: Option<Subdomain>,
    /// The drone it was scheduled on, if this call created it (none also when the drone's
    /// name in the database does not decode: a warning is logged).
    pub drone: Option<DroneName>,
    /// The key's fencing token, if this call acquired the key.
    pub fencing_token: Option<i64>,
}

/// What [`Connector::try_spawn`] did.
enum Spawn {
    /// It created the backend.
    Spawned(ConnectResponse),
    /// A live backend holds the key: nothing was created.
    KeyHeld,
    /// No drone qualifies: nothing was created.
    NoDrone,
    /// The requested backend name is taken: nothing was created.
    IdTaken(BackendName),
}

/// The holder of a key, as read.
struct HeldKey {
    identity: BackendIdentity,
    tag: String,
    live: bool,
    /// The token for this caller: the static token, or one issued with the read (only when
    /// the holder is live and the tag matches).
    token: Option<(BearerToken, Option<SecretToken>)>,
}

/// `connect` and `revoke` on a context. Reached through
/// [`PlaneDatabase::connect`](crate::PlaneDatabase::connect).
pub(crate) struct Connector<'a> {
    ctx: &'a Context,
}

impl<'a> Connector<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// [`PlaneDatabase::connect`](crate::PlaneDatabase::connect).
    #[tracing::instrument(
        skip_all,
        fields(namespace, key, cluster, backend = tracing::field::Empty, drone = tracing::field::Empty)
    )]
    pub(crate) async fn connect(
        &self,
        request: &ConnectRequest,
    ) -> Result<ConnectResponse, ConnectError> {
        let key = request.key.clone().unwrap_or_else(KeyConfig::new_random);
        let span = tracing::Span::current();
        span.record("namespace", key.namespace.as_str());
        span.record("key", key.name.as_str());
        if let Some(cluster) = self.spawn_cluster(request) {
            span.record("cluster", cluster.as_str());
        }
        let response =
            crate::metrics::timed_connect(self.ctx.pool(), self.connect_key(request, key)).await?;
        // The backend is only known now; later log lines in this span carry it.
        span.record("backend", response.backend_id.as_str());
        if let Some(drone) = &response.drone {
            span.record("drone", drone.as_str());
        }
        Ok(response)
    }

    /// The cluster a backend of this request would be spawned in: the spawn config's, or
    /// the configured default.
    fn spawn_cluster<'r>(&'r self, request: &'r ConnectRequest) -> Option<&'r ClusterName> {
        let spawn = request.spawn_config.as_ref()?;
        spawn
            .cluster
            .as_ref()
            .or(self.ctx.config().default_cluster.as_ref())
    }

    /// [`connect`](Self::connect) for the resolved key.
    async fn connect_key(
        &self,
        request: &ConnectRequest,
        key: KeyConfig,
    ) -> Result<ConnectResponse, ConnectError> {
        check_sizes(request, &key)?;
        if let Some(spawn) = &request.spawn_config {
            check_limits(spawn)?;
        }
        let cluster = self.spawn_cluster(request);

        for _ in 0..MAX_ATTEMPTS {
            let mut no_drone = false;
            let mut id_taken = None;
            if let (Some(spawn), Some(cluster)) = (&request.spawn_config, cluster) {
                match self.try_spawn(&key, spawn, cluster, request).await? {
                    Spawn::Spawned(response) => return Ok(response),
                    Spawn::KeyHeld => {}
                    Spawn::NoDrone => no_drone = true,
                    Spawn::IdTaken(backend) => id_taken = Some(backend),
                }
            }

            match self.key_holder(&key, request).await? {
                Some(holder) if holder.live => {
                    let Some((token, secret_token)) =
                        holder.token.filter(|_| holder.tag == key.tag)
                    else {
                        return Err(ConnectError::KeyHeld {
                            namespace: key.namespace,
                            name: key.name,
                            backend: holder.identity.id,
                            key_tag: holder.tag,
                            request_tag: key.tag,
                        });
                    };
                    let identity = holder.identity;
                    return Ok(ConnectResponse {
                        backend_id: identity.id,
                        spawned: false,
                        status: identity.status,
                        cluster: identity.cluster,
                        token,
                        secret_token,
                        subdomain: identity.subdomain,
                        drone: None,
                        fencing_token: None,
                    });
                }
                // No live holder: spawn (again) if we can.
                _ => {
                    let Some(spawn) = &request.spawn_config else {
                        return Err(ConnectError::NoSpawnConfig {
                            namespace: key.namespace,
                            name: key.name,
                        });
                    };
                    let Some(cluster) = cluster else {
                        return Err(ConnectError::NoClusterProvided);
                    };
                    // The name's holder committed (Postgres reports a unique violation only
                    // then) and it does not hold this key: no retry can succeed.
                    if let Some(backend) = id_taken {
                        return Err(ConnectError::BackendIdTaken { backend });
                    }
                    if no_drone {
                        return Err(ConnectError::NoDroneAvailable {
                            cluster: cluster.clone(),
                            pool: spawn.pool.clone(),
                        });
                    }
                }
            }
        }
        Err(ConnectError::Contended {
            namespace: key.namespace,
            name: key.name,
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Creates the backend if the key is free or expired, on a drone picked as
    /// [`DroneDatabase::pick_for_spawn`](crate::drone::DroneDatabase::pick_for_spawn) picks,
    /// in the same statement (batched with concurrent calls, see
    /// [`WriteBatchConfig`](crate::WriteBatchConfig)).
    async fn try_spawn(
        &self,
        key: &KeyConfig,
        spawn: &SpawnConfig,
        cluster: &ClusterName,
        request: &ConnectRequest,
    ) -> Result<Spawn> {
        self.ctx.config().scheduler.checked_sample_size()?;
        let backend_id = spawn.id.clone().unwrap_or_else(BackendName::new_random);
        let (token, secret_token) = if spawn.use_static_token {
            (BearerToken::new_random_static(), None)
        } else {
            (BearerToken::new_random(), Some(SecretToken::new_random()))
        };
        let item = NewBackend::for_request(
            backend_id.clone(),
            key,
            cluster,
            spawn,
            request,
            &token,
            secret_token.as_ref(),
            BackendActionName::new_random(),
        )?;

        let (fencing_token, drone_id, drone_name) = match self.ctx.spawner().write(item).await {
            Ok(SpawnOutcome::Created {
                fencing_token,
                drone_id,
                drone_name,
            }) => (fencing_token, drone_id, drone_name),
            Ok(SpawnOutcome::KeyHeld) => return Ok(Spawn::KeyHeld),
            Ok(SpawnOutcome::NoDrone) => return Ok(Spawn::NoDrone),
            // A caller-chosen name that a backend already has: as that backend's row or as
            // the holder of another key.
            Err(sqlx::Error::Database(e))
                if spawn.id.is_some()
                    && e.is_unique_violation()
                    && matches!(e.constraint(), Some("backend_pkey" | "backend_key_pkey")) =>
            {
                return Ok(Spawn::IdTaken(backend_id));
            }
            Err(e) => return Err(e.into()),
        };
        EventWriter::new(self.ctx.bus()).committed();
        // The backend exists now. A drone name that does not decode (a row written behind
        // the crate's back) must not turn that into an error: a caller without a key would
        // retry and create a second backend. It is reported, and the response names no drone.
        let drone = match DroneName::try_from(drone_name) {
            Ok(name) => Some(name),
            Err(e) => {
                let error = Error::decode("node", "name", drone_id, e);
                tracing::warn!(backend = %backend_id, %error, "scheduled a new backend on a drone whose name does not decode");
                None
            }
        };
        tracing::info!(backend = %backend_id, drone = ?drone, "scheduled a new backend");
        Ok(Spawn::Spawned(ConnectResponse {
            backend_id,
            spawned: true,
            status: BackendStatus::Scheduled,
            cluster: cluster.clone(),
            token,
            secret_token,
            subdomain: spawn.subdomain.clone(),
            drone,
            fencing_token: Some(fencing_token),
        }))
    }

    /// The backend holding the key, if any, and whether its lease is still live. If it is
    /// live, has the request's tag and no static token, a token for this caller is issued in
    /// the same statement (one round trip for a reconnect).
    async fn key_holder(
        &self,
        key: &KeyConfig,
        request: &ConnectRequest,
    ) -> Result<Option<HeldKey>> {
        let token = BearerToken::new_random();
        let secret = SecretToken::new_random();
        let row = sqlx::query!(
            r#"
            with holder as (
                select k.id, k.tag, k.expires_at > now() as live, b.last_status_number,
                       b.cluster, b.subdomain, b.static_token
                from backend_key k
                join backend b on b.id = k.id
                where k.namespace = $1 and k.key_name = $2
            ),
            issued as (
                insert into token (token_digest, backend_id, expiration_time, username, auth,
                                   secret_token)
                select $4, id, now() + make_interval(secs => $5), $6, $7, $8
                from holder
                where live and tag = $3 and static_token is null
                returning 1
            )
            select id as "id!", tag as "tag!", live as "live!",
                   last_status_number as "last_status_number!", cluster as "cluster!",
                   subdomain, static_token, exists (select 1 from issued) as "issued!"
            from holder
            "#,
            key.namespace,
            key.name,
            key.tag,
            token.digest(),
            self.ctx.config().token_lifetime.as_secs_f64(),
            request.user,
            Value::Object(request.auth.clone()),
            secret.as_str(),
        )
        .fetch_optional(self.ctx.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let identity =
            BackendIdentity::decode(row.id, row.last_status_number, row.cluster, row.subdomain)?;
        let token = match (row.static_token, row.issued) {
            (Some(token), _) => Some((BearerToken::from(token), None)),
            (None, true) => Some((token, Some(secret))),
            (None, false) => None,
        };
        Ok(Some(HeldKey {
            identity,
            tag: row.tag,
            live: row.live,
            token,
        }))
    }

    /// Revokes every token issued to `user` for `backend`. Returns how many were revoked.
    #[tracing::instrument(skip(self), fields(backend = %backend))]
    pub(crate) async fn revoke(&self, backend: &BackendName, user: &str) -> Result<u64> {
        // A longer user or one with a NUL holds no token (connect refuses them).
        limits::check_text("user", user, limit!(USER_BYTES))?;
        let result = sqlx::query!(
            "delete from token where backend_id = $1 and username = $2",
            backend.as_str(),
            user,
        )
        .execute(self.ctx.pool())
        .await?;
        Ok(result.rows_affected())
    }
}

impl crate::metrics::HasOutcome for Result<ConnectResponse, ConnectError> {
    fn outcome(&self, _: crate::metrics::Operation) -> crate::metrics::Outcome {
        use crate::metrics::Outcome;
        match self {
            Ok(_) => Outcome::Accepted,
            Err(ConnectError::Other(error)) => crate::metrics::error_outcome(error),
            Err(ConnectError::Contended { .. }) => Outcome::Error,
            Err(_) => Outcome::Refused,
        }
    }
}

/// Every caller-supplied text and JSON of the request within its limit (see
/// [`limits`](crate::limits)) and without a NUL, before any query: on the reconnect path too,
/// and before a new backend is queued for a batch, so a refusal writes nothing and costs no
/// round trip. Names the crate parsed (cluster, backend name, subdomain) are bounded by their
/// types.
fn check_sizes(request: &ConnectRequest, key: &KeyConfig) -> Result<()> {
    limits::check_text("key.name", &key.name, limit!(KEY_NAME_BYTES))?;
    limits::check_text("key.namespace", &key.namespace, limit!(KEY_NAMESPACE_BYTES))?;
    limits::check_text("key.tag", &key.tag, limit!(KEY_TAG_BYTES))?;
    if let Some(user) = &request.user {
        limits::check_text("user", user, limit!(USER_BYTES))?;
    }
    limits::check_json_object("auth", &request.auth, limit!(AUTH_BYTES))?;
    if let Some(spawn) = &request.spawn_config {
        limits::check_text(
            "spawn_config.pool",
            spawn.pool.as_str(),
            limit!(DRONE_POOL_BYTES),
        )?;
        limits::check_json(
            "spawn_config.executable",
            &spawn.executable,
            limit!(EXECUTABLE_BYTES),
        )?;
    }
    Ok(())
}

/// Limits must be positive: a zero or negative lifetime would make the backend a
/// termination candidate before it starts.
fn check_limits(spawn: &SpawnConfig) -> Result<()> {
    for (argument, value) in [
        ("lifetime_limit_seconds", spawn.lifetime_limit_seconds),
        ("max_idle_seconds", spawn.max_idle_seconds),
    ] {
        if let Some(v) = value {
            if v <= 0 {
                return Err(Error::InvalidArgument {
                    argument,
                    reason: format!("must be positive, got {v}"),
                });
            }
        }
    }
    Ok(())
}
