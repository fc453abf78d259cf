//! A real headless browser for the page test: Debian's `chromium`, driven over the DevTools
//! protocol with a minimal websocket client (text frames only; no extra crate), and a TCP
//! proxy between the browser and the server that can drop every connection at once and
//! records the `Last-Event-ID` headers the browser sends.

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// How long one step (start, load, a websocket answer) may take before the test fails.
const STEP: Duration = Duration::from_secs(30);

/// The browser binaries looked for, in order. A missing browser fails the test.
const CANDIDATES: [&str; 2] = ["chromium", "chromium-browser"];

/// A headless chromium, killed (and its profile removed) when dropped.
pub struct Browser {
    child: Child,
    profile: std::path::PathBuf,
    port: u16,
}

impl Browser {
    /// Starts chromium on `url` with a fresh profile and a DevTools port of its choosing.
    /// Panics, naming what to install, when no chromium is on the PATH.
    pub async fn start(url: &str) -> Browser {
        let binary = CANDIDATES
            .iter()
            .find(|name| {
                Command::new(name)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or_else(|| {
                panic!(
                    "no headless browser: this test needs Debian's `chromium` \
                     (apt-get install chromium; .ci/run installs it)"
                )
            });
        let profile =
            std::env::temp_dir().join(format!("plane-db-page-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let _ = std::fs::create_dir_all(&profile);
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1000,600",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            // Chromium also makes folders of its own in the temporary directory
            // (`org.chromium.Chromium.*`): inside the profile, they go when it goes.
            .env("TMPDIR", &profile)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        // It says where DevTools listens on stderr: `DevTools listening on ws://…:PORT/…`.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.to_string());
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            profile,
            port: 0,
        };
        let address = rx
            .recv_timeout(STEP)
            .expect("chromium announces its DevTools address");
        let port = address
            .split('/')
            .next()
            .and_then(|host| host.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in the DevTools address {address:?}"));
        browser.port = port;
        browser
    }

    /// A DevTools session on the page whose URL starts with `url`.
    pub async fn page(&self, url: &str) -> Page {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await
                .expect("DevTools target list")
                .json()
                .await
                .expect("DevTools target list is JSON");
            let found = list.as_array().into_iter().flatten().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
            });
            if let Some(ws) = found.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                return Page::connect(ws).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no page at {url}: {list}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A DevTools session on one page, over a websocket.
pub struct Page {
    stream: TcpStream,
    next_id: u64,
}

impl Page {
    async fn connect(ws_url: &str) -> Page {
        let rest = ws_url
            .strip_prefix("ws://")
            .unwrap_or_else(|| panic!("not a ws:// URL: {ws_url}"));
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut stream = TcpStream::connect(host).await.expect("connect to DevTools");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cGxhbmUtZGItcGFnZS10ZXN0\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // The answer's header, byte by byte up to the blank line (frames follow it).
        let mut header = Vec::new();
        while !header.ends_with(b"\r\n\r\n") {
            let byte = tokio::time::timeout(STEP, stream.read_u8())
                .await
                .expect("DevTools answers the upgrade")
                .expect("read the upgrade answer");
            header.push(byte);
        }
        let header = String::from_utf8_lossy(&header);
        assert!(
            header.starts_with("HTTP/1.1 101"),
            "websocket upgrade refused: {header}"
        );
        Page { stream, next_id: 1 }
    }

    /// Sends one masked text frame.
    async fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x5a, 0x13, 0xc7, 0x88];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream
            .write_all(&frame)
            .await
            .expect("send to DevTools");
    }

    /// Reads one whole message (text, possibly in fragments); pings and pongs are skipped.
    async fn receive(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let head = self.stream.read_u16().await.expect("read a frame");
            let (fin, opcode) = (head & 0x8000 != 0, (head >> 8) & 0x0f);
            let masked = head & 0x80 != 0;
            let len = match head & 0x7f {
                126 => u64::from(self.stream.read_u16().await.unwrap()),
                127 => self.stream.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).await.unwrap();
            }
            let mut payload = vec![0u8; usize::try_from(len).unwrap()];
            self.stream.read_exact(&mut payload).await.unwrap();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x8 => panic!("DevTools closed the websocket"),
                0x9 | 0xa => continue,
                _ => message.extend_from_slice(&payload),
            }
            if fin {
                return String::from_utf8(message).expect("a text message");
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as
    /// JSON. Panics with the page's exception if it throws.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true, "awaitPromise": true},
        });
        self.send(&command.to_string()).await;
        let answer = tokio::time::timeout(STEP, async {
            loop {
                let message: Value =
                    serde_json::from_str(&self.receive().await).expect("DevTools sends JSON");
                if message["id"] == id {
                    return message;
                }
            }
        })
        .await
        .expect("DevTools answers before the timeout");
        if let Some(exception) = answer["result"].get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        assert!(answer.get("error").is_none(), "{expression}: {answer}");
        answer["result"]["result"]["value"].clone()
    }
}

/// A TCP proxy in front of the server: what the browser connects to.
pub struct Proxy {
    /// Where the browser connects.
    pub base: String,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    last_event_ids: Arc<Mutex<Vec<String>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let last_event_ids = Arc::new(Mutex::new(Vec::new()));
        let (conns, ids) = (connections.clone(), last_event_ids.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let ids = ids.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upward = async move {
                        // A request's headers arrive in one read in practice; each read
                        // is searched for the header before it is passed on.
                        let mut client_read = client_read;
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let n = match client_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let text = String::from_utf8_lossy(&buffer[..n]).to_ascii_lowercase();
                            for header in text.split("\r\n").skip(1) {
                                if let Some(value) = header.strip_prefix("last-event-id:") {
                                    ids.lock().unwrap().push(value.trim().to_string());
                                }
                            }
                            if server_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let downward = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upward, downward);
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            base,
            connections,
            last_event_ids,
            accept,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Drops every open connection at once (both sides closed), as a restarting server or
    /// a broken network would.
    pub fn cut(&self) -> usize {
        let open: Vec<AbortHandle> = std::mem::take(&mut *self.connections.lock().unwrap());
        let count = open.iter().filter(|c| !c.is_finished()).count();
        for connection in open {
            connection.abort();
        }
        count
    }

    /// The `Last-Event-ID` values of the requests seen so far, in order.
    pub fn last_event_ids(&self) -> Vec<String> {
        self.last_event_ids.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
