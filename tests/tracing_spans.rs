//! Every database operation runs in a span carrying its identifiers, so an operator can
//! follow one backend through the logs; errors are returned, not logged by the library.
//!
//! A test binary of its own: the capturing subscriber is the process's global default, so
//! no other test's threads can race it for `tracing`'s per-callsite interest cache.

#[path = "it/common.rs"]
#[allow(dead_code)] // The shared fixtures include some this binary does not use.
mod common;

use common::{cluster, drone, request, with_db};
use plane_db::types::{BackendState, TerminationKind, TerminationReason};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// A span as seen by the capturing layer: its name and every field recorded on it.
#[derive(Debug, Clone)]
struct SpanSeen {
    name: &'static str,
    fields: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Captured {
    spans: Arc<Mutex<HashMap<u64, SpanSeen>>>,
    /// Warnings and errors logged by the library: (message and fields).
    loud_events: Arc<Mutex<Vec<String>>>,
}

struct FieldsVisitor<'a>(&'a mut HashMap<String, String>);

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
}

impl<S: Subscriber> Layer<S> for Captured {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut FieldsVisitor(&mut fields));
        self.spans.lock().unwrap().insert(
            id.into_u64(),
            SpanSeen {
                name: attrs.metadata().name(),
                fields,
            },
        );
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.spans.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut FieldsVisitor(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let level = *event.metadata().level();
        if level <= Level::WARN && event.metadata().target().starts_with("plane_db") {
            let mut fields = HashMap::new();
            event.record(&mut FieldsVisitor(&mut fields));
            self.loud_events
                .lock()
                .unwrap()
                .push(format!("{level} {fields:?}"));
        }
    }
}

impl Captured {
    /// The fields of every span named `name`, in no particular order.
    fn spans(&self, name: &str) -> Vec<HashMap<String, String>> {
        self.spans
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.name == name)
            .map(|s| s.fields.clone())
            .collect()
    }

    /// The one span named `name` whose `field` is `value`; panics listing what was seen.
    fn span_with(&self, name: &str, field: &str, value: &str) -> HashMap<String, String> {
        let spans = self.spans(name);
        spans
            .iter()
            .find(|f| f.get(field).map(String::as_str) == Some(value))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} span with {field}={value}; saw {spans:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_run_in_spans_that_carry_their_identifiers() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    with_db(|db| {
        let captured = captured.clone();
        async move {
            let d = drone(&db).await;
            let response = db.connect(&request("traced")).await.unwrap();
            let backend = response.backend_id.to_string();

            let connect = captured.span_with("connect", "backend", &backend);
            assert_eq!(connect["namespace"], "ns");
            assert_eq!(connect["key"], "traced");
            assert_eq!(connect["cluster"], cluster().as_str());
            assert_eq!(connect["drone"], d.name.as_str());

            db.backend()
                .update_state(&response.backend_id, &BackendState::Loading)
                .await
                .unwrap();
            let update = captured.span_with("update_state", "backend", &backend);
            assert_eq!(update["status"], "loading");

            db.backend()
                .route_info_for_token(&response.token)
                .await
                .unwrap();
            captured.span_with("route_info_for_token", "backend", &backend);

            db.drone()
                .heartbeat(d.id, chrono::Utc::now())
                .await
                .unwrap();
            captured.span_with("heartbeat", "drone", &d.id.to_string());

            db.backend_action()
                .request_termination(
                    &response.backend_id,
                    TerminationKind::Soft,
                    TerminationReason::External,
                )
                .await
                .unwrap();
            captured.span_with("request_termination", "backend", &backend);

            db.backend().mark_drone_lost(d.id).await.unwrap();
            captured.span_with("mark_drone_lost", "drone", &d.id.to_string());

            // Spans and metrics share operation names (METRICS.md): every `operation` label
            // of the metrics is the name of a span its call opens.
            db.backend()
                .update_keepalive(&response.backend_id)
                .await
                .unwrap();
            db.backend()
                .route_info_for_static_token(&plane_db::types::BearerToken::from(
                    "s.unknown".to_string(),
                ))
                .await
                .unwrap();
            for operation in plane_db::metrics::OPERATIONS {
                assert!(
                    !captured.spans(operation).is_empty(),
                    "no span named {operation}"
                );
            }
            captured.span_with("update_keepalive", "backend", &backend);

            // A failure is returned to the caller, who logs it once; the library stays quiet.
            let unknown = plane_db::types::NodeId::from(i32::MAX);
            assert!(db.drone().drain(unknown).await.is_err());
            captured.span_with("drain", "drone", &unknown.to_string());
            let loud = captured.loud_events.lock().unwrap().clone();
            assert!(loud.is_empty(), "the library logged: {loud:?}");
        }
    })
    .await
}
