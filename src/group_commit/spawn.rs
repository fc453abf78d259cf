//! `connect`'s statements for group commit: a new backend for a key, alone or many at once.
//!
//! Each new backend is the key's acquisition (only if the key is free or its lease expired,
//! with the next fencing token), the backend row, its first history row, its `scheduled`
//! event, the spawn action for its drone with that action's event, and the caller's token.
//! All of it comes from one statement, or none of it.

use super::Statements;
use crate::config::KeyLeaseConfig;
use crate::error::{interval_secs, Result};
use crate::events::{EventBatch, NotificationPayload};
use crate::metrics::Operation;
use crate::types::{
    BackendActionMessage, BackendActionName, BackendName, BackendState, BackendStatus, ClusterName,
    KeyConfig, NodeId,
};
use serde_json::Value;
use sqlx::PgConnection;
use std::time::Duration;

/// A backend to create, as the statement takes it.
pub(crate) struct NewBackend {
    pub(crate) backend_id: BackendName,
    pub(crate) key: KeyConfig,
    pub(crate) cluster: ClusterName,
    pub(crate) drone_id: NodeId,
    pub(crate) lifetime_limit_seconds: Option<f64>,
    pub(crate) max_idle_seconds: Option<i32>,
    pub(crate) static_token: Option<String>,
    pub(crate) subdomain: Option<String>,
    pub(crate) executable: Value,
    pub(crate) action_id: BackendActionName,
    /// The digest of the caller's bearer token; none for a static token.
    pub(crate) token_digest: Option<Vec<u8>>,
    pub(crate) user: Option<String>,
    pub(crate) auth: Value,
    /// The secret sent with the token's requests (empty for a static token).
    pub(crate) secret_token: String,
    /// `namespace`, a NUL, `key name`: the key row this item locks.
    lock_key: String,
    /// Exactly one event, the backend's `scheduled` state, whose payload is also the row's
    /// `state` (serialised once).
    events: EventBatch,
}

impl NewBackend {
    /// Everything but the key, cluster and backend fields, which the caller sets.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        backend_id: BackendName,
        key: KeyConfig,
        cluster: ClusterName,
        drone_id: NodeId,
        executable: Value,
        token_digest: Option<Vec<u8>>,
        user: Option<String>,
        auth: Value,
    ) -> Result<Self> {
        let events = EventBatch::one(&backend_id, &BackendState::Scheduled)?;
        let lock_key = format!("{}\u{0}{}", key.namespace, key.name);
        Ok(Self {
            backend_id,
            key,
            cluster,
            drone_id,
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            static_token: None,
            subdomain: None,
            executable,
            action_id: BackendActionName::new_random(),
            token_digest,
            user,
            auth,
            secret_token: String::new(),
            lock_key,
            events,
        })
    }

    /// The `scheduled` state as JSON: the payload of its one event.
    fn state(&self) -> Option<&Value> {
        self.events.payloads().first()
    }
}

/// The statements of `connect`'s spawn. The output is the key's new fencing token, or none
/// if a live backend holds the key (nothing was written).
pub(crate) struct Spawns {
    /// The `wake` argument of `plane_write_events` (see `EventWriter::wake`).
    pub(crate) wake: &'static str,
    pub(crate) lease: KeyLeaseConfig,
    pub(crate) token_lifetime: Duration,
}

impl Statements for Spawns {
    type Item = NewBackend;
    type Output = Option<i64>;
    const OPERATION: Operation = Operation::Connect;

    fn lock_key(item: &NewBackend) -> &str {
        &item.lock_key
    }

    async fn write_one(
        &self,
        conn: &mut PgConnection,
        item: &NewBackend,
    ) -> std::result::Result<Option<i64>, sqlx::Error> {
        self.spawn_one(conn, item).await
    }

    async fn write_many(
        &self,
        conn: &mut PgConnection,
        items: &[&NewBackend],
    ) -> std::result::Result<Vec<Option<i64>>, sqlx::Error> {
        self.spawn_many(conn, items).await
    }
}

