//! `plane-db migrate`.

use crate::failure::{one_line, Failure, Outcome};
use crate::output::Out;
use plane_db::PlaneDatabase;
use std::io::{self, Write};

/// Applies this build's missing migrations (`plane_db::migrate`: a database that a newer
/// build migrated is accepted, a diverging or edited one refused, one that Plane 0.5.5
/// migrated converted in place).
pub async fn migrate(db: &PlaneDatabase, out: &Out) -> Outcome {
    let report = plane_db::migrate(db.pool())
        .await
        .map_err(|e| Failure::Other(format!("migration failed: {}", one_line(&e))))?;
    let mut stdout = io::stdout().lock();
    if out.json {
        out.json(&mut stdout, &report)?;
    } else {
        if let Some(c) = &report.converted_from_plane {
            writeln!(
                stdout,
                "converted the Plane 0.5.5 database in place: {} backend(s), {} state(s), \
                 {} key(s), {} token(s), {} action(s), {} event(s), {} node(s) ({} merged), \
                 {} drone(s), {} controller(s), {} ACME TXT record(s)",
                c.backends,
                c.backend_states,
                c.backend_keys,
                c.tokens,
                c.backend_actions,
                c.events,
                c.nodes,
                c.nodes_merged,
                c.drones,
                c.controllers,
                c.acme_txt_entries
            )?;
        }
        match (report.latest_known, report.applied.is_empty()) {
            (None, _) => writeln!(stdout, "this build has no migrations")?,
            (Some(version), true) => writeln!(stdout, "schema is up to date (version {version})")?,
            (Some(version), false) => writeln!(
                stdout,
                "applied {} migration(s) ({}); schema is at version {version}",
                report.applied.len(),
                list_versions(&report.applied)
            )?,
        }
    }
    if !report.newer_unknown.is_empty() {
        eprintln!(
            "plane-db: the database also has {} newer migration(s) that this build does not know \
             ({}): a newer plane-db migrated it, which is fine while migrations only add to the schema",
            report.newer_unknown.len(),
            list_versions(&report.newer_unknown)
        );
    }
    Ok(())
}

/// Migration versions as `1, 2, 3`.
fn list_versions(versions: &[i64]) -> String {
    versions
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
