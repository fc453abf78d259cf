//! The checks every request passes before a route sees it, against other web pages: any page
//! a developer visits can send requests to 127.0.0.1, and a DNS name its owner points at
//! 127.0.0.1 (DNS rebinding) even makes them same-origin for the browser.
//!
//! - **Host.** Every request's `Host` must be one this controller serves (its listen address,
//!   `localhost:PORT`, `127.0.0.1:PORT`, `[::1]:PORT`, and those given with
//!   `--allowed-host`), else 421 `unknown_host`. A rebound DNS name arrives with its own
//!   name as the Host, so this is what defeats DNS rebinding, for reads as well as writes.
//! - **Origin.** A state-changing request (any method but GET, HEAD and OPTIONS) that carries
//!   an `Origin` must come from `http://` one of those hosts (or `https://` one given with
//!   `--allowed-host`, for a reverse proxy that terminates TLS), else 403 `forbidden_origin`.
//!   Browsers send `Origin` on every such request, same-origin ones included.
//! - **JSON bodies only.** A state-changing request must say `Content-Type:
//!   application/json`, else 415 `unsupported_media_type`. A page can send a cross-site POST
//!   without asking the server first only with a form's content types (`text/plain`,
//!   form-encoded, multipart); `application/json` makes the browser ask first (a CORS
//!   preflight), which this controller never grants.
//! - **Bounded bodies.** At most [`MAX_BODY_BYTES`], else 413 `body_too_large`, checked on
//!   `Content-Length` before anything is read, and while reading a body without one.
//!
//! None of this is authentication: a local program, or anyone who can reach the port, can
//! still do everything. See "Authentication" in `main.rs`'s documentation.

use super::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// The largest request body accepted: room for a connect request at the library's limits
/// (`plane_db::limits`: `auth` and `spawn_config.executable` up to 64 KiB each, keys and
/// names a few KiB more), with JSON's escaping on top; far below what would strain memory.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The hosts (and so the origins) this controller answers to. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RequestGuard {
    /// `Host` values accepted, lowercase, exactly as a client sends them (`name:port`, or
    /// `name` alone for port 80).
    hosts: Arc<HashSet<String>>,
    /// `Origin` values accepted on state-changing requests, lowercase.
    origins: Arc<HashSet<String>>,
}

impl RequestGuard {
    /// The guard of a controller listening on `listen`, also accepting the `extra` hosts
    /// (`--allowed-host`: a name a client uses for it, such as a port-forward's
    /// `127.0.0.1:9999` or a reverse proxy's `controller.example.com`).
    pub fn new(listen: SocketAddr, extra: &[String]) -> RequestGuard {
        let port = listen.port();
        let mut hosts: Vec<String> = vec![
            listen.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        // A client leaves out the port when it is the scheme's default.
        if port == 80 {
            hosts.extend(
                hosts
                    .clone()
                    .into_iter()
                    .filter_map(|host| host.strip_suffix(":80").map(str::to_string)),
            );
        }
        let extra: Vec<String> = extra
            .iter()
            .map(|host| host.trim().to_ascii_lowercase())
            .collect();
        let origins = hosts
            .iter()
            .map(|host| format!("http://{host}"))
            .chain(
                extra
                    .iter()
                    .flat_map(|host| [format!("http://{host}"), format!("https://{host}")]),
            )
            .collect();
        hosts.extend(extra);
        RequestGuard {
            hosts: Arc::new(hosts.into_iter().collect()),
            origins: Arc::new(origins),
        }
    }

    /// The accepted `Host` values, sorted (for the start-up message).
    pub fn hosts(&self) -> Vec<&str> {
        let mut hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        hosts.sort_unstable();
        hosts
    }

    /// Refuses a request whose Host is not served (421).
    fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim().to_ascii_lowercase());
        match host {
            Some(host) if self.hosts.contains(&host) => Ok(()),
            // The value is not echoed: the log line is enough, and the answer goes to
            // whoever sent it anyway.
            _ => Err(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                "this controller does not serve that Host; start it with --allowed-host NAME \
                 to reach it under another name",
            )),
        }
    }

    /// Refuses a state-changing request from a foreign origin (403), or without a JSON
    /// content type (415), or with a `Content-Length` over the limit (413).
    fn check_write(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if let Some(origin) = headers.get(header::ORIGIN) {
            // `Origin: null` (a sandboxed frame, a file: page) is foreign too.
            let allowed = origin
                .to_str()
                .is_ok_and(|origin| self.origins.contains(&origin.trim().to_ascii_lowercase()));
            if !allowed {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden_origin",
                    "requests that change state are accepted only from this controller's \
                     own pages",
                ));
            }
        }
        if !is_json(headers) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON, with Content-Type: application/json ({} when there \
                 is nothing to say)",
            ));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        Ok(())
    }
}

/// `application/json`, with parameters (`; charset=utf-8`) or not, in any case.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("a request body may hold at most {MAX_BODY_BYTES} bytes"),
    )
}

/// The middleware (`axum::middleware::from_fn_with_state`) that applies the checks of the
/// module documentation, then passes the request on with its body read (bounded).
pub async fn guard(State(guard): State<RequestGuard>, request: Request, next: Next) -> Response {
    if let Err(refused) = guard.check_host(request.headers()) {
        return refused.into_response();
    }
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    if let Err(refused) = guard.check_write(request.headers()) {
        return refused.into_response();
    }
    // Read here, so that a body sent without a Content-Length (chunked) is bounded too and
    // refused in the same JSON form; the routes then read it from memory.
    let (parts, body) = request.into_parts();
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // The client went away or sent a broken body: nobody may read the answer.
            Err(error) => {
                return ApiError::bad_request(
                    "invalid_body",
                    format!("could not read the body: {error}"),
                )
                .into_response()
            }
        };
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return too_large().into_response();
        }
        bytes.extend_from_slice(&chunk);
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
