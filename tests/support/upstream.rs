//! A test API on 127.0.0.1, the "real" host behind credproxy's routes: one HTTPS listener
//! (a leaf from the test CA for [`API_NAMES`], ALPN h2 + http/1.1) and one plain-HTTP
//! listener, both served by hyper's auto builder (HTTP/1.1 and h2).
//!
//! Endpoints, on either listener:
//! - `GET /bytes/N` streams N zero bytes (generated, never buffered);
//! - `POST /upload` counts the body's bytes as they arrive and answers `{"received": N}`;
//! - `/hang` never answers (for 504 tests); `/gate` answers once [`TestApi::open_gate`];
//! - `GET /ws` is a WebSocket echo server for tokens the token endpoint issued (see `ws`);
//! - `GET /events/NAME` streams server-sent events a fixed time apart (see `events`);
//! - anything else echoes what the API saw as JSON (method, path, version, tls, headers).
//!
//! A request whose `Authorization: Bearer T` names a [`revoke`](TestApi::revoke)d token
//! gets 401 instead, as a real API answers a token its provider revoked; after
//! [`require_issued_tokens`](TestApi::require_issued_tokens), so does one without a token
//! the token endpoint issued and that has not expired. Every request is recorded (with
//! when it arrived) and counted, with awaitable counters so tests never sleep.

pub mod events;
pub mod ws;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::ca::TestCa;
use super::serve::{self, ServerTask};
use super::token::{Issued, WAIT};

/// Names the API's certificate is valid for: the routed host, a host a tunnel must not
/// switch to, and an unrouted host tests reach through a blind tunnel.
pub const API_NAMES: &[&str] = &[
    "api.test",
    "other.test",
    "unrouted.test",
    "localhost",
    "127.0.0.1",
];

/// What the API received: one entry per request head.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub version: Version,
    /// Arrived on the HTTPS listener.
    pub tls: bool,
    pub headers: HeaderMap,
    /// What the API answered (200, or 401 for a revoked or invalid token).
    pub status: StatusCode,
    /// When the request head arrived.
    pub at: tokio::time::Instant,
}

impl Seen {
    /// Every `Authorization` value, in order.
    pub fn authorization(&self) -> Vec<String> {
        self.headers
            .get_all(AUTHORIZATION)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The bearer token the request carried, if any.
    pub fn bearer(&self) -> Option<&str> {
        bearer(&self.headers)
    }

    /// The value of header `name`, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

pub struct TestApi {
    https: SocketAddr,
    http: SocketAddr,
    leaf: CertificateDer<'static>,
    shared: Arc<Shared>,
    /// Both accept loops; dropping them aborts their connections, parked ones included.
    tasks: Vec<ServerTask>,
}

#[derive(Default)]
struct State {
    revoked: HashSet<String>,
    seen: Vec<Seen>,
    /// The tokens `/ws` accepts.
    issued: Option<Issued>,
    /// Every endpoint, not only `/ws`, wants a token `issued` vouches for.
    require_issued: bool,
    /// When each event of `/events/NAME` was sent, by NAME.
    events_sent: HashMap<String, Vec<tokio::time::Instant>>,
}

struct Shared {
    state: Mutex<State>,
    /// Request heads received.
    requests: watch::Sender<u64>,
    /// 401 answers.
    unauthorized: watch::Sender<u64>,
    /// Requests parked on `/hang` or `/gate`.
    parked: watch::Sender<u64>,
    /// `/gate` answers once this is true.
    gate: watch::Sender<bool>,
    /// Upload bytes received so far, all requests together.
    uploaded: watch::Sender<u64>,
    /// Bytes of `/bytes/N` bodies handed to the connection.
    downloaded: watch::Sender<u64>,
    /// WebSocket connections opened and closed on `/ws`.
    ws_opened: watch::Sender<u64>,
    ws_closed: watch::Sender<u64>,
    /// Bytes of `/ws` flood messages sent, and of messages a `/ws` sink received.
    ws_flooded: watch::Sender<u64>,
    ws_sunk: watch::Sender<u64>,
}

type ApiBody = BoxBody<Bytes, Infallible>;

// === impl TestApi ===

impl TestApi {
    pub async fn start(ca: &TestCa) -> Self {
        let leaf = ca.issue(API_NAMES);
        let leaf_der = leaf.chain[0].clone();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .expect("leaf key matches leaf cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            requests: watch::Sender::new(0),
            unauthorized: watch::Sender::new(0),
            parked: watch::Sender::new(0),
            gate: watch::Sender::new(false),
            uploaded: watch::Sender::new(0),
            downloaded: watch::Sender::new(0),
            ws_opened: watch::Sender::new(0),
            ws_closed: watch::Sender::new(0),
            ws_flooded: watch::Sender::new(0),
            ws_sunk: watch::Sender::new(0),
        });
        let https = serve::bind("test API").await;
        let http = serve::bind("test API").await;
        let https_addr = https.local_addr().expect("API local_addr");
        let http_addr = http.local_addr().expect("API local_addr");
        let tasks = vec![
            serve_api(https, Some(acceptor), &shared),
            serve_api(http, None, &shared),
        ];
        Self {
            https: https_addr,
            http: http_addr,
            leaf: leaf_der,
            shared,
            tasks,
        }
    }

    /// The HTTPS listener.
    pub fn https_addr(&self) -> SocketAddr {
        self.https
    }

    /// The plain-HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The certificate the HTTPS listener presents.
    pub fn leaf_cert(&self) -> CertificateDer<'static> {
        self.leaf.clone()
    }

