//! Partitioned history: `event` and `backend_state` are partitioned by ranges of `id`
//! (migration `20261206030000_partitioned_history`). This module keeps partitions ahead of
//! the sequences and retires old ones whole, detaching them (`DETACH PARTITION …
//! CONCURRENTLY`) and dropping them, so that retention deletes no rows of these tables.
//!
//! Nothing here runs on a write path: writers only ever insert into the partitioned table,
//! and its last partition is open ended (`[B, MAXVALUE)`), so an insert always finds a
//! partition even when nothing maintains them (older builds, a stopped cleaner). No DEFAULT
//! partition: with one, Postgres refuses `DETACH … CONCURRENTLY`, and retiring a partition
//! would need an exclusive lock on the whole table, which stalls every writer.
//!
//! Creating partitions ahead moves the open-ended partition up while it is still empty:
//! detach it concurrently, drop it, then in one transaction attach new, empty partitions
//! `[B, B + size)`, … and a new open-ended one above them (`ATTACH` takes only SHARE UPDATE
//! EXCLUSIVE on the table, which no reader or writer conflicts with, and an empty table needs
//! no scan). While it is detached, an id at or above `B` would find no partition; it is done
//! only while at least one whole partition lies between the sequence and `B`.
//!
//! If writes reached the open-ended partition first (nothing maintained the partitions for
//! a while), it is split instead: given an upper bound above the sequence, after a CHECK
//! proved that its rows fit, and new partitions go above it (`Partitions::split_tail`).
//!
//! Retention (see RELIABILITY.md, "Retention by partitions"):
//! - an `event` partition goes once every id in its range has been handed out and its newest
//!   row is older than the horizon (`CleanupConfig::event_min_age`): no event inside the
//!   retention window is lost, and an event older than the horizon stays until the rest of its
//!   partition is old too;
//! - a `backend_state` partition goes once every id in its range has been handed out and it
//!   holds no row. A backend's history rows are deleted only with the backend itself (the
//!   backends phase of cleanup, at least `backend_min_age` after it terminated), so a backend
//!   that lives for months keeps its whole history, and the partitions that hold it stay.

use crate::config::CleanupConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use std::time::Duration;

/// What one round of partition maintenance and retention did (part of
/// [`CleanupSummary`](crate::CleanupSummary)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionReport {
    /// Partitions created ahead of the sequences (both tables).
    pub partitions_created: u64,
    /// Open-ended partitions that writes had reached (nothing maintained the partitions for
    /// a while), given an upper bound above the sequence so that retention can drop them
    /// once their rows are old; their rows stay where they are.
    pub tails_split: u64,
    /// `event` partitions detached and dropped.
    pub event_partitions_dropped: u64,
    /// Events in them.
    pub events_dropped: u64,
    /// Empty `backend_state` partitions detached and dropped.
    pub state_partitions_dropped: u64,
    /// `backend_state` partitions past the sequence that still hold rows of backends that
    /// exist (kept).
    pub state_partitions_kept: u64,
    /// The role may not change the partitions (it does not own the tables: the
    /// application role of `docs/least-privilege.sql`): nothing was created or dropped, and
    /// old events were deleted row by row instead, as before partitioning. Run cleanup (or
    /// [`maintain_partitions`](crate::PlaneDatabase::maintain_partitions)) as the tables'
    /// owner now and then to keep partitions ahead and drop old ones.
    pub ddl_refused: bool,
}

/// Whether `error` is Postgres refusing DDL to a role that does not own the table
/// (`insufficient_privilege`, SQLSTATE 42501, e.g. `must be owner of table event`).
pub(crate) fn lacks_privilege(error: &Error) -> bool {
    match error {
        Error::Database(sqlx::Error::Database(db)) => db.code().as_deref() == Some("42501"),
        _ => false,
    }
}

/// A history table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum History {
    Event,
    BackendState,
}

impl History {
    const ALL: [History; 2] = [History::Event, History::BackendState];

    fn table(self) -> &'static str {
        match self {
            History::Event => "event",
            History::BackendState => "backend_state",
        }
    }

    fn sequence(self) -> &'static str {
        match self {
            History::Event => "event_id_seq",
            History::BackendState => "backend_state_id_seq",
        }
    }
}

/// One partition: its name and bounds (`None`: MINVALUE below, MAXVALUE above).
#[derive(Debug, Clone)]
struct Partition {
    name: String,
    lower: Option<i64>,
    upper: Option<i64>,
    detach_pending: bool,
    /// It carries the CHECK of a split that has not finished (see `Partitions::split_tail`).
    split_check: bool,
}

