//! `plane-db nodes`.

use super::cluster_name;
use crate::args::NodesArgs;
use crate::failure::Outcome;
use crate::output::{age, Cell, Out, Table, Tone};
use chrono::Utc;
use plane_db::types::ClusterName;
use plane_db::PlaneDatabase;
use std::io;

/// Lists nodes: the active ones, or all; of one cluster, or of all.
pub async fn nodes(db: &PlaneDatabase, out: &Out, args: NodesArgs) -> Outcome {
    let cluster = cluster_name(args.cluster.as_deref())?;
    let nodes: Vec<_> = db
        .node()
        .list()
        .await?
        .into_iter()
        .filter(|n| args.all || n.active)
        .filter(|n| cluster.is_none() || n.cluster == cluster)
        .collect();
    let mut stdout = io::stdout().lock();
    if out.json {
        return Ok(out.json(&mut stdout, &nodes)?);
    }
    let now = Utc::now();
    let mut table = Table::new(&[
        "ID",
        "KIND",
        "NAME",
        "CLUSTER",
        "CONTROLLER",
        "ACTIVE",
        "VERSION",
        "CONNECTED",
    ]);
    for node in &nodes {
        table.row(vec![
            Cell::new(node.id.to_string()),
            Cell::new(node.kind().as_str()),
            Cell::new(node.name.as_str()),
            Cell::opt(node.cluster.as_ref().map(ClusterName::as_str)),
            Cell::opt(node.controller.as_ref().map(|c| c.as_str())),
            if node.active {
                Cell::toned("yes", Tone::Good)
            } else {
                Cell::toned("no", Tone::Dim)
            },
            Cell::new(&node.plane_version),
            Cell::opt(node.connected_at.map(|at| age(at, now))),
        ]);
    }
    let empty = if args.all {
        "no nodes"
    } else {
        "no active nodes (--all shows the others)"
    };
    out.table(&mut stdout, &table, empty)?;
    Ok(())
}
