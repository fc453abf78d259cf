//! `plane-db status`: one screen on the whole database.

use crate::failure::Outcome;
use crate::output::{age, time, Cell, Out, Table, Tone};
use plane_db::status::{CleanupRun, DatabaseStatus, DroneCondition};
use plane_db::types::ClusterName;
use plane_db::PlaneDatabase;
use std::io::{self, Write};

/// Prints controllers online, drones, backends by status, the open transaction holding
/// back the event bus, the event table, who leads each lease and the last cleanup.
pub async fn status(db: &PlaneDatabase, out: &Out) -> Outcome {
    let status = db.status().await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &status_json(&status)?)?);
    }
    print(&mut stdout, out, &status)?;
    Ok(())
}

/// The overview as JSON: as the library serializes it, and whether the open transaction
/// holds back the event bus (computed from it, so not one of its fields).
fn status_json(status: &DatabaseStatus) -> io::Result<serde_json::Value> {
    let mut value = serde_json::to_value(status)?;
    if let (Some(tx), Some(object)) = (
        &status.oldest_transaction,
        value["oldest_transaction"].as_object_mut(),
    ) {
        object.insert("holds_bus".to_string(), tx.holds_bus().into());
    }
    Ok(value)
}

/// The overview as sections of tables.
fn print(stdout: &mut impl Write, out: &Out, status: &DatabaseStatus) -> io::Result<()> {
    let now = status.as_of;
    let heading = |text: &str| Tone::Bold.paint(text, out.color);

    let server = &status.server;
    let role = if server.in_recovery {
        Tone::Bad.paint("a standby (in recovery): writes fail here", out.color)
    } else {
        "the primary".to_string()
    };
    let address = match (&server.address, server.port) {
        (Some(address), Some(port)) => format!("{address}:{port}"),
        _ => "a local socket".to_string(),
    };
    writeln!(
        stdout,
        "{} {address}, {role}, PostgreSQL {}, up since {} ({})\n",
        heading("SERVER:"),
        server.version,
        time(server.started_at),
        age(server.started_at, now)
    )?;

    writeln!(
        stdout,
        "{}",
        heading(&format!("CONTROLLERS ONLINE: {}", status.controllers.len()))
    )?;
    if !status.controllers.is_empty() {
        let mut table = Table::new(&["NAME", "VERSION", "LAST HEARTBEAT"]);
        for c in &status.controllers {
            table.row(vec![
                Cell::new(c.name.as_str()),
                Cell::new(&c.plane_version),
                Cell::new(age(c.last_heartbeat, now)),
            ]);
        }
        table.print(stdout, out.color)?;
    }

    let total: i64 = status.drones.iter().map(|d| d.count).sum();
    writeln!(stdout, "\n{}", heading(&format!("DRONES: {total}")))?;
    if !status.drones.is_empty() {
        let mut table = Table::new(&["CLUSTER", "POOL", "STATE", "COUNT"]);
        for d in &status.drones {
            let tone = match d.condition {
                DroneCondition::Ready => Tone::Good,
                DroneCondition::NotReady | DroneCondition::Draining => Tone::Busy,
                DroneCondition::Stale | DroneCondition::Offline => Tone::Bad,
            };
            table.row(vec![
                Cell::opt(d.cluster.as_ref().map(ClusterName::as_str)),
                if d.pool.is_default() {
                    Cell::toned("(default)", Tone::Dim)
                } else {
                    Cell::new(d.pool.as_str())
                },
                Cell::toned(d.condition.as_str(), tone),
                Cell::new(d.count.to_string()),
            ]);
        }
        table.print(stdout, out.color)?;
    }

    let total: i64 = status.backends.iter().map(|(_, count)| count).sum();
    writeln!(stdout, "\n{}", heading(&format!("BACKENDS: {total}")))?;
    if !status.backends.is_empty() {
        let mut table = Table::new(&["STATUS", "COUNT"]);
        for (s, count) in &status.backends {
            table.row(vec![
                Cell::toned(s.as_str(), Tone::of_status(*s)),
                Cell::new(count.to_string()),
            ]);
        }
        table.print(stdout, out.color)?;
    }

    writeln!(stdout, "\n{}", heading("OLDEST OPEN TRANSACTION"))?;
    match &status.oldest_transaction {
        None => writeln!(stdout, "none")?,
        Some(t) => {
            let mut table = Table::new(&[
                "PID",
                "APPLICATION",
                "DATABASE",
                "STATE",
                "OPEN FOR",
                "XID AGE",
                "HOLDS",
            ]);
            table.row(vec![
                Cell::new(t.pid.to_string()),
                Cell::opt(t.application_name.as_deref().filter(|a| !a.is_empty())),
                Cell::opt(t.database.as_deref()),
                Cell::opt(t.state.as_deref()),
                Cell::opt(t.transaction_start.map(|at| age(at, now))),
                Cell::opt(t.xid_age.map(|a| a.to_string())),
                if t.holds_bus() {
                    Cell::toned("event bus, vacuum", Tone::Busy)
                } else {
                    Cell::toned("vacuum", Tone::Dim)
                },
            ]);
            table.print(stdout, out.color)?;
        }
    }

    writeln!(stdout, "\n{}", heading("EVENTS"))?;
    let events = &status.events;
    let mut table = Table::new(&["ROWS (ESTIMATE)", "SIZE", "OLDEST"]);
    table.row(vec![
        Cell::opt(events.rows_estimate.map(|n| n.to_string())),
        Cell::new(bytes(events.bytes)),
        Cell::opt(
            events
                .oldest_id
                .zip(events.oldest_at)
                .map(|(id, at)| format!("#{id}, {} ({})", time(at), age(at, now))),
        ),
    ]);
    table.print(stdout, out.color)?;

    writeln!(stdout, "\n{}", heading("LEADERS"))?;
    if status.leaders.is_empty() {
        writeln!(stdout, "none (no lease taken yet)")?;
    } else {
        let mut table = Table::new(&["LEASE", "HOLDER", "TERM", "SINCE", "EXPIRES"]);
        for l in &status.leaders {
            table.row(vec![
                Cell::new(&l.lease),
                if l.active {
                    Cell::toned(&l.holder, Tone::Good)
                } else {
                    Cell::toned(format!("none (last: {})", l.holder), Tone::Bad)
                },
                Cell::new(l.term.to_string()),
                Cell::new(format!(
                    "{} ({})",
                    time(l.elected_at),
                    age(l.elected_at, now)
                )),
                Cell::new(age(l.expires_at, now)),
            ]);
        }
        table.print(stdout, out.color)?;
    }

    writeln!(
        stdout,
        "\n{} {}",
        heading("LAST CLEANUP:"),
        last_cleanup(status.last_cleanup.as_ref())
    )
}

/// What `status` says of the last cleanup.
fn last_cleanup(run: Option<&CleanupRun>) -> String {
    match run {
        None => "never (no completed run recorded)".to_string(),
        Some(run) => format!(
            "{} (took {:.1} s; deleted {} backends, {} events, {} expired tokens)",
            time(run.finished_at),
            (run.finished_at - run.started_at).num_milliseconds().max(0) as f64 / 1000.0,
            run.backends,
            run.events,
            run.tokens
        ),
    }
}

/// Bytes as an operator reads them (`512 B`, `3.2 MiB`).
fn bytes(count: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
