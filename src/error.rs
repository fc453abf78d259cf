//! The crate's error types and their conversions. The checks that refuse a caller's input
//! with [`Error::InvalidArgument`] are in `src/validate.rs` (and, for sizes, in
//! [`limits`](crate::limits)).

use crate::types::{BackendName, ClusterName, DronePoolName};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a plane-db call.
///
/// Expected outcomes that a caller branches on (a refused transition, an unknown token) are
/// not errors: they are `Ok(false)`, `Ok(None)` or an enum such as `RouteInfoResult`. Errors
/// are for failures, and keep their cause chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database reported an error, or could not be reached. The message names the
    /// cause on the same line (e.g. `database error: error occurred while attempting to
    /// establish a TLS connection: invalid peer certificate: UnknownIssuer`); the cause is
    /// also the error's [`source`](std::error::Error::source).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the schema migrations failed. The message names the cause on the same line,
    /// which is also the error's [`source`](std::error::Error::source).
    #[error("could not migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The database's applied migrations do not fit this build's (see
    /// [`migrate`](crate::migrate)).
    #[error("the database's schema does not fit this build")]
    Schema(#[from] SchemaError),

    /// Converting a database that Plane 0.5.5 migrated failed; the conversion was rolled
    /// back, and the database is as Plane left it (see [`migrate`](crate::migrate)).
    #[error(transparent)]
    PlaneConversion(#[from] PlaneConversionError),

    /// A row read from the database does not hold what the schema promises.
    #[error("invalid {column} in {table} row {id:?}")]
    Decode {
        /// The table the row came from.
        table: &'static str,
        /// The column that could not be decoded.
        column: &'static str,
        /// The row's id, as text.
        id: String,
        /// Why it could not be decoded.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A value could not be serialized to JSON for storage.
    #[error("could not serialize {what} to JSON")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// The caller asked about something that does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// The kind of thing (e.g. "backend", "drone").
        what: &'static str,
        /// Its id or name.
        id: String,
    },

    /// No host of a URL that lists several (or gives `target_session_attrs`) could be
    /// reached and fitted: the message names each host tried and why it was refused (see
    /// [`hosts`](crate::hosts)).
    #[error(transparent)]
    NoSuitableHost(#[from] crate::hosts::NoSuitableHost),

    /// The caller passed a value the operation cannot accept.
    #[error("invalid argument {argument}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        argument: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// Work fenced by a leader lease's term was refused because that term no longer holds
    /// the lease (another controller took it over, or it expired): nothing was written. See
    /// [`leader`](crate::leader).
    #[error("not the leader: lease {lease:?} is no longer held under term {term}")]
    NotLeader {
        /// The lease's name.
        lease: String,
        /// The term the work was fenced with.
        term: i64,
    },
}

/// How the database's applied migrations contradict this build's (see
/// [`migrate`](crate::migrate) and the policy on [`MIGRATOR`](crate::MIGRATOR)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A migration of this build is applied with a different text (its recorded checksum
    /// differs): a committed migration was edited.
    #[error(
        "migration {version} ({description}) was applied from a different text than this \
         build's (checksum mismatch): a committed migration was edited; restore its applied \
         text and put the change in a new migration"
    )]
    ChecksumMismatch {
        /// The migration's version.
        version: i64,
        /// This build's description of it.
        description: String,
    },

    /// The database has a migration that this build does not know and that is older than
    /// this build's newest: the database and the build have diverging histories.
    #[error(
        "the database has migration {version}, which this build does not know and which is \
         older than this build's newest migration {latest_known}: the database and this \
         build have diverging migration histories"
    )]
    UnknownOlder {
        /// The unknown applied migration's version.
        version: i64,
        /// This build's newest migration.
        latest_known: i64,
    },

    /// A migration of this build is not applied, but the database already has a newer one
    /// that this build does not know: the newer build that migrated it skipped ours.
    #[error(
        "this build's migration {version} is not applied, but the database already has the \
         newer migration {newer}, which this build does not know: refusing to apply an older \
         migration under a newer schema"
    )]
    MissingBeforeNewer {
        /// This build's unapplied migration.
        version: i64,
        /// The oldest of the unknown, newer migrations applied in the database.
        newer: i64,
    },

    /// The database was migrated by a Plane older than 0.5.5: its Plane migrations are the
    /// first ones of Plane 0.5.5's, not all of them. Only a database that Plane 0.5.5
    /// migrated is converted.
    #[error(
        "the database was migrated by a Plane older than 0.5.5 (its newest Plane migration is \
         {newest_applied}; it lacks {} of Plane 0.5.5's, {}): start a Plane 0.5.5 controller \
         on it once, so that it migrates to 0.5.5, then convert it",
        missing.len(), list(missing)
    )]
    PlaneOlder {
        /// The newest Plane migration applied.
        newest_applied: i64,
        /// Plane 0.5.5's migrations that are not applied.
        missing: Vec<i64>,
    },

    /// The database has Plane migrations, but not exactly Plane 0.5.5's: some are missing
    /// (not as a prefix), some are unknown (a newer Plane, or a fork), or some were applied
    /// from a different text. Only a database that Plane 0.5.5 migrated is converted.
    #[error(
        "the database has Plane migrations but not exactly Plane 0.5.5's (unknown: {}; \
         missing: {}; applied from another text: {}): only a database migrated by Plane \
         0.5.5 is converted",
        list(unexpected),
        list(missing),
        list(edited)
    )]
    PlaneUnrecognized {
        /// Applied migrations that are not Plane 0.5.5's.
        unexpected: Vec<i64>,
        /// Plane 0.5.5's migrations that are not applied.
        missing: Vec<i64>,
        /// Plane 0.5.5's migrations applied with another checksum.
        edited: Vec<i64>,
    },
}

