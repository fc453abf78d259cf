//! In-place conversion of a database that Plane 0.5.5 migrated into plane-db's schema.
//!
//! [`migrate`](crate::migrate()) recognises such a database by its `_sqlx_migrations` (exactly
//! Plane 0.5.5's 13 versions, with their checksums) and, under the migration lock, converts
//! it in one transaction ([`convert`]): Plane's tables are set aside, plane-db's schema is
//! created (this build's migrations up to [`CONVERSION_TARGET`]; later ones are applied
//! afterwards as usual), every row is copied over, with the columns plane-db has and Plane
//! lacks derived, the counts are checked, and Plane's tables are dropped. The SQL, with what
//! happens to each table, is in `src/plane055.sql`.

use crate::error::{Error, PlaneConversionError, Result, SchemaError};
use crate::types::BackendStatus;
use sqlx::migrate::{AppliedMigration, Migration};
use sqlx::{Connection, Executor, PgConnection, Row};
use std::time::Instant;

/// Plane 0.5.5's migrations: each version with the SHA-384 of its text, as sqlx records them
/// in `_sqlx_migrations` (Plane embeds them with `sqlx::migrate!`). In order.
const PLANE_055_MIGRATIONS: [(i64, &str); 13] = [
    (20231027092522, "3cf6b491dec62b2d559526117d3193e609f18293d0323eecda2bc3933719ca7c6d3dbc38bfa2ba726a0f85fee3c195e4"),
    (20240105213756, "00a9fc83b2ff2b6f17f521562eb9e8fcb318f98712fe6e6059e182bc9b02d1a1d8e4b4a506346aed46cefc3676f41cef"),
    (20240124120935, "c1731c0323722042ee3fbe7673ef1f7a52b818b3f18e43b9b1abe252c0e5b42d53d6408490510cdc14910cc3bd658d62"),
    (20240127170332, "367ad57b53b932352a85dd315c585c9e5b2603e49c4ea5600823900ac6ad2396116b0f0b1896eb87ed7b50f8fa642631"),
    (20240206210023, "667d7d79ed4c0a6470429ca166d0e388b429885135b2017697d128f1fc46b8c4636824e4e9d5e071be1cdea82abcc93e"),
    (20240207171651, "32e57d06be0fcea8d2c7e38347c6d6b8b6b3e9960cd90fab9d07040eb23673659ba424cf537ef0e481affab0e938d55b"),
    (20240209001513, "432e470b9c1acd82924c6637996eff00e05c7d922408ea872f65063a4f044e88efdc64e6b217247c2893a85b6e593d1c"),
    (20240315193812, "c789f4858a46ee36f13f349f628e26a3c5591e540d58eac349bf472b1347ae0b83bcb2fd5bd7c25643057afc3c069705"),
    (20240319133519, "f0a44331daa7448470cfd227e7c72cee168aacea9fbe6d73c2f4c67381baefe78e168a5bbc3a8ab1b13b9812faa08e56"),
    (20240320144840, "30d2edf9208817c32d1146b016c4035d0c942fd113139446e793df40c3ca37011c23512f164408791b1f6b01fc9b0c56"),
    (20240320175958, "7894cf2eef6f6b1afb7e5457f89b7ec37f2525c45fb68a02895275f3ed42dacb2e894378a7241490ec248252779e84e1"),
    (20240625170232, "7a6d0d2101503105df6e981f6aa9740ff19462967fdc2a4524ea7c6d3d0671d146403711d47fd1e387ac2f187905fd58"),
    (20240709213841, "4e2908e41b1cd52855c3f0e336d2f6834eb1adc6c07063d434ae053d8d6e68dbb44d451dadbc9a1aedb7e9fe7d3d20c8"),
];

/// The schema the conversion produces: this build's migrations up to this version, created
/// in the conversion's transaction. The copy statements are written against it, so it never
/// moves: a later migration is applied after the conversion, like on any plane-db database.
pub(crate) const CONVERSION_TARGET: i64 = 20261128200000;

/// The conversion's SQL, one statement per step (see the file's header).
const SCRIPT: &str = include_str!("plane055.sql");

