//! `GET /`: the live page, one static HTML document with inline JavaScript (`page.html`).

use axum::http::header;
use axum::response::IntoResponse;

/// The page `GET /` serves: one static document, no framework and no build step. It lists
/// the backends (`GET /backends`) and follows each live one over its status stream with the
/// browser's own `EventSource`, which reconnects by itself after a dropped connection and
/// sends `Last-Event-ID`, so the server resumes after the last status shown. Every status
/// received is appended to the backend's "seen" list as it arrives (nothing is filtered
/// client-side), so a status shown twice or missing would be visible there. Browsers allow
/// about six connections per host over HTTP/1.1, so it follows at most five backends at once
/// and keeps one connection for its own requests.
const PAGE: &str = include_str!("page.html");

/// `GET /`: the live page ([`PAGE`]).
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
