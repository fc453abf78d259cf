//! `plane-db`: see and fix a plane-db database from a shell.
//!
//! Built with the `cli` feature: `cargo run --features cli -- --help`. Every listing prints
//! an aligned table (coloured on a terminal, plain when piped) or, with `--json`, JSON for
//! scripts. Errors are one line on stderr; the exit code says what went wrong (see
//! [`Failure::exit_code`]).

mod output;

use chrono::Utc;
use clap::{Args, Parser, Subcommand, ValueEnum};
use output::{age, printable, redact, time, Cell, Table, Tone};
use plane_db::backend::{BackendFilter, BackendRow};
use plane_db::events::Event;
use plane_db::types::{BackendName, BackendStatus, ClusterName, DroneName, NodeId};
use plane_db::{CleanupConfig, CleanupProgress, PlaneDatabase};
use serde_json::json;
use std::collections::HashSet;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "plane-db",
    version,
    about = "See and fix the state of a plane-db database.",
    after_help = "Exit codes: 0 success, 1 failure (database, I/O), 2 bad usage, 3 not found."
)]
struct Cli {
    /// The database, as a Postgres URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// Print JSON instead of a table (streams print one JSON object per line).
    #[arg(long, global = true)]
    json: bool,
    /// When to colour tables: `auto` colours on a terminal unless NO_COLOR is set.
    #[arg(long, value_enum, default_value_t = ColorMode::Auto, global = true)]
    color: ColorMode,
    /// Print tokens and other secrets as stored. By default they are redacted: static tokens
    /// (in spawn actions and their events), secret tokens, and any value named like a token,
    /// secret or password, in tables and JSON alike.
    #[arg(long, global = true)]
    show_secrets: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorMode {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schema migrations this build knows (and convert a database that Plane
    /// 0.5.5 migrated, in place).
    Migrate,
    /// One screen: controllers online, drones, backends by status, the open transaction
    /// holding back the event bus, the event table's size and oldest event, last cleanup.
    Status,
    /// List backends, newest states included (terminated ones until cleaned up).
    Backends(BackendsArgs),
    /// Show one backend and its state history.
    Backend {
        /// The backend's id.
        id: String,
    },
    /// List nodes (drones, proxies, DNS servers); only active ones unless --all.
    Nodes {
        /// Include nodes that are not active (no online controller holds them).
        #[arg(long)]
        all: bool,
        /// Only nodes of this cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// List events, or follow them as they are committed.
    Events(EventsArgs),
    /// Print a backend's status changes until it has terminated.
    Watch {
        /// The backend's id.
        id: String,
    },
    /// List a drone's backends that are idle or past their expiration time.
    TerminationCandidates(DroneArgs),
    /// Stop a backend's key from being renewed, so the key expires and the drone stops it.
    PreventRenew {
        /// The backend's id.
        id: String,
    },
    /// Mark backends terminated (reason `lost`): the given ones, or every live backend of a drone.
    MarkLost {
        /// The backends' ids.
        #[arg(required_unless_present = "drone", conflicts_with = "drone")]
        ids: Vec<String>,
        /// The drone's cluster (needed with a drone name).
        #[arg(long)]
        cluster: Option<String>,
        /// Every live backend of this drone (a name, or a numeric node id).
        #[arg(long)]
        drone: Option<String>,
    },
    /// Delete old terminated backends, old events and expired tokens, in batches.
    Cleanup {
        /// Delete backends that terminated, and events written, more than this many days ago.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(i32).range(0..=36_500))]
        min_age_days: i32,
        /// Rows per transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..))]
        batch_size: i32,
    },
}

#[derive(Args)]
struct BackendsArgs {
    /// Only backends of this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Only backends of this drone (a name, which needs --cluster, or a numeric node id).
    #[arg(long)]
    drone: Option<String>,
    /// Only backends in this status (scheduled, loading, starting, waiting, ready,
    /// terminating, hard-terminating, terminated).
    #[arg(long)]
    status: Option<String>,
    /// Print at most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    limit: i64,
}

#[derive(Args)]
struct EventsArgs {
    /// Keep printing events as they are committed, until interrupted.
    #[arg(long)]
    follow: bool,
    /// Start after this event id (without it, --follow prints only new events).
    #[arg(long)]
    since: Option<i64>,
    /// Only events of this kind (e.g. backend_state, node_connection, backend_action).
    #[arg(long)]
    kind: Option<String>,
    /// Without --follow: print at most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    limit: i64,
    /// How many live events may wait to be printed before the subscription pauses (and then
    /// catches up from the table). Small values exercise that path in tests.
    #[arg(long, default_value_t = 100_000, hide = true)]
    max_pending: usize,
}

#[derive(Args)]
struct DroneArgs {
    /// The drone's cluster (needed with a drone name).
    #[arg(long)]
    cluster: Option<String>,
    /// The drone: a name, or a numeric node id.
    #[arg(long)]
    drone: String,
}

/// Why a command failed, and so which exit code it ends with.
#[derive(Debug)]
enum Failure {
    /// The command line or an argument's value is wrong.
    Usage(String),
    /// What the command names does not exist.
    NotFound(String),
    /// The database or the output failed.
    Other(String),
    /// Whoever read the output stopped reading (`plane-db … | head`): not a failure.
    Stopped,
}

impl Failure {
    /// 2 for bad usage (as clap's own usage errors), 3 for not found, 1 for anything else.
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Stopped => 0,
            Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
        }
    }

    fn message(&self) -> Option<&str> {
        match self {
            Failure::Usage(m) | Failure::NotFound(m) | Failure::Other(m) => Some(m),
            Failure::Stopped => None,
        }
    }
}

impl From<plane_db::Error> for Failure {
    fn from(error: plane_db::Error) -> Self {
        match error {
            plane_db::Error::NotFound { .. } => Failure::NotFound(error.to_string()),
            plane_db::Error::InvalidArgument { .. } => Failure::Usage(error.to_string()),
            other => Failure::Other(one_line(&other)),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::BrokenPipe {
            return Failure::Stopped;
        }
        Failure::Other(format!("cannot write output: {error}"))
    }
}

/// The error and its causes on one line, skipping a cause whose text the line already has
/// (some errors repeat their source in their own message).
fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    printable(&line)
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&Failure::Other(format!("cannot start: {error}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(&failure),
    }
}

fn fail(failure: &Failure) -> ExitCode {
    if let Some(message) = failure.message() {
        eprintln!("plane-db: {message}");
    }
    ExitCode::from(failure.exit_code())
}

/// Logs go to stderr, filtered by `RUST_LOG` (e.g. `RUST_LOG=plane_db=debug` shows every
/// operation's span); warnings only by default, so a skipped undecodable row is visible.
fn init_logging() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::WARN)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(io::stderr)
                // A line as each operation's span closes, with its fields and timing.
                .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
                .with_ansi(io::stderr().is_terminal()),
        )
        .with(filter)
        .try_init();
}

