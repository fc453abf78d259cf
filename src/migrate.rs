//! Schema migrations under the additive policy ([`migrate`], [`MIGRATOR`]), including the
//! in-place conversion of a Plane 0.5.5 database.

use crate::error::Result;
use crate::plane055::{self, PlaneConversionReport};
use sqlx::PgPool;

/// The schema migrations (`migrations/`), embedded at compile time.
///
/// Apply them with [`migrate`] (which [`open_and_migrate`](crate::open_and_migrate) calls): it lets a build run
/// against a database that a *newer* build has already migrated, which sqlx's own
/// `MIGRATOR.run(&pool)` refuses ("migration N was previously applied but is missing").
///
/// # Policy: migrations are additive
///
/// Controllers are upgraded one at a time, so for a while old and new builds share one
/// database, and an old one may restart after a new one migrated it. That works because
/// every migration only *expands* the schema: new tables, new nullable columns (or columns
/// with a default), new indexes, new functions. Whatever an old build reads or writes keeps
/// its meaning. Removing or renaming a column or table, tightening a constraint, or
/// changing what a column holds (the *contract* step) waits for a later release, once no
/// build that uses the old shape runs. Never edit a committed migration: its checksum is
/// recorded, and [`migrate`] refuses a database whose applied migration differs from the
/// build's.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The versions this call applied, in order; empty when the schema was up to date.
    pub applied: Vec<i64>,
    /// Versions applied in the database that this build does not know, all newer than its
    /// own: a newer build migrated the database (an upgrade is under way, or was rolled
    /// back). Empty otherwise.
    pub newer_unknown: Vec<i64>,
    /// This build's newest migration (applied now); `None` if it has none.
    /// Serialized as `schema_version`.
    #[serde(rename = "schema_version")]
    pub latest_known: Option<i64>,
    /// Set when this call converted a database that Plane 0.5.5 migrated: what it copied.
    /// `None` otherwise (also when another controller converted it first).
    pub converted_from_plane: Option<PlaneConversionReport>,
}

/// Applies the migrations of [`MIGRATOR`] that the database lacks, under the additive policy
/// described there:
///
/// - an applied migration that this build does not know is accepted when it is newer than
///   all of this build's (a newer controller migrated the database); it is logged as a
///   warning and listed in [`MigrationReport::newer_unknown`];
/// - one that is older than this build's newest is refused
///   ([`SchemaError::UnknownOlder`](crate::error::SchemaError::UnknownOlder)): the database
///   and the build have diverging histories;
/// - so is a database that has such newer migrations but lacks one of this build's
///   ([`SchemaError::MissingBeforeNewer`](crate::error::SchemaError::MissingBeforeNewer));
/// - an applied migration whose text differs from this build's is refused
///   ([`SchemaError::ChecksumMismatch`](crate::error::SchemaError::ChecksumMismatch)).
///
/// A database that **Plane 0.5.5** migrated (its `_sqlx_migrations` holds exactly Plane
/// 0.5.5's versions and checksums) is converted in place first, in one transaction: its
/// tables are replaced by plane-db's, with every row copied over (bearer tokens become their
/// SHA-256 digests, so every token Plane issued still routes; backend names, keys, fencing
/// tokens, actions and events are kept), and then this build's later migrations are applied
/// as usual ([`MigrationReport::converted_from_plane`] says what was copied). A conversion
/// that fails changes nothing ([`Error::PlaneConversion`](crate::Error::PlaneConversion)).
/// A database with only the first of Plane 0.5.5's migrations (an older Plane) is refused
/// ([`SchemaError::PlaneOlder`](crate::error::SchemaError::PlaneOlder)), and so is one
/// with other Plane migrations, unknown ones or edited ones
/// ([`SchemaError::PlaneUnrecognized`](crate::error::SchemaError::PlaneUnrecognized)). See
/// the README, "Moving from Plane 0.5.5".
///
/// When every migration of this build is applied, it only reads `_sqlx_migrations`: an
/// application role without DDL privileges can run it. Otherwise it takes sqlx's advisory
/// lock (the one `MIGRATOR.run` takes) and reads again under it, so controllers migrating one
/// database at the same time apply each migration once (and convert a Plane database once).
#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> Result<MigrationReport> {
    let mut conn = pool.acquire().await?;
    let (result, poisoned) = migrate_on(&mut conn).await;
    if poisoned {
        // It may still hold the advisory lock: closing it releases the lock.
        conn.close_on_drop();
    }
    result
}

