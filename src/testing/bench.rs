//! Hooks for the bench (`examples/bench`): the library's own statements, run the way the
//! bench measures them, so that the bench never keeps copies of them. Hidden from the docs;
//! not part of the API, and free to change with the bench.

use crate::backend::{alive_for_drone_query, termination_candidates_query};
use crate::error::Result;
use crate::partition::{History, Partitions};
use crate::types::NodeId;
use crate::PlaneDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Execute, PgConnection, PgPool, Postgres};
use std::time::{Duration, Instant};

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

/// Which plan `explain_bus_*` asks Postgres for when executing the bus reader's prepared
/// statement: the bus's pooled connections prepare each statement once, and after five runs
/// Postgres may switch from custom plans (made for the arguments) to a generic one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanMode {
    /// `plan_cache_mode = force_custom_plan`.
    Custom,
    /// `plan_cache_mode = force_generic_plan`.
    Generic,
}

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of the bus reader's read statement (a read's
/// first page) for the span from snapshot `prev` to snapshot `target` (text forms, as
/// `pg_current_snapshot()::text` gives them), above id `after`, at most `batch` rows, with no
/// restart floor. Returns the plan (the one-element JSON array Postgres prints) and the ids
/// the statement read when the library ran it.
pub async fn explain_bus_read_page(
    pool: &PgPool,
    mode: PlanMode,
    prev: &str,
    target: &str,
    after: i64,
    batch: i64,
) -> Result<(serde_json::Value, Vec<i64>)> {
    let one = one_connection(pool).await?;
    let (ids, arguments) = crate::events::bench_read_page(&one, prev, target, after, batch).await?;
    let plan = explain_prepared(&one, mode, &arguments).await?;
    one.close().await;
    Ok((plan, ids))
}

/// As [`explain_bus_read_page`], for the statement that lists the rest of a large read's span
/// (ids only, above `after`, as many as the bus lists at once).
pub async fn explain_bus_span_ids(
    pool: &PgPool,
    mode: PlanMode,
    prev: &str,
    target: &str,
    after: i64,
) -> Result<(serde_json::Value, Vec<i64>)> {
    let one = one_connection(pool).await?;
    let (ids, arguments) = crate::events::bench_read_span_ids(&one, prev, target, after).await?;
    let plan = explain_prepared(&one, mode, &arguments).await?;
    one.close().await;
    Ok((plan, ids))
}

/// As [`explain_bus_read_page`], for the statement that fetches a page of listed `ids` by
/// primary key (with the header of snapshot `target`).
pub async fn explain_bus_page_by_ids(
    pool: &PgPool,
    mode: PlanMode,
    target: &str,
    ids: &[i64],
) -> Result<(serde_json::Value, Vec<i64>)> {
    let one = one_connection(pool).await?;
    let (read, arguments) = crate::events::bench_read_page_by_ids(&one, target, ids).await?;
    let plan = explain_prepared(&one, mode, &arguments).await?;
    one.close().await;
    Ok((plan, read))
}

/// A pool of one fresh connection to `pool`'s database: the statement the library runs
/// through it is prepared on that connection, where [`explain_prepared`] finds it.
async fn one_connection(pool: &PgPool) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .connect_with((*pool.connect_options()).clone())
        .await?)
}

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE` of the one statement the library
/// prepared on `one`'s connection (found in `pg_prepared_statements`), with `arguments` (SQL
/// literals), under plan mode `mode`. The statement is the library's own, as prepared by its
/// call: its text is never copied.
async fn explain_prepared(
    one: &PgPool,
    mode: PlanMode,
    arguments: &[String],
) -> Result<serde_json::Value> {
    let mut conn = one.acquire().await?;
    let names: Vec<String> = sqlx::query_scalar(
        "select name from pg_prepared_statements
         where not from_sql and statement not like '%pg_prepared_statements%'",
    )
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    let [name] = names.as_slice() else {
        return Err(sqlx::Error::Protocol(format!(
            "expected one statement prepared by the library's call, found {names:?}"
        ))
        .into());
    };
    let mode = match mode {
        PlanMode::Custom => "force_custom_plan",
        PlanMode::Generic => "force_generic_plan",
    };
    sqlx::query(&format!("set plan_cache_mode = {mode}"))
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    let sql = format!(
        "explain (analyze, buffers, format json) execute {name}({})",
        arguments.join(", ")
    );
    let plan: serde_json::Value = sqlx::query_scalar(&sql)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query("reset plan_cache_mode")
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    Ok(plan)
}

/// A partitioned history table, for [`drop_history_partition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryTable {
    /// `event`.
    Event,
    /// `backend_state`.
    BackendState,
}

/// Detaches partition `partition` of `table` (`DETACH PARTITION … CONCURRENTLY`) and drops
/// it, with the two steps retention runs in
/// [`PlaneDatabase::run_cleanup`](crate::PlaneDatabase::run_cleanup), without choosing which
/// partition: the bench times one drop of a partition it filled. Returns how long each step
/// took (detach, drop).
pub async fn drop_history_partition(
    db: &PlaneDatabase,
    table: HistoryTable,
    partition: &str,
) -> Result<(Duration, Duration)> {
    let table = match table {
        HistoryTable::Event => History::Event,
        HistoryTable::BackendState => History::BackendState,
    };
    let partitions = Partitions::new(db.context());
    let t = Instant::now();
    partitions.detach_partition(table, partition).await?;
    let detach = t.elapsed();
    let t = Instant::now();
    partitions.drop_detached(table, partition).await?;
    Ok((detach, t.elapsed()))
}
