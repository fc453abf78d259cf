//! `connect`'s statements for group commit: a new backend for a key, alone or many at once.
//!
//! Each new backend is the pick of its drone, the key's acquisition (only if the key is free
//! or its lease expired, with the next fencing token), the backend row, its first history
//! row, its `scheduled` event, the spawn action for its drone with that action's event, and
//! the caller's token. All of it comes from one statement, or none of it.
//!
//! The pick follows `DroneDatabase::pick_for_spawn`'s rules, spelled out in each statement
//! so that it is planned with the statement: a database function holding it was planned
//! again on every call and halved the pick rate (measured), and its default row estimate
//! made Postgres JIT-compile the spawn statement (about 320 ms a call).
//! `tests/it/scheduling.rs` checks the rules of all three (`pick_for_spawn`, the lone and the
//! batch statement) against the same drones.
//!
//! Two statements, one write: the lone one is about twice the batch one's rate for a call
//! alone (measured, see `spawn_one`), so both stay. What keeps them one write: every item is
//! built by [`NewBackend::for_request`] (one struct literal, no field left to a default), both
//! statements take the item apart field by field without `..` (a new field does not build
//! until both name it), and `tests/it/batch_statements.rs` runs the same calls alone, in one
//! batch and in batches of one, in three databases, and compares every column of every row.

use crate::config::{KeyLeaseConfig, SchedulerConfig};
use crate::connect::{ConnectRequest, SpawnConfig};
use crate::error::Result;
use crate::events::{EventBatch, NotificationPayload};
use crate::group_commit::Statements;
use crate::metrics::Operation;
use crate::types::{
    BackendActionMessage, BackendActionName, BackendName, BackendState, BackendStatus, BearerToken,
    ClusterName, DronePoolName, KeyConfig, SecretToken,
};
use crate::validate::{check_json, check_text, interval_secs};
use serde_json::Value;
use sqlx::PgConnection;
use std::time::Duration;

/// A backend to create, as the statement takes it.
pub(crate) struct NewBackend {
    backend_id: BackendName,
    key: KeyConfig,
    cluster: ClusterName,
    /// The drone pool to pick a drone from.
    pool: DronePoolName,
    lifetime_limit_seconds: Option<f64>,
    max_idle_seconds: Option<i32>,
    static_token: Option<String>,
    subdomain: Option<String>,
    executable: Value,
    action_id: BackendActionName,
    /// The digest of the caller's bearer token; none for a static token.
    token_digest: Option<Vec<u8>>,
    user: Option<String>,
    auth: Value,
    /// The secret sent with the token's requests (empty for a static token).
    secret_token: String,
    /// `namespace`, a NUL, `key name`: the key row this item locks.
    lock_key: String,
    /// Exactly one event, the backend's `scheduled` state, whose payload is also the row's
    /// `state` (serialised once).
    events: EventBatch,
}

impl NewBackend {
    /// The item `connect` writes for a new backend of `request`: named `backend_id`, under
    /// `key`, in `cluster`, with the caller's `token` (a static one is stored as it is, any
    /// other as its digest, with `secret_token`) and its spawn action named `action_id`.
    /// Every field is set here, in one struct literal, so that a new field cannot be
    /// forgotten: the same function builds the items of `connect` and of the tests that
    /// compare the lone and the batch statements (`plane_db::testing::statements`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_request(
        backend_id: BackendName,
        key: &KeyConfig,
        cluster: &ClusterName,
        spawn: &SpawnConfig,
        request: &ConnectRequest,
        token: &BearerToken,
        secret_token: Option<&SecretToken>,
        action_id: BackendActionName,
    ) -> Result<Self> {
        let user = request.user.clone();
        let auth = Value::Object(request.auth.clone());
        // Postgres refuses a NUL in text or jsonb, and refusing it here gives the call the
        // same typed error alone or batched, before a batch it would make the server
        // refuse (and so be written again item by item).
        check_text("key.name", &key.name)?;
        check_text("key.namespace", &key.namespace)?;
        check_text("key.tag", &key.tag)?;
        check_text("spawn_config.pool", spawn.pool.as_str())?;
        if let Some(user) = &user {
            check_text("user", user)?;
        }
        check_json("auth", &auth)?;
        check_json("spawn_config.executable", &spawn.executable)?;
        let events = EventBatch::one(&backend_id, &BackendState::Scheduled)?;
        let lock_key = format!("{}\u{0}{}", key.namespace, key.name);
        Ok(Self {
            backend_id,
            key: key.clone(),
            cluster: cluster.clone(),
            pool: spawn.pool.clone(),
            lifetime_limit_seconds: spawn.lifetime_limit_seconds.map(f64::from),
            max_idle_seconds: spawn.max_idle_seconds,
            static_token: spawn.use_static_token.then(|| token.as_str().to_string()),
            subdomain: spawn.subdomain.as_ref().map(|s| s.as_str().to_string()),
            executable: spawn.executable.clone(),
            action_id,
            token_digest: (!spawn.use_static_token).then(|| token.digest()),
            user,
            auth,
            secret_token: secret_token
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            lock_key,
            events,
        })
    }
}

