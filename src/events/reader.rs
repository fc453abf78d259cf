//! The reader: the statement that reads the events committed since the previous read, the
//! cursor it keeps (a snapshot, the server's start time and incarnation), the floor it reads from after
//! a server change, and the recently dispatched rows it remembers to skip then. The
//! [module docs](super) say what this guarantees and why it works.

use super::backoff::Backoff;
use super::event::Event;
use super::registry::{ReadSpan, Shared};
use crate::config::BusConfig;
use crate::error::Result;
use crate::metrics as m;
use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Reads newly committed events whenever woken (or every poll interval) and dispatches them.
pub(super) async fn read_loop(
    shared: Arc<Shared>,
    pool: PgPool,
    mut cursor: Cursor,
    mut seen: Seen,
    config: BusConfig,
) {
    let mut backoff = Backoff::new(config.max_backoff);
    let mut progress = None;
    loop {
        let read = read_new_events(
            &shared,
            &pool,
            &cursor,
            &mut seen,
            &mut progress,
            PageLimits {
                rows: config.fetch_batch_size,
                bytes: page_bytes(config.max_page_bytes),
            },
        );
        let started = std::time::Instant::now();
        let read = read.await;
        let outcome = match &read {
            Ok(Some(_)) => "ok",
            Ok(None) => "server_changed",
            Err(_) => "error",
        };
        m::bus_read(started.elapsed(), outcome);
        m::sample_pool(&pool);
        shared.sample_queues();
        match read {
            Ok(None) => {
                tracing::warn!(
                    "event bus: the database server changed during a read; reading again"
                );
            }
            Ok(Some(next)) => {
                cursor = next;
                backoff.reset();
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(config.poll_interval) => {}
                    _ = shared.closed() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "event bus: reading events failed; retrying");
                backoff.wait(&shared).await;
            }
        }
        if shared.is_closed() {
            return;
        }
    }
}

