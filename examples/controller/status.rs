//! `GET /backend/{id}/status` and `GET /backend/{id}/status-stream`: the current status,
//! and the statuses as Server-Sent Events, resumable with `Last-Event-ID` (see "Resuming the
//! status stream" in `main.rs`'s documentation).

use super::error::{backend_id, error_chain, unknown_backend, ApiError};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use plane_db::types::{BackendAddr, BackendName, BackendStatus, BackendStatusStreamEntry};
use plane_db::PlaneDatabase;
use serde::{Deserialize, Serialize};

/// What `GET /backend/{id}/status` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusBody {
    /// The backend.
    pub backend_id: BackendName,
    /// The status number: the `id` of this status's event on the status stream, so a client
    /// can open the stream with `Last-Event-ID` set to it to get only later changes.
    pub event_id: i32,
    /// The status, its termination details and when it was entered.
    #[serde(flatten)]
    pub entry: BackendStatusStreamEntry,
    /// Where the backend listens, once it does (waiting and ready).
    pub address: Option<BackendAddr>,
}

/// `GET /backend/{id}/status`: the backend's current status.
pub async fn status(
    State(db): State<PlaneDatabase>,
    Path(id): Path<String>,
) -> Result<Json<StatusBody>, ApiError> {
    let id = backend_id(id)?;
    let row = db
        .backend()
        .backend(&id)
        .await?
        .ok_or_else(|| unknown_backend(&id))?;
    Ok(Json(StatusBody {
        backend_id: row.id,
        event_id: row.state.status().as_int(),
        entry: BackendStatusStreamEntry::from_state(&row.state, row.last_status_time),
        address: row.state.address(),
    }))
}

/// `GET /backend/{id}/status-stream`: the backend's statuses as Server-Sent Events, resumed
/// after `Last-Event-ID` if the client sends one (see the module documentation).
pub async fn status_stream(
    State(db): State<PlaneDatabase>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = backend_id(id)?;
    let after = last_event_id(&headers)?;
    // Checked first so that an unknown id is answered as `unknown_backend` (404) whatever
    // the library's error for it, and because the 204 below needs to know the backend
    // exists.
    if db.backend().backend(&id).await?.is_none() {
        return Err(unknown_backend(&id));
    }
    if after == Some(BackendStatus::Terminated) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let stream = db.backend().status_stream(&id).await?;
    Ok(Sse::new(status_events(stream, after, id))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The SSE events of a status stream, skipping entries up to and including `after`.
///
/// The library's stream yields strictly increasing statuses, so the status number is a
/// unique, ordered event id and "above `after`" is exactly what the client has not seen.
pub fn status_events(
    stream: impl Stream<Item = BackendStatusStreamEntry> + Send + 'static,
    after: Option<BackendStatus>,
    backend: BackendName,
) -> impl Stream<Item = Result<Event, axum::Error>> + Send + 'static {
    stream
        .filter(move |entry| std::future::ready(after.is_none_or(|seen| entry.status > seen)))
        .map(move |entry| {
            Event::default()
                .id(entry.status.as_int().to_string())
                .json_data(&entry)
                .inspect_err(|error| {
                    // Ends the response; the client resumes from the last id it got.
                    tracing::error!(%backend, error = %error_chain(error), "could not encode a status event");
                })
        })
}

/// The status named by the `Last-Event-ID` header, if the client sent one. Only ids this
/// server hands out (status numbers) are accepted.
fn last_event_id(headers: &HeaderMap) -> Result<Option<BackendStatus>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::bad_request(
            "invalid_last_event_id",
            "Last-Event-ID must be an event id of this stream: a status number (10, 20, … 70)",
        )
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let number: i32 = value.parse().map_err(|_| invalid())?;
    BackendStatus::from_int(number)
        .map(Some)
        .ok_or_else(invalid)
}
