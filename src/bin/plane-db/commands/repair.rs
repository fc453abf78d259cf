//! Fixing backends a drone no longer runs as it should: `plane-db termination-candidates`,
//! `prevent-renew` and `mark-lost`.

use super::{backend_name, cluster_name, find_drone};
use crate::args::{BackendArg, DroneArgs, MarkLostArgs};
use crate::failure::{Failure, Outcome};
use crate::output::{age, time, Cell, Out, Table, Tone};
use plane_db::PlaneDatabase;
use serde_json::json;
use std::io::{self, Write};

/// Lists a drone's backends that are idle or past their expiration time.
pub async fn termination_candidates(db: &PlaneDatabase, out: &Out, args: DroneArgs) -> Outcome {
    let cluster = cluster_name(args.cluster.as_deref())?;
    let drone = find_drone(db, cluster.as_ref(), &args.drone).await?;
    let candidates = db.backend().termination_candidates(drone).await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &candidates)?);
    }
    let mut table = Table::new(&["BACKEND", "WHY", "LAST KEEPALIVE", "EXPIRES"]);
    for candidate in &candidates {
        let expired = candidate
            .expiration_time
            .is_some_and(|at| at < candidate.as_of);
        table.row(vec![
            Cell::new(candidate.backend_id.as_str()),
            Cell::toned(if expired { "expired" } else { "idle" }, Tone::Bad),
            Cell::new(age(candidate.last_keepalive, candidate.as_of)),
            Cell::opt(candidate.expiration_time.map(time)),
        ]);
    }
    out.table(&mut stdout, &table, "no termination candidates")?;
    Ok(())
}

/// Stops a backend's key from being renewed.
pub async fn prevent_renew(db: &PlaneDatabase, out: &Out, args: BackendArg) -> Outcome {
    let id = backend_name(&args.id)?;
    if db.backend().backend(&id).await?.is_none() {
        return Err(Failure::NotFound(format!(
            "backend {:?} not found",
            id.as_str()
        )));
    }
    let prevented = db.key().prevent_renew(&id).await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        out.json(
            &mut stdout,
            &json!({ "backend_id": id, "prevented": prevented }),
        )?;
    } else if prevented {
        writeln!(
            stdout,
            "{id}: key renewal prevented; the key expires at its deadline"
        )?;
    } else {
        writeln!(
            stdout,
            "{id}: nothing to do (renewal already prevented, or the backend holds no key)"
        )?;
    }
    Ok(())
}

/// Marks the given backends, or every live backend of a drone, terminated (reason `lost`).
pub async fn mark_lost(db: &PlaneDatabase, out: &Out, args: MarkLostArgs) -> Outcome {
    let marked = match &args.drone {
        Some(drone) => {
            let cluster = cluster_name(args.cluster.as_deref())?;
            let drone = find_drone(db, cluster.as_ref(), drone).await?;
            db.backend().mark_drone_lost(drone).await?
        }
        None => {
            let names = args
                .ids
                .iter()
                .map(|id| backend_name(id))
                .collect::<Result<Vec<_>, _>>()?;
            db.backend().mark_lost(&names).await?
        }
    };
    let mut stdout = io::stdout().lock();
    if out.json {
        out.json(&mut stdout, &json!({ "marked": marked }))?;
    } else {
        for backend in &marked {
            writeln!(stdout, "{backend}")?;
        }
        eprintln!(
            "plane-db: marked {} backend(s) lost (unknown and already terminated ones are left alone)",
            marked.len()
        );
    }
    Ok(())
}