/// Dispatches every event committed after the snapshot `prev` and returns the cursor to
/// continue from. See the module docs for why this loses nothing and repeats nothing.
///
/// A read covers the rows visible in one fixed target snapshot (the first page's) and not in
/// `prev`, dispatched in id order. The first page (at most `batch` rows) comes from the read
/// statement itself; when there is more, the read lists the ids of the rest once (up to
/// [`ID_CHUNK`] at a time, ids only) and fetches them `batch` at a time by primary key. So
/// every row is evaluated a bounded number of times, whatever the backlog: paging with the
/// read statement alone re-evaluated and sorted the whole span for every page, which made a
/// backlog cost quadratically (17.7 s for 5,000 rows read one per page).
///
/// `progress` keeps the read's state across calls (target, last id dispatched, restart
/// floor, ids still to fetch): a read that fails between pages (a dropped connection)
/// resumes where it stopped instead of dispatching the pages already dispatched again.
/// Dispatching is synchronous, so the state is exact at every await.
///
/// If the server's past may have changed since `prev` (its start time changed, or the
/// incarnation marker is gone or different: crash recovery in place, a promoted standby),
/// transaction ids may have gone back and rows written with reused ids would look already
/// read. The read then takes its target from [`restart_floor`] and also reads every row from
/// a transaction at or after the floor, skipping the rows above it that were already
/// dispatched. `None` if the server changed between two pages of one read: the caller reads
/// again from `prev` (the restart path then applies), and that read skips the rows the
/// cut-short one dispatched (those visible in its target up to its last id, below the restart
/// floor, where transaction ids are still the old server's).
///
/// The statements are prepared once per connection, and after five runs Postgres may switch
/// to a generic plan that does not know the parameters. Two details keep the read statement
/// on the `xid` index, touching only the new rows: the range `xid >= least(xmax(prev),
/// restart floor)` also gets its (implied) upper bound `xid < xmax(snap)` (a visible row's
/// transaction is below the snapshot's `xmax`), which Postgres estimates as narrow; and the
/// page cursor and order use `id + 0`, which the primary key cannot serve. With a plain
/// `order by id … limit` the generic plan walked the primary key through the whole table (83
/// ms per read at 145,000 events, against 0.14 ms), and a plain `id > $3` added a scan of the
/// whole primary-key index.
async fn read_new_events(
    shared: &Shared,
    pool: &PgPool,
    prev: &Cursor,
    seen: &mut Seen,
    progress: &mut Option<Progress>,
    limits: PageLimits,
) -> Result<Option<Cursor>> {
    let batch = limits.rows;
    let p = progress.get_or_insert_with(Progress::default);
    let mut restart_checked = false;
    // Whether this call marked the start of an inexact read (see `Registry::epoch`); a read
    // resumed by a later call marks it again, which only makes more positions inexact.
    let mut epoch_bumped = false;
    loop {
        let page = Page {
            prev: &prev.snapshot,
            target: p.target.as_ref().map(|t| t.snapshot.as_str()),
            after: p.after,
            batch,
            max_bytes: limits.bytes,
            restart_floor: p.restart_floor.as_ref().map(|f| f.xid.as_str()),
            cut_short: &p.cut_short,
        };
        let rows = match &mut p.rest {
            None => read_page(pool, &page).await?,
            Some(rest) if rest.ids.is_empty() && rest.listed_all => {
                // The read is complete.
                break;
            }
            Some(rest) if rest.ids.is_empty() => {
                let ids = read_span_ids(pool, &page, ID_CHUNK).await?;
                rest.listed_all = (ids.len() as i64) < ID_CHUNK;
                rest.ids = ids.into();
                continue;
            }
            Some(rest) => {
                // At most `batch` rows and `max_bytes` of payload, at least one row.
                let max_rows = usize::try_from(batch).unwrap_or(usize::MAX);
                let mut bytes = 0_i64;
                let mut ids = Vec::new();
                for &(id, size) in &rest.ids {
                    if !ids.is_empty() && (ids.len() >= max_rows || bytes + size > limits.bytes) {
                        break;
                    }
                    bytes += size;
                    ids.push(id);
                }
                let n = ids.len();
                let target = page.target.unwrap_or(prev.snapshot.as_str());
                let rows = read_page_by_ids(pool, target, &ids).await?;
                rest.ids.drain(..n);
                rows
            }
        };

        // The statements always return a row (a left join on a one-row select), carrying the
        // snapshot, the server's start time and its incarnation even when no event is new.
        let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        match &p.target {
            None if first.past_changed_since(prev) && !restart_checked => {
                restart_checked = true;
                let (target, floor) = self::restart_floor(pool, prev, first, seen).await?;
                p.target = Some(target);
                p.restart_floor = Some(floor);
                continue;
            }
            None => p.target = Some(first.cursor()),
            Some(t) if first.past_changed_since(t) => {
                // Read again from `prev` (the restart path then applies), skipping what this
                // read already dispatched: its rows are those visible in its target up to
                // `after`, as long as their transaction ids were not reused.
                let mut cut_short = std::mem::take(&mut p.cut_short);
                cut_short.targets.push(t.snapshot.clone());
                cut_short.afters.push(p.after);
                *p = Progress {
                    cut_short,
                    ..Progress::default()
                };
                return Ok(None);
            }
            Some(_) => {}
        }

        let span = match &p.target {
            Some(t) => ReadSpan {
                prev: prev.snapshot.as_str().into(),
                target: t.snapshot.as_str().into(),
                exact: p.restart_floor.is_none() && p.cut_short.targets.is_empty(),
            },
            None => return Err(sqlx::Error::RowNotFound.into()),
        };
        if !span.exact && !epoch_bumped {
            epoch_bumped = true;
            shared.bump_epoch();
        }
        let matched = rows.first().and_then(|r| r.matched).unwrap_or(0);
        let mut count = 0_i64;
        // The delay from commit to dispatch, measured from the event's `created_at` (its
        // transaction's start on the server's clock: the commit time is not recorded) to now.
        let delay = metrics::histogram!(m::BUS_DELIVERY_DELAY_SECONDS);
        let now = Utc::now();
        let mut kinds = m::KindTally::default();
        for row in rows {
            let (Some(id), Some(xid), Some(kind), Some(created_at), Some(data)) =
                (row.id, row.xid, row.kind, row.created_at, row.data)
            else {
                continue;
            };
            count += 1;
            p.after = id;
            let identity = EventIdentity::new(id, xid, created_at);
            if p.restart_floor
                .as_ref()
                .is_some_and(|f| f.skip.contains(&identity))
            {
                // Already dispatched before the server change (its id was reused below).
                continue;
            }
            seen.record(identity);
            kinds.add(&kind);
            delay.record((now - created_at).to_std().map_or(0.0, |d| d.as_secs_f64()));
            shared.dispatch(
                Arc::new(Event {
                    id: Some(id),
                    kind,
                    key: row.key,
                    created_at,
                    data,
                }),
                Some(&span),
            );
        }
        kinds.flush(m::BUS_EVENTS_READ_TOTAL);
        if p.rest.is_none() {
            // The page is the whole span if fewer rows than the limit matched and the byte
            // limit kept all of them.
            if matched < batch && count >= matched {
                break;
            }
            // More than one page: list the rest of the span's ids once.
            p.rest = Some(Rest::default());
        }
    }
    // The read is complete.
    let target = progress.take().and_then(|p| p.target);
    if epoch_bumped {
        shared.bump_epoch();
    }
    if let Some(xmax) = target.as_ref().and_then(|t| snapshot_xmax(&t.snapshot)) {
        // Rows above the new cursor's `xmax` are not visible in it (after transaction ids
        // went back, rows of the old server's may lie there).
        seen.high_xid = seen.high_xid.map(|high| high.min(xmax - 1));
    }
    Ok(target)
}