/// Versions as `1, 2, 3`, or `none`.
fn list(versions: &[i64]) -> String {
    if versions.is_empty() {
        return "none".to_string();
    }
    versions
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a database that Plane 0.5.5 migrated could not be converted. The conversion runs in
/// one transaction: after any of these, nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlaneConversionError {
    /// A step of the conversion failed in the database.
    #[error(
        "converting the Plane 0.5.5 database failed at step {step:?} (rolled back, nothing \
         was changed): {source}"
    )]
    Step {
        /// The step (as named in the conversion script, e.g. `copy backends`).
        step: &'static str,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },

    /// A backend's status is none that Plane 0.5.5 (or an earlier Plane) writes.
    #[error(
        "cannot convert the Plane 0.5.5 database: backend {backend:?} has status {status:?}, \
         which is no Plane status ({others} other backend(s) too); nothing was changed"
    )]
    UnknownStatus {
        /// The first such backend, in id order.
        backend: String,
        /// Its status.
        status: String,
        /// How many more backends have an unknown status.
        others: usize,
    },

    /// A backend action names no existing backend (neither in its `backend_id` column nor in
    /// its JSON), which plane-db's schema cannot hold.
    #[error(
        "cannot convert the Plane 0.5.5 database: backend action {action:?} belongs to no \
         backend ({others} other action(s) too); delete it, or let Plane clean it up, and \
         convert again; nothing was changed"
    )]
    ActionWithoutBackend {
        /// The first such action, in id order.
        action: String,
        /// How many more actions have no backend.
        others: usize,
    },

    /// A table's copy wrote a different number of rows than Plane's table holds.
    #[error(
        "converting the Plane 0.5.5 database copied {converted} of {plane} row(s) of table \
         {table}; rolled back, nothing was changed"
    )]
    RowCountMismatch {
        /// Plane's table.
        table: &'static str,
        /// The rows to copy.
        plane: i64,
        /// The rows copied.
        converted: u64,
    },

    /// The conversion script lacks a step this build runs: a defect of the build.
    #[error("the Plane 0.5.5 conversion script has no step {0:?} (a defect of this build)")]
    MissingStep(&'static str),
}

impl Error {
    /// Builds a [`Error::Decode`] for a bad column value.
    pub(crate) fn decode(
        table: &'static str,
        column: &'static str,
        id: impl std::fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Decode {
            table,
            column,
            id: id.to_string(),
            source: source.into(),
        }
    }

