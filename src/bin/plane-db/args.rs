//! The command line: global options, one subcommand each, and their arguments (clap).

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `plane-db [global options] <command> [arguments]`.
#[derive(Parser)]
#[command(
    name = "plane-db",
    version,
    about = "See and fix the state of a plane-db database.",
    after_help = "Exit codes: 0 success, 1 failure (database, I/O), 2 bad usage, 3 not found."
)]
pub struct Cli {
    /// The database, as a Postgres URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Print JSON instead of a table (streams print one JSON object per line).
    #[arg(long, global = true)]
    pub json: bool,
    /// When to colour tables: `auto` colours on a terminal unless NO_COLOR is set.
    #[arg(long, value_enum, default_value_t = ColorMode::Auto, global = true)]
    pub color: ColorMode,
    /// Print tokens and other secrets as stored. By default they are redacted: static tokens
    /// (in spawn actions and their events), secret tokens, and any value named like a token,
    /// secret or password, in tables and JSON alike.
    #[arg(long, global = true)]
    pub show_secrets: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `--color`.
#[derive(Clone, Copy, ValueEnum)]
pub enum ColorMode {
    Auto,
    Always,
    Never,
}

/// The subcommands; each is run by a function of the `commands` module of the same name.
#[derive(Subcommand)]
pub enum Command {
    /// Apply the schema migrations this build knows (and convert a database that Plane
    /// 0.5.5 migrated, in place).
    Migrate,
    /// One screen: controllers online, drones, backends by status, the open transaction
    /// holding back the event bus, the event table's size and oldest event, who leads
    /// (the cleanup lease and any other), last cleanup.
    Status,
    /// List backends, newest states included (terminated ones until cleaned up).
    Backends(BackendsArgs),
    /// Show one backend and its state history.
    Backend(BackendArg),
    /// List nodes (drones, proxies, DNS servers); only active ones unless --all.
    Nodes(NodesArgs),
    /// List events, or follow them as they are committed.
    Events(EventsArgs),
    /// Print a backend's status changes until it has terminated.
    Watch(BackendArg),
    /// List a drone's backends that are idle or past their expiration time.
    TerminationCandidates(DroneArgs),
    /// Stop a backend's key from being renewed, so the key expires and the drone stops it.
    PreventRenew(BackendArg),
    /// Mark backends terminated (reason `lost`): the given ones, or every live backend of a drone.
    MarkLost(MarkLostArgs),
    /// Delete old terminated backends, old events and expired tokens, in batches.
    Cleanup(CleanupArgs),
}

/// `backends`.
#[derive(Args)]
pub struct BackendsArgs {
    /// Only backends of this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only backends of this drone (a name, which needs --cluster, or a numeric node id).
    #[arg(long)]
    pub drone: Option<String>,
    /// Only backends in this status (scheduled, loading, starting, waiting, ready,
    /// terminating, hard-terminating, terminated).
    #[arg(long)]
    pub status: Option<String>,
    /// Print at most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    pub limit: i64,
}

/// The one backend that `backend`, `watch` and `prevent-renew` are about.
#[derive(Args)]
pub struct BackendArg {
    /// The backend's id.
    pub id: String,
}

/// `nodes`.
#[derive(Args)]
pub struct NodesArgs {
    /// Include nodes that are not active (no online controller holds them).
    #[arg(long)]
    pub all: bool,
    /// Only nodes of this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
}

/// `events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Keep printing events as they are committed, until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Start after this event id (without it, --follow prints only new events).
    #[arg(long)]
    pub since: Option<i64>,
    /// Only events of this kind (e.g. backend_state, node_connection, backend_action).
    #[arg(long)]
    pub kind: Option<String>,
    /// Without --follow: print at most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    pub limit: i64,
    /// How many live events may wait to be printed before the subscription pauses (and then
    /// catches up from the table). Small values exercise that path in tests.
    #[arg(long, default_value_t = 100_000, hide = true)]
    pub max_pending: usize,
}

/// The drone that `termination-candidates` is about.
#[derive(Args)]
pub struct DroneArgs {
    /// The drone's cluster (needed with a drone name).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The drone: a name, or a numeric node id.
    #[arg(long)]
    pub drone: String,
}

/// `mark-lost`.
#[derive(Args)]
pub struct MarkLostArgs {
    /// The backends' ids.
    #[arg(required_unless_present = "drone", conflicts_with = "drone")]
    pub ids: Vec<String>,
    /// The drone's cluster (needed with a drone name).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Every live backend of this drone (a name, or a numeric node id).
    #[arg(long)]
    pub drone: Option<String>,
}

/// `cleanup`.
#[derive(Args)]
pub struct CleanupArgs {
    /// Delete backends that terminated, and events written, more than this many days ago.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(i32).range(0..=36_500))]
    pub min_age_days: i32,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..))]
    pub batch_size: i32,
    /// The largest share of the time cleanup keeps the server busy, in (0, 1]: after each
    /// batch it waits so that writers meet its work only that share of the time (0.1: ten
    /// times as long, nine tenths of the time out of the way).
    #[arg(long, default_value_t = 1.0)]
    pub busy_share: f64,
}
