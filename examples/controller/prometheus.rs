//! `GET /metrics`: the library's metrics in Prometheus text format (see METRICS.md).

use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::time::Duration;

/// Histogram buckets of every `…_seconds` metric: 1 ms to 30 s, so that a dashboard can
/// compute quantiles (`histogram_quantile`) across controllers.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus recorder for the library's metrics, with histogram buckets for durations.
/// `main` installs it process-wide; the HTTP test installs one for its own thread.
pub fn prometheus_recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), SECONDS_BUCKETS)
        // Only an empty bucket list is refused, and this one is not empty.
        .unwrap_or_else(|_| PrometheusBuilder::new())
        .build_recorder()
}

/// `GET /metrics`: what `handle`'s recorder holds, in Prometheus text format.
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(|State(handle): State<PrometheusHandle>| async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
        })
        .with_state(handle),
    )
}

/// Folds recorded histogram samples into their buckets every few seconds, so that memory
/// stays bounded between scrapes.
pub async fn metrics_upkeep(handle: PrometheusHandle) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        handle.run_upkeep();
    }
}