/// What the command prints to, and how.
struct Out {
    json: bool,
    color: bool,
    show_secrets: bool,
}

impl Out {
    /// `value` as it may be printed: secrets redacted unless `--show-secrets`.
    fn shown<'v>(&self, value: &'v serde_json::Value) -> std::borrow::Cow<'v, serde_json::Value> {
        if self.show_secrets {
            std::borrow::Cow::Borrowed(value)
        } else {
            std::borrow::Cow::Owned(redact(value))
        }
    }

    /// Prints `value` as pretty JSON (secrets redacted unless `--show-secrets`).
    fn json(&self, stdout: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
        output::json(stdout, &self.shown(value))
    }

    /// Prints `value` as one line of JSON (secrets redacted unless `--show-secrets`).
    fn json_line(&self, stdout: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
        output::json_line(stdout, &self.shown(value))
    }
}

async fn run(cli: Cli) -> Outcome {
    let url = cli
        .database_url
        .filter(|url| !url.is_empty())
        .ok_or_else(|| {
            Failure::Usage("no database: pass --database-url or set DATABASE_URL".to_string())
        })?;
    let out = Out {
        json: cli.json,
        color: match cli.color {
            ColorMode::Always => true,
            ColorMode::Never => false,
            // NO_COLOR counts only when set to something (the convention's own rule).
            ColorMode::Auto => {
                io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        },
        show_secrets: cli.show_secrets,
    };
    let mut config = plane_db::Config::default();
    if let Command::Events(args) = &cli.command {
        config.bus.max_pending_per_subscription = args.max_pending;
    }
    let db = open(&url, config).await?;
    match cli.command {
        Command::Migrate => migrate(&db, &out).await,
        Command::Status => status(&db, &out).await,
        Command::Backends(args) => backends(&db, &out, args).await,
        Command::Backend { id } => backend(&db, &out, &backend_name(&id)?).await,
        Command::Nodes { all, cluster } => nodes(&db, &out, all, cluster.as_deref()).await,
        Command::Events(args) => events(&db, &out, args).await,
        Command::Watch { id } => watch(&db, &out, &backend_name(&id)?).await,
        Command::TerminationCandidates(args) => termination_candidates(&db, &out, args).await,
        Command::PreventRenew { id } => prevent_renew(&db, &out, &backend_name(&id)?).await,
        Command::MarkLost {
            ids,
            cluster,
            drone,
        } => mark_lost(&db, &out, ids, cluster.as_deref(), drone.as_deref()).await,
        Command::Cleanup {
            min_age_days,
            batch_size,
        } => cleanup(&db, &out, min_age_days, batch_size).await,
    }
}

/// Opens a small pool: the CLI runs one statement at a time (two while following, for the
/// listener). The URL is never echoed, since it may hold a password.
async fn open(url: &str, config: plane_db::Config) -> Result<PlaneDatabase, Failure> {
    use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
    use sqlx::Connection;
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Failure::Usage(format!("invalid database URL: {}", one_line(&e))))?;
    // One connection up front, because a pool retries until its timeout and then reports
    // only that it timed out; this says why (refused, bad password, no such database).
    PgConnection::connect_with(&options)
        .await
        .map_err(|e| Failure::Other(format!("cannot connect to the database: {}", one_line(&e))))?
        .close()
        .await
        .map_err(|e| Failure::Other(format!("cannot connect to the database: {}", one_line(&e))))?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    Ok(PlaneDatabase::with_config(pool, config))
}

