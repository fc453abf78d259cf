//! Several hosts in one URL, with libpq's semantics: for a primary and its standbys under an
//! HA engine (Patroni, pg_auto_failover) without a proxy in front.
//!
//! Every URL that [`OpenOptions`](crate::OpenOptions) takes (the main one, the direct one,
//! each replica's) may list several hosts, as libpq does:
//!
//! ```text
//! postgres://plane:secret@db1:5432,db2:5432,db3:5432/plane?target_session_attrs=read-write
//! postgres://plane@/plane?host=db1,db2&port=5432,5433&target_session_attrs=primary
//! ```
//!
//! - A new connection tries the hosts in turn (in a random order with
//!   `load_balance_hosts=random`) and keeps the first that it can reach and that fits
//!   [`target_session_attrs`](TargetSessionAttrs), checked on the connection with
//!   `pg_is_in_recovery()` and `transaction_read_only`. Each host gets `connect_timeout`
//!   seconds (libpq's parameter; 5 s when the URL does not say, where libpq waits without
//!   limit: a hung host must not hang the search).
//! - A pool does not search for every connection: it connects to the host it found, and a
//!   task per URL (one extra connection) checks that host every second
//!   ([`OpenOptions::host_check_interval`](crate::OpenOptions::host_check_interval)). When
//!   the host stops answering or stops fitting (a failover, a demoted primary), the task
//!   searches again and moves the pool to the host it finds: connections opened from then
//!   on go there, and the pool's connections to the old host are closed instead of being
//!   handed out again (one that is in use is closed when it is given back and next asked
//!   for). The event bus's listening connection follows as well. No restart of the
//!   controller is needed.
//! - Every new connection is checked when it is opened as well; one that does not fit is
//!   replaced by a search before the pool uses it, so a connection that the pool hands out
//!   fitted when it was opened.
//! - When no host fits, [`open`](crate::OpenOptions::open) fails with
//!   [`Error::NoSuitableHost`](crate::Error::NoSuitableHost), which names every host tried
//!   and why it was refused; later, the search's failures are logged and counted
//!   (`plane_db_host_search_failures_total`), and callers get the pool's timeout.
//!
//! Differences from libpq, by design: `load_balance_hosts=random` shuffles the order of each
//! search, not of each connection (a pool's connections share one host, and many processes
//! spread over the hosts); `prefer-standby` stays on the primary it fell back to until that
//! stops answering; the password comes from the URL (or `PGPASSWORD`), not from a
//! per-host `.pgpass` line. The key/value form (`host=db1 port=5432 …`) is not accepted.

mod parse;
mod select;
mod watch;

pub(crate) use parse::{parse_url, ParsedUrl};
pub(crate) use select::connect_fitting;
pub(crate) use watch::{HostSet, HostWatch, PoolHosts};

use std::fmt;
use std::time::Duration;

/// Which servers a connection may stay on: libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Any server that accepts the connection (the default).
    #[default]
    Any,
    /// A server whose sessions may write (`transaction_read_only` is off).
    ReadWrite,
    /// A server whose sessions may not write (`transaction_read_only` is on).
    ReadOnly,
    /// A server that is not in recovery (not a standby).
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// The value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            _ => return None,
        })
    }

    /// Whether a server in this state fits (for `PreferStandby`: fits in the search's
    /// second pass, which takes any server).
    fn accepts(self, server: ServerState) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !server.read_only,
            TargetSessionAttrs::ReadOnly => server.read_only,
            TargetSessionAttrs::Primary => !server.in_recovery,
            TargetSessionAttrs::Standby => server.in_recovery,
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection found about its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    /// `pg_is_in_recovery()`: the server is a standby.
    pub in_recovery: bool,
    /// `transaction_read_only`: the session may not write.
    pub read_only: bool,
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = if self.in_recovery {
            "a standby"
        } else {
            "a primary"
        };
        let access = if self.read_only {
            "read-only"
        } else {
            "read-write"
        };
        write!(f, "{role}, {access}")
    }
}

/// One host tried by a search, and why it was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAttempt {
    /// The host as listed (a name, an address, or a socket directory) and its port.
    pub host: String,
    /// Why it was not kept.
    pub refusal: HostRefusal,
}

/// Why a host was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostRefusal {
    /// Connecting (or checking the connection) failed; the driver's message.
    Failed(String),
    /// No answer within `connect_timeout`.
    TimedOut(Duration),
    /// It answered, but does not fit `target_session_attrs`.
    Unfit(ServerState),
}

impl fmt::Display for HostAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.refusal {
            HostRefusal::Failed(error) => write!(f, "{}: {error}", self.host),
            HostRefusal::TimedOut(after) => {
                write!(f, "{}: no answer within {after:?}", self.host)
            }
            HostRefusal::Unfit(state) => write!(f, "{}: is {state}", self.host),
        }
    }
}

/// No host of a URL could be reached and fitted its `target_session_attrs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no host fits target_session_attrs={target}: {}", list(attempts))]
pub struct NoSuitableHost {
    /// What was asked for.
    pub target: TargetSessionAttrs,
    /// Every host tried, in the order tried.
    pub attempts: Vec<HostAttempt>,
}

fn list(attempts: &[HostAttempt]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `load_balance_hosts`: the order in which a search tries the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LoadBalanceHosts {
    /// In the order listed (the default).
    #[default]
    Disable,
    /// In a random order, drawn anew for each search.
    Random,
}

/// A host of a URL and its port; `None` is the default (libpq's: `PGHOST`, a local socket,
/// or `localhost`; `PGPORT` or 5432).
pub(crate) type HostEntry = (Option<String>, Option<u16>);

/// The hosts of a URL and how to pick among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostList {
    pub(crate) hosts: Vec<HostEntry>,
    pub(crate) target: TargetSessionAttrs,
    pub(crate) load_balance: LoadBalanceHosts,
    /// Per host; `None` waits without limit (`connect_timeout=0`).
    pub(crate) connect_timeout: Option<Duration>,
}

/// Each host's share of a search when the URL gives no `connect_timeout`.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