/// How many ids of a large read's span are listed at once (8 bytes each): the rows of a
/// read beyond its first page are fetched by these ids. A span larger than this is listed
/// again from where the previous list ended, which evaluates the span once more per chunk.
const ID_CHUNK: i64 = 1_000_000;

/// How much one page of a read may hold: at most `rows` rows and, beyond its first row,
/// `bytes` of payload (`pg_column_size` of `data`, as stored).
#[derive(Clone, Copy)]
struct PageLimits {
    rows: i64,
    bytes: i64,
}

/// [`BusConfig::max_page_bytes`] as the statements take it.
fn page_bytes(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

/// Which page of events [`read_page`] reads: those committed after the snapshot `prev` and
/// visible in `target` (the current snapshot when `None`), above id `after`, at most `batch`
/// rows and `max_bytes` of payload (at least one row), from transactions at or above
/// `restart_floor` too (after a server change), skipping the rows of the reads in
/// `cut_short`.
struct Page<'a> {
    prev: &'a str,
    target: Option<&'a str>,
    after: i64,
    batch: i64,
    max_bytes: i64,
    restart_floor: Option<&'a str>,
    cut_short: &'a CutShort,
}

/// One row of a page: the read's snapshot, the server's start time, its incarnation and the
/// time of the read, and one event (its columns all `None` when no event is new: the
/// statement always returns a row).
struct PageRow {
    snapshot: String,
    started: DateTime<Utc>,
    incarnation: Option<String>,
    taken_at: DateTime<Utc>,
    id: Option<i64>,
    xid: Option<i64>,
    kind: Option<String>,
    key: Option<String>,
    created_at: Option<DateTime<Utc>>,
    data: Option<serde_json::Value>,
    /// How many rows [`read_page`]'s statement matched before the byte limit cut the page
    /// (at most the row limit; `None` from [`read_page_by_ids`]).
    matched: Option<i64>,
}

impl PageRow {
    /// Whether the server this row was read on may have another past than the one `cursor`
    /// was taken on: it restarted (start time) or went through crash recovery or promotion
    /// (the incarnation marker, which both erase).
    fn past_changed_since(&self, cursor: &Cursor) -> bool {
        self.started != cursor.server_started || self.incarnation != cursor.incarnation
    }

    /// The cursor this row's header describes.
    fn cursor(&self) -> Cursor {
        Cursor {
            snapshot: self.snapshot.clone(),
            server_started: self.started,
            incarnation: self.incarnation.clone(),
            taken_at: self.taken_at,
        }
    }
}