/// Applies this build's missing migrations (`plane_db::migrate`: a database that a newer
/// build migrated is accepted, a diverging or edited one refused, one that Plane 0.5.5
/// migrated converted in place).
async fn migrate(db: &PlaneDatabase, out: &Out) -> Outcome {
    let report = plane_db::migrate(db.pool())
        .await
        .map_err(|e| Failure::Other(format!("migration failed: {}", one_line(&e))))?;
    let mut stdout = io::stdout().lock();
    if out.json {
        out.json(
            &mut stdout,
            &json!({
                "schema_version": report.latest_known,
                "applied": report.applied,
                "newer_unknown": report.newer_unknown,
                "converted_from_plane": report.converted_from_plane.as_ref().map(|c| json!({
                    "controllers": c.controllers,
                    "nodes": c.nodes,
                    "nodes_merged": c.nodes_merged,
                    "drones": c.drones,
                    "backends": c.backends,
                    "backend_states": c.backend_states,
                    "backend_keys": c.backend_keys,
                    "backend_actions": c.backend_actions,
                    "tokens": c.tokens,
                    "events": c.events,
                    "acme_txt_entries": c.acme_txt_entries,
                })),
            }),
        )?;
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

async fn backends(db: &PlaneDatabase, out: &Out, args: BackendsArgs) -> Outcome {
    let cluster = args.cluster.as_deref().map(cluster_name).transpose()?;
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
        out.json(&mut stdout, &rows.iter().map(backend_json).collect())?;
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
        print_table(&mut stdout, &table, out, "no backends match")?;
    }
    if cut {
        eprintln!(
            "plane-db: showing the first {} backends; pass --limit to see more",
            args.limit
        );
    }
    Ok(())
}

fn backend_json(row: &BackendRow) -> serde_json::Value {
    json!({
        "id": row.id,
        "cluster": row.cluster,
        "drone_id": row.drone_id,
        "status": row.state.status(),
        "state": row.state,
        "last_status_time": row.last_status_time,
        "last_keepalive": row.last_keepalive,
        "expiration_time": row.expiration_time,
        "allowed_idle_seconds": row.allowed_idle_seconds,
    })
}

async fn backend(db: &PlaneDatabase, out: &Out, id: &BackendName) -> Outcome {
    let row = db
        .backend()
        .backend(id)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("backend {:?} not found", id.as_str())))?;
    let history = db.backend().state_history(id).await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        let mut value = backend_json(&row);
        value["history"] = history
            .iter()
            .map(|h| json!({ "id": h.id, "created_at": h.created_at, "state": h.state }))
            .collect();
        return Ok(out.json(&mut stdout, &value)?);
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
    fields.row(field(
        "since",
        Cell::new(format!(
            "{} ({})",
            time(row.last_status_time),
            age(row.last_status_time, row.as_of)
        )),
    ));
    fields.row(field(
        "last keepalive",
        Cell::new(format!(
            "{} ({})",
            time(row.last_keepalive),
            age(row.last_keepalive, row.as_of)
        )),
    ));
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
    print_table(&mut stdout, &table, out, "no state history (cleaned up?)")?;
    Ok(())
}