/// What the spawn statement did with one new backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SpawnOutcome {
    /// Created on the drone it picked, with the key's new fencing token.
    Created {
        fencing_token: i64,
        drone_id: i32,
        drone_name: String,
    },
    /// A live backend holds the key: nothing was written.
    KeyHeld,
    /// No drone qualifies: nothing was written.
    NoDrone,
}

impl SpawnOutcome {
    /// The outcome from the statement's nullable columns: no drone, or a drone and no
    /// fencing token (the key is held), or both.
    fn from_row(drone: Option<(i32, String)>, fencing_token: Option<i64>) -> Self {
        match (drone, fencing_token) {
            (None, _) => SpawnOutcome::NoDrone,
            (Some(_), None) => SpawnOutcome::KeyHeld,
            (Some((drone_id, drone_name)), Some(fencing_token)) => SpawnOutcome::Created {
                fencing_token,
                drone_id,
                drone_name,
            },
        }
    }
}

/// The statements of `connect`'s spawn.
pub(crate) struct Spawns {
    /// The `wake` argument of `plane_write_events` (see `EventWriter::wake`).
    pub(crate) wake: &'static str,
    pub(crate) lease: KeyLeaseConfig,
    pub(crate) token_lifetime: Duration,
    /// How drones are picked; its sample size is checked by the caller.
    pub(crate) scheduler: SchedulerConfig,
}

impl Statements for Spawns {
    type Item = NewBackend;
    type Output = SpawnOutcome;
    const OPERATION: Operation = Operation::Connect;

    fn lock_key(item: &NewBackend) -> &str {
        &item.lock_key
    }

    async fn write_one(
        &self,
        conn: &mut PgConnection,
        item: &NewBackend,
    ) -> std::result::Result<SpawnOutcome, sqlx::Error> {
        self.spawn_one(conn, item).await
    }

    async fn write_many(
        &self,
        conn: &mut PgConnection,
        items: &[&NewBackend],
    ) -> std::result::Result<Vec<Option<SpawnOutcome>>, sqlx::Error> {
        // A batch of one takes the lone statement (about twice the rate, see `spawn_one`).
        // Neither skips a locked key: the batch writer's lock timeout bounds the wait.
        let outcomes = match items {
            [one] => vec![self.spawn_one(conn, one).await?],
            _ => self.spawn_many(conn, items).await?,
        };
        Ok(outcomes.into_iter().map(Some).collect())
    }
}

/// Both spawn statements count a drone's live backends with `last_status_number < 70`
/// written into the SQL, not bound: with a parameter, the generic plan's estimate for the
/// inequality (a third of the table) made Postgres plan the statement again on every call
/// once terminated backends fill the table (0.5 ms of a 2.3 ms connect at 10^7 history
/// rows, bench section `growth`). This keeps the literal equal to the source of truth.
const _: () = assert!(BackendStatus::Terminated.as_int() == 70);