impl Spawns {
    /// One backend, in a statement without arrays.
    async fn spawn_one(
        &self,
        conn: &mut PgConnection,
        item: &NewBackend,
    ) -> std::result::Result<Option<i64>, sqlx::Error> {
        let lease = &self.lease;
        // The spawn action is assembled in SQL because the fencing token and the deadlines
        // are only known inside the statement; its shape is BackendActionMessage's.
        sqlx::query_scalar!(
            r#"
            with acquired as (
                insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                values ($1, $2, $3, $4, now() + make_interval(secs => $5),
                        nextval('backend_key_fencing_token_seq'))
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
                select $1, $6, $7, $8, now(), $9, $10, now() + make_interval(secs => $11),
                       $12, now(), $13, $14
                from acquired
                returning id
            ),
            history as (
                insert into backend_state (backend_id, state, created_at)
                select id, $9, now() from new_backend
            ),
            drone_clock as (
                -- The drone acts on the deadlines by its own clock: shift them by how far
                -- its clock was from ours at its last heartbeat (at most a day either way, so
                -- an absurd clock cannot push a deadline out of range).
                select greatest(least(coalesce(
                    (select last_local_time - last_heartbeat from drone where id = $10),
                    interval '0'
                ), interval '1 day'), interval '-1 day') as skew
            ),
            spawn as (
                select jsonb_build_object('Spawn', jsonb_build_object(
                    'executable', $15::jsonb,
                    'key', jsonb_build_object(
                        'key', jsonb_build_object('name', $3::text, 'namespace', $2::text, 'tag', $4::text),
                        'deadlines', jsonb_build_object(
                            'renew_at', (extract(epoch from now() + c.skew + make_interval(secs => $16)) * 1000)::bigint,
                            'soft_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $17)) * 1000)::bigint,
                            'hard_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $27)) * 1000)::bigint
                        ),
                        'token', a.fencing_token
                    ),
                    'static_token', $13::text
                )) as action
                from acquired a, new_backend, drone_clock c
            ),
            spawn_action as (
                insert into backend_action (id, backend_id, drone_id, action)
                select $18, $1, $10, action from spawn
                returning action
            ),
            emitted as (
                -- The backend's `scheduled` event comes from the batch ($19, $28, $29). The
                -- spawn action's payload (a BackendActionMessage) is built here: its fencing
                -- token and deadlines only exist inside this statement.
                select plane_write_events(
                    $19::text[] || $20::text,
                    $28::text[] || $10::integer::text,
                    $29::jsonb[] || jsonb_build_object('action_id', $18::text, 'backend_id', $1::text,
                                                       'drone_id', $10::integer, 'action', action),
                    $26)
                from spawn_action
            ),
            new_token as (
                insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
                select $21, id, now() + make_interval(secs => $22), $23, $24, $25
                from new_backend
                where $21::bytea is not null
            )
            -- One row of `emitted` exactly when the key was acquired.
            select a.fencing_token from acquired a, emitted
            "#,
            item.backend_id.as_str(),
            item.key.namespace,
            item.key.name,
            item.key.tag,
            interval_secs(lease.expires_after()),
            item.cluster.as_str(),
            BackendStatus::Scheduled.to_string(),
            BackendStatus::Scheduled.as_int(),
            item.state(),
            item.drone_id.as_i32(),
            item.lifetime_limit_seconds,
            item.max_idle_seconds,
            item.static_token,
            item.subdomain,
            item.executable,
            lease.renew_after.as_secs_f64(),
            lease.soft_terminate_after.as_secs_f64(),
            item.action_id.as_str(),
            item.events.kinds() as &[&str],
            BackendActionMessage::kind(),
            item.token_digest,
            self.token_lifetime.as_secs_f64(),
            item.user,
            item.auth,
            item.secret_token,
            self.wake,
            interval_secs(lease.hard_terminate_after),
            item.events.keys(),
            item.events.payloads(),
        )
        .fetch_optional(&mut *conn)
        .await
    }

