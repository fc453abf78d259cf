//! Hooks for the bench (`examples/bench`): the library's own statements, run the way the
//! bench measures them, so that the bench never keeps copies of them. Hidden from the docs;
//! not part of the API, and free to change with the bench.

use crate::backend::{alive_for_drone_query, termination_candidates_query};
use crate::error::Result;
use crate::types::NodeId;
use sqlx::{Execute, PgConnection, PgPool, Postgres};

/// One read of the event bus's read statement on `conn`: the events committed after the
/// snapshot `prev` (Postgres's text form, as `pg_current_snapshot()::text` gives it), at most
/// `batch`, with no restart floor. Returns their ids. Prepared once per connection, as on each
/// of the bus's pooled connections, so repeated calls see the plans Postgres chooses there.
pub async fn bus_read(conn: &mut PgConnection, prev: &str, batch: i64) -> Result<Vec<i64>> {
    crate::events::read_once(conn, prev, batch).await
}

/// `EXPLAIN` (one line of the plan per item) of the statement behind
/// [`BackendDatabase::termination_candidates`](crate::backend::BackendDatabase::termination_candidates)
/// for `drone`, with the arguments that call binds.
pub async fn explain_termination_candidates(pool: &PgPool, drone: NodeId) -> Result<Vec<String>> {
    explain(pool, termination_candidates_query(drone)).await
}

/// `EXPLAIN` (one line of the plan per item) of the statement behind
/// [`BackendDatabase::list_alive_backends_for_drone`](crate::backend::BackendDatabase::list_alive_backends_for_drone)
/// for `drone`, with the arguments that call binds.
pub async fn explain_list_alive_backends_for_drone(
    pool: &PgPool,
    drone: NodeId,
) -> Result<Vec<String>> {
    explain(pool, alive_for_drone_query(drone)).await
}

/// `EXPLAIN` of a statement as built for a call: its text, with its bound arguments.
async fn explain<'q>(pool: &PgPool, mut query: impl Execute<'q, Postgres>) -> Result<Vec<String>> {
    let sql = format!("explain {}", query.sql());
    let arguments = query
        .take_arguments()
        .map_err(sqlx::Error::Encode)?
        .unwrap_or_default();
    drop(query);
    Ok(sqlx::query_scalar_with(&sql, arguments)
        .fetch_all(pool)
        .await?)
}