impl Spawns {
    /// One backend, in a statement without arrays. (Running the batch statement with one
    /// item instead, to keep one statement rather than two, was measured: one caller fell
    /// from about 1,165 to 516–563 connects/s, 0.62x–0.68x the seed's sequence.)
    pub(crate) async fn spawn_one(
        &self,
        conn: &mut PgConnection,
        item: &NewBackend,
    ) -> std::result::Result<SpawnOutcome, sqlx::Error> {
        let lease = &self.lease;
        let scheduler = &self.scheduler;
        // Every field, by name and without `..`: a field added to `NewBackend` does not
        // build until both statements (this one and `spawn_many`) name it, and one named
        // and not bound is an unused variable (denied in CI). `tests/it/batch_statements.rs`
        // then compares the rows both statements write.
        let NewBackend {
            backend_id,
            key,
            cluster,
            pool,
            lifetime_limit_seconds,
            max_idle_seconds,
            static_token,
            subdomain,
            executable,
            action_id,
            token_digest,
            user,
            auth,
            secret_token,
            lock_key: _,
            events,
        } = item;
        // The spawn action is assembled in SQL because the drone, the fencing token and the
        // deadlines are only known inside the statement; its shape is BackendActionMessage's.
        let row = sqlx::query!(
            r#"
            -- plane-db: connect, new backend
            with sample as (
                -- The pick, as in `pick_for_spawn`, from the same view.
                select d.id, d.name
                from plane_schedulable_drone d
                where d.cluster = $6
                  and d.pool = $7
                  and d.drone_heartbeat > now() - make_interval(secs => $8)
                  and d.controller_heartbeat > now() - make_interval(secs => $9)
                order by random()
                limit $10
            ),
            picked as (
                select s.id, s.name
                from sample s
                order by (
                    select count(*) from backend b
                    where b.drone_id = s.id and b.last_status_number < 70
                ), random()
                limit 1
            ),
            acquired as (
                insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                select $1, $2, $3, $4, now() + make_interval(secs => $5),
                       nextval('backend_key_fencing_token_seq')
                from picked
                -- A key a live backend visibly holds is left alone (`on conflict` would lock
                -- it even without updating it); one committed meanwhile is the conflict's.
                where not exists (
                    select 1 from backend_key k
                    where k.namespace = $2 and k.key_name = $3 and k.expires_at > now()
                )
                on conflict (namespace, key_name) do update set
                    id = excluded.id,
                    tag = excluded.tag,
                    expires_at = excluded.expires_at,
                    fencing_token = excluded.fencing_token,
                    allow_renew = true
                where backend_key.expires_at <= now()
                returning fencing_token
            ),
            new_backend as (
                insert into backend (id, cluster, last_status, last_status_number, last_status_time,
                                     state, drone_id, expiration_time, allowed_idle_seconds,
                                     last_keepalive, static_token, subdomain)
                select $1, $6, $11, $12, now(), $13, p.id, now() + make_interval(secs => $14),
                       $15, now(), $16, $17
                from acquired, picked p
                returning id, drone_id
            ),
            history as (
                insert into backend_state (backend_id, state, created_at)
                select id, $13, now() from new_backend
            ),
            spawn as (
                select b.drone_id, jsonb_build_object('Spawn', jsonb_build_object(
                    'executable', $18::jsonb,
                    'key', jsonb_build_object(
                        'key', jsonb_build_object('name', $3::text, 'namespace', $2::text, 'tag', $4::text),
                        'deadlines', jsonb_build_object(
                            'renew_at', (extract(epoch from now() + c.skew + make_interval(secs => $19)) * 1000)::bigint,
                            'soft_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $20)) * 1000)::bigint,
                            'hard_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $21)) * 1000)::bigint
                        ),
                        'token', a.fencing_token
                    ),
                    'static_token', $16::text
                )) as action
                from acquired a, new_backend b
                cross join lateral (
                    -- The drone acts on the deadlines by its own clock: shift them by how far
                    -- its clock was from ours at its last heartbeat (at most a day either
                    -- way, so an absurd clock cannot push a deadline out of range).
                    select greatest(least(coalesce(
                        (select last_local_time - last_heartbeat from drone where id = b.drone_id),
                        interval '0'
                    ), interval '1 day'), interval '-1 day') as skew
                ) c
            ),
            spawn_action as (
                insert into backend_action (id, backend_id, drone_id, action)
                select $22, $1, drone_id, action from spawn
                returning drone_id, action
            ),
            emitted as (
                -- The backend's `scheduled` event comes from the batch ($23, $24, $25). The
                -- spawn action's payload (a BackendActionMessage) is built here: its drone,
                -- fencing token and deadlines only exist inside this statement.
                select plane_write_events(
                    $23::text[] || $26::text,
                    $24::text[] || drone_id::text,
                    $25::jsonb[] || jsonb_build_object('action_id', $22::text, 'backend_id', $1::text,
                                                       'drone_id', drone_id, 'action', action),
                    $27)
                from spawn_action
            ),
            new_token as (
                insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
                select $28, id, now() + make_interval(secs => $29), $30, $31, $32
                from new_backend
                where $28::bytea is not null
            )
            -- No row: no drone. A drone and no fencing token: the key is held.
            select p.id as "drone_id!", p.name as "drone_name!", w.fencing_token as "fencing_token?"
            from picked p
            left join (select a.fencing_token from acquired a, emitted) w on true
            "#,
            backend_id.as_str(),
            key.namespace,
            key.name,
            key.tag,
            interval_secs(lease.expires_after()),
            cluster.as_str(),
            pool.as_str(),
            scheduler.drone_heartbeat_timeout.as_secs_f64(),
            scheduler.controller_heartbeat_timeout.as_secs_f64(),
            scheduler.sample_size,
            BackendStatus::Scheduled.to_string(),
            BackendStatus::Scheduled.as_int(),
            // The `scheduled` state: the payload of the item's one event.
            events.payloads().first(),
            *lifetime_limit_seconds,
            *max_idle_seconds,
            *static_token,
            *subdomain,
            *executable,
            lease.renew_after.as_secs_f64(),
            lease.soft_terminate_after.as_secs_f64(),
            interval_secs(lease.hard_terminate_after),
            action_id.as_str(),
            events.kinds() as &[&str],
            events.keys(),
            events.payloads(),
            BackendActionMessage::kind(),
            self.wake,
            *token_digest,
            self.token_lifetime.as_secs_f64(),
            *user,
            *auth,
            *secret_token,
        )
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match row {
            None => SpawnOutcome::NoDrone,
            Some(row) => {
                SpawnOutcome::from_row(Some((row.drone_id, row.drone_name)), row.fencing_token)
            }
        })
    }

    /// Many backends (distinct keys), in one statement (its first line names it in
    /// `pg_stat_activity`, which shows only the first kilobyte). The items are numbered in the
    /// order given (`n`, 1-based); the keys are acquired, and everything else written, in
    /// that order. The drones are picked for the batch as a whole (see the statement), so
    /// that its items spread as if picked one after the other.
    pub(crate) async fn spawn_many(
        &self,
        conn: &mut PgConnection,
        items: &[&NewBackend],
    ) -> std::result::Result<Vec<SpawnOutcome>, sqlx::Error> {
        let lease = &self.lease;
        let scheduler = &self.scheduler;
        let mut events = EventBatch::default();
        let mut ids = Vec::with_capacity(items.len());
        let mut namespaces = Vec::with_capacity(items.len());
        let mut key_names = Vec::with_capacity(items.len());
        let mut tags = Vec::with_capacity(items.len());
        let mut clusters = Vec::with_capacity(items.len());
        let mut pools = Vec::with_capacity(items.len());
        let mut lifetimes = Vec::with_capacity(items.len());
        let mut max_idles = Vec::with_capacity(items.len());
        let mut static_tokens = Vec::with_capacity(items.len());
        let mut subdomains = Vec::with_capacity(items.len());
        let mut executables = Vec::with_capacity(items.len());
        let mut action_ids = Vec::with_capacity(items.len());
        let mut digests = Vec::with_capacity(items.len());
        let mut users = Vec::with_capacity(items.len());
        let mut auths = Vec::with_capacity(items.len());
        let mut secrets = Vec::with_capacity(items.len());
        for item in items {
            // Every field by name, as in `spawn_one` (see there).
            let NewBackend {
                backend_id,
                key,
                cluster,
                pool,
                lifetime_limit_seconds,
                max_idle_seconds,
                static_token,
                subdomain,
                executable,
                action_id,
                token_digest,
                user,
                auth,
                secret_token,
                lock_key: _,
                events: item_events,
            } = item;
            ids.push(backend_id.as_str());
            namespaces.push(key.namespace.as_str());
            key_names.push(key.name.as_str());
            tags.push(key.tag.as_str());
            clusters.push(cluster.as_str());
            pools.push(pool.as_str());
            lifetimes.push(*lifetime_limit_seconds);
            max_idles.push(*max_idle_seconds);
            static_tokens.push(static_token.as_deref());
            subdomains.push(subdomain.as_deref());
            executables.push(executable.clone());
            action_ids.push(action_id.as_str());
            digests.push(token_digest.as_deref());
            users.push(user.as_deref());
            auths.push(auth.clone());
            secrets.push(secret_token.as_str());
            events.extend(item_events);
        }
        // One `scheduled` event per item, in the items' order: its payload is also the
        // backend row's `state` and its first history row. The spawn actions' events are
        // built here, as in `spawn_one`, and follow each backend's own event.
        let rows = sqlx::query!(
            r#"
            -- plane-db: connect, new backends (batch)
            with input as (
                select *
                from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                            $6::text[], $7::float8[], $8::integer[], $9::text[], $10::text[],
                            $11::jsonb[], $12::text[], $13::bytea[], $14::text[], $15::jsonb[],
                            $16::text[], $17::jsonb[])
                    with ordinality as i(backend_id, namespace, key_name, tag, cluster, pool,
                                         lifetime, max_idle, static_token, subdomain,
                                         executable, action_id, token_digest, username, auth,
                                         secret_token, state, n)
            ),
            -- The picks. One item picks as `pick_for_spawn` does: the least loaded of a
            -- random sample of `sample_size` eligible drones. The items of a batch see the
            -- loads from before it, so picking for each on its own would send them all to
            -- the same least loaded drone. Instead, per cluster and pool with m items, a
            -- random sample of `sample_size` x m eligible drones (all, if fewer) is filled
            -- up: the item of rank r (0-based) takes the (r+1)-th lowest of (load + j) over
            -- the sampled drones and j = 0..m-1 (ties at random), i.e. each item goes to the
            -- drone that is least loaded once the items before it are counted. Items whose
            -- key a live backend visibly holds (reconnects, which create nothing) rank last,
            -- so that they take none of the best drones; their key is not touched below
            -- (not even locked, as `on conflict` would).
            ranked as (
                select i.n, i.cluster, i.pool, h.held,
                       row_number() over (partition by i.cluster, i.pool
                                          order by h.held, i.n) - 1 as rank
                from input i
                cross join lateral (
                    select exists (
                        select 1 from backend_key k
                        where k.namespace = i.namespace and k.key_name = i.key_name
                          and k.expires_at > now()
                    ) as held
                ) h
            ),
            groups as (
                select cluster, pool, count(*) as items
                from ranked
                group by cluster, pool
            ),
            sampled as (
                select g.cluster, g.pool, s.id, s.name, s.load
                from groups g
                cross join lateral (
                    select d.id, d.name, (
                        select count(*) from backend b
                        where b.drone_id = d.id and b.last_status_number < 70
                    ) as load
                    from plane_schedulable_drone d
                    where d.cluster = g.cluster
                      and d.pool = g.pool
                      and d.drone_heartbeat > now() - make_interval(secs => $19)
                      and d.controller_heartbeat > now() - make_interval(secs => $20)
                    order by random()
                    limit least($21::bigint, 1000) * g.items
                ) s
            ),
            slots as (
                -- j runs over the group's ranks, taken from its own rows rather than from
                -- generate_series, whose default estimate (1,000 rows) would inflate the plan.
                select s.cluster, s.pool, s.id, s.name,
                       row_number() over (partition by s.cluster, s.pool
                                          order by s.load + j.rank, random()) as slot
                from sampled s
                join ranked j on j.cluster = s.cluster and j.pool = s.pool
            ),
            picked as (
                select r.n, r.held, s.id as drone_id, s.name as drone_name
                from ranked r
                join slots s on s.cluster = r.cluster and s.pool = r.pool and s.slot = r.rank + 1
            ),
            acquired as (
                insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                select i.backend_id, i.namespace, i.key_name, i.tag,
                       now() + make_interval(secs => $18), nextval('backend_key_fencing_token_seq')
                from input i
                join picked p on p.n = i.n
                where not p.held
                order by i.n
                on conflict (namespace, key_name) do update set
                    id = excluded.id,
                    tag = excluded.tag,
                    expires_at = excluded.expires_at,
                    fencing_token = excluded.fencing_token,
                    allow_renew = true
                where backend_key.expires_at <= now()
                returning id, fencing_token
            ),
            new_backend as (
                insert into backend (id, cluster, last_status, last_status_number, last_status_time,
                                     state, drone_id, expiration_time, allowed_idle_seconds,
                                     last_keepalive, static_token, subdomain)
                select i.backend_id, i.cluster, $22, $23, now(), i.state, p.drone_id,
                       now() + make_interval(secs => i.lifetime), i.max_idle, now(),
                       i.static_token, i.subdomain
                from acquired a
                join input i on i.backend_id = a.id
                join picked p on p.n = i.n
                order by i.n
                returning id
            ),
            -- The rest is written for the backends inserted (all those whose key was
            -- acquired: a failed insert fails the statement).
            spawned as (
                select i.*, a.fencing_token, p.drone_id
                from new_backend b
                join acquired a on a.id = b.id
                join input i on i.backend_id = b.id
                join picked p on p.n = i.n
            ),
            history as (
                insert into backend_state (backend_id, state, created_at)
                select backend_id, state, now() from spawned order by n
            ),
            spawn as (
                -- The drone's clock skew as in `spawn_one`.
                select s.n, s.backend_id, s.drone_id, s.action_id, jsonb_build_object('Spawn', jsonb_build_object(
                    'executable', s.executable,
                    'key', jsonb_build_object(
                        'key', jsonb_build_object('name', s.key_name, 'namespace', s.namespace, 'tag', s.tag),
                        'deadlines', jsonb_build_object(
                            'renew_at', (extract(epoch from now() + c.skew + make_interval(secs => $24)) * 1000)::bigint,
                            'soft_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $25)) * 1000)::bigint,
                            'hard_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $26)) * 1000)::bigint
                        ),
                        'token', s.fencing_token
                    ),
                    'static_token', s.static_token
                )) as action
                from spawned s
                cross join lateral (
                    select greatest(least(coalesce(
                        (select last_local_time - last_heartbeat from drone where id = s.drone_id),
                        interval '0'
                    ), interval '1 day'), interval '-1 day') as skew
                ) c
            ),
            spawn_action as (
                insert into backend_action (id, backend_id, drone_id, action)
                select action_id, backend_id, drone_id, action from spawn order by n
            ),
            emitted as (
                select plane_write_events(array_agg(e.kind order by e.n, e.part),
                                          array_agg(e.key order by e.n, e.part),
                                          array_agg(e.data order by e.n, e.part), $27)
                from (
                    select e.n, 1 as part, e.kind, e.key, e.data
                    from unnest($28::text[], $29::text[], $17::jsonb[])
                        with ordinality as e(kind, key, data, n)
                    where e.n in (select n from spawned)
                    union all
                    select n, 2, $30::text, drone_id::text,
                           jsonb_build_object('action_id', action_id, 'backend_id', backend_id,
                                              'drone_id', drone_id, 'action', action)
                    from spawn
                ) e
            ),
            new_token as (
                insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
                select token_digest, backend_id, now() + make_interval(secs => $31), username,
                       auth, secret_token
                from spawned
                where token_digest is not null
                order by n
            )
            -- Per item: no drone; a drone and no fencing token (the key is held); or both.
            select i.n as "n!", p.drone_id as "drone_id?", p.drone_name as "drone_name?",
                   w.fencing_token as "fencing_token?"
            from input i
            left join picked p on p.n = i.n
            left join (select n, fencing_token from spawned, emitted) w on w.n = i.n
            "#,
            &ids as &[&str],
            &namespaces as &[&str],
            &key_names as &[&str],
            &tags as &[&str],
            &clusters as &[&str],
            &pools as &[&str],
            &lifetimes as &[Option<f64>],
            &max_idles as &[Option<i32>],
            &static_tokens as &[Option<&str>],
            &subdomains as &[Option<&str>],
            &executables,
            &action_ids as &[&str],
            &digests as &[Option<&[u8]>],
            &users as &[Option<&str>],
            &auths,
            &secrets as &[&str],
            events.payloads(),
            interval_secs(lease.expires_after()),
            scheduler.drone_heartbeat_timeout.as_secs_f64(),
            scheduler.controller_heartbeat_timeout.as_secs_f64(),
            scheduler.sample_size,
            BackendStatus::Scheduled.to_string(),
            BackendStatus::Scheduled.as_int(),
            lease.renew_after.as_secs_f64(),
            lease.soft_terminate_after.as_secs_f64(),
            interval_secs(lease.hard_terminate_after),
            self.wake,
            events.kinds() as &[&str],
            events.keys(),
            BackendActionMessage::kind(),
            self.token_lifetime.as_secs_f64(),
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut outcomes = vec![None; items.len()];
        for row in rows {
            // `n` is 1-based; a value out of range cannot come back, and is ignored if it does.
            if let Some(slot) = usize::try_from(row.n - 1)
                .ok()
                .and_then(|i| outcomes.get_mut(i))
            {
                let drone = row.drone_id.zip(row.drone_name);
                *slot = Some(SpawnOutcome::from_row(drone, row.fencing_token));
            }
        }
        // One row per item comes back; a missing one is reported, not guessed.
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| sqlx::Error::Protocol("the spawn statement skipped an item".into()))
            })
            .collect()
    }
}