    /// Many backends (distinct keys), in one statement. The items are numbered in the
    /// order given (`n`, 1-based); the keys are acquired, and everything else written, in
    /// that order.
    async fn spawn_many(
        &self,
        conn: &mut PgConnection,
        items: &[&NewBackend],
    ) -> std::result::Result<Vec<Option<i64>>, sqlx::Error> {
        let lease = &self.lease;
        let mut events = EventBatch::default();
        let mut ids = Vec::with_capacity(items.len());
        let mut namespaces = Vec::with_capacity(items.len());
        let mut key_names = Vec::with_capacity(items.len());
        let mut tags = Vec::with_capacity(items.len());
        let mut clusters = Vec::with_capacity(items.len());
        let mut drones = Vec::with_capacity(items.len());
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
            ids.push(item.backend_id.as_str());
            namespaces.push(item.key.namespace.as_str());
            key_names.push(item.key.name.as_str());
            tags.push(item.key.tag.as_str());
            clusters.push(item.cluster.as_str());
            drones.push(item.drone_id.as_i32());
            lifetimes.push(item.lifetime_limit_seconds);
            max_idles.push(item.max_idle_seconds);
            static_tokens.push(item.static_token.as_deref());
            subdomains.push(item.subdomain.as_deref());
            executables.push(item.executable.clone());
            action_ids.push(item.action_id.as_str());
            digests.push(item.token_digest.as_deref());
            users.push(item.user.as_deref());
            auths.push(item.auth.clone());
            secrets.push(item.secret_token.as_str());
            events.extend(&item.events);
        }
        // One `scheduled` event per item, in the items' order: its payload is also the
        // backend row's `state` and its first history row. The spawn actions' events are
        // built here, as in `spawn_one`, and follow each backend's own event.
        let rows = sqlx::query!(
            r#"
            with input as (
                select *
                from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                            $6::integer[], $7::float8[], $8::integer[], $9::text[], $10::text[],
                            $11::jsonb[], $12::text[], $13::bytea[], $14::text[], $15::jsonb[],
                            $16::text[], $17::jsonb[])
                    with ordinality as i(backend_id, namespace, key_name, tag, cluster,
                                         drone_id, lifetime, max_idle, static_token, subdomain,
                                         executable, action_id, token_digest, username, auth,
                                         secret_token, state, n)
            ),
            acquired as (
                insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token)
                select backend_id, namespace, key_name, tag, now() + make_interval(secs => $18),
                       nextval('backend_key_fencing_token_seq')
                from input
                order by n
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
                select i.backend_id, i.cluster, $19, $20, now(), i.state, i.drone_id,
                       now() + make_interval(secs => i.lifetime), i.max_idle, now(),
                       i.static_token, i.subdomain
                from acquired a
                join input i on i.backend_id = a.id
                order by i.n
                returning id
            ),
            -- The rest is written for the backends inserted (all those whose key was
            -- acquired: a failed insert fails the statement).
            spawned as (
                select i.*, a.fencing_token
                from new_backend b
                join acquired a on a.id = b.id
                join input i on i.backend_id = b.id
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
                            'renew_at', (extract(epoch from now() + c.skew + make_interval(secs => $21)) * 1000)::bigint,
                            'soft_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $22)) * 1000)::bigint,
                            'hard_terminate_at', (extract(epoch from now() + c.skew + make_interval(secs => $23)) * 1000)::bigint
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
                                          array_agg(e.data order by e.n, e.part), $24)
                from (
                    select e.n, 1 as part, e.kind, e.key, e.data
                    from unnest($25::text[], $26::text[], $17::jsonb[])
                        with ordinality as e(kind, key, data, n)
                    where e.n in (select n from spawned)
                    union all
                    select n, 2, $27::text, drone_id::text,
                           jsonb_build_object('action_id', action_id, 'backend_id', backend_id,
                                              'drone_id', drone_id, 'action', action)
                    from spawn
                ) e
            ),
            new_token as (
                insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
                select token_digest, backend_id, now() + make_interval(secs => $28), username,
                       auth, secret_token
                from spawned
                where token_digest is not null
                order by n
            )
            select s.n as "n!", s.fencing_token as "fencing_token!" from spawned s, emitted
            "#,
            &ids as &[&str],
            &namespaces as &[&str],
            &key_names as &[&str],
            &tags as &[&str],
            &clusters as &[&str],
            &drones as &[i32],
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
        let mut tokens = vec![None; items.len()];
        for row in rows {
            // `n` is 1-based; a value out of range cannot come back, and is ignored if it does.
            if let Some(slot) = usize::try_from(row.n - 1)
                .ok()
                .and_then(|i| tokens.get_mut(i))
            {
                *slot = Some(row.fencing_token);
            }
        }
        Ok(tokens)
    }
}