    // --- knobs ---

    /// From now on, `Authorization: Bearer <token>` gets 401.
    pub fn revoke(&self, token: &str) {
        self.state().revoked.insert(token.to_owned());
    }

    /// `/ws` accepts the tokens `issued` vouches for (and no others).
    pub fn accept_tokens(&self, issued: Issued) {
        self.state().issued = Some(issued);
    }

    /// From now on `/ws` accepts no token at all.
    pub fn reject_all_tokens(&self) {
        self.state().issued = None;
    }

    /// From now on every endpoint, like `/ws`, answers 401 to a request without a token
    /// that the token endpoint of [`accept_tokens`](Self::accept_tokens) issued and that
    /// has not expired, as a real API checks every request.
    pub fn require_issued_tokens(&self) {
        self.state().require_issued = true;
    }

    /// Lets every request parked on `/gate` (and any later one) answer.
    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }

    // --- observability ---

    pub fn requests(&self) -> u64 {
        *self.shared.requests.borrow()
    }

    pub fn unauthorized(&self) -> u64 {
        *self.shared.unauthorized.borrow()
    }

    pub fn uploaded(&self) -> u64 {
        *self.shared.uploaded.borrow()
    }

    pub fn downloaded(&self) -> u64 {
        *self.shared.downloaded.borrow()
    }

    /// Every request seen so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// The last `n` requests' answers and `Authorization` values, oldest first.
    pub fn last_answers(&self, n: usize) -> Vec<(StatusCode, Vec<String>)> {
        let seen = self.seen();
        seen[seen.len().saturating_sub(n)..]
            .iter()
            .map(|s| (s.status, s.authorization()))
            .collect()
    }

    /// The first request seen that `matches`, if any.
    pub fn first_seen(&self, matches: impl Fn(&Seen) -> bool) -> Option<Seen> {
        self.state().seen.iter().find(|s| matches(s)).cloned()
    }

    /// The most recent request; panics if there was none.
    pub fn last(&self) -> Seen {
        self.state()
            .seen
            .last()
            .cloned()
            .expect("the test API has seen no request")
    }

    pub fn ws_closed(&self) -> u64 {
        *self.shared.ws_closed.borrow()
    }

    pub fn ws_flooded(&self) -> u64 {
        *self.shared.ws_flooded.borrow()
    }

    pub fn ws_sunk(&self) -> u64 {
        *self.shared.ws_sunk.borrow()
    }

    /// Waits until a `/ws` sink has received `bytes`.
    pub async fn wait_for_ws_sunk(&self, bytes: u64) {
        wait_for(
            &self.shared.ws_sunk,
            bytes,
            "bytes received by the WebSocket sink",
        )
        .await;
    }

    /// When each event of `/events/NAME` was sent, oldest first.
    pub fn events_sent(&self, name: &str) -> Vec<tokio::time::Instant> {
        self.state()
            .events_sent
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `n` WebSocket connections have been opened on `/ws`.
    pub async fn wait_for_ws_opened(&self, n: u64) {
        wait_for(&self.shared.ws_opened, n, "WebSocket connections opened").await;
    }

    /// Waits up to `within` until `n` WebSocket connections on `/ws` have closed.
    pub async fn wait_for_ws_closed(&self, n: u64, within: std::time::Duration) {
        let mut rx = self.shared.ws_closed.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|closed| *closed >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "{n} WebSocket connections were not closed upstream within {within:?}; {} were",
            self.ws_closed()
        );
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: u64) {
        wait_for(&self.shared.requests, n, "API requests").await;
    }

    /// Waits until `n` requests have been answered 401.
    pub async fn wait_for_unauthorized(&self, n: u64) {
        wait_for(&self.shared.unauthorized, n, "401 answers from the API").await;
    }

    /// Waits until `n` requests are (or were) parked on `/hang` or `/gate`.
    pub async fn wait_for_parked(&self, n: u64) {
        wait_for(&self.shared.parked, n, "requests parked on /hang or /gate").await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

async fn wait_for(counter: &watch::Sender<u64>, n: u64, what: &str) {
    let mut rx = counter.subscribe();
    let reached = tokio::time::timeout(WAIT, rx.wait_for(|seen| *seen >= n)).await;
    assert!(
        matches!(reached, Ok(Ok(_))),
        "timed out after {WAIT:?} waiting for {n} {what}; saw {}",
        *counter.borrow()
    );
}

// === impl Shared ===

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === serving ===

fn serve_api(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: &Arc<Shared>,
) -> ServerTask {
    let tls = acceptor.is_some();
    let shared = Arc::clone(shared);
    serve::spawn(listener, acceptor, move |req| {
        handle(Arc::clone(&shared), tls, req)
    })
}

async fn handle(
    shared: Arc<Shared>,
    tls: bool,
    mut req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let at = tokio::time::Instant::now();
    let revoked = {
        let state = shared.state();
        let token = bearer(&parts.headers);
        token.is_some_and(|t| state.revoked.contains(t))
            || (state.require_issued
                && !token.is_some_and(|t| state.issued.as_ref().is_some_and(|i| i.is_valid(t))))
    };
    let status = if path == "/ws" {
        let issued = shared.state().issued.clone();
        ws::status(&parts.headers, issued.as_ref())
    } else if revoked {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let seen = Seen {
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_owned),
        version: parts.version,
        tls,
        headers: parts.headers.clone(),
        status,
        at,
    };
    let echo = echo(&seen);
    shared.state().seen.push(seen);
    shared.requests.send_modify(|n| *n += 1);

    if path == "/ws" {
        return Ok(ws::answer(&shared, status, &parts.headers, upgrade));
    }
    if revoked {
        // Read the body first, so a client still sending it sees the 401, not a reset.
        let mut body = body;
        while let Some(Ok(_)) = body.frame().await {}
        shared.unauthorized.send_modify(|n| *n += 1);
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "invalid_token" }),
        );
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return Ok(response);
    }

    let response = match (&parts.method, path.as_str()) {
        (_, "/hang") => {
            shared.parked.send_modify(|n| *n += 1);
            std::future::pending::<()>().await;
            unreachable!("pending() never completes")
        }
        (_, "/gate") => {
            shared.parked.send_modify(|n| *n += 1);
            // Err only if the API is gone, and then nobody waits for this response.
            let _ = shared.gate.subscribe().wait_for(|open| *open).await;
            json_response(StatusCode::OK, echo)
        }
        (&Method::GET, events) if events.starts_with("/events/") => {
            events::answer(&shared, &events["/events/".len()..])
        }
        (&Method::POST, "/upload") => {
            let received = count_upload(&shared, body).await;
            json_response(StatusCode::OK, json!({ "received": received }))
        }
        (&Method::GET, bytes) if bytes.starts_with("/bytes/") => {
            match bytes["/bytes/".len()..].parse::<u64>() {
                Ok(n) => {
                    let mut response = Response::new(
                        ZeroBody::counted(n, Arc::clone(&shared))
                            .map_err(|never| match never {})
                            .boxed(),
                    );
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        http::HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                Err(_) => json_response(StatusCode::BAD_REQUEST, json!({ "error": "bad size" })),
            }
        }
        _ => json_response(StatusCode::OK, echo),
    };
    Ok(response)
}

