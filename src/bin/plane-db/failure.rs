//! Why a command failed, and so which exit code it ends with.

use crate::output::printable;
use std::io;

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The command line or an argument's value is wrong.
    Usage(String),
    /// What the command names does not exist.
    NotFound(String),
    /// The database or the output failed.
    Other(String),
    /// Whoever read the output stopped reading (`plane-db … | head`): not a failure.
    Stopped,
}

/// What every command returns.
pub type Outcome = Result<(), Failure>;

impl Failure {
    /// 2 for bad usage (as clap's own usage errors), 3 for not found, 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Stopped => 0,
            Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
        }
    }

    /// The line to print on stderr, if any.
    pub fn message(&self) -> Option<&str> {
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
pub fn one_line(error: &dyn std::error::Error) -> String {
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