/// [`migrate`] on one connection. The flag says the connection must not be reused (it failed,
/// or could not release the migration lock, which belongs to the session).
pub(crate) async fn migrate_on(conn: &mut sqlx::PgConnection) -> (Result<MigrationReport>, bool) {
    match migrate_inner(conn).await {
        Ok((report, poisoned)) => (Ok(report), poisoned),
        Err(error) => (Err(error), true),
    }
}

async fn migrate_inner(conn: &mut sqlx::PgConnection) -> Result<(MigrationReport, bool)> {
    use sqlx::migrate::Migrate;
    let known: Vec<&sqlx::migrate::Migration> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let mut poisoned = false;
    let up_to_date = match applied_migrations(&mut *conn).await? {
        // Plane 0.5.5's database: converted under the lock.
        Some(applied) if plane055::is_plane_055(&applied)? => None,
        Some(applied) => Some(plan(&known, &applied)?).filter(|plan| plan.to_apply.is_empty()),
        None => None,
    };
    let report = match up_to_date {
        Some(plan) => plan.report(Vec::new(), None),
        None => {
            conn.lock().await?;
            let outcome = apply_locked(&mut *conn, &known).await?;
            // The advisory lock belongs to the session: a connection that could not release
            // it is closed (which releases it) rather than reused.
            poisoned = conn.unlock().await.is_err();
            outcome
        }
    };
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, "applied schema migrations");
    }
    if !report.newer_unknown.is_empty() {
        tracing::warn!(
            newer = ?report.newer_unknown,
            latest_known = ?report.latest_known,
            "the database has migrations newer than this build's (a newer build applied them); \
             carrying on, since migrations only add to the schema"
        );
    }
    Ok((report, poisoned))
}

/// The migrations recorded as applied, or `None` when `_sqlx_migrations` does not exist yet
/// (a fresh database).
async fn applied_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<Vec<sqlx::migrate::AppliedMigration>>> {
    use sqlx::migrate::{Migrate, MigrateError};
    /// Postgres' `undefined_table` error code.
    const UNDEFINED_TABLE: &str = "42P01";
    match conn.list_applied_migrations().await {
        Ok(applied) => Ok(Some(applied)),
        Err(MigrateError::Execute(sqlx::Error::Database(error)))
            if error.code().as_deref() == Some(UNDEFINED_TABLE) =>
        {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// Under the migration lock: creates `_sqlx_migrations` if needed, plans against what is
/// applied now, and applies what is missing, each migration in its own transaction.
async fn apply_locked(
    conn: &mut sqlx::PgConnection,
    known: &[&sqlx::migrate::Migration],
) -> Result<MigrationReport> {
    use sqlx::migrate::{Migrate, MigrateError};
    conn.ensure_migrations_table().await?;
    if let Some(version) = conn.dirty_version().await? {
        return Err(MigrateError::Dirty(version).into());
    }
    let mut applied = conn.list_applied_migrations().await?;
    // Read under the lock: another controller may have converted it meanwhile.
    let converted = if plane055::is_plane_055(&applied)? {
        let report = plane055::convert(&mut *conn, known).await?;
        applied = conn.list_applied_migrations().await?;
        Some(report)
    } else {
        None
    };
    let plan = plan(known, &applied)?;
    let mut done = Vec::with_capacity(plan.to_apply.len());
    for migration in &plan.to_apply {
        conn.apply(migration).await?;
        done.push(migration.version);
    }
    Ok(plan.report(done, converted))
}

/// What to apply, and the applied migrations newer than this build's.
#[derive(Debug)]
struct Plan<'a> {
    to_apply: Vec<&'a sqlx::migrate::Migration>,
    newer_unknown: Vec<i64>,
    latest_known: Option<i64>,
}

impl Plan<'_> {
    fn report(
        self,
        applied: Vec<i64>,
        converted_from_plane: Option<PlaneConversionReport>,
    ) -> MigrationReport {
        MigrationReport {
            applied,
            newer_unknown: self.newer_unknown,
            latest_known: self.latest_known,
            converted_from_plane,
        }
    }
}

/// Compares this build's migrations with the applied ones (see [`migrate`] for the rules).
fn plan<'a>(
    known: &[&'a sqlx::migrate::Migration],
    applied: &[sqlx::migrate::AppliedMigration],
) -> Result<Plan<'a>, crate::error::SchemaError> {
    use crate::error::SchemaError;
    let latest_known = known.iter().map(|m| m.version).max();
    let mut newer_unknown = Vec::new();
    for record in applied {
        match (
            known.iter().find(|m| m.version == record.version),
            latest_known,
        ) {
            (Some(migration), _) if migration.checksum != record.checksum => {
                return Err(SchemaError::ChecksumMismatch {
                    version: record.version,
                    description: migration.description.to_string(),
                });
            }
            (Some(_), _) => {}
            (None, Some(latest)) if record.version < latest => {
                return Err(SchemaError::UnknownOlder {
                    version: record.version,
                    latest_known: latest,
                });
            }
            (None, _) => newer_unknown.push(record.version),
        }
    }
    newer_unknown.sort_unstable();
    let mut to_apply: Vec<&sqlx::migrate::Migration> = known
        .iter()
        .filter(|m| !applied.iter().any(|record| record.version == m.version))
        .copied()
        .collect();
    to_apply.sort_by_key(|m| m.version);
    if let (Some(missing), Some(&newer)) = (to_apply.first(), newer_unknown.first()) {
        return Err(SchemaError::MissingBeforeNewer {
            version: missing.version,
            newer,
        });
    }
    Ok(Plan {
        to_apply,
        newer_unknown,
        latest_known,
    })
}

