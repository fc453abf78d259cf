//! `plane-db`: see and fix a plane-db database from a shell.
//!
//! Built with the `cli` feature: `cargo run --features cli -- --help`. Every listing prints
//! an aligned table (coloured on a terminal, plain when piped) or, with `--json`, JSON for
//! scripts. Errors are one line on stderr; the exit code says what went wrong (see
//! [`Failure::exit_code`]).
//!
//! The parts: [`args`] (the command line), [`commands`] (one file per group of commands),
//! [`output`] (tables, JSON, times) and [`redact`] (secrets kept off the screen).

mod args;
mod commands;
mod failure;
mod output;
mod redact;

use args::{Cli, ColorMode, Command};
use clap::Parser;
use commands::{backends, cleanup, events, migrate, nodes, repair, status};
use failure::{one_line, Failure, Outcome};
use output::Out;
use plane_db::PlaneDatabase;
use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::time::Duration;

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

/// Opens the database the options name and runs the command on it.
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
        Command::Migrate => migrate::migrate(&db, &out).await,
        Command::Status => status::status(&db, &out).await,
        Command::Backends(args) => backends::backends(&db, &out, args).await,
        Command::Backend(args) => backends::backend(&db, &out, args).await,
        Command::Nodes(args) => nodes::nodes(&db, &out, args).await,
        Command::Events(args) => events::events(&db, &out, args).await,
        Command::Watch(args) => backends::watch(&db, &out, args).await,
        Command::TerminationCandidates(args) => {
            repair::termination_candidates(&db, &out, args).await
        }
        Command::PreventRenew(args) => repair::prevent_renew(&db, &out, args).await,
        Command::MarkLost(args) => repair::mark_lost(&db, &out, args).await,
        Command::Cleanup(args) => cleanup::cleanup(&db, &out, args).await,
    }
}

/// Opens a small pool: the CLI runs one statement at a time (two while following, for the
/// listener). The URL is never echoed, since it may hold a password. It may list several
/// hosts with `target_session_attrs`, as the library's URLs may (`plane_db::hosts`).
async fn open(url: &str, config: plane_db::Config) -> Result<PlaneDatabase, Failure> {
    let options = plane_db::OpenOptions::new(url)
        .map_err(|e| Failure::Usage(format!("invalid database URL: {}", one_line(&e))))?
        .application_name("plane-db-cli")
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .config(config);
    let cannot_connect = |e: &dyn std::error::Error| {
        Failure::Other(format!("cannot connect to the database: {}", one_line(e)))
    };
    // One connection up front, because a pool retries a refused connection until its
    // timeout and then reports only that it timed out; this says why (refused, bad
    // password, no such database). A URL with several hosts needs none: opening searches
    // them and names each host and why it was refused.
    if let Ok(single) = url.parse::<sqlx::postgres::PgConnectOptions>() {
        use sqlx::Connection;
        sqlx::PgConnection::connect_with(&single)
            .await
            .map_err(|e| cannot_connect(&e))?
            .close()
            .await
            .map_err(|e| cannot_connect(&e))?;
    }
    options.open().await.map_err(|e| cannot_connect(&e))
}