/// What converting a Plane 0.5.5 database copied, table by table (see
/// [`MigrationReport::converted_from_plane`](crate::MigrationReport::converted_from_plane)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[derive(serde::Serialize)]
pub struct PlaneConversionReport {
    /// Controllers.
    pub controllers: u64,
    /// Nodes (drones, proxies, ACME DNS servers).
    pub nodes: u64,
    /// Older rows of cross-cluster nodes (ACME DNS servers) that Plane registered again
    /// under the same name at each connection, folded into the newest one.
    pub nodes_merged: u64,
    /// Drones.
    pub drones: u64,
    /// Backends.
    pub backends: u64,
    /// Rows of backend state history.
    pub backend_states: u64,
    /// Keys held by backends.
    pub backend_keys: u64,
    /// Backend actions, pending and acknowledged.
    pub backend_actions: u64,
    /// Bearer tokens (now stored as digests).
    pub tokens: u64,
    /// Events.
    pub events: u64,
    /// ACME TXT records.
    pub acme_txt_entries: u64,
}

/// Whether `applied` (a database's `_sqlx_migrations`) is exactly Plane 0.5.5's set, which
/// [`convert`] converts. `false` when it has no Plane migration at all. A database with
/// some Plane migrations but not exactly 0.5.5's is refused: [`SchemaError::PlaneOlder`]
/// when they are the first ones of 0.5.5's, [`SchemaError::PlaneUnrecognized`] otherwise.
pub(crate) fn is_plane_055(applied: &[AppliedMigration]) -> Result<bool, SchemaError> {
    let plane_version = |version: i64| PLANE_055_MIGRATIONS.iter().any(|(v, _)| *v == version);
    if !applied.iter().any(|m| plane_version(m.version)) {
        return Ok(false);
    }
    let mut unexpected: Vec<i64> = applied
        .iter()
        .map(|m| m.version)
        .filter(|&version| !plane_version(version))
        .collect();
    unexpected.sort_unstable();
    let mut edited: Vec<i64> = applied
        .iter()
        .filter(|m| {
            PLANE_055_MIGRATIONS
                .iter()
                .any(|(version, checksum)| *version == m.version && hex(&m.checksum) != *checksum)
        })
        .map(|m| m.version)
        .collect();
    edited.sort_unstable();
    let missing: Vec<i64> = PLANE_055_MIGRATIONS
        .iter()
        .map(|(version, _)| *version)
        .filter(|version| !applied.iter().any(|m| m.version == *version))
        .collect();
    if unexpected.is_empty() && edited.is_empty() && missing.is_empty() {
        return Ok(true);
    }
    // The applied ones are a prefix of 0.5.5's when every missing one comes after them.
    let present = PLANE_055_MIGRATIONS.len() - missing.len();
    let prefix = PLANE_055_MIGRATIONS[present..]
        .iter()
        .all(|(version, _)| missing.contains(version));
    if unexpected.is_empty() && edited.is_empty() && prefix {
        let newest_applied = PLANE_055_MIGRATIONS[present - 1].0;
        return Err(SchemaError::PlaneOlder {
            newest_applied,
            missing,
        });
    }
    Err(SchemaError::PlaneUnrecognized {
        unexpected,
        missing,
        edited,
    })
}

/// Lowercase hexadecimal.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// The conversion script's steps, by name.
struct Script {
    steps: Vec<(&'static str, &'static str)>,
}

impl Script {
    /// Splits the script at its `-- step: <name>` lines; the text before the first is its
    /// header.
    fn parse(text: &'static str) -> Self {
        let steps = text
            .split("\n-- step: ")
            .skip(1)
            .map(|step| match step.split_once('\n') {
                Some((name, sql)) => (name.trim(), sql),
                None => (step.trim(), ""),
            })
            .collect();
        Script { steps }
    }