/// The read statement (see [`read_new_events`] for why it is written this way), on a pool or
/// on one connection (where it is prepared once, as on each of the pool's connections).
async fn read_page(executor: impl PgExecutor<'_>, page: &Page<'_>) -> sqlx::Result<Vec<PageRow>> {
    sqlx::query_as!(
        PageRow,
        r#"
        select
            s.snap::text as "snapshot!",
            s.started as "started!",
            s.incarnation,
            s.taken_at as "taken_at!",
            e.id as "id?",
            e.xid::text::bigint as "xid?",
            e.kind as "kind?",
            e.key as "key?",
            e.created_at as "created_at?",
            e.data as "data?",
            e.matched as "matched?"
        from (
            select
                coalesce($2::text::pg_snapshot, pg_current_snapshot()) as snap,
                $1::text::pg_snapshot as prev,
                pg_postmaster_start_time() as started,
                (select id::text from plane_server_incarnation) as incarnation,
                statement_timestamp() as taken_at
        ) s
        left join lateral (
            -- The page: the first `batch` rows of the span (a top-N sort of ids and sizes),
            -- cut where their payloads pass `max_bytes` (a window over those rows only),
            -- then fetched by primary key. `matched` says how many rows the top-N found: the
            -- read is complete when that is below `batch` and the byte cut kept them all.
            select e.id, e.xid, e.kind, e.key, e.created_at, e.data, w.matched
            from (
                select w.id, w.ord, w.matched
                from (
                    select id, ord, bytes,
                           count(*) over () as matched,
                           sum(bytes) over (order by ord rows unbounded preceding) as running_bytes
                    from (
                        select id, id + 0 as ord, pg_column_size(data) as bytes
                        from event
                        where ((xid >= least(pg_snapshot_xmax(s.prev), $5::text::xid8)
                                and xid < pg_snapshot_xmax(s.snap))
                               or xid = any(array(select pg_snapshot_xip(s.prev))))
                          and pg_visible_in_snapshot(xid, s.snap)
                          and id + 0 > $3
                          and not exists (
                              select 1 from unnest($6::text[], $7::bigint[]) as c(target, upto)
                              where id <= c.upto
                                and pg_visible_in_snapshot(xid, c.target::pg_snapshot)
                                and ($5::text is null or xid < $5::text::xid8)
                          )
                        order by id + 0
                        limit $4
                    ) r
                ) w
                where w.running_bytes - w.bytes < $8
                order by w.ord
            ) w
            join event e on e.id = w.id
        ) e on true
        order by e.id
        "#,
        page.prev,
        page.target,
        page.after,
        page.batch,
        page.restart_floor,
        &page.cut_short.targets,
        &page.cut_short.afters,
        page.max_bytes,
    )
    .fetch_all(executor)
    .await
}

/// The ids of the rows [`read_page`] would return for `page` (whose target must be set),
/// above `page.after`, in order, at most `limit`, each with the size of its payload: the rest
/// of a large read, listed once (ids and sizes only, so the sort is of ids, not rows).
async fn read_span_ids(
    pool: &PgPool,
    page: &Page<'_>,
    limit: i64,
) -> sqlx::Result<Vec<(i64, i64)>> {
    let rows = sqlx::query!(
        r#"
        select id as "id!", pg_column_size(data)::bigint as "bytes!"
        from event
        where ((xid >= least(pg_snapshot_xmax($1::text::pg_snapshot), $5::text::xid8)
                and xid < pg_snapshot_xmax($2::text::pg_snapshot))
               or xid = any(array(select pg_snapshot_xip($1::text::pg_snapshot))))
          and pg_visible_in_snapshot(xid, $2::text::pg_snapshot)
          and id + 0 > $3
          and not exists (
              select 1 from unnest($6::text[], $7::bigint[]) as c(target, upto)
              where id <= c.upto
                and pg_visible_in_snapshot(xid, c.target::pg_snapshot)
                and ($5::text is null or xid < $5::text::xid8)
          )
        order by id + 0
        limit $4
        "#,
        page.prev,
        page.target,
        page.after,
        limit,
        page.restart_floor,
        &page.cut_short.targets,
        &page.cut_short.afters,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.bytes)).collect())
}