    /// Whether this error means the database could not be reached or the connection broke
    /// (as opposed to a query that the database refused).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Tls(_)
            )
        )
    }
}

/// Serializes a value to JSON for storage, as a typed error instead of a panic.
pub(crate) fn to_json<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|source| Error::Serialize { what, source })
}

/// Why [`PlaneDatabase::connect`](crate::PlaneDatabase::connect) did not return a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The key is held by a live backend that was created with a different tag.
    #[error(
        "key {namespace:?}/{name:?} is held by backend {backend} with tag {key_tag:?}, \
         not the requested {request_tag:?}"
    )]
    KeyHeld {
        /// The key's namespace.
        namespace: String,
        /// The key's name.
        name: String,
        /// The backend holding the key.
        backend: BackendName,
        /// The tag the holder acquired the key with (Plane's `key_tag`).
        key_tag: String,
        /// The tag of the request (Plane's `request_tag`).
        request_tag: String,
    },

    /// A backend must be spawned, but its spawn config names no cluster and no
    /// [`Config::default_cluster`](crate::Config::default_cluster) is set.
    #[error("no cluster in the spawn config, and no default cluster is configured")]
    NoClusterProvided,

    /// The spawn config asks for a backend name ([`SpawnConfig::id`](crate::connect::SpawnConfig::id))
    /// that an existing backend already has (running or terminated: names are never reused
    /// while the row exists).
    #[error("backend name {backend} is taken by an existing backend")]
    BackendIdTaken {
        /// The requested name.
        backend: BackendName,
    },

    /// No live backend holds the key and the request carried no spawn config.
    #[error("no live backend holds key {namespace:?}/{name:?} and no spawn config was given")]
    NoSpawnConfig {
        /// The key's namespace.
        namespace: String,
        /// The key's name.
        name: String,
    },

    /// No drone can take a new backend in the requested cluster and pool.
    #[error("no drone available in cluster {cluster} pool {:?}", pool.as_str())]
    NoDroneAvailable {
        /// The requested cluster.
        cluster: ClusterName,
        /// The requested pool.
        pool: DronePoolName,
    },

    /// The key changed hands too many times while this request was trying to read it.
    #[error("key {namespace:?}/{name:?} kept changing; gave up after {attempts} attempts")]
    Contended {
        /// The key's namespace.
        namespace: String,
        /// The key's name.
        name: String,
        /// How many attempts were made.
        attempts: u32,
    },

    /// Any other failure.
    #[error(transparent)]
    Other(#[from] Error),
}

impl From<sqlx::Error> for ConnectError {
    fn from(e: sqlx::Error) -> Self {
        ConnectError::Other(Error::Database(e))
    }
}

/// Keeps the rows that decoded and logs each one that did not, with its cause, so that one
/// bad row neither fails a listing nor hides the rows after it.
pub(crate) fn skip_undecodable<T>(rows: impl IntoIterator<Item = Result<T>>) -> Vec<T> {
    rows.into_iter()
        .filter_map(|row| match row {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "skipping a row that does not decode"
                );
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn database_errors_name_their_cause_on_one_line_and_keep_it_as_source() {
        let cause = "error occurred while attempting to establish a TLS connection: \
                     server does not support TLS";
        let error = Error::from(sqlx::Error::Tls("server does not support TLS".into()));
        assert_eq!(error.to_string(), format!("database error: {cause}"));
        assert_eq!(
            error.source().map(|s| s.to_string()).as_deref(),
            Some(cause)
        );
        assert!(error.is_connection_error());

        let connect = ConnectError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(
            connect.to_string(),
            "database error: pool timed out while waiting for an open connection"
        );

        let migrate = Error::from(sqlx::migrate::MigrateError::Execute(
            sqlx::Error::PoolTimedOut,
        ));
        assert_eq!(
            migrate.to_string(),
            "could not migrate the database: while executing migrations: \
             pool timed out while waiting for an open connection"
        );
        assert!(migrate.source().is_some());
    }
}
