//! What the parent reads from the database: the stored events (the truth the subscribers
//! are compared with), the invariants that a half-written change would break, and the
//! workers' connections.

use crate::check::Expected;
use plane_db::types::BackendStatus;
use sqlx::{PgPool, Row};
use std::collections::{HashMap, HashSet};

/// The stored events above a floor: `backend_state` ones (for the typed subscribers) and
/// all of them (for the all-events subscribers).
pub struct Stored {
    /// `backend_state` events by id, with their keys.
    pub states: Expected,
    /// Every event by id, with its key.
    pub all: Expected,
    /// When each was written (its transaction's start, microseconds since the Unix epoch,
    /// the database server's clock).
    pub created_us: HashMap<i64, i64>,
}

/// The id of the newest stored event (0 if none).
pub async fn latest_event_id(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select coalesce(max(id), 0) from event")
        .fetch_one(pool)
        .await
        .expect("the latest event id")
}

/// Every stored event above `floor`.
pub async fn stored_events(pool: &PgPool, floor: i64) -> Stored {
    let rows: Vec<(i64, String, Option<String>, i64)> = sqlx::query_as(
        "select id, kind, key, (extract(epoch from created_at) * 1000000)::bigint
         from event where id > $1 order by id",
    )
    .bind(floor)
    .fetch_all(pool)
    .await
    .expect("read the stored events");
    let mut stored = Stored {
        states: Expected::new(),
        all: Expected::new(),
        created_us: HashMap::new(),
    };
    for (id, kind, key, created_us) in rows {
        stored.created_us.insert(id, created_us);
        if kind == "backend_state" {
            stored.states.insert(id, key.clone());
        }
        stored.all.insert(id, key);
    }
    stored
}

/// The invariants of a database where every change was written whole, each with the number
/// of rows that break it (all must be 0).
pub async fn invariants(pool: &PgPool) -> Vec<(String, i64)> {
    let row = sqlx::query(
        r#"
        select
          (select count(*) from backend_key k
            where not exists (select 1 from backend b where b.id = k.id))
            as key_without_backend,
          (select count(*) from backend b
            where b.last_status_number < 70
              and not exists (select 1 from backend_key k where k.id = b.id))
            as live_backend_without_key,
          (select count(*) from backend b
            where not exists (select 1 from backend_state s where s.backend_id = b.id))
            as backend_without_history,
          (select count(*) from backend b
            where not exists (select 1 from event e
                              where e.kind = 'backend_state' and e.key = b.id))
            as backend_without_event,
          (select count(*) from backend b
            where not exists (select 1 from backend_action a where a.backend_id = b.id))
            as backend_without_spawn_action,
          (select count(*) from backend b
            where (select s.state->>'status' from backend_state s
                   where s.backend_id = b.id order by s.id desc limit 1)
                  is distinct from b.last_status)
            as row_status_not_last_history,
          (select count(*) from
             (select backend_id as k, state->>'status' as s, count(*) as n
                from backend_state group by 1, 2) h
             full join
             (select key as k, data->>'status' as s, count(*) as n
                from event where kind = 'backend_state' group by 1, 2) e
             on h.k = e.k and h.s = e.s
            where h.n is distinct from e.n)
            as history_and_events_differ,
          (select count(*) from event e
            where e.kind = 'backend_state'
              and not exists (select 1 from backend b where b.id = e.key))
            as state_event_without_backend,
          (select count(*) from event e
            where e.kind = 'backend_action'
              and not exists (select 1 from backend_action a where a.id = e.data->>'action_id'))
            as action_event_without_action,
          (select count(*) from backend_action a
            where not exists (select 1 from event e
                              where e.kind = 'backend_action' and e.data->>'action_id' = a.id))
            as action_without_event,
          (select count(*) from token t
            where not exists (select 1 from backend b where b.id = t.backend_id))
            as token_without_backend
        "#,
    )
    .fetch_one(pool)
    .await
    .expect("check the invariants");
    [
        "key_without_backend",
        "live_backend_without_key",
        "backend_without_history",
        "backend_without_event",
        "backend_without_spawn_action",
        "row_status_not_last_history",
        "history_and_events_differ",
        "state_event_without_backend",
        "action_event_without_action",
        "action_without_event",
        "token_without_backend",
    ]
    .into_iter()
    .map(|name| (name.to_string(), row.get::<i64, _>(name)))
    .collect()
}

/// A worker's connections (its pool's and its listener's): how many, and how many were
/// running a statement.
pub async fn connections(pool: &PgPool, application_name: &str) -> (i64, i64) {
    sqlx::query_as(
        "select count(*), count(*) filter (where state = 'active') from pg_stat_activity
         where datname = current_database() and application_name in ($1, $1 || '-listener')",
    )
    .bind(application_name)
    .fetch_one(pool)
    .await
    .expect("read pg_stat_activity")
}

/// The (key, status number) pairs in the history of backends created under keys matching
/// `key_like`: what committed. Also the backends themselves.
pub async fn committed_statuses(
    pool: &PgPool,
    key_like: &str,
) -> (HashSet<(String, i32)>, HashSet<String>) {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "select a.action->'Spawn'->'key'->'key'->>'name', s.backend_id, s.state->>'status'
         from backend_state s
         join backend_action a on a.backend_id = s.backend_id
         where a.action->'Spawn'->'key'->'key'->>'name' like $1",
    )
    .bind(key_like)
    .fetch_all(pool)
    .await
    .expect("read the committed history");
    let mut statuses = HashSet::new();
    let mut backends = HashSet::new();
    for (key, backend, status) in rows {
        let status: BackendStatus = status.parse().expect("a stored status");
        statuses.insert((key, status.as_int()));
        backends.insert(backend);
    }
    (statuses, backends)
}

/// Who holds each `race-…` key.
pub async fn race_holders(pool: &PgPool, namespace: &str) -> HashMap<String, String> {
    sqlx::query_as::<_, (String, String)>(
        "select key_name, id from backend_key where namespace = $1 and key_name like 'race-%'",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await
    .expect("read the race keys")
    .into_iter()
    .collect()
}

/// The spawn actions of `race-…` keys, and the backends they name.
pub async fn race_spawn_actions(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "select count(*), count(distinct backend_id) from backend_action
         where action->'Spawn'->'key'->'key'->>'name' like 'race-%'",
    )
    .fetch_one(pool)
    .await
    .expect("read the race's spawn actions")
}

/// A count.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The key each backend was created under (from its spawn action).
pub async fn backend_keys(pool: &PgPool) -> HashMap<String, String> {
    sqlx::query_as::<_, (String, String)>(
        "select backend_id, action->'Spawn'->'key'->'key'->>'name' from backend_action
         where action ? 'Spawn'",
    )
    .fetch_all(pool)
    .await
    .expect("read the backends' keys")
    .into_iter()
    .collect()
}

/// Creates `role`, a login role with what a controller needs on `database` and nothing
/// more (the functions an older bus needed revoked), as the controllers of a real
/// deployment connect. The replica copies it.
pub async fn create_app_role(pool: &PgPool, database: &str, role: &str) {
    let sql = format!(
        "create role {role} login;
         grant connect on database \"{database}\" to {role};
         grant usage on schema public to {role};
         grant select, insert, update, delete on all tables in schema public to {role};
         grant usage, select on all sequences in schema public to {role};
         revoke execute on function pg_control_checkpoint() from public;
         revoke execute on function pg_walfile_name(pg_lsn) from public;"
    );
    sqlx::raw_sql(&sql)
        .execute(pool)
        .await
        .expect("create the controllers' role");
}