    fn step(&self, name: &'static str) -> Result<&'static str, PlaneConversionError> {
        self.steps
            .iter()
            .find(|(step, _)| *step == name)
            .map(|(_, sql)| *sql)
            .ok_or(PlaneConversionError::MissingStep(name))
    }
}

/// The steps [`convert`] runs, in order, [`DROP`] aside (a unit test checks the script has
/// exactly these).
#[cfg(test)]
const STEPS: [&str; 17] = [
    LOCK,
    SET_ASIDE,
    UNKNOWN_STATUSES,
    ACTIONS_WITHOUT_BACKEND,
    COUNT,
    "copy controllers",
    "copy nodes",
    "copy drones",
    COPY_BACKENDS,
    "copy backend states",
    "copy keys",
    FENCING_TOKENS,
    "copy actions",
    "copy tokens",
    "copy events",
    "copy ACME TXT records",
    CONTINUE_IDS,
];
const LOCK: &str = "lock Plane's tables";
const SET_ASIDE: &str = "set aside";
const UNKNOWN_STATUSES: &str = "find unknown statuses";
const ACTIONS_WITHOUT_BACKEND: &str = "find actions without a backend";
const COUNT: &str = "count Plane's rows";
const COPY_BACKENDS: &str = "copy backends";
const FENCING_TOKENS: &str = "continue fencing tokens";
const CONTINUE_IDS: &str = "continue ids";
const DROP: &str = "drop Plane's tables";
/// Steps run from Rust, named in errors like the script's.
const CREATE_SCHEMA: &str = "create plane-db's schema";
const RECORD_MIGRATIONS: &str = "record plane-db's migrations";

/// Attaches the step to a database error.
fn at(step: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| PlaneConversionError::Step { step, source }.into()
}

/// Runs a step that takes no parameters; returns the rows it wrote.
async fn run(conn: &mut PgConnection, script: &Script, step: &'static str) -> Result<u64> {
    let result = sqlx::query(script.step(step)?)
        .persistent(false)
        .execute(&mut *conn)
        .await
        .map_err(at(step))?;
    Ok(result.rows_affected())
}

/// Checks that a copy wrote as many rows as Plane's table holds.
fn check_count(table: &'static str, plane: i64, converted: u64) -> Result<u64> {
    if u64::try_from(plane).ok() != Some(converted) {
        return Err(PlaneConversionError::RowCountMismatch {
            table,
            plane,
            converted,
        }
        .into());
    }
    Ok(converted)
}

/// Converts a database that Plane 0.5.5 migrated ([`is_plane_055`]) into plane-db's schema
/// at [`CONVERSION_TARGET`], in one transaction. The caller holds the migration lock and
/// passes this build's migrations.
pub(crate) async fn convert(
    conn: &mut PgConnection,
    known: &[&Migration],
) -> Result<PlaneConversionReport> {
    let started = Instant::now();
    let script = Script::parse(SCRIPT);
    let statuses: Vec<&str> = BackendStatus::ALL.iter().map(|s| s.as_str()).collect();
    let numbers: Vec<i32> = BackendStatus::ALL.iter().map(|s| s.as_int()).collect();
    let mut ours: Vec<&Migration> = known
        .iter()
        .filter(|m| m.version <= CONVERSION_TARGET)
        .copied()
        .collect();
    ours.sort_by_key(|m| m.version);

    let mut tx = conn.begin().await?;
    // A large history may take a while to copy: no statement timeout (a pool's included).
    // The event table's trigger stays silent for the copied rows (nobody listens yet).
    sqlx::query(
        "select set_config('statement_timeout', '0', true), \
                set_config('plane.event_wake', 'deferred', true)",
    )
    .persistent(false)
    .execute(&mut *tx)
    .await?;

    run(&mut tx, &script, LOCK).await?;
    run(&mut tx, &script, SET_ASIDE).await?;

    let unknown = sqlx::query(script.step(UNKNOWN_STATUSES)?)
        .persistent(false)
        .bind(&statuses)
        .fetch_all(&mut *tx)
        .await
        .map_err(at(UNKNOWN_STATUSES))?;
    if let Some(first) = unknown.first() {
        return Err(PlaneConversionError::UnknownStatus {
            backend: first.try_get(0).map_err(at(UNKNOWN_STATUSES))?,
            status: first.try_get(1).map_err(at(UNKNOWN_STATUSES))?,
            others: unknown.len() - 1,
        }
        .into());
    }
    let orphans = sqlx::query(script.step(ACTIONS_WITHOUT_BACKEND)?)
        .persistent(false)
        .fetch_all(&mut *tx)
        .await
        .map_err(at(ACTIONS_WITHOUT_BACKEND))?;
    if let Some(first) = orphans.first() {
        return Err(PlaneConversionError::ActionWithoutBackend {
            action: first.try_get(0).map_err(at(ACTIONS_WITHOUT_BACKEND))?,
            others: orphans.len() - 1,
        }
        .into());
    }
    let counts = sqlx::query(script.step(COUNT)?)
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .map_err(at(COUNT))?;
    let count = |column: &str| -> Result<i64> { counts.try_get(column).map_err(at(COUNT)) };

    // plane-db's schema, recorded as applied in place of Plane's migrations.
    for migration in &ours {
        let applied_in = Instant::now();
        // Several statements: sent as one simple query, as sqlx applies migrations.
        tx.execute(&*migration.sql)
            .await
            .map_err(at(CREATE_SCHEMA))?;
        let elapsed = i64::try_from(applied_in.elapsed().as_nanos()).unwrap_or(i64::MAX);
        sqlx::query(
            "insert into _sqlx_migrations (version, description, success, checksum, execution_time) \
             values ($1, $2, true, $3, $4)",
        )
        .persistent(false)
        .bind(migration.version)
        .bind(&*migration.description)
        .bind(&*migration.checksum)
        .bind(elapsed)
        .execute(&mut *tx)
        .await
        .map_err(at(RECORD_MIGRATIONS))?;
    }
    let plane_versions: Vec<i64> = PLANE_055_MIGRATIONS.iter().map(|(v, _)| *v).collect();
    sqlx::query("delete from _sqlx_migrations where version = any($1)")
        .persistent(false)
        .bind(&plane_versions)
        .execute(&mut *tx)
        .await
        .map_err(at(RECORD_MIGRATIONS))?;

    let controllers = check_count(
        "controller",
        count("controllers")?,
        run(&mut tx, &script, "copy controllers").await?,
    )?;
    let nodes = check_count(
        "node",
        count("nodes_kept")?,
        run(&mut tx, &script, "copy nodes").await?,
    )?;
    let nodes_merged = u64::try_from(count("nodes")?)
        .unwrap_or(0)
        .saturating_sub(nodes);
    let drones = check_count(
        "drone",
        count("drones")?,
        run(&mut tx, &script, "copy drones").await?,
    )?;
    let copied_backends = sqlx::query(script.step(COPY_BACKENDS)?)
        .persistent(false)
        .bind(&statuses)
        .bind(&numbers)
        .execute(&mut *tx)
        .await
        .map_err(at(COPY_BACKENDS))?
        .rows_affected();
    let backends = check_count("backend", count("backends")?, copied_backends)?;
    let backend_states = check_count(
        "backend_state",
        count("backend_states")?,
        run(&mut tx, &script, "copy backend states").await?,
    )?;
    let backend_keys = check_count(
        "backend_key",
        count("backend_keys")?,
        run(&mut tx, &script, "copy keys").await?,
    )?;
    run(&mut tx, &script, FENCING_TOKENS).await?;
    let backend_actions = check_count(
        "backend_action",
        count("backend_actions")?,
        run(&mut tx, &script, "copy actions").await?,
    )?;
    let tokens = check_count(
        "token",
        count("tokens")?,
        run(&mut tx, &script, "copy tokens").await?,
    )?;
    let events = check_count(
        "event",
        count("events")?,
        run(&mut tx, &script, "copy events").await?,
    )?;
    let acme_txt_entries = check_count(
        "acme_txt_entries",
        count("acme_txt_entries")?,
        run(&mut tx, &script, "copy ACME TXT records").await?,
    )?;
    run(&mut tx, &script, CONTINUE_IDS).await?;
    run(&mut tx, &script, DROP).await?;
    tx.commit().await?;

    let report = PlaneConversionReport {
        controllers,
        nodes,
        nodes_merged,
        drones,
        backends,
        backend_states,
        backend_keys,
        backend_actions,
        tokens,
        events,
        acme_txt_entries,
    };
    tracing::info!(
        ?report,
        schema_version = CONVERSION_TARGET,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "converted a database that Plane 0.5.5 migrated into plane-db's schema, in place"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn applied(version: i64, checksum: &str) -> AppliedMigration {
        let bytes: Vec<u8> = (0..checksum.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&checksum[i..i + 2], 16).unwrap())
            .collect();
        AppliedMigration {
            version,
            checksum: Cow::Owned(bytes),
        }
    }

    fn plane(count: usize) -> Vec<AppliedMigration> {
        PLANE_055_MIGRATIONS[..count]
            .iter()
            .map(|(version, checksum)| applied(*version, checksum))
            .collect()
    }

    #[test]
    fn exactly_plane_055_is_converted_and_a_database_without_plane_is_not_plane() {
        assert_eq!(is_plane_055(&plane(13)), Ok(true));
        assert_eq!(is_plane_055(&[]), Ok(false));
        let ours = applied(20261128000000, &"00".repeat(48));
        assert_eq!(is_plane_055(&[ours]), Ok(false));
    }

    #[test]
    fn an_older_plane_is_refused_as_older() {
        let error = is_plane_055(&plane(11)).unwrap_err();
        assert_eq!(
            error,
            SchemaError::PlaneOlder {
                newest_applied: 20240320175958,
                missing: vec![20240625170232, 20240709213841],
            }
        );
        let message = error.to_string();
        assert!(message.contains("older than 0.5.5"), "{message}");
        assert!(
            message.contains("20240625170232, 20240709213841"),
            "{message}"
        );
    }

    #[test]
    fn extra_gaps_and_edits_are_refused_as_unrecognized() {
        let mut extra = plane(13);
        extra.push(applied(20240801000000, &"ab".repeat(48)));
        assert_eq!(
            is_plane_055(&extra),
            Err(SchemaError::PlaneUnrecognized {
                unexpected: vec![20240801000000],
                missing: vec![],
                edited: vec![],
            })
        );
        let mut gap = plane(13);
        gap.remove(3);
        assert!(matches!(
            is_plane_055(&gap),
            Err(SchemaError::PlaneUnrecognized { ref missing, .. }) if missing == &vec![20240127170332]
        ));
        let mut edited = plane(13);
        edited[0] = applied(PLANE_055_MIGRATIONS[0].0, &"cd".repeat(48));
        let error = is_plane_055(&edited).unwrap_err();
        assert!(matches!(
            error,
            SchemaError::PlaneUnrecognized { ref edited, .. } if edited == &vec![20231027092522]
        ));
        assert!(
            error.to_string().contains("exactly Plane 0.5.5's"),
            "{error}"
        );
    }

    #[test]
    fn the_script_has_exactly_the_steps_convert_runs() {
        let script = Script::parse(SCRIPT);
        let names: Vec<&str> = script.steps.iter().map(|(name, _)| *name).collect();
        let mut expected: Vec<&str> = STEPS.to_vec();
        expected.push(DROP);
        assert_eq!(names, expected);
        for (name, sql) in &script.steps {
            assert!(
                sql.lines()
                    .any(|line| !line.trim().is_empty() && !line.starts_with("--")),
                "step {name:?} has no statement"
            );
        }
        assert!(matches!(
            script.step("no such step"),
            Err(PlaneConversionError::MissingStep("no such step"))
        ));
    }

    #[test]
    fn the_conversion_target_is_one_of_our_migrations_and_all_up_to_it_run_in_a_transaction() {
        let ours: Vec<&Migration> = crate::MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .collect();
        assert!(ours.iter().any(|m| m.version == CONVERSION_TARGET));
        for migration in ours.iter().filter(|m| m.version <= CONVERSION_TARGET) {
            assert!(
                !migration.no_tx,
                "migration {} cannot run inside the conversion's transaction",
                migration.version
            );
        }
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
    }
}