#[cfg(test)]
mod migration_plan_tests {
    use super::plan;
    use crate::error::SchemaError;
    use sqlx::migrate::{AppliedMigration, Migration, MigrationType};

    fn migration(version: i64, sql: &'static str) -> Migration {
        Migration::new(
            version,
            format!("m{version}").into(),
            MigrationType::Simple,
            sql.into(),
            false,
        )
    }

    fn applied(migration: &Migration) -> AppliedMigration {
        AppliedMigration {
            version: migration.version,
            checksum: migration.checksum.clone(),
        }
    }

    fn unknown(version: i64) -> AppliedMigration {
        applied(&migration(version, "select 'not ours'"))
    }

    #[test]
    fn a_fresh_database_gets_everything_in_order() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let plan = plan(&[&b, &a], &[]).unwrap();
        let versions: Vec<i64> = plan.to_apply.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![1, 2]);
        assert!(plan.newer_unknown.is_empty());
        assert_eq!(plan.latest_known, Some(2));
    }

    #[test]
    fn newer_unknown_migrations_are_accepted_and_listed() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let plan = plan(
            &[&a, &b],
            &[applied(&a), applied(&b), unknown(3), unknown(4)],
        )
        .unwrap();
        assert!(plan.to_apply.is_empty());
        assert_eq!(plan.newer_unknown, vec![3, 4]);
    }

    #[test]
    fn an_unknown_migration_older_than_ours_is_refused() {
        let (a, c) = (migration(1, "a"), migration(3, "c"));
        let error = plan(&[&a, &c], &[applied(&a), unknown(2), applied(&c)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::UnknownOlder {
                version: 2,
                latest_known: 3
            }
        );
        // Also when ours is not applied yet.
        let error = plan(&[&a, &c], &[applied(&a), unknown(2)]).unwrap_err();
        assert!(matches!(
            error,
            SchemaError::UnknownOlder { version: 2, .. }
        ));
    }

    #[test]
    fn a_missing_migration_under_a_newer_schema_is_refused() {
        let (a, b) = (migration(1, "a"), migration(2, "b"));
        let error = plan(&[&a, &b], &[applied(&a), unknown(3)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::MissingBeforeNewer {
                version: 2,
                newer: 3
            }
        );
    }

    #[test]
    fn an_edited_migration_is_refused() {
        let a = migration(1, "a");
        let edited = migration(1, "a, edited");
        let error = plan(&[&a], &[applied(&edited)]).unwrap_err();
        assert_eq!(
            error,
            SchemaError::ChecksumMismatch {
                version: 1,
                description: "m1".into()
            }
        );
        assert!(error.to_string().contains("checksum"), "{error}");
    }
}