/// What keeping partitions ahead did to one or both tables.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ahead {
    /// Partitions created.
    pub(crate) created: u64,
    /// Open-ended partitions split (given an upper bound) because writes had reached them.
    pub(crate) split: u64,
}

impl Partition {
    fn is_tail(&self) -> bool {
        self.upper.is_none()
    }
}

/// Parses one bound as `pg_get_expr` prints it: `'2000000'`, `MINVALUE` or `MAXVALUE`.
fn bound(text: &str) -> Option<i64> {
    text.trim().trim_matches('\'').parse().ok()
}

/// The partition statements, on a context; the caller checks its fence between steps.
pub(crate) struct Partitions<'a> {
    ctx: &'a Context,
}

impl<'a> Partitions<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }

    /// Whether `table` is partitioned (a database migrated by this build always is).
    async fn is_partitioned(&self, table: History) -> Result<bool> {
        let kind = sqlx::query_scalar!(
            r#"select relkind::text as "kind!" from pg_class where oid = $1::text::regclass"#,
            table.table()
        )
        .fetch_one(self.ctx.pool())
        .await?;
        Ok(kind == "p")
    }

    async fn list(&self, table: History) -> Result<Vec<Partition>> {
        let rows = sqlx::query!(
            r#"
            select c.relname::text as "name!",
                   i.inhdetachpending as "pending!",
                   exists (select 1 from pg_constraint k
                           where k.conrelid = c.oid and k.conname = 'plane_split_bound')
                       as "split_check!",
                   regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                'FROM \(([^)]*)\) TO \(([^)]*)\)') as bounds
            from pg_inherits i
            join pg_class c on c.oid = i.inhrelid
            where i.inhparent = $1::text::regclass
            "#,
            table.table()
        )
        .fetch_all(self.ctx.pool())
        .await?;
        let mut parts: Vec<Partition> = rows
            .into_iter()
            .map(|row| {
                let bounds = row.bounds.unwrap_or_default();
                Partition {
                    name: row.name,
                    lower: bounds.first().and_then(|b| bound(b)),
                    upper: bounds.get(1).and_then(|b| bound(b)),
                    detach_pending: row.pending,
                    split_check: row.split_check,
                }
            })
            .collect();
        parts.sort_by_key(|p| (p.lower.is_some(), p.lower));
        Ok(parts)
    }

    /// The largest id the sequence has handed out (0 before the first).
    async fn last_id(&self, table: History) -> Result<i64> {
        let last = sqlx::query_scalar!(
            "select pg_sequence_last_value($1::text::regclass)",
            table.sequence()
        )
        .fetch_one(self.ctx.pool())
        .await?;
        Ok(last.unwrap_or(0))
    }

    /// Finishes a `DETACH … CONCURRENTLY` that was cut short (the process died between its
    /// two transactions) and drops the partition: it was being retired, or it was an empty
    /// open-ended one being moved up.
    async fn finish_pending(&self, table: History, parts: &[Partition]) -> Result<()> {
        for part in parts.iter().filter(|p| p.detach_pending) {
            ddl(
                self.ctx,
                &format!(
                    "alter table {} detach partition {} finalize",
                    table.table(),
                    quote(&part.name)
                ),
            )
            .await?;
            ddl(self.ctx, &format!("drop table {}", quote(&part.name))).await?;
        }
        Ok(())
    }

    /// Keeps at least `config.partitions_ahead` empty partitions of `config.partition_rows`
    /// ids above each sequence, and an open-ended one above them. Returns how many it
    /// created.
    pub(crate) async fn ensure_ahead(&self, config: &CleanupConfig) -> Result<Ahead> {
        check(config)?;
        let mut done = Ahead::default();
        for table in History::ALL {
            if self.is_partitioned(table).await? {
                let ahead = self.ensure_ahead_of(table, config).await?;
                done.created += ahead.created;
                done.split += ahead.split;
            }
        }
        Ok(done)
    }

    async fn ensure_ahead_of(&self, table: History, config: &CleanupConfig) -> Result<Ahead> {
        let mut parts = self.list(table).await?;
        if parts.iter().any(|p| p.detach_pending) {
            self.finish_pending(table, &parts).await?;
            parts = self.list(table).await?;
        }
        let last = self.last_id(table).await?;
        let ahead = parts
            .iter()
            .filter(|p| !p.is_tail() && p.lower.is_some_and(|lower| lower > last))
            .count();
        let wanted = usize::try_from(config.partitions_ahead).unwrap_or(usize::MAX);
        let tail = parts.iter().find(|p| p.is_tail());
        let leftover_check = tail.is_some_and(|tail| tail.split_check);
        if ahead >= wanted && tail.is_some() && !leftover_check {
            return Ok(Ahead::default());
        }
        let t = table.table();
        // Where new partitions start: the open-ended partition's lower bound, or (if there
        // is none) above every partition.
        let highest = parts.iter().filter_map(|p| p.upper).max();
        let start = match tail {
            Some(tail) => {
                let lower = tail.lower.unwrap_or(i64::MIN);
                let empty = sqlx::query_scalar::<_, bool>(&format!(
                    "select not exists (select 1 from {})",
                    quote(&tail.name)
                ))
                .fetch_one(self.ctx.pool())
                .await?;
                if !empty || lower <= last {
                    // Writes reached it before it could be moved up (nothing maintained the
                    // partitions for a while): give it an upper bound instead.
                    return self.split_tail(table, tail, last, config, wanted).await;
                }
                if leftover_check {
                    // A split died half way, and no write reached the partition since: its
                    // CHECK only has to go (or an id past its bound would fail).
                    locked(
                        self.ctx,
                        &[format!(
                            "alter table {} drop constraint if exists {SPLIT_BOUND}",
                            quote(&tail.name)
                        )],
                    )
                    .await?;
                    if ahead >= wanted {
                        return Ok(Ahead::default());
                    }
                }
                ddl(
                    self.ctx,
                    &format!(
                        "alter table {t} detach partition {} concurrently",
                        quote(&tail.name)
                    ),
                )
                .await?;
                ddl(self.ctx, &format!("drop table {}", quote(&tail.name))).await?;
                lower
            }
            None => highest.unwrap_or(0).max(last.saturating_add(1)),
        };
        let count = wanted.saturating_sub(ahead).max(1);
        let mut steps = Vec::new();
        let mut lower = start;
        for _ in 0..count {
            let upper = lower.saturating_add(config.partition_rows);
            steps.extend(attach_steps(t, lower, Some(upper)));
            lower = upper;
        }
        steps.extend(attach_steps(t, lower, None));
        locked(self.ctx, &steps).await?;
        let created = count as u64 + 1;
        tracing::info!(
            table = t,
            from = start,
            to = lower,
            "created partitions ahead"
        );
        Ok(Ahead { created, split: 0 })
    }

    /// Gives the open-ended partition `tail`, which writes reached before it could be moved
    /// up, the upper bound `M = last + 1 + room` (`last`: the sequence, or the partition's
    /// start if that is higher; room: `partitions_ahead` partitions of
    /// `partition_rows` ids, at least one), and attaches `wanted` empty partitions and a new
    /// open-ended one above `M`. No row moves and no scan runs under an exclusive lock:
    ///
    /// 1. `CHECK (id >= lower AND id < M) NOT VALID` on `tail` (catalog only);
    /// 2. `VALIDATE` it: one scan of `tail` under SHARE UPDATE EXCLUSIVE, which no reader
    ///    or writer conflicts with;
    /// 3. in one transaction: detach `tail`, attach it again for `[lower, M)` (the valid
    ///    CHECK proves its rows fit, so no scan), drop the CHECK, attach the new partitions.
    ///    Detaching takes ACCESS EXCLUSIVE on the table for the length of a catalog
    ///    transaction.
    ///
    /// Steps 1 and 3 wait at most 50 ms per try for their locks, so writers queue behind
    /// them at most that long. Between steps 1 and 3 an insert with an id at or above `M`
    /// would fail: `room` ids must not be handed out during the scan. If they were, step 3
    /// refuses with an error that says so, and the CHECK is dropped. A CHECK left by a split
    /// that died half way is replaced by the next one (or dropped, if no write reached the
    /// partition).
    async fn split_tail(
        &self,
        table: History,
        tail: &Partition,
        last: i64,
        config: &CleanupConfig,
        wanted: usize,
    ) -> Result<Ahead> {
        let t = table.table();
        let name = quote(&tail.name);
        let room = config
            .partition_rows
            .saturating_mul(i64::from(config.partitions_ahead.max(1)));
        // Above the sequence, and above the partition's own start if rows with explicit ids
        // put it in use before the sequence got there.
        let upper = last
            .max(tail.lower.unwrap_or(i64::MIN))
            .saturating_add(1)
            .saturating_add(room);
        let (lower_sql, check) = match tail.lower {
            Some(lower) => (lower.to_string(), format!("id >= {lower} and id < {upper}")),
            None => ("minvalue".to_string(), format!("id < {upper}")),
        };
        tracing::warn!(
            table = t,
            partition = tail.name,
            upper,
            "writes reached the open-ended partition: splitting it (nothing maintained the \
             partitions for a while)"
        );
        let drop_check = format!("alter table {name} drop constraint if exists {SPLIT_BOUND}");
        locked(
            self.ctx,
            &[
                drop_check.clone(),
                format!(
                    "alter table {name} add constraint {SPLIT_BOUND} check ({check}) not valid"
                ),
            ],
        )
        .await?;
        let mut steps = vec![
            format!("alter table {t} detach partition {name}"),
            // No insert into the table runs now (ACCESS EXCLUSIVE), and an insert takes its id
            // only once it holds its lock: the sequence stays where it is until the commit.
            format!(
                "do $$ begin if pg_sequence_last_value('{sequence}') >= {upper} then \
                 raise exception 'plane-db: splitting partition % of {t}: the sequence \
                 reached % while the partition was checked, past the bound {upper}; \
                 inserts above the bound failed meanwhile (raise partition_rows or \
                 partitions_ahead)', {literal}, pg_sequence_last_value('{sequence}'); \
                 end if; end $$",
                sequence = table.sequence(),
                literal = literal(&tail.name),
            ),
            format!("alter table {t} attach partition {name} for values from ({lower_sql}) to ({upper})"),
            // The bound does its work now (and this transaction holds the lock already).
            drop_check.clone(),
        ];
        let mut lower = upper;
        let count = wanted.max(1);
        for _ in 0..count {
            let next = lower.saturating_add(config.partition_rows);
            steps.extend(attach_steps(t, lower, Some(next)));
            lower = next;
        }
        steps.extend(attach_steps(t, lower, None));
        let validated = ddl(
            self.ctx,
            &format!("alter table {name} validate constraint {SPLIT_BOUND}"),
        )
        .await;
        let split = match validated {
            Ok(()) => locked(self.ctx, &steps).await,
            Err(error) => Err(error),
        };
        if let Err(error) = split {
            // Without its CHECK, the open-ended partition takes any id again.
            if let Err(drop_error) = locked(self.ctx, &[drop_check]).await {
                tracing::error!(
                    table = t,
                    partition = tail.name,
                    error = %drop_error,
                    "could not drop the split's CHECK; the next cleanup replaces it"
                );
            }
            return Err(error);
        }
        tracing::info!(
            table = t,
            partition = tail.name,
            upper,
            "split the open-ended partition"
        );
        Ok(Ahead {
            created: count as u64 + 1,
            split: 1,
        })
    }

    /// The `event` partitions whose ids were all handed out and whose newest row is older
    /// than `min_age`, and the empty `backend_state` partitions whose ids were all handed out:
    /// `(table, partition, rows)`, oldest first, plus how many `backend_state` partitions past
    /// the sequence still hold rows.
    pub(crate) async fn retired(
        &self,
        event_min_age: Duration,
    ) -> Result<(Vec<(History, String, u64)>, u64)> {
        let mut retired = Vec::new();
        let mut kept = 0;
        for table in History::ALL {
            if !self.is_partitioned(table).await? {
                continue;
            }
            let last = self.last_id(table).await?;
            for part in self.list(table).await? {
                if part.detach_pending || part.upper.is_none_or(|upper| upper > last + 1) {
                    continue;
                }
                let name = quote(&part.name);
                match table {
                    History::Event => {
                        // The newest row through the partition's created_at index.
                        let old = sqlx::query_scalar::<_, bool>(&format!(
                            "select coalesce(max(created_at) < now() - make_interval(secs => $1), true) from {name}"
                        ))
                        .bind(crate::validate::interval_secs(event_min_age))
                        .fetch_one(self.ctx.pool())
                        .await?;
                        if old {
                            let rows = sqlx::query_scalar::<_, i64>(&format!(
                                "select count(*) from {name}"
                            ))
                            .fetch_one(self.ctx.pool())
                            .await?;
                            retired.push((table, part.name, u64::try_from(rows).unwrap_or(0)));
                        }
                    }
                    History::BackendState => {
                        let empty = sqlx::query_scalar::<_, bool>(&format!(
                            "select not exists (select 1 from {name})"
                        ))
                        .fetch_one(self.ctx.pool())
                        .await?;
                        if empty {
                            retired.push((table, part.name, 0));
                        } else {
                            kept += 1;
                        }
                    }
                }
            }
        }
        Ok((retired, kept))
    }

    /// Detaches `partition` of `table` concurrently and drops it.
    pub(crate) async fn drop_partition(&self, table: History, partition: &str) -> Result<()> {
        self.detach_partition(table, partition).await?;
        self.drop_detached(table, partition).await
    }

    /// The first step of [`drop_partition`](Self::drop_partition): `DETACH PARTITION …
    /// CONCURRENTLY`.
    pub(crate) async fn detach_partition(&self, table: History, partition: &str) -> Result<()> {
        ddl(
            self.ctx,
            &format!(
                "alter table {} detach partition {} concurrently",
                table.table(),
                quote(partition)
            ),
        )
        .await
    }

    /// The second step of [`drop_partition`](Self::drop_partition): `DROP TABLE` of the
    /// detached partition.
    pub(crate) async fn drop_detached(&self, table: History, partition: &str) -> Result<()> {
        ddl(self.ctx, &format!("drop table {}", quote(partition))).await?;
        tracing::info!(table = table.table(), partition, "dropped a partition");
        Ok(())
    }
}

