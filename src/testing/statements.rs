//! Hooks for the tests that compare group commit's statements (`tests/it/batch_statements.rs`):
//! the lone statement and the batch statement of `connect` and of `update_state`, run
//! directly on the same items, so that a test can compare every row they write. Hidden from
//! the docs; not part of the API.
//!
//! The items are built by the crate's own constructors (those `connect` and `update_state`
//! use), with the random parts `connect` draws (tokens, the spawn action's name) derived
//! from the backend's name instead, so that two databases given the same calls hold the same
//! rows.

use crate::backend::state_write::{self, StateChange};
use crate::connect::spawn::NewBackend;
use crate::connect::ConnectRequest;
use crate::error::{Error, Result};
use crate::types::{BackendActionName, BackendName, BackendState, BearerToken, SecretToken};
use crate::PlaneDatabase;

/// Which statements a hook writes its items with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Each item in the lone statement (a call written alone).
    Alone,
    /// All items in one batch statement (they must have distinct lock keys).
    OneBatch,
    /// Each item in a batch statement of its own.
    BatchesOfOne,
}

/// Writes a new backend for each of `requests` with `connect`'s spawn statements, in order,
/// on one connection (each statement its own transaction). Each request needs a key, a spawn
/// config with a backend name and a cluster. Returns what the statement said of each item
/// (`SpawnOutcome`'s `Debug`).
pub async fn spawn(
    db: &PlaneDatabase,
    requests: &[ConnectRequest],
    written: Written,
) -> Result<Vec<String>> {
    let mut items = Vec::with_capacity(requests.len());
    for request in requests {
        items.push(new_backend(db, request)?);
    }
    let spawns = db.context().spawner().statements();
    let mut conn = db.pool().acquire().await?;
    let mut outcomes = Vec::with_capacity(items.len());
    match written {
        Written::Alone => {
            for item in &items {
                outcomes.push(spawns.spawn_one(&mut conn, item).await?);
            }
        }
        Written::OneBatch => {
            let all: Vec<&NewBackend> = items.iter().collect();
            outcomes = spawns.spawn_many(&mut conn, &all).await?;
        }
        Written::BatchesOfOne => {
            for item in &items {
                outcomes.extend(spawns.spawn_many(&mut conn, &[item]).await?);
            }
        }
    }
    Ok(outcomes.iter().map(|o| format!("{o:?}")).collect())
}

/// The item `connect` would write for `request`, its random parts derived from the name.
fn new_backend(db: &PlaneDatabase, request: &ConnectRequest) -> Result<NewBackend> {
    let missing = |argument: &'static str| Error::InvalidArgument {
        argument,
        reason: "required by the test hook".into(),
    };
    let key = request.key.as_ref().ok_or_else(|| missing("key"))?;
    let spawn = request
        .spawn_config
        .as_ref()
        .ok_or_else(|| missing("spawn_config"))?;
    let backend_id = spawn.id.clone().ok_or_else(|| missing("spawn_config.id"))?;
    let cluster = spawn
        .cluster
        .as_ref()
        .or(db.config().default_cluster.as_ref())
        .ok_or_else(|| missing("spawn_config.cluster"))?;
    let (token, secret) = if spawn.use_static_token {
        (
            BearerToken::from(format!("{}{backend_id}", BearerToken::STATIC_PREFIX)),
            None,
        )
    } else {
        (
            BearerToken::from(format!("token-{backend_id}")),
            Some(SecretToken::from(format!("secret-{backend_id}"))),
        )
    };
    let action_id: BackendActionName = format!("{}{backend_id}", BackendActionName::PREFIX)
        .parse()
        .map_err(|e| Error::InvalidArgument {
            argument: "spawn_config.id",
            reason: format!("too long for the test hook's action name: {e}"),
        })?;
    NewBackend::for_request(
        backend_id,
        key,
        cluster,
        spawn,
        request,
        &token,
        secret.as_ref(),
        action_id,
    )
}

/// Applies `changes` with `update_state`'s statements, in order, on one connection (each
/// statement its own transaction). Returns, per change, whether it was applied (`None`: the
/// batch statement skipped it, its row locked elsewhere).
pub async fn update_state(
    db: &PlaneDatabase,
    changes: &[(BackendName, BackendState)],
    written: Written,
) -> Result<Vec<Option<bool>>> {
    let mut items = Vec::with_capacity(changes.len());
    for (backend, new_state) in changes {
        items.push(StateChange::new(backend, new_state)?);
    }
    let wake = db.context().state_writer().statements().wake;
    let mut conn = db.pool().acquire().await?;
    let mut applied = Vec::with_capacity(items.len());
    match written {
        Written::Alone => {
            for item in &items {
                applied.push(Some(
                    state_write::write_single(&mut conn, item, wake).await?,
                ));
            }
        }
        Written::OneBatch => {
            let all: Vec<&StateChange> = items.iter().collect();
            applied = state_write::write_statement(&mut conn, &all, wake).await?;
        }
        Written::BatchesOfOne => {
            for item in &items {
                applied.extend(state_write::write_statement(&mut conn, &[item], wake).await?);
            }
        }
    }
    Ok(applied)
}
