//! A test OAuth token endpoint (`POST /token`, refresh_token grant) over HTTPS on
//! 127.0.0.1, behaving like a strict real provider: client authentication, refresh-token
//! rotation with reuse detection (see `chain`), failures on demand, and counters plus
//! awaitable events so tests synchronise on what happened instead of sleeping.
//!
//! All secrets it issues or expects contain `-SECRET-`, so tests can grep output for leaks.
//! Use real (unpaused) tokio time: its waits time out after [`WAIT`].

mod chain;
mod request;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use self::chain::{Chain, Redeem};
pub use self::request::{BodyFormat, RecordedRequest};
use super::ca::TestCa;
use super::serve::{self, ServerTask};

/// How long `wait_for_*` waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);
pub const CLIENT_ID: &str = "client-1";
pub const DEFAULT_EXPIRES_IN: u64 = 3600;

/// An injected failure, served instead of the real answer (the chain is left untouched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Status500,
    Status429 {
        retry_after_secs: u64,
    },
    /// 200 with a non-JSON body.
    Garbage,
    /// 200 JSON without `access_token`.
    EmptyToken,
    /// 400 `invalid_grant` (counted in `invalid_grant_count`).
    InvalidGrant,
    /// 400 `invalid_request` whose `error_description` quotes the presented refresh token
    /// and client secret, as careless providers do: credproxy must not repeat them.
    EchoSecrets,
    /// 400 with this `error` code and `error_description` (e.g. HTML, to check escaping).
    Described {
        error: &'static str,
        description: String,
    },
}

pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops serving (connections included) when the server is dropped.
    task: ServerTask,
}

struct Shared {
    state: Mutex<State>,
    calls: watch::Sender<u64>,
    responses: watch::Sender<u64>,
    /// `false` while responses are held (see `hold_responses`).
    open: watch::Sender<bool>,
}

struct State {
    client_id: String,
    client_secret: String,
    chain: Chain,
    expires_in: u64,
    send_expires_in: bool,
    delay: Duration,
    failures: VecDeque<Failure>,
    /// Issued access tokens and when each expires; `revoke_access_tokens` clears it.
    access_tokens: HashMap<String, Instant>,
    current_access_token: Option<String>,
    /// Every token this server handed out, access and refresh, in order.
    issued: Vec<String>,
    /// Every access token issued by a successful refresh, and when, in order.
    issuances: Vec<Issuance>,
    requests: Vec<RecordedRequest>,
    successes: u64,
    invalid_grants: u64,
    grace_redemptions: u64,
    in_flight: u64,
    max_in_flight: u64,
}

/// One successful refresh: the access token it issued, and when.
#[derive(Clone, Debug)]
pub struct Issuance {
    /// When the server decided the answer (the token is valid from then on; the response
    /// may be held back after it, see `set_delay`).
    pub at: Instant,
    pub access_token: String,
}

/// A reply before it becomes an HTTP response.
struct Reply {
    status: StatusCode,
    body: String,
    retry_after: Option<u64>,
    json: bool,
}

// === secrets ===

fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A fresh client secret, `cs-SECRET-<random>`.
pub fn new_client_secret() -> String {
    format!("cs-SECRET-{}", random_hex())
}

/// The `n`th refresh token of a chain, `rt-SECRET-<n>-<random>`; tests seed with `n = 0`.
pub fn new_refresh_token(n: u64) -> String {
    format!("rt-SECRET-{n}-{}", random_hex())
}

fn new_access_token(n: u64) -> String {
    format!("at-SECRET-{n}-{}", random_hex())
}

/// The access tokens a [`TokenServer`] issued, as an API sees them.
#[derive(Clone)]
pub struct Issued(Arc<Shared>);

impl Issued {
    /// Issued by the server, not revoked, not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        self.0
            .state()
            .access_tokens
            .get(token)
            .is_some_and(|expires_at| Instant::now() < *expires_at)
    }
}

// === impl TokenServer ===

