//! Reading stored events by id, to resume a stream (not the bus's read, which goes by
//! transaction visibility).

use super::event::Event;
use crate::error::Result;
use crate::validate::check_non_negative;
use sqlx::PgPool;

/// The id of the newest stored event, `None` if there are none.
#[tracing::instrument(skip(pool))]
pub(crate) async fn latest_event_id(pool: &PgPool) -> Result<Option<i64>> {
    // Reads the primary key index backwards: one row, whatever the table's size.
    let id = sqlx::query_scalar!("select max(id) from event")
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// Stored events with an id greater than `since`, in id order, at most `limit`.
#[tracing::instrument(name = "get_events_since", skip(pool))]
pub(crate) async fn events_since(pool: &PgPool, since: i64, limit: i64) -> Result<Vec<Event>> {
    check_non_negative("limit", limit)?;
    let rows = sqlx::query!(
        r#"
        select id, kind, key, created_at, data
        from event
        where id > $1
        order by id
        limit $2
        "#,
        since,
        limit,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Event {
            id: Some(row.id),
            kind: row.kind,
            key: row.key,
            created_at: row.created_at,
            data: row.data,
        })
        .collect())
}
