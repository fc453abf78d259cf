//! `plane-db cleanup`.

use crate::args::CleanupArgs;
use crate::failure::Outcome;
use crate::output::{Cell, Out, Table};
use plane_db::{CleanupConfig, CleanupProgress, PlaneDatabase};
use std::io::{self, IsTerminal};
use std::time::Duration;

/// Deletes old terminated backends, old events and expired tokens, showing progress on
/// stderr and a summary on stdout.
pub async fn cleanup(db: &PlaneDatabase, out: &Out, args: CleanupArgs) -> Outcome {
    let min_age = Duration::from_secs(u64::from(args.min_age_days.unsigned_abs()) * 86_400);
    let config = CleanupConfig {
        backend_min_age: min_age,
        event_min_age: min_age,
        batch_size: args.batch_size,
        busy_share: args.busy_share,
        ..CleanupConfig::default()
    };
    // Progress goes to stderr: rewritten in place on a terminal, one line per phase when
    // not, so a log of the run stays short.
    let terminal = io::stderr().is_terminal();
    let line = |p: &CleanupProgress| {
        format!(
            "plane-db: cleanup {}: {} deleted in {} batch(es)",
            p.phase, p.deleted, p.batches
        )
    };
    let mut current: Option<CleanupProgress> = None;
    let summary = db
        .run_cleanup_with_progress(&config, |p| {
            match current {
                _ if terminal => eprint!("\r\x1b[K{}", line(&p)),
                Some(previous) if previous.phase != p.phase => eprintln!("{}", line(&previous)),
                _ => {}
            }
            current = Some(p);
        })
        .await;
    match current {
        Some(_) if terminal => eprintln!(),
        Some(last) => eprintln!("{}", line(&last)),
        None => {}
    }
    let summary = summary?;
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &summary)?);
    }
    let b = &summary.backends;
    let mut table = Table::new(&["DELETED", "ROWS"]);
    for (what, count) in [
        ("backends", b.backends),
        ("  their state history", b.states),
        ("  their tokens", b.tokens),
        ("  their actions", b.actions),
        ("  their keys", b.keys),
        ("events", summary.events),
        ("expired tokens", summary.tokens),
    ] {
        table.row(vec![Cell::new(what), Cell::new(count.to_string())]);
    }
    table.print(&mut stdout, out.color)?;
    Ok(())
}
