//! Reading backends: `plane-db backends`, `backend` and `watch`.

use super::{backend_name, cluster_name, find_drone};
use crate::args::{BackendArg, BackendsArgs};
use crate::failure::{Failure, Outcome};
use crate::output::{age, time, Cell, Out, Table, Tone};
use chrono::Utc;
use plane_db::backend::{BackendFilter, BackendRow, BackendStateRecord};
use plane_db::types::{BackendState, BackendStatus, BackendStatusStreamEntry};
use plane_db::PlaneDatabase;
use serde::Serialize;
use std::io::{self, Write};

/// A backend as `--json` prints it: the row, its status (from its state), and its state
/// history when it is shown alone.
#[derive(Serialize)]
struct BackendJson<'a> {
    #[serde(flatten)]
    row: &'a BackendRow,
    status: BackendStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<&'a [BackendStateRecord]>,
}

impl<'a> BackendJson<'a> {
    fn new(row: &'a BackendRow, history: Option<&'a [BackendStateRecord]>) -> Self {
        BackendJson {
            row,
            status: row.state.status(),
            history,
        }
    }
}

/// Lists backends, filtered by cluster, drone and status.
pub async fn backends(db: &PlaneDatabase, out: &Out, args: BackendsArgs) -> Outcome {
    let cluster = cluster_name(args.cluster.as_deref())?;
    let drone = match &args.drone {
        Some(drone) => Some(find_drone(db, cluster.as_ref(), drone).await?),
        None => None,
    };
    let status = args
        .status
        .as_deref()
        .map(|s| s.parse::<BackendStatus>())
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    // One more than asked, to know whether the listing was cut.
    let filter = BackendFilter {
        cluster,
        drone,
        status,
        limit: Some(args.limit.saturating_add(1)),
    };
    let mut rows = db.backend().list(&filter).await?;
    let cut = rows.len() as i64 > args.limit;
    rows.truncate(usize::try_from(args.limit).unwrap_or(usize::MAX));
    let mut stdout = io::stdout().lock();
    if out.json {
        let rows: Vec<_> = rows.iter().map(|row| BackendJson::new(row, None)).collect();
        out.json(&mut stdout, &rows)?;
    } else {
        // Ages are on the database clock (`as_of`), as the times themselves are.
        let mut table = Table::new(&["ID", "CLUSTER", "DRONE", "STATUS", "SINCE", "KEEPALIVE"]);
        for row in &rows {
            let status = row.state.status();
            table.row(vec![
                Cell::new(row.id.as_str()),
                Cell::new(row.cluster.as_str()),
                Cell::new(row.drone_id.to_string()),
                Cell::toned(status.as_str(), Tone::of_status(status)),
                Cell::new(age(row.last_status_time, row.as_of)),
                Cell::new(age(row.last_keepalive, row.as_of)),
            ]);
        }
        out.table(&mut stdout, &table, "no backends match")?;
    }
    if cut {
        eprintln!(
            "plane-db: showing the first {} backends; pass --limit to see more",
            args.limit
        );
    }
    Ok(())
}

/// Shows one backend and its state history.
pub async fn backend(db: &PlaneDatabase, out: &Out, args: BackendArg) -> Outcome {
    let id = backend_name(&args.id)?;
    let row = db
        .backend()
        .backend(&id)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("backend {:?} not found", id.as_str())))?;
    let history = db.backend().state_history(&id).await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &BackendJson::new(&row, Some(&history)))?);
    }
    let status = row.state.status();
    let mut fields = Table::new(&["FIELD", "VALUE"]);
    let field = |name: &str, value: Cell| vec![Cell::new(name), value];
    fields.row(field("id", Cell::new(row.id.as_str())));
    fields.row(field("cluster", Cell::new(row.cluster.as_str())));
    fields.row(field("drone", Cell::new(row.drone_id.to_string())));
    fields.row(field(
        "status",
        Cell::toned(status.as_str(), Tone::of_status(status)),
    ));
    fields.row(field(
        "address",
        Cell::opt(row.state.address().map(|a| a.to_string())),
    ));
    let when = |at| format!("{} ({})", time(at), age(at, row.as_of));
    fields.row(field("since", Cell::new(when(row.last_status_time))));
    fields.row(field("last keepalive", Cell::new(when(row.last_keepalive))));
    fields.row(field("expires", Cell::opt(row.expiration_time.map(time))));
    fields.row(field(
        "allowed idle",
        Cell::opt(row.allowed_idle_seconds.map(|s| format!("{s}s"))),
    ));
    fields.print(&mut stdout, out.color)?;
    writeln!(stdout)?;
    let mut table = Table::new(&["#", "TIME", "STATUS", "DETAIL"]);
    for record in &history {
        let status = record.state.status();
        table.row(vec![
            Cell::new(record.id.to_string()),
            Cell::new(time(record.created_at)),
            Cell::toned(status.as_str(), Tone::of_status(status)),
            Cell::new(state_detail(&record.state)),
        ]);
    }
    out.table(&mut stdout, &table, "no state history (cleaned up?)")?;
    Ok(())
}

/// Prints a backend's status changes until it has terminated.
pub async fn watch(db: &PlaneDatabase, out: &Out, args: BackendArg) -> Outcome {
    use futures_util::StreamExt;
    let id = backend_name(&args.id)?;
    let stream = db.backend().status_stream(&id).await?;
    let mut stream = std::pin::pin!(stream);
    let mut stdout = io::stdout().lock();
    while let Some(entry) = stream.next().await {
        if out.json {
            out.json_line(&mut stdout, &entry)?;
            continue;
        }
        let mut detail = termination_detail(&entry);
        if let Some(exit_error) = entry.exit_error {
            detail.push(format!("exit_error={exit_error}"));
        }
        let status = Tone::of_status(entry.status).paint(entry.status.as_str(), out.color);
        let line = format!("{}  {status}  {}", time(entry.time), detail.join(" "));
        writeln!(stdout, "{}", line.trim_end())?;
        stdout.flush()?;
    }
    Ok(())
}

/// What a state carries beyond its status, compactly: address, termination reason and
/// kind, exit code.
fn state_detail(state: &BackendState) -> String {
    let mut parts = Vec::new();
    if let Some(address) = state.address() {
        parts.push(format!("address={address}"));
    }
    parts.extend(termination_detail(&BackendStatusStreamEntry::from_state(
        state,
        Utc::now(),
    )));
    if let BackendState::Terminated {
        exit_code: Some(code),
        ..
    } = state
    {
        parts.push(format!("exit_code={code}"));
    }
    parts.join(" ")
}

/// A status entry's termination details as `name=value` words (none before terminating).
fn termination_detail(entry: &BackendStatusStreamEntry) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(reason) = entry.termination_reason {
        parts.push(format!("reason={reason}"));
    }
    if let Some(kind) = entry.termination_kind {
        parts.push(format!("kind={kind}"));
    }
    parts
}