/// The rows with `ids` (listed by [`read_span_ids`]), by primary key, with the header of
/// [`read_page`] (the `target` snapshot, and the server's start time and incarnation, which
/// tell whether the server changed since the ids were listed).
async fn read_page_by_ids(pool: &PgPool, target: &str, ids: &[i64]) -> sqlx::Result<Vec<PageRow>> {
    sqlx::query_as!(
        PageRow,
        r#"
        select
            $1::text as "snapshot!",
            s.started as "started!",
            s.incarnation,
            s.taken_at as "taken_at!",
            e.id as "id?",
            e.xid::text::bigint as "xid?",
            e.kind as "kind?",
            e.key as "key?",
            e.created_at as "created_at?",
            e.data as "data?",
            null::bigint as "matched?"
        from (
            select
                pg_postmaster_start_time() as started,
                (select id::text from plane_server_incarnation) as incarnation,
                statement_timestamp() as taken_at
        ) s
        left join lateral (
            -- One primary-key lookup per id, whatever the planner thinks of the table: with
            -- `id = any($2)` a custom plan on a table never analyzed read the whole table
            -- sequentially for every page (135 pages at 10,000 rows, 1,335 at 100,000). The
            -- `limit 1` (the id is the key) keeps the lookup a subquery per id, which the
            -- planner cannot turn into a join with a scan of the whole table.
            select ev.id, ev.xid, ev.kind, ev.key, ev.created_at, ev.data
            from unnest($2::bigint[]) as i(id)
            cross join lateral (
                select id, xid, kind, key, created_at, data
                from event
                where event.id = i.id
                limit 1
            ) ev
        ) e on true
        order by e.id
        "#,
        target,
        ids,
    )
    .fetch_all(pool)
    .await
}

/// One read of the bus's statement on `conn`, as the bench measures it: the events committed
/// after the snapshot `prev` (Postgres's text form), at most `batch`, with no restart floor;
/// returns their ids.
#[cfg(feature = "testing")]
pub(crate) async fn read_once(
    conn: &mut sqlx::PgConnection,
    prev: &str,
    batch: i64,
) -> Result<Vec<i64>> {
    let rows = read_page(
        conn,
        &Page {
            prev,
            target: None,
            after: 0,
            batch,
            max_bytes: page_bytes(BusConfig::default().max_page_bytes),
            restart_floor: None,
            cut_short: &CutShort::default(),
        },
    )
    .await?;
    Ok(rows.into_iter().filter_map(|row| row.id).collect())
}

/// The `xmax` of a snapshot in Postgres's text form (`xmin:xmax:xip,…`).
fn snapshot_xmax(snapshot: &str) -> Option<i64> {
    snapshot.split(':').nth(1)?.parse().ok()
}

/// Where the reader stands: the snapshot of its previous read, the start time and
/// incarnation of the server that took it, and when it was taken (the server's clock).
///
/// Snapshots are only comparable on one unbroken run of transaction ids. A restarted server,
/// a server recovered from a crash in place or another server (a promoted replica after a
/// failover) may hand out again transaction ids that the previous snapshot already counts as
/// finished; the start time (a restart, another server) or the incarnation marker (crash
/// recovery and promotion erase it: see the migration `server_incarnation`) tells the reader
/// that this may have happened (see [`read_new_events`]).
#[derive(Clone)]
pub(super) struct Cursor {
    snapshot: String,
    server_started: DateTime<Utc>,
    incarnation: Option<String>,
    taken_at: DateTime<Utc>,
}

/// How many recently dispatched events the reader remembers, to skip them if a read after a
/// server change meets them again. 24 bytes each.
const RECENT_EVENTS: usize = 65_536;

/// What identifies a dispatched row across a change of the server's past: its id and
/// transaction id, which a rewound server can hand out again together (both the sequence and
/// the transaction counter go back to the replay point), and its `created_at` in
/// microseconds, which a row written again with them does not share (its transaction starts
/// later, on a clock that went on).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct EventIdentity {
    id: i64,
    xid: i64,
    created_micros: i64,
}

impl EventIdentity {
    fn new(id: i64, xid: i64, created_at: DateTime<Utc>) -> Self {
        Self {
            id,
            xid,
            created_micros: created_at.timestamp_micros(),
        }
    }
}

/// What the reader knows about the rows it has seen, for the read after a server change (see
/// [`restart_floor`]).
#[derive(Default)]
pub(super) struct Seen {
    /// The highest transaction id of a row visible in the cursor's snapshot (when the bus
    /// started, or dispatched since).
    high_xid: Option<i64>,
    /// The most recently dispatched rows, oldest first, at most [`RECENT_EVENTS`].
    recent: VecDeque<EventIdentity>,
}

impl Seen {
    fn record(&mut self, row: EventIdentity) {
        self.high_xid = Some(self.high_xid.map_or(row.xid, |h| h.max(row.xid)));
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(row);
    }
}

/// The lower bound a read after a server change applies, and the dispatched rows at or above
/// it that the read must skip.
#[derive(Clone)]
struct RestartFloor {
    /// As `xid8` text.
    xid: String,
    skip: Arc<HashSet<EventIdentity>>,
}

