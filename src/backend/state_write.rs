//! `update_state`'s statements for group commit: a state change, alone or many at once.

use crate::error::Result;
use crate::events::EventBatch;
use crate::group_commit::Statements;
use crate::metrics::Operation;
use crate::types::{BackendName, BackendState, BackendStatus};
use sqlx::PgConnection;

/// A state change as the statement takes it, serialised by the caller.
pub(crate) struct StateChange {
    backend: BackendName,
    status: String,
    status_number: i32,
    address: Option<String>,
    terminated: bool,
    /// Exactly one event, the `backend_state` one, whose payload is also the row's `state`
    /// (serialised once).
    events: EventBatch,
}

impl StateChange {
    /// The change of `backend` to `state`, with its `backend_state` event.
    pub(crate) fn new(backend: &BackendName, state: &BackendState) -> Result<Self> {
        let status = state.status();
        Ok(Self {
            backend: backend.clone(),
            status: status.to_string(),
            status_number: status.as_int(),
            address: state.address().map(|a| a.to_string()),
            terminated: status == BackendStatus::Terminated,
            events: EventBatch::one(backend, state)?,
        })
    }
}

/// The statements of `update_state`. The output is whether the change was applied (false:
/// the backend is unknown or the change is not forward).
pub(crate) struct StateChanges {
    /// The `wake` argument of `plane_write_events` (see `EventWriter::wake`).
    pub(crate) wake: &'static str,
}

impl Statements for StateChanges {
    type Item = StateChange;
    type Output = bool;
    const OPERATION: Operation = Operation::UpdateState;

    fn lock_key(change: &StateChange) -> &str {
        change.backend.as_str()
    }

    async fn write_one(
        &self,
        conn: &mut PgConnection,
        change: &StateChange,
    ) -> std::result::Result<bool, sqlx::Error> {
        write_single(conn, change, self.wake).await
    }

    async fn write_many(
        &self,
        conn: &mut PgConnection,
        changes: &[&StateChange],
    ) -> std::result::Result<Vec<Option<bool>>, sqlx::Error> {
        // Also for one change: unlike `write_single`, it does not wait for a row locked
        // elsewhere, and a batch writer must not.
        write_statement(conn, changes, self.wake).await
    }
}