/// What a state carries beyond its status, compactly: address, termination reason and
/// kind, exit code.
fn state_detail(state: &plane_db::types::BackendState) -> String {
    let mut parts = Vec::new();
    if let Some(address) = state.address() {
        parts.push(format!("address={address}"));
    }
    parts.extend(termination_detail(
        &plane_db::types::BackendStatusStreamEntry::from_state(state, Utc::now()),
    ));
    if let plane_db::types::BackendState::Terminated {
        exit_code: Some(code),
        ..
    } = state
    {
        parts.push(format!("exit_code={code}"));
    }
    parts.join(" ")
}

/// A status entry's termination details as `name=value` words (none before terminating).
fn termination_detail(entry: &plane_db::types::BackendStatusStreamEntry) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(reason) = entry.termination_reason {
        parts.push(format!("reason={reason}"));
    }
    if let Some(kind) = entry.termination_kind {
        parts.push(format!("kind={kind}"));
    }
    parts
}

async fn nodes(db: &PlaneDatabase, out: &Out, all: bool, cluster: Option<&str>) -> Outcome {
    let cluster = cluster.map(cluster_name).transpose()?;
    let nodes: Vec<_> = db
        .node()
        .list()
        .await?
        .into_iter()
        .filter(|n| all || n.active)
        .filter(|n| cluster.is_none() || n.cluster == cluster)
        .collect();
    let mut stdout = io::stdout().lock();
    if out.json {
        let value = nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "kind": n.kind().as_str(),
                    "name": n.name.as_str(),
                    "cluster": n.cluster,
                    "controller": n.controller,
                    "active": n.active,
                    "plane_version": n.plane_version,
                    "plane_hash": n.plane_hash,
                    "connected_at": n.connected_at,
                })
            })
            .collect();
        return Ok(out.json(&mut stdout, &value)?);
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
    let empty = if all {
        "no nodes"
    } else {
        "no active nodes (--all shows the others)"
    };
    print_table(&mut stdout, &table, out, empty)?;
    Ok(())
}

fn event_json(event: &Event) -> serde_json::Value {
    json!({
        "id": event.id,
        "kind": event.kind,
        "key": event.key,
        "created_at": event.created_at,
        "data": event.data,
    })
}

/// One event as a line of text: id, time, kind, key and the payload as compact JSON
/// (secrets redacted unless `--show-secrets`).
fn event_line(event: &Event, out: &Out) -> String {
    printable(&format!(
        "{}  {}  {}  {}  {}",
        event
            .id
            .map_or_else(|| "-".to_string(), |id| id.to_string()),
        time(event.created_at),
        event.kind,
        event.key.as_deref().unwrap_or("-"),
        out.shown(&event.data),
    ))
}