/// A read that has not finished: the snapshot it reads up to (once its first page is read),
/// the last id it dispatched, the restart floor it uses, the ids of the rows it still has to
/// fetch (beyond its first page); and the reads that a server change cut short, whose
/// dispatched rows it must not dispatch again (see [`read_new_events`]).
#[derive(Default)]
pub(super) struct Progress {
    target: Option<Cursor>,
    after: i64,
    restart_floor: Option<RestartFloor>,
    rest: Option<Rest>,
    cut_short: CutShort,
}

/// The rest of a read beyond its first page: ids listed and not yet fetched, and whether the
/// list reached the end of the span.
#[derive(Default)]
struct Rest {
    /// Each with the size of its payload.
    ids: VecDeque<(i64, i64)>,
    listed_all: bool,
}

/// Reads cut short by a server change: each one's target snapshot and the last id it
/// dispatched. It had dispatched exactly its target's visible rows up to that id.
#[derive(Default, Clone)]
struct CutShort {
    targets: Vec<String>,
    afters: Vec<i64>,
}

/// Writes the incarnation marker if the table is empty (a new database, or one whose marker
/// crash recovery or promotion erased). Concurrent buses agree: the first insert wins.
async fn ensure_incarnation(pool: &PgPool) -> Result<()> {
    sqlx::query!("insert into plane_server_incarnation default values on conflict do nothing")
        .execute(pool)
        .await?;
    Ok(())
}

/// The transaction id [`fence_foreign_events`] gives rows that came from another cluster:
/// `FrozenTransactionId`, below every snapshot's `xmin` (so visible in all of them, never
/// new) and below every id a server hands out (so the restart floor can leave it out).
const FOREIGN_XID: &str = "2";

/// Rows whose transaction ids come from another cluster (a restored dump, a logical copy:
/// `event.xid` travels verbatim) are made history: given [`FOREIGN_XID`]. Returns how many.
///
/// Such a row can be told apart exactly: it is visible, yet its `xid` is at or above the
/// `xmax` of the very snapshot that sees it, which no transaction of this server can have
/// written (a visible row's transaction committed before the snapshot, so its id is below
/// `xmax`). Left alone, it would look new once this server's counter passed its id, and an
/// event from the other cluster's past would be delivered again. Run when the bus starts and
/// whenever the server's past may have changed; the `xid` index finds such rows (usually
/// none) at its upper end.
///
/// The rows a restore brings are treated as history, like everything committed before a
/// subscription: a bus that moved to a restored copy does not deliver the rows the copy
/// holds that it had not delivered from the original (logged at warn with their count).
async fn fence_foreign_events(pool: &PgPool) -> Result<u64> {
    let fenced = sqlx::query!(
        r#"
        update event set xid = $1::text::xid8
        where xid >= pg_snapshot_xmax(pg_current_snapshot())
        "#,
        FOREIGN_XID,
    )
    .execute(pool)
    .await?
    .rows_affected();
    if fenced > 0 {
        metrics::counter!(m::BUS_FOREIGN_EVENTS_TOTAL).increment(fenced);
        tracing::warn!(
            rows = fenced,
            "event bus: found events whose transaction ids come from another cluster (a \
             restored dump or a logical copy); they are history now and will not be delivered"
        );
    }
    Ok(fenced)
}

/// The cursor to start from (the current snapshot), and the highest transaction id of a row
/// visible in it: read backwards on the `xid` index, skipping the rows of transactions still
/// in progress.
pub(super) async fn current_cursor(pool: &PgPool) -> Result<(Cursor, Seen)> {
    ensure_incarnation(pool).await?;
    fence_foreign_events(pool).await?;
    let row = sqlx::query!(
        r#"
        select
            pg_current_snapshot()::text as "snapshot!",
            pg_postmaster_start_time() as "started!",
            (select id::text from plane_server_incarnation) as incarnation,
            statement_timestamp() as "taken_at!",
            (select xid::text::bigint from event
             where pg_visible_in_snapshot(xid, pg_current_snapshot())
             order by xid desc limit 1) as high_xid
        "#
    )
    .fetch_one(pool)
    .await?;
    let cursor = Cursor {
        snapshot: row.snapshot,
        server_started: row.started,
        incarnation: row.incarnation,
        taken_at: row.taken_at,
    };
    let seen = Seen {
        high_xid: row.high_xid,
        recent: VecDeque::new(),
    };
    Ok((cursor, seen))
}