/// The statement: applies each change that moves its backend forward (at most one change
/// per backend), appending its history row, releasing the key on `terminated`, and writing
/// its event, all for the changed rows only. Returns, per change, whether it was applied,
/// or none if its backend's row is locked by another transaction: then nothing of it was
/// written (the statement does not wait for that lock; the change is written alone).
pub(crate) async fn write_statement(
    conn: &mut PgConnection,
    changes: &[&StateChange],
    wake: &'static str,
) -> std::result::Result<Vec<Option<bool>>, sqlx::Error> {
    let mut events = EventBatch::default();
    let mut ids = Vec::with_capacity(changes.len());
    let mut statuses = Vec::with_capacity(changes.len());
    let mut numbers = Vec::with_capacity(changes.len());
    let mut addresses = Vec::with_capacity(changes.len());
    let mut terminated = Vec::with_capacity(changes.len());
    for change in changes {
        // Every field by name, as in `write_single` (see there).
        let StateChange {
            backend,
            status,
            status_number,
            address,
            terminated: terminates,
            events: change_events,
        } = change;
        ids.push(backend.as_str());
        statuses.push(status.as_str());
        numbers.push(*status_number);
        addresses.push(address.as_deref());
        terminated.push(*terminates);
        events.extend(change_events);
    }
    // `n` numbers the changes (1-based, as `with ordinality`); the events are in the same
    // order, one per change.
    let rows = sqlx::query!(
        r#"
        with input as (
            select *
            from unnest($1::text[], $2::text[], $3::integer[], $4::text[], $5::jsonb[], $6::boolean[])
                with ordinality as i(id, status, status_number, address, state, terminated, n)
        ),
        -- The batch's rows that no other transaction holds locked, locked now with the lock
        -- the update takes (in id order, as every batch locks them). A row locked elsewhere
        -- is skipped rather than waited for: the batch must not wait on one caller's row.
        locked as materialized (
            select b.id from backend b
            where b.id in (select id from input)
            order by b.id
            for no key update skip locked
        ),
        updated as (
            update backend b set
                last_status = i.status,
                last_status_number = i.status_number,
                last_status_time = now(),
                cluster_address = i.address,
                state = i.state
            from input i
            where b.id = i.id and b.id in (select id from locked)
              and b.last_status_number < i.status_number
            returning i.n, b.id, i.state, i.terminated
        ),
        history as (
            insert into backend_state (backend_id, state, created_at)
            select id, state, now() from updated order by n
        ),
        released as (
            delete from backend_key
            where id in (select id from updated where terminated)
        ),
        emitted as (
            select plane_write_events(array_agg(e.kind order by e.n), array_agg(e.key order by e.n),
                                      array_agg(e.data order by e.n), $10)
            from unnest($7::text[], $8::text[], $9::jsonb[]) with ordinality as e(kind, key, data, n)
            where e.n in (select n from updated)
        )
        -- Per change applied, and per change whose backend exists but was skipped (its row
        -- locked elsewhere: handed back to be written alone); nothing for the others.
        select u.n as "n!", false as "skipped!" from updated u, emitted
        union all
        select i.n, true from input i
        where i.id not in (select id from locked)
          and exists (select 1 from backend b where b.id = i.id)
        "#,
        &ids as &[&str],
        &statuses as &[&str],
        &numbers,
        &addresses as &[Option<&str>],
        // One event per change, in the changes' order: its payload is the new state.
        events.payloads(),
        &terminated,
        events.kinds() as &[&str],
        events.keys(),
        events.payloads(),
        wake,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut applied = vec![Some(false); changes.len()];
    for row in rows {
        // `n` is 1-based; a value out of range cannot come back, and is ignored if it does.
        if let Some(slot) = usize::try_from(row.n - 1)
            .ok()
            .and_then(|i| applied.get_mut(i))
        {
            *slot = if row.skipped { None } else { Some(true) };
        }
    }
    Ok(applied)
}

/// [`write_statement`] for one change: the same effects, in a statement without arrays
/// (measured: about 7% more calls per second for a lone writer than the batch statement
/// with arrays of one).
pub(crate) async fn write_single(
    conn: &mut PgConnection,
    change: &StateChange,
    wake: &'static str,
) -> std::result::Result<bool, sqlx::Error> {
    // Every field, by name and without `..`: a field added to `StateChange` does not build
    // until both statements (this one and `write_statement`) name it, and one named and not
    // bound is an unused variable (denied in CI). `tests/it/batch_statements.rs` then
    // compares the rows both statements write.
    let StateChange {
        backend,
        status,
        status_number,
        address,
        terminated,
        events,
    } = change;
    let updated = sqlx::query_scalar!(
        r#"
        with updated as (
            update backend set
                last_status = $2,
                last_status_number = $3,
                last_status_time = now(),
                cluster_address = $4,
                state = $5
            where id = $1 and last_status_number < $3
            returning id
        ),
        history as (
            insert into backend_state (backend_id, state, created_at)
            select id, $5, now() from updated
        ),
        released as (
            delete from backend_key
            where $6 and id in (select id from updated)
        ),
        emitted as (
            select plane_write_events(array_agg(e.kind), array_agg(e.key), array_agg(e.data), $10)
            from unnest($7::text[], $8::text[], $9::jsonb[]) as e(kind, key, data)
            where e.key in (select id from updated)
        )
        select count(*) as "updated!" from updated, emitted
        "#,
        backend.as_str(),
        *status,
        *status_number,
        *address,
        // The new state: the payload of the change's one event.
        events.payloads().first(),
        *terminated,
        events.kinds() as &[&str],
        events.keys(),
        events.payloads(),
        wake,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(updated > 0)
}
