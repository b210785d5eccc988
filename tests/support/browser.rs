//! A real headless browser (Debian's `chromium`, installed by `.ci/run`) driven over the
//! Chrome DevTools Protocol: one WebSocket, JSON commands answered by id. Just the four
//! things a page test needs: open a URL, evaluate JavaScript (awaiting its promise), send
//! a header with every request, take a screenshot. The process is killed on drop.
//! `CHROMIUM=/path/to/chrome` picks another binary (default: `chromium` on the PATH).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::client;

/// Starting chromium (cold, on a busy machine) takes longer than a test server.
const LAUNCH_WAIT: Duration = Duration::from_secs(60);
/// One DevTools command, including the page work it waits for.
const COMMAND_WAIT: Duration = Duration::from_secs(20);

pub struct Browser {
    child: Child,
    devtools: WebSocketStream<TcpStream>,
    next_id: u64,
    /// `Page.*` events not yet waited for, oldest first.
    page_events: VecDeque<String>,
    _profile: TempDir,
}

impl Browser {
    /// Starts `chromium` headless with a throw-away profile and attaches to its first tab.
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().expect("browser profile dir");
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                // Containers often have a 64 MB /dev/shm, too small for a renderer.
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                "--window-size=1280,800",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} (install Debian's chromium): {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let port = tokio::time::timeout(LAUNCH_WAIT, devtools_port(stderr))
            .await
            .expect("chromium did not announce its DevTools port in time");
        let page = tokio::time::timeout(LAUNCH_WAIT, first_page(port))
            .await
            .expect("chromium's DevTools listed no page in time");
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to DevTools");
        let (devtools, _) = tokio_tungstenite::client_async(page.as_str(), stream)
            .await
            .expect("DevTools WebSocket handshake");
        let mut browser = Self {
            child,
            devtools,
            next_id: 0,
            page_events: VecDeque::new(),
            _profile: profile,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Network.enable", json!({})).await;
        browser
    }

    /// Sends `name: value` with every request the page makes (navigation, fetch, forms).
    pub async fn set_header(&mut self, name: &str, value: &str) {
        self.call(
            "Network.setExtraHTTPHeaders",
            json!({ "headers": { name: value } }),
        )
        .await;
    }

    /// Opens `url` and waits until the document and its script have loaded.
    pub async fn open(&mut self, url: &str) {
        self.page_events.clear();
        let answer = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(
            answer.get("errorText").is_none(),
            "navigating to {url}: {answer}"
        );
        self.wait_for_event("Page.loadEventFired").await;
    }

    /// Runs `action` (JavaScript that makes the page navigate, e.g. a form submit) and
    /// waits until the page it leads to has loaded.
    pub async fn navigate_by(&mut self, action: &str) {
        self.page_events.clear();
        self.eval(action).await;
        self.wait_for_event("Page.loadEventFired").await;
    }

    /// Turns the page's own JavaScript off (DevTools evaluation keeps working).
    pub async fn disable_javascript(&mut self) {
        self.call(
            "Emulation.setScriptExecutionDisabled",
            json!({ "value": true }),
        )
        .await;
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and returns
    /// its value; a thrown exception fails the test.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(exception) = answer.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        answer["result"]["value"].clone()
    }

    /// Waits, inside the page, until `condition` (a JavaScript expression) is true: it is
    /// re-checked on every DOM change, so this wakes on the change itself.
    pub async fn wait_for(&mut self, condition: &str) {
        let script = format!(
            "new Promise((resolve) => {{
                const check = () => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }};
                if (check()) return resolve(true);
                const observer = new MutationObserver(() => {{
                    if (check()) {{ observer.disconnect(); resolve(true); }}
                }});
                observer.observe(document, {{ subtree: true, childList: true, characterData: true, attributes: true }});
                document.addEventListener('readystatechange', () => {{
                    if (check()) {{ observer.disconnect(); resolve(true); }}
                }});
            }})"
        );
        let answer = tokio::time::timeout(COMMAND_WAIT, self.eval(&script)).await;
        assert!(
            matches!(answer, Ok(Value::Bool(true))),
            "timed out waiting until {condition}"
        );
    }

    /// Saves a PNG of the viewport (the whole page when `full_page`) to `path`.
    pub async fn screenshot(&mut self, path: &Path, full_page: bool) -> PathBuf {
        let answer = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": full_page }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(answer["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
        path.to_owned()
    }

    /// One DevTools command. `Page.*` events that arrive meanwhile are kept for
    /// `wait_for_event`; other events are dropped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params }).to_string();
        self.devtools
            .send(Message::text(command))
            .await
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let answer = tokio::time::timeout(COMMAND_WAIT, async {
            loop {
                let message = self.next_message().await;
                if message["id"] == id {
                    return message;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools {method} did not answer in time"));
        if let Some(error) = answer.get("error") {
            panic!("DevTools {method}: {error}");
        }
        answer["result"].clone()
    }

    async fn wait_for_event(&mut self, name: &str) {
        let found = tokio::time::timeout(COMMAND_WAIT, async {
            loop {
                if let Some(at) = self.page_events.iter().position(|e| e == name) {
                    self.page_events.drain(..=at);
                    return;
                }
                self.next_message().await;
            }
        })
        .await;
        assert!(found.is_ok(), "no {name} event in time");
    }

    /// The next message from DevTools; a `Page.*` event is also queued.
    async fn next_message(&mut self) -> Value {
        loop {
            let message = self
                .devtools
                .next()
                .await
                .expect("DevTools closed")
                .expect("DevTools read");
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
            if let Some(event) = value["method"].as_str().filter(|m| m.starts_with("Page.")) {
                self.page_events.push_back(event.to_owned());
            }
            return value;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads chromium's stderr until "DevTools listening on ws://127.0.0.1:PORT/…", then
/// keeps draining it (a full pipe would block the browser).
async fn devtools_port(stderr: tokio::process::ChildStderr) -> u16 {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    while let Some(line) = lines.next_line().await.expect("read chromium's stderr") {
        if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
            let port = rest.split('/').next().and_then(|p| p.parse().ok());
            if let Some(port) = port {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return port;
            }
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    panic!("chromium exited without a DevTools port:\n{seen}");
}

/// The WebSocket URL of the browser's first page, from `/json/list`.
async fn first_page(port: u16) -> String {
    let http = client::reqwest_direct();
    loop {
        let list: Value = http
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
            .expect("DevTools /json/list")
            .json()
            .await
            .expect("DevTools /json/list is JSON");
        let page = list.as_array().and_then(|targets| {
            targets
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        });
        if let Some(url) = page {
            return url.to_owned();
        }
        // The first tab is created right after the port opens: no event to await here.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
