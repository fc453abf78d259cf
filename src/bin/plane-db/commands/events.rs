//! `plane-db events`: the stored events, or following them as they are committed.

use crate::args::EventsArgs;
use crate::failure::{Failure, Outcome};
use crate::output::{printable, time, Cell, Out, Table};
use plane_db::events::Event;
use plane_db::PlaneDatabase;
use std::collections::HashSet;
use std::io::{self, Write};

/// Lists the stored events (`--since`, `--kind`, `--limit`), or follows them (`--follow`).
pub async fn events(db: &PlaneDatabase, out: &Out, args: EventsArgs) -> Outcome {
    if args.follow {
        follow(db, out, &args).await
    } else {
        list(db, out, &args).await
    }
}

/// Whether `event` is of the kind asked for (any, without `--kind`).
fn wanted(args: &EventsArgs, event: &Event) -> bool {
    args.kind.as_deref().is_none_or(|kind| event.kind == kind)
}

/// Prints the stored events after `--since`, at most `--limit` of them.
async fn list(db: &PlaneDatabase, out: &Out, args: &EventsArgs) -> Outcome {
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    // One more than asked, to know whether the listing was cut.
    let mut events = Vec::new();
    read_events_after(db, args.since.unwrap_or(0), |event| {
        if wanted(args, &event) {
            events.push(event);
        }
        Ok(events.len() <= limit)
    })
    .await?;
    if events.len() > limit {
        events.truncate(limit);
        eprintln!(
            "plane-db: showing the first {limit} events; pass --since with the last id to see more"
        );
    }
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &events)?);
    }
    let mut table = Table::new(&["ID", "TIME", "KIND", "KEY", "DATA"]);
    for event in &events {
        table.row(vec![
            Cell::opt(event.id.map(|id| id.to_string())),
            Cell::new(time(event.created_at)),
            Cell::new(&event.kind),
            Cell::opt(event.key.as_deref()),
            Cell::new(out.shown(&event.data).to_string()),
        ]);
    }
    Ok(out.table(&mut stdout, &table, "no events")?)
}

/// Prints the stored events after `--since` (if given), then every event as it is
/// committed, until interrupted.
///
/// Subscribe first, then read the stored events: one committed in between is in both,
/// and `backlog` keeps it from being printed twice. Only the backlog's ids are kept: a
/// live event is never repeated by the subscription (a full queue pauses it and it catches
/// up from the table), so memory stays flat however long the follow runs. Without
/// `--since`, following starts at the latest stored event, as if it had been given.
async fn follow(db: &PlaneDatabase, out: &Out, args: &EventsArgs) -> Outcome {
    let mut stdout = io::stdout().lock();
    let mut subscription = db.subscribe_all_events().await?;
    let mut backlog = HashSet::new();
    if let Some(since) = args.since {
        read_events_after(db, since, |event: Event| {
            if event.id.is_none_or(|id| backlog.insert(id)) && wanted(args, &event) {
                print_event(&mut stdout, out, &event)?;
            }
            Ok(true)
        })
        .await?;
    }
    while let Some(next) = subscription.next().await {
        match next {
            Ok(event) => {
                let repeat = event.id.is_some_and(|id| backlog.contains(&id));
                if !repeat && wanted(args, &event) {
                    print_event(&mut stdout, out, &event)?;
                }
            }
            // Only what the subscription could not read back: ephemeral messages, or stored
            // events when the database server changed while it was behind.
            Err(lagged) => {
                eprintln!(
                    "plane-db: fell behind by {} events that could not be read back \
                     (ephemeral messages, or the database server changed meanwhile); \
                     `plane-db events --since ID` lists what is stored",
                    lagged.missed
                );
            }
        }
    }
    Ok(())
}

/// Reads the stored events with ids above `since` in id order, a page at a time, handing
/// each to `each` until it answers false or there are no more.
async fn read_events_after(
    db: &PlaneDatabase,
    mut since: i64,
    mut each: impl FnMut(Event) -> Result<bool, Failure>,
) -> Outcome {
    const PAGE: i64 = 1000;
    loop {
        let page = db.get_events_since(since, PAGE).await?;
        let Some(last) = page.last().and_then(|e| e.id) else {
            return Ok(());
        };
        since = last;
        for event in page {
            if !each(event)? {
                return Ok(());
            }
        }
    }
}

/// Prints one followed event: a line of JSON, or a line of text (id, time, kind, key and
/// the payload as compact JSON), secrets redacted unless `--show-secrets`.
fn print_event(stdout: &mut impl Write, out: &Out, event: &Event) -> Outcome {
    if out.json {
        out.json_line(stdout, event)?;
    } else {
        let line = format!(
            "{}  {}  {}  {}  {}",
            event
                .id
                .map_or_else(|| "-".to_string(), |id| id.to_string()),
            time(event.created_at),
            event.kind,
            event.key.as_deref().unwrap_or("-"),
            out.shown(&event.data),
        );
        writeln!(stdout, "{}", printable(&line))?;
        stdout.flush()?;
    }
    Ok(())
}
