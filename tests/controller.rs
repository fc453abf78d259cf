//! The example HTTP controller (examples/controller/), driven over TCP with a real HTTP
//! client, on a fresh database each: connect, status, the SSE status stream (exact ids,
//! resumption with `Last-Event-ID`, end at termination), terminate, route lookups, the
//! error answers, and the demo drone the README walkthrough relies on.

#[path = "../examples/controller/main.rs"]
#[allow(dead_code)] // `main` and the command line are not used here.
mod controller;

#[path = "controller/browser.rs"]
mod browser;

#[path = "it/common.rs"]
#[allow(dead_code)] // The shared fixtures include some this binary does not use.
mod common;

use common::*;
use controller::RequestGuard;
use plane_db::types::{
    BackendAction, BackendAddr, BackendName, BackendState, BackendStatus, BackendStatusStreamEntry,
    ControllerName, TerminationKind, TerminationReason,
};
use plane_db::PlaneDatabase;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::future::IntoFuture;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single read may take before the test fails instead of hanging. Only a
/// bound: nothing asserts on timing.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The controller's router served on 127.0.0.1 on a free port.
struct Server {
    base: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// A port bound for a server, whose address its request guard needs (as in `main`).
struct Bound {
    listener: tokio::net::TcpListener,
    address: std::net::SocketAddr,
}

impl Bound {
    /// The guard `main` builds for this address, with `extra` as `--allowed-host`.
    fn guard(&self, extra: &[&str]) -> RequestGuard {
        let extra: Vec<String> = extra.iter().map(|host| host.to_string()).collect();
        RequestGuard::new(self.address, &extra)
    }

    async fn serve(self, app: axum::Router) -> Server {
        let listener = self.listener;
        let base = format!("http://{}", self.address);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Server {
            base,
            shutdown,
            task,
        }
    }
}

impl Server {
    async fn bind() -> Bound {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        Bound { listener, address }
    }