/// After the server's past may have changed since `prev` (`now` is the first row read since,
/// which says why): a new target snapshot for the read, and the lowest transaction id that
/// the server may have handed out again (as `xid8` text) with the dispatched rows at or above
/// it, which the read must skip.
///
/// The floor is computed in the same statement, so on the same snapshot, as the target, with
/// ordinary functions only (no `pg_control_checkpoint()`, no WAL functions, so it works for an
/// unprivileged role and on any server). It is the lesser of:
///
/// 1. One above the highest transaction id of a row the reader has seen visible. A new
///    server's first transaction id is above every transaction whose commit it has: after a
///    restart or crash recovery, every commit the reader saw (durable commits; see
///    RELIABILITY.md on `synchronous_commit`), and after a switchover, everything. This bound
///    alone is exact in those cases: nothing the reader has seen lies above it.
/// 2. The lowest transaction id of a row created (by the server's clock) at or after the
///    previous read's snapshot was taken: a row visible in that snapshot was created before
///    it (`created_at` is its transaction's start), so such a row is new. This catches rows
///    that reused ids *below* the first bound, which happens when the new server lost
///    transactions the reader had seen (a replica that had not replayed the tail, commits
///    under `synchronous_commit = off` lost in a crash) or its counter was moved back. It
///    assumes the new server's clock is not behind the old one's by more than the time the
///    change took (a failover takes seconds; a restart keeps the clock).
///
/// Transactions still running in the target snapshot need no bound: they are in its `xip`,
/// which the next read covers. (An earlier version also took the oldest running transaction
/// as a bound, from a snapshot of its own; a prepared transaction left open then pulled the
/// floor down to its id and the re-read delivered old events again.) If the reader has seen
/// no row and none was created since, the floor is the target's `xmax`: nothing visible in it
/// is new.
///
/// When the second bound is the lower, rows the reader already dispatched may lie above the
/// floor: they are skipped by [`EventIdentity`], as far as the reader remembers them
/// ([`RECENT_EVENTS`]).
async fn restart_floor(
    pool: &PgPool,
    prev: &Cursor,
    now: &PageRow,
    seen: &Seen,
) -> Result<(Cursor, RestartFloor)> {
    let cause = if now.started != prev.server_started {
        "restart"
    } else {
        "crash_recovery_or_promotion"
    };
    ensure_incarnation(pool).await?;
    fence_foreign_events(pool).await?;
    let row = sqlx::query!(
        r#"
        select
            pg_current_snapshot()::text as "snapshot!",
            pg_postmaster_start_time() as "started!",
            (select id::text from plane_server_incarnation) as incarnation,
            statement_timestamp() as "taken_at!",
            coalesce(
                least(
                    ($1::bigint + 1)::text::xid8,
                    (select min(xid) from event
                     where created_at >= $2
                       and xid > $3::text::xid8
                       and pg_visible_in_snapshot(xid, pg_current_snapshot()))
                ),
                pg_snapshot_xmax(pg_current_snapshot())
            )::text::bigint as "floor!"
        "#,
        seen.high_xid,
        prev.taken_at,
        FOREIGN_XID,
    )
    .fetch_one(pool)
    .await?;
    let target = Cursor {
        snapshot: row.snapshot,
        server_started: row.started,
        incarnation: row.incarnation,
        taken_at: row.taken_at,
    };
    let skip: HashSet<EventIdentity> = seen
        .recent
        .iter()
        .copied()
        .filter(|row_seen| row_seen.xid >= row.floor)
        .collect();
    let went_back = seen.high_xid.is_some_and(|high| row.floor <= high);
    let bound = if went_back {
        "ids_went_back"
    } else {
        "precise"
    };
    metrics::counter!(m::BUS_RESTART_READS_TOTAL, "bound" => bound, "cause" => cause).increment(1);
    if went_back {
        let oldest_remembered = seen.recent.front().map(|r| r.xid);
        tracing::warn!(
            cause,
            floor = row.floor,
            highest_seen = seen.high_xid,
            skipping = skip.len(),
            "event bus: the server's past changed and it reuses transaction ids of rows \
             already read; re-reading from the first reused id, skipping the events already \
             delivered"
        );
        if oldest_remembered.is_some_and(|oldest| oldest > row.floor)
            && seen.recent.len() == RECENT_EVENTS
        {
            tracing::warn!(
                "event bus: the re-read reaches below the events remembered; \
                 older events in it may be delivered again"
            );
        }
    } else {
        tracing::info!(
            cause,
            floor = row.floor,
            "event bus: the database server restarted, recovered from a crash or changed; \
             reading from the first transaction id it may have reused"
        );
    }
    Ok((
        target,
        RestartFloor {
            xid: row.floor.to_string(),
            skip: Arc::new(skip),
        },
    ))
}