async fn events(db: &PlaneDatabase, out: &Out, args: EventsArgs) -> Outcome {
    let wanted = |event: &Event| args.kind.as_deref().is_none_or(|kind| event.kind == kind);
    let mut stdout = io::stdout().lock();
    if !args.follow {
        let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
        // One more than asked, to know whether the listing was cut.
        let mut events = Vec::new();
        read_events_after(db, args.since.unwrap_or(0), |event| {
            if wanted(&event) {
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
        if out.json {
            return Ok(out.json(&mut stdout, &events.iter().map(event_json).collect())?);
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
        return Ok(print_table(&mut stdout, &table, out, "no events")?);
    }

    // Subscribe first, then read the stored events: one committed in between is in both,
    // and `backlog` keeps it from being printed twice. Only the backlog's ids are kept: a
    // live event is never repeated by the subscription (a full queue pauses it and it catches
    // up from the table), so memory stays flat however long the follow runs. Without
    // --since, following starts at the latest stored event, as if it had been given.
    let mut subscription = db.subscribe_all_events().await?;
    let mut backlog = HashSet::new();
    if let Some(since) = args.since {
        read_events_after(db, since, |event: Event| {
            if event.id.is_none_or(|id| backlog.insert(id)) && wanted(&event) {
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
                if !repeat && wanted(&event) {
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

fn print_event(stdout: &mut impl Write, out: &Out, event: &Event) -> Outcome {
    if out.json {
        out.json_line(stdout, &event_json(event))?;
    } else {
        writeln!(stdout, "{}", event_line(event, out))?;
        stdout.flush()?;
    }
    Ok(())
}

async fn watch(db: &PlaneDatabase, out: &Out, id: &BackendName) -> Outcome {
    use futures_util::StreamExt;
    let stream = db.backend().status_stream(id).await?;
    let mut stream = std::pin::pin!(stream);
    let mut stdout = io::stdout().lock();
    while let Some(entry) = stream.next().await {
        if out.json {
            let value = serde_json::to_value(&entry)
                .map_err(|e| Failure::Other(format!("cannot print a status: {e}")))?;
            out.json_line(&mut stdout, &value)?;
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

async fn termination_candidates(db: &PlaneDatabase, out: &Out, args: DroneArgs) -> Outcome {
    let cluster = args.cluster.as_deref().map(cluster_name).transpose()?;
    let drone = find_drone(db, cluster.as_ref(), &args.drone).await?;
    let candidates = db.backend().termination_candidates(drone).await?;
    let mut stdout = io::stdout().lock();
    if out.json {
        let value = candidates
            .iter()
            .map(|c| {
                json!({
                    "backend_id": c.backend_id,
                    "expiration_time": c.expiration_time,
                    "last_keepalive": c.last_keepalive,
                    "allowed_idle_seconds": c.allowed_idle_seconds,
                })
            })
            .collect();
        return Ok(out.json(&mut stdout, &value)?);
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
    print_table(&mut stdout, &table, out, "no termination candidates")?;
    Ok(())
}

async fn prevent_renew(db: &PlaneDatabase, out: &Out, id: &BackendName) -> Outcome {
    if db.backend().backend(id).await?.is_none() {
        return Err(Failure::NotFound(format!(
            "backend {:?} not found",
            id.as_str()
        )));
    }
    let prevented = db.keys().prevent_renew(id).await?;
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

async fn mark_lost(
    db: &PlaneDatabase,
    out: &Out,
    ids: Vec<String>,
    cluster: Option<&str>,
    drone: Option<&str>,
) -> Outcome {
    let marked = match drone {
        Some(drone) => {
            let cluster = cluster.map(cluster_name).transpose()?;
            let drone = find_drone(db, cluster.as_ref(), drone).await?;
            db.backend().mark_drone_lost(drone).await?
        }
        None => {
            let names = ids
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

async fn cleanup(db: &PlaneDatabase, out: &Out, min_age_days: i32, batch_size: i32) -> Outcome {
    let config = CleanupConfig {
        backend_min_age_days: min_age_days,
        event_min_age: Duration::from_secs(u64::from(min_age_days.unsigned_abs()) * 86_400),
        batch_size,
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
    let b = &summary.backends;
    if out.json {
        out.json(
            &mut stdout,
            &json!({
                "backends": b.backends,
                "backend_states": b.states,
                "backend_tokens": b.tokens,
                "backend_actions": b.actions,
                "backend_keys": b.keys,
                "events": summary.events,
                "expired_tokens": summary.tokens,
            }),
        )?;
    } else {
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
    }
    Ok(())
}

/// What `status` says of the last cleanup.
fn last_cleanup(run: Option<&plane_db::status::CleanupRun>) -> String {
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

async fn status(db: &PlaneDatabase, out: &Out) -> Outcome {
    let status = db.status().await?;
    let now = status.as_of;
    let mut stdout = io::stdout().lock();
    let tx = status.oldest_transaction.as_ref();
    if out.json {
        let value = json!({
            "as_of": status.as_of,
            "controllers": status.controllers.iter().map(|c| json!({
                "name": c.name,
                "plane_version": c.plane_version,
                "last_heartbeat": c.last_heartbeat,
                "heartbeat_age_seconds": c.heartbeat_age.num_milliseconds() as f64 / 1000.0,
            })).collect::<Vec<_>>(),
            "drones": status.drones.iter().map(|d| json!({
                "cluster": d.cluster,
                "pool": d.pool,
                "state": d.condition.as_str(),
                "count": d.count,
            })).collect::<Vec<_>>(),
            "backends": status.backends.iter().map(|(s, count)| (s.as_str().to_string(), json!(count)))
                .collect::<serde_json::Map<_, _>>(),
            "oldest_transaction": tx.map(|t| json!({
                "pid": t.pid,
                "application_name": t.application_name,
                "database": t.database,
                "user": t.user,
                "state": t.state,
                "transaction_start": t.transaction_start,
                "age_seconds": t.age.map(|a| a.num_milliseconds() as f64 / 1000.0),
                "xid": t.xid,
                "xmin": t.xmin,
                "xid_age": t.xid_age,
                "holds_bus": t.holds_bus(),
            })),
            "events": {
                "rows_estimate": status.events.rows_estimate,
                "bytes": status.events.bytes,
                "oldest_id": status.events.oldest_id,
                "oldest_at": status.events.oldest_at,
            },
            "last_cleanup": status.last_cleanup.as_ref().map(|run| serde_json::json!({
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "backends": run.backends,
                "events": run.events,
                "tokens": run.tokens,
            })),
        });
        return Ok(out.json(&mut stdout, &value)?);
    }
    let heading = |text: &str| Tone::Bold.paint(text, out.color);

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
        table.print(&mut stdout, out.color)?;
    }

    let total: i64 = status.drones.iter().map(|d| d.count).sum();
    writeln!(stdout, "\n{}", heading(&format!("DRONES: {total}")))?;
    if !status.drones.is_empty() {
        let mut table = Table::new(&["CLUSTER", "POOL", "STATE", "COUNT"]);
        for d in &status.drones {
            use plane_db::status::DroneCondition;
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
        table.print(&mut stdout, out.color)?;
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
        table.print(&mut stdout, out.color)?;
    }

    writeln!(stdout, "\n{}", heading("OLDEST OPEN TRANSACTION"))?;
    match tx {
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
            table.print(&mut stdout, out.color)?;
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
    table.print(&mut stdout, out.color)?;

    writeln!(
        stdout,
        "\n{} {}",
        heading("LAST CLEANUP:"),
        last_cleanup(status.last_cleanup.as_ref())
    )?;
    Ok(())
}

/// Prints the table, or `empty` to stderr when it has no rows (so a script reading stdout
/// gets only the header).
fn print_table(stdout: &mut impl Write, table: &Table, out: &Out, empty: &str) -> io::Result<()> {
    table.print(stdout, out.color)?;
    if table.is_empty() {
        eprintln!("plane-db: {empty}");
    }
    Ok(())
}

fn backend_name(id: &str) -> Result<BackendName, Failure> {
    id.parse()
        .map_err(|e| Failure::Usage(format!("invalid backend id {:?}: {e}", printable(id))))
}

fn cluster_name(name: &str) -> Result<ClusterName, Failure> {
    name.parse()
        .map_err(|e| Failure::Usage(format!("invalid cluster {:?}: {e}", printable(name))))
}

/// The drone given as a numeric node id, or by name within `cluster`: one lookup either way.
async fn find_drone(
    db: &PlaneDatabase,
    cluster: Option<&ClusterName>,
    drone: &str,
) -> Result<NodeId, Failure> {
    if let Ok(id) = drone.parse::<i32>() {
        let id = NodeId::from(id);
        let node = db
            .node()
            .get(id)
            .await?
            .ok_or_else(|| Failure::NotFound(format!("drone {id} not found")))?;
        return match node.name {
            plane_db::types::AnyNodeName::Drone(_) => Ok(id),
            other => Err(Failure::Usage(format!(
                "node {id} is a {}, not a drone",
                other.kind()
            ))),
        };
    }
    let name: DroneName = drone
        .parse()
        .map_err(|e| Failure::Usage(format!("invalid drone {:?}: {e}", printable(drone))))?;
    let cluster = cluster.ok_or_else(|| {
        Failure::Usage(format!(
            "drone {name} is a name: pass its --cluster too (or the drone's numeric id)"
        ))
    })?;
    let id = db
        .node()
        .id_of(Some(cluster), name.as_str())
        .await?
        .ok_or_else(|| Failure::NotFound(format!("drone {name} not found in cluster {cluster}")))?;
    Ok(id)
}