impl TokenServer {
    /// Serves `POST /token` on 127.0.0.1 with a leaf from `ca`, accepting `initial_refresh_token`
    /// from client [`CLIENT_ID`] with secret [`client_secret`](Self::client_secret).
    pub async fn start(ca: &TestCa, initial_refresh_token: &str) -> Self {
        let listener = serve::bind("token server").await;
        let addr = listener.local_addr().expect("token server local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client_id: CLIENT_ID.to_owned(),
                client_secret: new_client_secret(),
                chain: Chain::new(initial_refresh_token.to_owned()),
                expires_in: DEFAULT_EXPIRES_IN,
                send_expires_in: true,
                delay: Duration::ZERO,
                failures: VecDeque::new(),
                access_tokens: HashMap::new(),
                issued: Vec::new(),
                issuances: Vec::new(),
                current_access_token: None,
                requests: Vec::new(),
                successes: 0,
                invalid_grants: 0,
                grace_redemptions: 0,
                in_flight: 0,
                max_in_flight: 0,
            }),
            calls: watch::Sender::new(0),
            responses: watch::Sender::new(0),
            open: watch::Sender::new(true),
        });
        let handler_shared = Arc::clone(&shared);
        let task = serve::spawn(listener, Some(ca.acceptor()), move |req| {
            handle(Arc::clone(&handler_shared), req)
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT/token`
    pub fn url(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    pub fn client_id(&self) -> String {
        self.state().client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        self.state().client_secret.clone()
    }

    // --- knobs ---

    /// Replaces the accepted client credentials (e.g. a secret that needs urlencoding).
    pub fn set_client(&self, id: &str, secret: &str) {
        let mut state = self.state();
        state.client_id = id.to_owned();
        state.client_secret = secret.to_owned();
    }

    /// Holds every response this long. The grant takes effect before the wait, as on a
    /// provider whose response is lost: a client that gives up has still rotated the chain.
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Holds every response (after its grant took effect) until `release_responses`:
    /// keeps a refresh in flight for exactly as long as a test needs, with no timing.
    pub fn hold_responses(&self) {
        self.shared.open.send_replace(false);
    }

    pub fn release_responses(&self) {
        self.shared.open.send_replace(true);
    }

    /// The next `n` POSTs get `failure` (appended after failures already queued).
    pub fn fail_next(&self, n: usize, failure: Failure) {
        self.state()
            .failures
            .extend(std::iter::repeat_n(failure, n));
    }

    pub fn set_expires_in(&self, secs: u64) {
        self.state().expires_in = secs;
    }

    /// Leave `expires_in` out of responses (tokens still expire after the configured time).
    pub fn set_send_expires_in(&self, send: bool) {
        self.state().send_expires_in = send;
    }

    /// With rotation off, responses carry no `refresh_token` and the current one stays valid.
    pub fn set_rotation(&self, rotate: bool) {
        self.state().chain.rotation = rotate;
    }

    /// Every refresh token now gets `invalid_grant` (a permanent failure).
    pub fn revoke_all(&self) {
        self.state().chain.revoke_all();
    }

    /// Starts a new chain at `refresh_token` (recovery after `revoke_all`).
    pub fn reset_chain(&self, refresh_token: &str) {
        self.state().chain.reset(refresh_token.to_owned());
    }

    /// Every access token issued so far becomes invalid (for an upstream to answer 401).
    pub fn revoke_access_tokens(&self) {
        self.state().access_tokens.clear();
    }

    // --- observability ---

    /// POST requests received (any path, any outcome).
    pub fn calls(&self) -> u64 {
        *self.shared.calls.borrow()
    }

    /// Responses handed back to the connection, any status.
    pub fn responses(&self) -> u64 {
        *self.shared.responses.borrow()
    }

    /// Successful refreshes.
    pub fn successes(&self) -> u64 {
        self.state().successes
    }

    /// `invalid_grant` answers: reused, unknown or revoked tokens, and injected ones.
    pub fn invalid_grant_count(&self) -> u64 {
        self.state().invalid_grants
    }

    /// Successful refreshes that presented the grace token (a retry after a lost response).
    pub fn grace_redemptions(&self) -> u64 {
        self.state().grace_redemptions
    }

    /// Most requests ever being handled at once (1 means refreshes never overlapped).
    pub fn max_in_flight(&self) -> u64 {
        self.state().max_in_flight
    }

    pub fn current_access_token(&self) -> Option<String> {
        self.state().current_access_token.clone()
    }

    /// Issued by this server, not revoked, not expired.
    pub fn is_valid_access_token(&self, token: &str) -> bool {
        self.issued().is_valid(token)
    }

    /// A handle an API keeps to check tokens against this server.
    pub fn issued(&self) -> Issued {
        Issued(Arc::clone(&self.shared))
    }

    /// The refresh token the provider currently expects (`None` after `revoke_all`).
    pub fn latest_refresh_token(&self) -> Option<String> {
        self.state().chain.latest().map(str::to_owned)
    }

    /// Every access and refresh token this server issued (not the initial one).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state().issued.clone()
    }

    /// Every successful refresh, oldest first, with when it issued its access token.
    pub fn issuances(&self) -> Vec<Issuance> {
        self.state().issuances.clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state().requests.last().cloned()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Waits until at least `n` POSTs have arrived; panics after [`WAIT`].
    pub async fn wait_for_calls(&self, n: u64) {
        wait_for(&self.shared.calls, n, "token requests to arrive").await;
    }

    /// Waits until at least `n` responses have been sent; panics after [`WAIT`].
    pub async fn wait_for_responses(&self, n: u64) {
        wait_for(&self.shared.responses, n, "token responses to be sent").await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

/// Waits until `counter` reaches `n`; panics after [`WAIT`], naming `what` it waited for.
pub async fn wait_for(counter: &watch::Sender<u64>, n: u64, what: &str) {
    let mut rx = counter.subscribe();
    let reached = tokio::time::timeout(WAIT, rx.wait_for(|seen| *seen >= n)).await;
    if !matches!(reached, Ok(Ok(_))) {
        panic!(
            "timed out after {WAIT:?} waiting for {n} {what}; saw {}",
            *counter.borrow()
        );
    }
}

// === impl Shared ===

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not cascade into every later assertion.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === serving ===

/// Decrements the in-flight count however the handler ends (a cancelled future included).
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state().in_flight -= 1;
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    {
        let mut state = shared.state();
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
    }
    let _in_flight = InFlight(Arc::clone(&shared));

    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let recorded = RecordedRequest::new(
        parts.method,
        parts.uri.path().to_owned(),
        parts.headers,
        body,
    );
    let is_post = recorded.method == Method::POST;

    let (reply, delay) = {
        let mut state = shared.state();
        let reply = state.respond(&recorded);
        state.requests.push(recorded);
        (reply, state.delay)
    };
    if is_post {
        shared.calls.send_modify(|n| *n += 1);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // Err only if the server is gone, and then nobody is waiting for this response.
    let _ = shared.open.subscribe().wait_for(|open| *open).await;
    shared.responses.send_modify(|n| *n += 1);
    Ok(reply.into_response())
}

// === impl State ===

impl State {
    /// Decides the answer to one request and applies its effect on the chain.
    fn respond(&mut self, req: &RecordedRequest) -> Reply {
        if req.path != "/token" {
            return Reply::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
        }
        if req.method != Method::POST {
            return Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            );
        }
        if let Some(failure) = self.failures.pop_front() {
            return self.injected(failure, req);
        }
        let Some(fields) = &req.fields else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "body must be application/x-www-form-urlencoded or a JSON object",
            );
        };
        if let Some(reply) = self.authenticate(req) {
            return reply;
        }
        if fields.get("grant_type").map(String::as_str) != Some("refresh_token") {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be refresh_token",
            );
        }
        let Some(presented) = fields.get("refresh_token") else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "refresh_token missing",
            );
        };
        let n = self.successes + 1;
        let grace = self.chain.is_grace(presented);
        let new_refresh = match self.chain.redeem(presented, || new_refresh_token(n)) {
            Redeem::Rotated(token) => Some(token),
            Redeem::Kept => None,
            Redeem::Reused | Redeem::Unknown => return self.invalid_grant(),
        };
        self.successes = n;
        if grace {
            self.grace_redemptions += 1;
        }
        self.issue(n, new_refresh)
    }

    /// `None` when the client is authenticated; RFC 6749 §2.3: exactly one method.
    fn authenticate(&self, req: &RecordedRequest) -> Option<Reply> {
        let basic = req.auth_scheme().is_some();
        let body_secret = req.field("client_secret");
        let (id, secret) = match (basic, body_secret) {
            (true, Some(_)) => {
                return Some(Reply::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "more than one client authentication method",
                ));
            }
            (true, None) => match req.basic_credentials() {
                Some((id, secret)) => (id, secret),
                None => return Some(Reply::invalid_client()),
            },
            (false, Some(secret)) => (
                req.field("client_id").unwrap_or_default().to_owned(),
                secret.to_owned(),
            ),
            (false, None) => return Some(Reply::invalid_client()),
        };
        (id != self.client_id || secret != self.client_secret).then(Reply::invalid_client)
    }

    fn issue(&mut self, n: u64, refresh_token: Option<String>) -> Reply {
        let access_token = new_access_token(n);
        // A lifetime past what `Instant` can hold (a test of absurd `expires_in`) never ends.
        let now = Instant::now();
        let expires_at = now
            .checked_add(Duration::from_secs(self.expires_in))
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        self.access_tokens.insert(access_token.clone(), expires_at);
        self.issuances.push(Issuance {
            at: now,
            access_token: access_token.clone(),
        });
        self.current_access_token = Some(access_token.clone());
        self.issued.push(access_token.clone());
        self.issued.extend(refresh_token.clone());
        let mut body = json!({ "access_token": access_token, "token_type": "bearer" });
        if self.send_expires_in {
            body["expires_in"] = json!(self.expires_in);
        }
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = json!(refresh_token);
        }
        Reply::json(StatusCode::OK, body.to_string())
    }

    fn invalid_grant(&mut self) -> Reply {
        self.invalid_grants += 1;
        Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "refresh token reused or revoked",
        )
    }

    fn injected(&mut self, failure: Failure, req: &RecordedRequest) -> Reply {
        match failure {
            Failure::Described { error, description } => {
                Reply::error(StatusCode::BAD_REQUEST, error, &description)
            }
            Failure::Status500 => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "injected failure",
            ),
            Failure::Status429 { retry_after_secs } => Reply {
                retry_after: Some(retry_after_secs),
                ..Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "temporarily_unavailable",
                    "slow down",
                )
            },
            Failure::Garbage => Reply {
                status: StatusCode::OK,
                body: "<html><body>Service Unavailable</body></html>".to_owned(),
                retry_after: None,
                json: false,
            },
            Failure::EmptyToken => Reply::json(
                StatusCode::OK,
                json!({ "token_type": "bearer", "expires_in": self.expires_in }).to_string(),
            ),
            Failure::InvalidGrant => self.invalid_grant(),
            Failure::EchoSecrets => {
                let secret = req
                    .basic_credentials()
                    .map(|(_, secret)| secret)
                    .or_else(|| req.field("client_secret").map(str::to_owned))
                    .unwrap_or_default();
                let refresh_token = req.field("refresh_token").unwrap_or_default();
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!(
                        "refresh_token {refresh_token} is malformed for client secret {secret}"
                    ),
                )
            }
        }
    }
}

// === impl Reply ===

impl Reply {
    fn json(status: StatusCode, body: String) -> Self {
        Self {
            status,
            body,
            retry_after: None,
            json: true,
        }
    }

    fn error(status: StatusCode, error: &str, description: &str) -> Self {
        let body = json!({ "error": error, "error_description": description });
        Self::json(status, body.to_string())
    }

    fn invalid_client() -> Self {
        Self::error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        )
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let content_type = if self.json {
            "application/json"
        } else {
            "text/html"
        };
        let mut builder = Response::builder()
            .status(self.status)
            .header(CONTENT_TYPE, content_type)
            .header(CACHE_CONTROL, "no-store");
        if self.status == StatusCode::UNAUTHORIZED {
            builder = builder.header(WWW_AUTHENTICATE, "Basic realm=\"token\"");
        }
        if let Some(secs) = self.retry_after {
            builder = builder.header(RETRY_AFTER, secs);
        }
        builder
            .body(Full::new(Bytes::from(self.body)))
            .expect("static response parts are valid")
    }
}