// Hooks for the bench's `backlog` section (through `plane_db::testing::bench`): each runs one
// of the reader's three statements once, for a given span, through the very function the bus
// calls, and returns the ids it read with the statement's arguments as SQL literals, in its
// parameter order. The bench then runs `explain (analyze, buffers) execute` of the prepared
// statement that run left on its connection, with those arguments: no statement text is
// copied here or anywhere else.

/// [`read_page`] for the span from `prev` to `target` (snapshots in text form), above id
/// `after`, at most `batch` rows, with no restart floor: the ids it read and its arguments.
#[cfg(feature = "testing")]
pub(crate) async fn bench_read_page(
    pool: &PgPool,
    prev: &str,
    target: &str,
    after: i64,
    batch: i64,
) -> Result<(Vec<i64>, Vec<String>)> {
    let page = Page {
        prev,
        target: Some(target),
        after,
        batch,
        max_bytes: page_bytes(BusConfig::default().max_page_bytes),
        restart_floor: None,
        cut_short: &CutShort::default(),
    };
    let rows = read_page(pool, &page).await?;
    let mut arguments = bench_page_arguments(&page, batch);
    arguments.push(page.max_bytes.to_string());
    Ok((
        rows.into_iter().filter_map(|row| row.id).collect(),
        arguments,
    ))
}

/// [`read_span_ids`] for the same span, above id `after`, at most [`ID_CHUNK`] ids, as a large
/// read lists them: the ids and its arguments.
#[cfg(feature = "testing")]
pub(crate) async fn bench_read_span_ids(
    pool: &PgPool,
    prev: &str,
    target: &str,
    after: i64,
) -> Result<(Vec<i64>, Vec<String>)> {
    let page = Page {
        prev,
        target: Some(target),
        after,
        batch: ID_CHUNK,
        max_bytes: page_bytes(BusConfig::default().max_page_bytes),
        restart_floor: None,
        cut_short: &CutShort::default(),
    };
    let ids = read_span_ids(pool, &page, ID_CHUNK).await?;
    Ok((
        ids.into_iter().map(|(id, _)| id).collect(),
        bench_page_arguments(&page, ID_CHUNK),
    ))
}

/// [`read_page_by_ids`] for `ids` with the header of `target`: the ids it read and its
/// arguments.
#[cfg(feature = "testing")]
pub(crate) async fn bench_read_page_by_ids(
    pool: &PgPool,
    target: &str,
    ids: &[i64],
) -> Result<(Vec<i64>, Vec<String>)> {
    let rows = read_page_by_ids(pool, target, ids).await?;
    let ids_text = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    Ok((
        rows.into_iter().filter_map(|row| row.id).collect(),
        vec![
            bench_literal(target),
            bench_literal(&format!("{{{ids_text}}}")),
        ],
    ))
}

/// The arguments [`read_page`] and [`read_span_ids`] bind for `page` ($1 to $7; `read_page`
/// also binds `max_bytes` as $8), as literals (`limit` is $4). Only for pages without a restart floor or reads cut short.
#[cfg(feature = "testing")]
fn bench_page_arguments(page: &Page<'_>, limit: i64) -> Vec<String> {
    assert!(page.restart_floor.is_none() && page.cut_short.targets.is_empty());
    vec![
        bench_literal(page.prev),
        page.target.map_or_else(|| "null".into(), bench_literal),
        page.after.to_string(),
        limit.to_string(),
        "null".into(),
        "'{}'".into(),
        "'{}'".into(),
    ]
}

/// A string as an SQL literal (untyped: `execute` casts it to the parameter's type).
#[cfg(feature = "testing")]
fn bench_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