/// Reads the body frame by frame, counting bytes, keeping none.
async fn count_upload(shared: &Shared, mut body: Incoming) -> u64 {
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let n = data.len() as u64;
            received += n;
            shared.uploaded.send_modify(|total| *total += n);
        }
    }
    received
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn echo(seen: &Seen) -> serde_json::Value {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &seen.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    json!({
        "method": seen.method.as_str(),
        "path": seen.path,
        "version": format!("{:?}", seen.version),
        "tls": seen.tls,
        "headers": headers,
    })
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<ApiBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

// === ZeroBody ===

const CHUNK_SIZE: usize = 64 * 1024;
static ZEROES: [u8; CHUNK_SIZE] = [0; CHUNK_SIZE];

/// `len` zero bytes in 64 KiB frames of one static buffer: any size, no allocation.
/// Its exact size hint lets hyper send a `Content-Length`.
pub struct ZeroBody {
    remaining: u64,
    counter: Option<Arc<Shared>>,
}

impl ZeroBody {
    pub fn new(len: u64) -> Self {
        Self {
            remaining: len,
            counter: None,
        }
    }

    fn counted(len: u64, shared: Arc<Shared>) -> Self {
        Self {
            remaining: len,
            counter: Some(shared),
        }
    }
}

impl Body for ZeroBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK_SIZE as u64);
        self.remaining -= n;
        if let Some(shared) = &self.counter {
            shared.downloaded.send_modify(|total| *total += n);
        }
        let chunk = Bytes::from_static(&ZEROES[..n as usize]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