    /// The controller as `main` serves it, without `/metrics`.
    async fn start(db: &PlaneDatabase) -> Server {
        let bound = Server::bind().await;
        let app = controller::router(db.clone(), bound.guard(&[]), None);
        bound.serve(app).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops accepting, waits for the open connections to finish (every stream a test
    /// leaves open has ended by then), so the database can be dropped.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        tokio::time::timeout(STEP_TIMEOUT, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<String>,
    data: String,
}

impl SseEvent {
    fn entry(&self) -> BackendStatusStreamEntry {
        serde_json::from_str(&self.data).unwrap()
    }

    /// The event id and the status it carries.
    fn id_and_status(&self) -> (i32, BackendStatus) {
        let id = self.id.as_deref().expect("every event has an id");
        (id.parse().unwrap(), self.entry().status)
    }
}

/// A minimal SSE client over a streamed reqwest response.
struct SseClient {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseClient {
    async fn open(client: &Client, url: &str, last_event_id: Option<&str>) -> SseClient {
        let mut request = client.get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseClient {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event (comments such as keep-alives are skipped), or `None` once the server
    /// has ended the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(std::str::from_utf8(&block).unwrap()) {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(STEP_TIMEOUT, self.response.chunk())
                .await
                .expect("an event or the end of the stream")
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    assert!(self.buffer.is_empty(), "stream ended inside an event");
                    return None;
                }
            }
        }
    }

    /// Every remaining event, until the server ends the stream.
    async fn rest(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_string()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    data.map(|data| SseEvent { id, data })
}

fn ids_and_statuses(events: &[SseEvent]) -> Vec<(i32, BackendStatus)> {
    events.iter().map(SseEvent::id_and_status).collect()
}

fn pairs(statuses: &[BackendStatus]) -> Vec<(i32, BackendStatus)> {
    statuses.iter().map(|s| (s.as_int(), *s)).collect()
}

/// Sends a request and returns the status code and JSON body.
async fn json_of(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json::<Value>().await.unwrap();
    (status, body)
}

/// Asserts an error answer: the status code and the error code of the JSON body.
async fn assert_error(request: reqwest::RequestBuilder, status: StatusCode, code: &str) {
    let (got, body) = json_of(request).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn backend_of(body: &Value) -> BackendName {
    body["backend_id"].as_str().unwrap().parse().unwrap()
}

fn ready_address() -> BackendAddr {
    BackendAddr(addr(8080))
}

/// The states a drone reports on its way to ready.
fn startup() -> Vec<BackendState> {
    let waiting = BackendState::Starting.to_waiting(addr(8080));
    vec![
        BackendState::Loading,
        BackendState::Starting,
        waiting.clone(),
        waiting.to_ready(ready_address()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stream_resumes_exactly_and_ends_at_termination() {
    with_db(|db| async move {
        let drone = drone(&db).await;
        let server = Server::start(&db).await;
        let client = Client::new();

        let (status, body) =
            json_of(client.post(server.url("/connect")).json(&request("doc-1"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["spawned"], true);
        assert_eq!(body["status"], "scheduled");
        assert_eq!(body["drone"], drone.name.as_str());
        assert!(body["token"].as_str().is_some_and(|t| !t.is_empty()));
        let backend = backend_of(&body);
        let stream_url = format!("/backend/{backend}/status-stream");
        assert_eq!(body["status_stream_url"], stream_url);
        let stream_url = server.url(&stream_url);

        // The same key again: the same backend, not created again.
        let (status, again) =
            json_of(client.post(server.url("/connect")).json(&request("doc-1"))).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(backend_of(&again), backend);
        assert_eq!(again["spawned"], false);

        let (status, body) =
            json_of(client.get(server.url(&format!("/backend/{backend}/status")))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["backend_id"], backend.as_str());
        assert_eq!(body["status"], "scheduled");
        assert_eq!(body["event_id"], 10);
        assert_eq!(body["address"], Value::Null);

        // History first, then each state as the drone writes it, with its status number.
        let mut stream = SseClient::open(&client, &stream_url, None).await;
        let first = stream.next().await.unwrap();
        assert_eq!(first.id_and_status(), (10, BackendStatus::Scheduled));
        let startup = startup();
        for (state, id) in startup[..2].iter().zip([20, 30]) {
            assert!(db.backend().update_state(&backend, state).await.unwrap());
            let event = stream.next().await.unwrap();
            assert_eq!(event.id_and_status(), (id, state.status()));
        }

        // The client goes away after event 30; the drone carries on meanwhile.
        drop(stream);
        for state in &startup[2..] {
            assert!(db.backend().update_state(&backend, state).await.unwrap());
        }
        let (_, body) =
            json_of(client.get(server.url(&format!("/backend/{backend}/status")))).await;
        assert_eq!(body["status"], "ready");
        assert_eq!(body["event_id"], 50);
        assert_eq!(body["address"], ready_address().to_string());

        // Resuming after 30 gives 40 and 50: nothing seen again, nothing skipped.
        let mut resumed = SseClient::open(&client, &stream_url, Some("30")).await;
        let mut got = vec![resumed.next().await.unwrap(), resumed.next().await.unwrap()];
        assert_eq!(
            ids_and_statuses(&got),
            pairs(&[BackendStatus::Waiting, BackendStatus::Ready])
        );

        // Terminate through the controller; the drone finds the action and reports.
        let (status, body) = json_of(
            client
                .post(server.url(&format!("/backend/{backend}/terminate")))
                .json(&json!({"kind": "soft"})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["result"], "requested");
        assert_eq!(body["kind"], "soft");
        assert_eq!(body["drone_id"], json!(drone.id));
        let action_id = body["action_id"].as_str().unwrap();
        let queued = db.backend_action().pending(drone.id, 10).await.unwrap();
        let action = queued
            .iter()
            .find(|a| a.action_id.as_str() == action_id)
            .expect("the terminate action is queued for the drone");
        assert_eq!(action.backend_id, backend);
        assert_eq!(
            action.action,
            BackendAction::Terminate {
                kind: TerminationKind::Soft,
                reason: TerminationReason::External
            }
        );
        let terminating = startup[3].to_terminating(TerminationReason::External);
        assert!(db
            .backend()
            .update_state(&backend, &terminating)
            .await
            .unwrap());
        assert!(db
            .backend()
            .update_state(&backend, &terminating.to_terminated(Some(0)))
            .await
            .unwrap());

        // The resumed stream carries on to the end and then closes.
        got.extend(resumed.rest().await);
        assert_eq!(
            ids_and_statuses(&got),
            pairs(&[
                BackendStatus::Waiting,
                BackendStatus::Ready,
                BackendStatus::Terminating,
                BackendStatus::Terminated
            ])
        );
        let last = got.last().unwrap().entry();
        assert_eq!(last.termination_reason, Some(TerminationReason::External));
        assert_eq!(last.termination_kind, Some(TerminationKind::Soft));
        assert_eq!(last.exit_error, Some(false));

        // A new client gets the whole history, and the stream ends by itself.
        let all = SseClient::open(&client, &stream_url, None)
            .await
            .rest()
            .await;
        let mut everything = vec![BackendStatus::Scheduled];
        everything.extend(startup.iter().map(BackendState::status));
        everything.extend([BackendStatus::Terminating, BackendStatus::Terminated]);
        assert_eq!(ids_and_statuses(&all), pairs(&everything));

        // Resuming from any event gives exactly what follows it.
        for (i, status) in everything.iter().enumerate() {
            let id = status.as_int().to_string();
            if *status == BackendStatus::Terminated {
                continue;
            }
            let rest = SseClient::open(&client, &stream_url, Some(&id))
                .await
                .rest()
                .await;
            assert_eq!(
                ids_and_statuses(&rest),
                pairs(&everything[i + 1..]),
                "after {id}"
            );
        }

        // After the last event there is nothing more: 204 tells the client to stop.
        let response = client
            .get(&stream_url)
            .header("Last-Event-ID", "70")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);

        let (status, body) = json_of(
            client
                .post(server.url(&format!("/backend/{backend}/terminate")))
                .json(&json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["result"], "already_terminated");
        assert_eq!(body["action_id"], Value::Null);

        drop(client);
        server.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_lookup_by_path_and_header() {
    with_db(|db| async move {
        drone(&db).await;
        let server = Server::start(&db).await;
        let client = Client::new();
        let (status, body) =
            json_of(client.post(server.url("/connect")).json(&request("doc-2"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let backend = backend_of(&body);
        let token = body["token"].as_str().unwrap().to_string();
        let secret = body["secret_token"].clone();
        assert!(secret.as_str().is_some_and(|s| !s.is_empty()));

        // Not ready yet: pending, without an address.
        let (status, route) = json_of(client.get(server.url(&format!("/route/{token}")))).await;
        assert_eq!(status, StatusCode::OK, "{route}");
        assert_eq!(route["status"], "pending");
        assert_eq!(route["backend_id"], backend.as_str());
        assert_eq!(route["address"], Value::Null);
        assert_eq!(route["secret_token"], secret);
        assert_eq!(route["user"], "alice");
        assert_eq!(route["cluster"], cluster().to_string());

        for state in startup() {
            assert!(db.backend().update_state(&backend, &state).await.unwrap());
        }
        let (status, by_path) = json_of(client.get(server.url(&format!("/route/{token}")))).await;
        assert_eq!(status, StatusCode::OK, "{by_path}");
        assert_eq!(by_path["status"], "ready");
        assert_eq!(by_path["address"], ready_address().to_string());
        assert_eq!(by_path["secret_token"], secret);
        let (status, by_header) =
            json_of(client.get(server.url("/route")).bearer_auth(&token)).await;
        assert_eq!(status, StatusCode::OK, "{by_header}");
        assert_eq!(by_header, by_path);

        // Unknown tokens, and a header that carries none.
        assert_error(
            client.get(server.url("/route/not-a-token-we-issued")),
            StatusCode::NOT_FOUND,
            "unknown_token",
        )
        .await;
        assert_error(
            client.get(server.url("/route")).bearer_auth("s.unknown"),
            StatusCode::NOT_FOUND,
            "unknown_token",
        )
        .await;
        assert_error(
            client.get(server.url("/route")),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;

        // Once the backend is terminating, its token routes nowhere.
        let terminating = startup()[3].to_terminating(TerminationReason::External);
        assert!(db
            .backend()
            .update_state(&backend, &terminating)
            .await
            .unwrap());
        assert_error(
            client.get(server.url(&format!("/route/{token}"))),
            StatusCode::NOT_FOUND,
            "unknown_token",
        )
        .await;

        drop(client);
        server.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_unknown_ids_and_no_drone() {
    with_db(|db| async move {
        let server = Server::start(&db).await;
        let client = Client::new();
        let connect = || client.post(server.url("/connect"));

        // No drone yet: nothing can be scheduled.
        assert_error(
            connect().json(&request("doc-3")),
            StatusCode::SERVICE_UNAVAILABLE,
            "no_drone",
        )
        .await;
        drone(&db).await;

        assert_error(
            connect()
                .header("content-type", "application/json")
                .body("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert_error(
            connect().json(&json!({})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        let mut bad_cluster = serde_json::to_value(request("doc-3")).unwrap();
        bad_cluster["spawn_config"]["cluster"] = json!("not a cluster!");
        assert_error(
            connect().json(&bad_cluster),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        let mut bad_idle = request("doc-3");
        if let Some(spawn) = &mut bad_idle.spawn_config {
            spawn.max_idle_seconds = Some(-1);
        }
        assert_error(
            connect().json(&bad_idle),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        )
        .await;
        // Only a key, and no backend holds it.
        let mut no_spawn = request("doc-nobody");
        no_spawn.spawn_config = None;
        assert_error(
            connect().json(&no_spawn),
            StatusCode::NOT_FOUND,
            "no_backend",
        )
        .await;
        // The key is held under another tag.
        let (status, _) = json_of(connect().json(&request("doc-3"))).await;
        assert_eq!(status, StatusCode::CREATED);
        let mut other_tag = request("doc-3");
        if let Some(key) = &mut other_tag.key {
            key.tag = "v2".into();
        }
        assert_error(connect().json(&other_tag), StatusCode::CONFLICT, "key_held").await;

        // Backend ids: malformed, and well-formed but unknown.
        let unknown = BackendName::new_random();
        for path in ["status", "status-stream"] {
            assert_error(
                client.get(server.url(&format!("/backend/Not_A_Name/{path}"))),
                StatusCode::BAD_REQUEST,
                "invalid_backend_id",
            )
            .await;
            assert_error(
                client.get(server.url(&format!("/backend/{unknown}/{path}"))),
                StatusCode::NOT_FOUND,
                "unknown_backend",
            )
            .await;
        }
        assert_error(
            client
                .post(server.url("/backend/Not_A_Name/terminate"))
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
            "invalid_backend_id",
        )
        .await;
        assert_error(
            client
                .post(server.url(&format!("/backend/{unknown}/terminate")))
                .json(&json!({})),
            StatusCode::NOT_FOUND,
            "unknown_backend",
        )
        .await;

        // A live backend, asked badly.
        let backend = spawn(&db).await.backend_id;
        for bad_id in ["abc", "15", "-1", "99999999999"] {
            assert_error(
                client
                    .get(server.url(&format!("/backend/{backend}/status-stream")))
                    .header("Last-Event-ID", bad_id),
                StatusCode::BAD_REQUEST,
                "invalid_last_event_id",
            )
            .await;
        }
        for bad_body in [
            r#"{"kind": "medium"}"#,
            r#"{"kind": "soft", "now": true}"#,
            "[",
            "",
        ] {
            assert_error(
                client
                    .post(server.url(&format!("/backend/{backend}/terminate")))
                    .header("content-type", "application/json")
                    .body(bad_body),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            )
            .await;
        }
        // None of those queued anything.
        assert_eq!(
            count(&db, "backend_action where action ? 'Terminate'").await,
            0
        );

        assert_error(
            client.get(server.url("/no/such/route")),
            StatusCode::NOT_FOUND,
            "no_such_route",
        )
        .await;

        drop(client);
        server.stop().await;
    })
    .await
}

/// The request guard: what another web page could send (a form's content types, a body
/// without limit, a foreign Host after DNS rebinding, a foreign Origin) is refused with a
/// JSON error and changes nothing; the controller's own origin, and a host allowed with
/// `--allowed-host`, work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_other_pages_could_send_are_refused() {
    with_db(|db| async move {
        let drone = drone(&db).await;
        let server = Server::start(&db).await;
        let host = server.base["http://".len()..].to_string();
        let port = host.rsplit(':').next().unwrap().to_string();
        let client = Client::new();
        let connect = || client.post(server.url("/connect"));
        let body = serde_json::to_string(&request("doc-guard")).unwrap();
        let backends = || count(&db, "backend");

        // JSON text under any other content type, or none: 415, nothing created.
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonp"),
            None,
        ] {
            let mut request = connect().body(body.clone());
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            assert_error(
                request,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            )
            .await;
        }
        assert_eq!(backends().await, 0);

        // Over the limit: 413, whether the length is declared or the body is chunked.
        let padded = |size: usize| format!("{body}{}", " ".repeat(size - body.len()));
        let oversize = padded(controller::MAX_BODY_BYTES + 1);
        assert_error(
            connect()
                .header("content-type", "application/json")
                .body(oversize.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .await;
        let chunks: Vec<Result<String, std::io::Error>> = oversize
            .as_bytes()
            .chunks(16 * 1024)
            .map(|chunk| Ok(String::from_utf8(chunk.to_vec()).unwrap()))
            .collect();
        assert_error(
            connect()
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    chunks,
                ))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .await;
        assert_eq!(backends().await, 0);

        // A foreign Host (a rebound DNS name, or another port): 421 for every method.
        for foreign in ["attacker.example", "attacker.example:80", "127.0.0.1:1"] {
            assert_error(
                client.get(server.url("/backends")).header("host", foreign),
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
            )
            .await;
            assert_error(
                connect()
                    .header("host", foreign)
                    .json(&request("doc-guard")),
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
            )
            .await;
        }
        assert_eq!(backends().await, 0);

        // A foreign Origin on a POST: 403, nothing created or queued.
        for foreign in [
            "http://attacker.example".to_string(),
            "null".to_string(),
            format!("https://{host}"),
            format!("http://localhost:{}", port.parse::<u16>().unwrap() + 1),
        ] {
            assert_error(
                connect()
                    .header("origin", &foreign)
                    .json(&request("doc-guard")),
                StatusCode::FORBIDDEN,
                "forbidden_origin",
            )
            .await;
        }
        assert_eq!(backends().await, 0);
        // GETs are not state-changing: their Origin is not checked.
        let response = client
            .get(server.url("/backends"))
            .header("origin", "http://attacker.example")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        // The controller's own origins, under each of its own Host names, with a body of
        // exactly the limit: created once, then found.
        let (status, created) = json_of(
            connect()
                .header("host", format!("localhost:{port}"))
                .header("origin", format!("http://localhost:{port}"))
                .header("content-type", "application/json; charset=utf-8")
                .body(padded(controller::MAX_BODY_BYTES)),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let backend = backend_of(&created);
        let (status, again) = json_of(
            connect()
                .header("origin", format!("http://{host}"))
                .json(&request("doc-guard")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(backend_of(&again), backend);
        assert_eq!(backends().await, 1);

        // Terminate: without a JSON content type nothing is queued; from a foreign origin
        // neither; from its own, it is.
        let terminate = || client.post(server.url(&format!("/backend/{backend}/terminate")));
        assert_error(
            terminate(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert_error(
            terminate()
                .header("origin", "http://attacker.example")
                .json(&json!({})),
            StatusCode::FORBIDDEN,
            "forbidden_origin",
        )
        .await;
        assert!(
            db.backend_action()
                .pending(drone.id, 10)
                .await
                .unwrap()
                .len()
                == 1
        );
        let (status, body) = json_of(
            terminate()
                .header("origin", format!("http://127.0.0.1:{port}"))
                .json(&json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["kind"], "soft");

        // `--allowed-host`: a reverse proxy's public name, as Host, and its https origin.
        let bound = Server::bind().await;
        let app = controller::router(db.clone(), bound.guard(&["Controller.Example.com"]), None);
        let proxied = bound.serve(app).await;
        let (status, body) = json_of(
            client
                .post(proxied.url("/connect"))
                .header("host", "controller.example.com")
                .header("origin", "https://controller.example.com")
                .json(&request("doc-guard")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_error(
            client
                .get(proxied.url("/backends"))
                .header("host", "controller.example.com:8443"),
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
        )
        .await;

        drop(client);
        proxied.stop().await;
        server.stop().await;
    })
    .await
}

/// The README walkthrough with only HTTP calls: the demo drone takes the backend to ready,
/// and carries out a hard termination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_drone_runs_the_walkthrough() {
    with_db(|db| async move {
        let controller_name = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller_name, true, "0.1.0", "test")
            .await
            .unwrap();
        let demo = controller::DemoDrone::register(&db, &controller_name, &cluster())
            .await
            .unwrap();
        let drone_task = tokio::spawn(demo.clone().run(db.clone(), Duration::ZERO));
        let server = Server::start(&db).await;
        let client = Client::new();

        let (status, body) =
            json_of(client.post(server.url("/connect")).json(&request("doc-4"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["drone"], demo.name.as_str());
        let backend = backend_of(&body);
        let token = body["token"].as_str().unwrap().to_string();
        let stream_url = server.url(&format!("/backend/{backend}/status-stream"));

        let mut stream = SseClient::open(&client, &stream_url, None).await;
        let mut got = Vec::new();
        while got.last().map(SseEvent::id_and_status) != Some((50, BackendStatus::Ready)) {
            got.push(stream.next().await.expect("the stream reaches ready"));
        }
        assert_eq!(
            ids_and_statuses(&got),
            pairs(&[
                BackendStatus::Scheduled,
                BackendStatus::Loading,
                BackendStatus::Starting,
                BackendStatus::Waiting,
                BackendStatus::Ready
            ])
        );
        let (_, route) = json_of(client.get(server.url(&format!("/route/{token}")))).await;
        assert_eq!(route["status"], "ready");

        let (status, body) = json_of(
            client
                .post(server.url(&format!("/backend/{backend}/terminate")))
                .json(&json!({"kind": "hard"})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let rest = stream.rest().await;
        assert_eq!(
            ids_and_statuses(&rest),
            pairs(&[BackendStatus::HardTerminating, BackendStatus::Terminated])
        );
        let last = rest[1].entry();
        assert_eq!(last.termination_kind, Some(TerminationKind::Hard));
        assert_eq!(last.termination_reason, Some(TerminationReason::External));
        assert_eq!(last.exit_error, Some(true));
        // The drone acknowledged both actions.
        assert!(db
            .backend_action()
            .pending(demo.id, 10)
            .await
            .unwrap()
            .is_empty());

        drop(client);
        server.stop().await;
        drone_task.abort();
        let _ = drone_task.await;
    })
    .await
}

/// What the page shows: each backend row's id, status and the statuses it has received.
async fn shown(page: &mut browser::Page) -> Vec<(String, String, Vec<String>)> {
    let rows = page
        .eval(
            r#"[...document.querySelectorAll("tr[data-backend]")].map((tr) => [
                tr.dataset.backend,
                tr.querySelector(".status").textContent,
                [...tr.querySelectorAll(".seen span")].map((s) => s.textContent)])"#,
        )
        .await;
    serde_json::from_value(rows).expect("rows as [id, status, [seen]]")
}

/// Waits (bounded) until the page shows one backend whose received statuses are `seen`;
/// returns its id.
async fn wait_shown(page: &mut browser::Page, seen: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let rows = shown(page).await;
        if let [(id, status, got)] = rows.as_slice() {
            if got == seen {
                assert_eq!(Some(status.as_str()), seen.last().copied());
                return id.clone();
            }
            // Never more than was sent, never twice: a prefix on the way there.
            assert!(
                got.len() < seen.len() && got[..] == seen[..got.len()],
                "the page shows {got:?}, expected the way to {seen:?}"
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed {seen:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_backend_live_in_a_real_browser() {
    with_db(|db| async move {
        let drone = drone(&db).await;
        // The browser reaches the server through the proxy, under the proxy's address: the
        // Host (and Origin) it sends, which the server must be told to accept, as a
        // port-forward would need `--allowed-host`.
        let bound = Server::bind().await;
        let proxy = browser::Proxy::start(bound.address).await;
        let proxy_host = &proxy.base["http://".len()..];
        let app = controller::router(db.clone(), bound.guard(&[proxy_host]), None);
        let server = bound.serve(app).await;
        let chromium = browser::Browser::start(&proxy.url("/")).await;
        let mut page = chromium.page(&proxy.url("/")).await;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while page.eval("document.body !== null && document.body.dataset.loaded === 'yes'").await != true {
            assert!(tokio::time::Instant::now() < deadline, "the page never loaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(shown(&mut page).await.is_empty());

        // The connect form, as a user fills it in.
        page.eval(&format!(
            r#"document.getElementById("key").value = "page-key";
               document.getElementById("cluster").value = "{}";
               document.getElementById("connect-button").click(); true"#,
            cluster()
        ))
        .await;
        let backend = wait_shown(&mut page, &["scheduled"]).await;
        let backend: BackendName = backend.parse().unwrap();
        let states = lifecycle();
        for state in &states[..2] {
            assert!(db.backend().update_state(&backend, state).await.unwrap());
        }
        wait_shown(&mut page, &["scheduled", "loading", "starting"]).await;

        // The server side drops the stream mid-way; two statuses happen while it is down.
        assert!(proxy.cut() >= 1, "the status stream was open");
        for state in &states[2..4] {
            assert!(db.backend().update_state(&backend, state).await.unwrap());
        }
        let all_ready = ["scheduled", "loading", "starting", "waiting", "ready"];
        wait_shown(&mut page, &all_ready).await;
        assert_eq!(
            proxy.last_event_ids(),
            vec!["30".to_string()],
            "the browser resumed after `starting` (30)"
        );

        // The terminate button asks the drone; the drone then reports the way out.
        page.eval(&format!(
            r#"document.querySelector('tr[data-backend="{backend}"] button.terminate').click(); true"#
        ))
        .await;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let pending = db.backend_action().pending(drone.id, 10).await.unwrap();
            let asked = pending.iter().any(|m| {
                m.backend_id == backend && matches!(m.action, BackendAction::Terminate { .. })
            });
            if asked {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no termination requested");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for state in &states[4..] {
            assert!(db.backend().update_state(&backend, state).await.unwrap());
        }
        let everything: Vec<&str> = std::iter::once(BackendState::Scheduled)
            .chain(states.iter().cloned())
            .map(|s| s.status().as_str())
            .collect();
        wait_shown(&mut page, &everything).await;
        let message = page
            .eval(r#"document.getElementById("message").textContent"#)
            .await;
        assert_eq!(message, format!("{backend}: requested"));
        let disabled = page
            .eval(r#"document.querySelector("button.terminate").disabled"#)
            .await;
        assert_eq!(disabled, true, "a terminated backend cannot be terminated");

        // A reload lists it, terminated, without following it again.
        page.eval("setTimeout(() => location.reload(), 0); true").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let rows = shown(&mut page).await;
            if rows == vec![(backend.to_string(), "terminated".to_string(), Vec::new())] {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "after reload: {rows:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        drop(page);
        drop(chromium);
        drop(proxy);
        server.stop().await;
    })
    .await;
}

/// One sample of a Prometheus text page: the value of `name` with exactly these labels.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, mut got) = match series.split_once('{') {
                Some((metric, rest)) => (
                    metric,
                    rest.trim_end_matches('}')
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            got.sort();
            (metric == name && got == wanted).then(|| value.parse().unwrap())
        })
}

/// Every series of `name` (any labels), as lines.
fn series<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    page.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

/// `/metrics` after a whole lifecycle (connect, ready, two route lookups, keepalives, hard
/// termination, cleanup): the figures are exactly what the lifecycle did. A current-thread
/// runtime with a recorder local to this thread: every task of this test (the bus, the demo
/// drone, the server) records into it, and the other tests of this binary (on other threads)
/// do not.
#[tokio::test(flavor = "current_thread")]
async fn metrics_page_counts_a_lifecycle() {
    use plane_db::metrics as m;
    let recorder = controller::prometheus_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    with_db(|db| async move {
        // The bus starts with this subscription, before any event is written.
        let mut all = db.subscribe_all_events().await.unwrap();
        let controller_name = ControllerName::new_random();
        db.controller()
            .heartbeat(&controller_name, true, "0.1.0", "test")
            .await
            .unwrap();
        let demo = controller::DemoDrone::register(&db, &controller_name, &cluster())
            .await
            .unwrap();
        let drone_task = tokio::spawn(demo.clone().run(db.clone(), Duration::ZERO));
        let bound = Server::bind().await;
        let app = controller::router(db.clone(), bound.guard(&[]), Some(handle));
        let server = bound.serve(app).await;
        let client = Client::new();
        let scrape = || async {
            let response = client.get(server.url("/metrics")).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.text().await.unwrap()
        };

        let (status, body) =
            json_of(client.post(server.url("/connect")).json(&request("doc-m"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let backend = backend_of(&body);
        let token = body["token"].as_str().unwrap().to_string();
        let stream_url = server.url(&format!("/backend/{backend}/status-stream"));
        let mut stream = SseClient::open(&client, &stream_url, None).await;
        while stream
            .next()
            .await
            .expect("the stream reaches ready")
            .id_and_status()
            != (50, BackendStatus::Ready)
        {}
        let (status, _) = json_of(client.get(server.url(&format!("/route/{token}")))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = json_of(client.get(server.url("/route/no-such-token"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(db.backend().update_keepalive(&backend).await.unwrap());
        let (status, body) = json_of(
            client
                .post(server.url(&format!("/backend/{backend}/terminate")))
                .json(&json!({"kind": "hard"})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        stream.rest().await;
        assert!(!db.backend().update_keepalive(&backend).await.unwrap());
        // Wait until the bus has read the terminated event.
        loop {
            let event = tokio::time::timeout(STEP_TIMEOUT, all.next())
                .await
                .expect("the bus delivers the terminated event")
                .unwrap()
                .unwrap();
            if event.kind == "backend_state" && event.data["status"] == "terminated" {
                break;
            }
        }

        // What the lifecycle wrote, from the database.
        let written: Vec<(String, i64)> =
            sqlx::query_as("select kind, count(*) from event group by kind order by kind")
                .fetch_all(db.pool())
                .await
                .unwrap();
        let total: i64 = written.iter().map(|(_, n)| n).sum();
        let history: i64 =
            sqlx::query_scalar("select count(*) from backend_state where backend_id = $1")
                .bind(backend.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert!(total >= 9 && history == 7, "{written:?}, {history} states");

        // The bus may still be reading events committed after `terminated` (an action ack
        // writes none, but wait for whatever was written to be read, then compare exactly).
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        let page = loop {
            let page = scrape().await;
            let read: f64 = written
                .iter()
                .filter_map(|(kind, _)| sample(&page, m::BUS_EVENTS_READ_TOTAL, &[("kind", kind)]))
                .sum();
            if read >= total as f64 || tokio::time::Instant::now() > deadline {
                break page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Every event written was read once, by kind; and each one's delivery delay recorded.
        for (kind, count) in &written {
            assert_eq!(
                sample(&page, m::BUS_EVENTS_READ_TOTAL, &[("kind", kind)]),
                Some(*count as f64),
                "events read of kind {kind}\n{page}"
            );
        }
        assert_eq!(
            series(&page, m::BUS_EVENTS_READ_TOTAL).len(),
            written.len(),
            "{page}"
        );
        let delay_count = format!("{}_count", m::BUS_DELIVERY_DELAY_SECONDS);
        assert_eq!(
            sample(&page, &delay_count, &[]),
            Some(total as f64),
            "{page}"
        );
        // One connect, accepted; each state after `scheduled` (written by connect) was one
        // accepted update_state; one route found and one not; one keepalive of each.
        let ops = |op: &str, outcome: &str| {
            sample(
                &page,
                m::OPERATIONS_TOTAL,
                &[("operation", op), ("outcome", outcome)],
            )
        };
        assert_eq!(ops("connect", "accepted"), Some(1.0), "{page}");
        assert_eq!(ops("update_state", "accepted"), Some((history - 1) as f64));
        assert_eq!(ops("route_info_for_token", "accepted"), Some(1.0));
        assert_eq!(ops("route_info_for_token", "not_found"), Some(1.0));
        assert_eq!(ops("update_keepalive", "accepted"), Some(1.0));
        assert_eq!(ops("update_keepalive", "not_found"), Some(1.0));
        let op_series = series(&page, m::OPERATIONS_TOTAL);
        let connects: Vec<_> = op_series
            .iter()
            .filter(|l| l.contains("\"connect\""))
            .collect();
        assert_eq!(connects.len(), 1, "{connects:?}");
        let durations = format!("{}_count", m::OPERATION_DURATION_SECONDS);
        let timed = |op: &str, outcome: &str| {
            sample(
                &page,
                &durations,
                &[("operation", op), ("outcome", outcome)],
            )
        };
        assert_eq!(timed("connect", "accepted"), Some(1.0));
        assert_eq!(
            timed("update_state", "accepted"),
            Some((history - 1) as f64)
        );
        // Every update_state waited for a connection once, and the wait was recorded.
        let acquires = format!("{}_count", m::POOL_ACQUIRE_DURATION_SECONDS);
        let update_states: f64 = op_series
            .iter()
            .filter(|l| l.contains("\"update_state\""))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum();
        assert_eq!(
            sample(&page, &acquires, &[("operation", "update_state")]),
            Some(update_states)
        );
        // This test's subscription to everything and the drone's to its actions are open.
        assert_eq!(
            sample(&page, m::BUS_SUBSCRIPTIONS, &[("kind", "all")]),
            Some(1.0)
        );
        assert_eq!(
            sample(&page, m::BUS_SUBSCRIPTIONS, &[("kind", "backend_action")]),
            Some(1.0)
        );
        // Nothing lagged, nothing caught up, no reconnect, no server change.
        for name in [
            m::BUS_LAGGED_TOTAL,
            m::BUS_EVENTS_MISSED_TOTAL,
            m::BUS_CATCH_UPS_TOTAL,
            m::BUS_LISTENER_RECONNECTS_TOTAL,
            m::BUS_RESTART_READS_TOTAL,
        ] {
            assert!(series(&page, name).is_empty(), "{name} moved\n{page}");
        }
        let size = sample(&page, m::POOL_CONNECTIONS, &[]).expect("pool size sampled");
        let idle = sample(&page, m::POOL_IDLE_CONNECTIONS, &[]).expect("idle sampled");
        assert!(
            size >= 1.0 && idle <= size,
            "{size} connections, {idle} idle"
        );
        // Help texts reached the exporter.
        assert!(
            page.contains(&format!("# HELP {} ", m::BUS_EVENTS_READ_TOTAL)),
            "{page}"
        );

        // Cleanup of everything: the rows deleted per table are the summary's.
        drop(all);
        let summary = db
            .run_cleanup(&plane_db::CleanupConfig {
                backend_min_age: Duration::ZERO,
                event_min_age: Duration::ZERO,
                batch_size: 1000,
                ..plane_db::CleanupConfig::default()
            })
            .await
            .unwrap();
        assert_eq!(summary.backends.backends, 1, "{summary:?}");
        // The events' partition is still the one being written: run_cleanup drops whole
        // partitions, so these go row by row through cleanup_events.
        assert_eq!(summary.events, 0, "{summary:?}");
        assert_eq!(
            db.cleanup_events(Duration::ZERO, 1000).await.unwrap(),
            total as u64
        );
        let page = scrape().await;
        let deleted = |table: &str| {
            sample(&page, m::CLEANUP_ROWS_DELETED_TOTAL, &[("table", table)]).unwrap_or(0.0)
        };
        assert_eq!(deleted("backend"), 1.0);
        assert_eq!(deleted("backend_state"), summary.backends.states as f64);
        assert_eq!(deleted("backend_state"), history as f64);
        assert_eq!(deleted("backend_action"), summary.backends.actions as f64);
        assert_eq!(deleted("event"), total as f64);
        assert_eq!(
            deleted("token"),
            (summary.backends.tokens + summary.tokens) as f64
        );
        let runs = format!("{}_count", m::CLEANUP_DURATION_SECONDS);
        assert_eq!(
            sample(&page, &runs, &[("outcome", "ok")]),
            Some(1.0),
            "{page}"
        );
        assert_eq!(
            sample(&page, m::BUS_SUBSCRIPTIONS, &[("kind", "all")]),
            Some(0.0)
        );

        drop(client);
        server.stop().await;
        drone_task.abort();
        let _ = drone_task.await;
    })
    .await
}