/// The statements that create `{table}_p{lower}` as an empty table like `table` and attach
/// it for `[lower, upper)` (`upper` `None`: MAXVALUE). Attaching builds its indexes and clones
/// the table's triggers and foreign keys; the table is empty, so both are instant.
fn attach_steps(table: &str, lower: i64, upper: Option<i64>) -> [String; 2] {
    let name = quote(&format!("{table}_p{lower}"));
    let upper = upper.map_or_else(|| "maxvalue".to_string(), |u| u.to_string());
    [
        format!("create table {name} (like {table} including defaults including constraints)"),
        format!(
            "alter table {table} attach partition {name} for values from ({lower}) to ({upper})"
        ),
    ]
}

/// Runs one DDL statement on its own, outside any transaction block (as `DETACH …
/// CONCURRENTLY` must).
async fn ddl(ctx: &Context, sql: &str) -> Result<()> {
    // One Parse/Bind/Execute/Sync: an implicit transaction of its own, which is what
    // `DETACH … CONCURRENTLY` requires.
    sqlx::query(sql)
        .persistent(false)
        .execute(ctx.pool())
        .await?;
    Ok(())
}

/// The CHECK a split puts on the open-ended partition (see `Partitions::split_tail`).
const SPLIT_BOUND: &str = "plane_split_bound";

/// How long one try of a [`locked`] transaction waits for its locks, and how many tries it
/// makes (with a 20 ms pause between them) before it gives up.
const LOCK_TRY: &str = "50ms";
const LOCK_TRIES: u32 = 200;

/// Runs `statements` in one transaction whose every lock waits at most [`LOCK_TRY`], trying
/// again while a lock was not granted: DDL that needs an exclusive lock then holds writers up
/// for at most that long (a queued exclusive lock blocks everyone behind it), and never
/// deadlocks with a writer that holds one table and wants another.
async fn locked(ctx: &Context, statements: &[String]) -> Result<()> {
    let mut tries = 0;
    loop {
        let mut tx = ctx.pool().begin().await?;
        run(&mut tx, &format!("set local lock_timeout = '{LOCK_TRY}'")).await?;
        let mut outcome = Ok(());
        for sql in statements {
            outcome = run(&mut tx, sql).await;
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            Ok(()) => return Ok(tx.commit().await?),
            Err(Error::Database(sqlx::Error::Database(db)))
                if db.code().as_deref() == Some("55P03") && tries + 1 < LOCK_TRIES =>
            {
                tries += 1;
                drop(tx);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// One statement in a transaction.
async fn run(tx: &mut sqlx::PgTransaction<'_>, sql: &str) -> Result<()> {
    sqlx::query(sql)
        .persistent(false)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A name as a string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A partition name as an identifier. Names are made here from a table name and a number,
/// or read from the catalog; quoting keeps either safe.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn check(config: &CleanupConfig) -> Result<()> {
    if config.partition_rows <= 0 {
        return Err(Error::InvalidArgument {
            argument: "partition_rows",
            reason: "must be greater than zero".to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bound;

    #[test]
    fn bounds_parse_as_postgres_prints_them() {
        assert_eq!(bound("'2000000'"), Some(2_000_000));
        assert_eq!(bound("MINVALUE"), None);
        assert_eq!(bound("MAXVALUE"), None);
    }
}
