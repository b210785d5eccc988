//! A test OAuth 2.0 authorization server for `credproxy authorize`, over HTTPS on
//! 127.0.0.1 (a leaf from the test CA, trusted by credproxy through `extra_ca`): the
//! authorization-code grant with PKCE (RFC 6749 §4.1, RFC 7636, S256 only), run as
//! strictly as a real provider runs it. The test plays the browser with [`Browser`] and
//! drives the command with [`AuthorizeRun`].
//!
//! - `GET /authorize?response_type=code&client_id&redirect_uri&state&code_challenge&code_challenge_method=S256[&scope][&token_access_type=offline]`:
//!   an unknown client or an unregistered `redirect_uri` gets a 400 page and no redirect
//!   (RFC 6749 §4.1.2.1); any other bad parameter a 302 back with `error=invalid_request`.
//!   A good request gets the consent "form", as JSON:
//!   `{"consent": {"method": "POST", "action": "/authorize/consent",
//!   "fields": {"request_id": …}, "decisions": ["approve", "deny"]}, "client_id": …}`.
//! - `POST /authorize/consent` (form `request_id`, `decision`): 302 to the `redirect_uri`
//!   with `code` and `state`, or with `error=access_denied`, `error_description` and `state`.
//! - `POST /token`, `grant_type=authorization_code`: client authentication (Basic or body
//!   fields, exactly one), a code it issued and that was never presented before (any
//!   presentation uses it up), the authorization request's `redirect_uri`, and a
//!   `code_verifier` whose S256 is the `code_challenge`; anything else is `invalid_grant`.
//!   `grant_type=refresh_token`: a refresh token of the chain it issued, rotated on every
//!   use; a superseded one is `invalid_grant`.
//!
//! Like Dropbox, it issues a refresh token only when the authorization request asked for
//! offline access (`token_access_type=offline`). Everything secret it issues or accepts
//! (client secret, codes, refresh and access tokens) contains `-SECRET-`, so every run's
//! output can be scanned for leaks; code verifiers are credproxy's own, so the server
//! records them ([`AuthzServer::verifiers`]) for the tests to look for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use url::Url;

use super::ca::TestCa;
use super::cli::{self, ConfigBuilder, Output, RUN_TIMEOUT, TestDir};
use super::serve::{self, ServerTask};
use super::token::{CLIENT_ID, RecordedRequest, WAIT, new_client_secret};

/// The integration's line that asks for offline access, as the Dropbox example does.
pub const OFFLINE: &str = r#"extra_authorize_params = { token_access_type = "offline" }"#;
/// What the consent page's "deny" sends back.
pub const DENIED_DESCRIPTION: &str = "The user denied the request";

fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `http://127.0.0.1:PORT/callback` on a port that was free a moment ago (bound to
/// 127.0.0.1:0, then released), for an integration's `redirect_uri`.
pub async fn free_redirect_uri() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}/callback")
}

/// RFC 7636 §4.2: BASE64URL(SHA256(verifier)), unpadded.
pub fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A query parameter of `url`; panics if `url` does not parse.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .unwrap_or_else(|e| panic!("not a URL ({e}): {url}"))
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

// === AuthzServer ===

pub struct AuthzServer {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    /// Stops serving (connections included) when the server is dropped.
    task: ServerTask,
}

struct Shared {
    state: Mutex<State>,
    /// `POST /token` requests received, any outcome.
    token_calls: watch::Sender<u64>,
}

/// An authorization request the user has not decided on yet.
#[derive(Clone)]
struct Pending {
    redirect_uri: String,
    state: Option<String>,
    challenge: String,
    offline: bool,
    scope: Option<String>,
}

/// What an issued code stands for.
struct Grant {
    redirect_uri: String,
    challenge: String,
    offline: bool,
    scope: Option<String>,
    presented: bool,
}

struct State {
    client_id: String,
    client_secret: String,
    redirect_uri: String,
    pending: HashMap<String, Pending>,
    codes: HashMap<String, Grant>,
    /// The refresh token the chain accepts now.
    current_refresh_token: Option<String>,
    /// Superseded refresh tokens: presenting one is reuse.
    retired_refresh_tokens: HashSet<String>,
    latest_access_token: Option<String>,
    corrupt_challenges: bool,
    echo_secrets: bool,
    issued: u64,
    authorization_requests: Vec<BTreeMap<String, String>>,
    consents: u64,
    token_requests: Vec<RecordedRequest>,
    code_exchanges: u64,
    refreshes: u64,
    /// The `error` of every failed `POST /token`, in order.
    token_errors: Vec<String>,
    verifiers: Vec<String>,
}

impl AuthzServer {
    /// Serves on 127.0.0.1 with a leaf from `ca`, for client [`CLIENT_ID`] (secret
    /// [`client_secret`](Self::client_secret)) whose one registered redirect URI is
    /// `http://127.0.0.1:PORT/callback` on a port found free after this server bound its
    /// own (so the two cannot collide).
    pub async fn start(ca: &TestCa) -> Self {
        let listener = serve::bind("authorization server").await;
        let addr = listener
            .local_addr()
            .expect("authorization server local_addr");
        let redirect_uri = free_redirect_uri().await;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client_id: CLIENT_ID.to_owned(),
                client_secret: new_client_secret(),
                redirect_uri,
                pending: HashMap::new(),
                codes: HashMap::new(),
                current_refresh_token: None,
                retired_refresh_tokens: HashSet::new(),
                latest_access_token: None,
                corrupt_challenges: false,
                echo_secrets: false,
                issued: 0,
                authorization_requests: Vec::new(),
                consents: 0,
                token_requests: Vec::new(),
                code_exchanges: 0,
                refreshes: 0,
                token_errors: Vec::new(),
                verifiers: Vec::new(),
            }),
            token_calls: watch::Sender::new(0),
        });
        let handler_shared = Arc::clone(&shared);
        let task = serve::spawn(listener, Some(ca.acceptor()), move |req| {
            handle(Arc::clone(&handler_shared), req)
        });
        Self { addr, shared, task }
    }

    /// `https://127.0.0.1:PORT/authorize`
    pub fn authorize_url(&self) -> String {
        format!("https://{}/authorize", self.addr)
    }

    /// `https://127.0.0.1:PORT/token`
    pub fn token_url(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    pub fn client_id(&self) -> String {
        self.state().client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        self.state().client_secret.clone()
    }

    pub fn redirect_uri(&self) -> String {
        self.state().redirect_uri.clone()
    }

    /// Sets `builder`'s integration up for this server: client id, the client secret via
    /// `${TEST_CLIENT_SECRET}`, `refresh_url`, `authorize_url`, `redirect_uri`, offline
    /// access asked for, and no `refresh_token` (that is what `authorize` is for).
    pub fn configure(&self, builder: ConfigBuilder) -> ConfigBuilder {
        self.configure_online(builder).integration_line(OFFLINE)
    }

    /// [`configure`](Self::configure) without asking for offline access.
    pub fn configure_online(&self, builder: ConfigBuilder) -> ConfigBuilder {
        builder
            .client_id(&self.client_id())
            .client_secret_env(ConfigBuilder::SECRET_VAR, &self.client_secret())
            .refresh_url(&self.token_url())
            .no_refresh_token()
            .option("authorize_url", &self.authorize_url())
            .option("redirect_uri", &self.redirect_uri())
    }

    // --- knobs ---

    /// Codes issued from now on expect a challenge other than the one the authorization
    /// request carried, as if that request had been tampered with on its way: the real
    /// verifier then fails the S256 check (`invalid_grant`).
    pub fn corrupt_challenges(&self) {
        self.state().corrupt_challenges = true;
    }

    /// Token error descriptions quote the presented code, code verifier and client
    /// secret, as careless providers do: credproxy must not repeat them.
    pub fn echo_secrets(&self) {
        self.state().echo_secrets = true;
    }

    // --- observability ---

    /// The query of every `GET /authorize`, in order.
    pub fn authorization_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.state().authorization_requests.clone()
    }

    /// Consent decisions posted (approve or deny).
    pub fn consents(&self) -> u64 {
        self.state().consents
    }

    /// `POST /token` requests received, any outcome.
    pub fn token_calls(&self) -> u64 {
        *self.shared.token_calls.borrow()
    }

    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.state().token_requests.clone()
    }

    /// Successful `authorization_code` exchanges.
    pub fn code_exchanges(&self) -> u64 {
        self.state().code_exchanges
    }

    /// Successful `refresh_token` grants.
    pub fn refreshes(&self) -> u64 {
        self.state().refreshes
    }

    /// The `error` of every failed `POST /token`, in order.
    pub fn token_errors(&self) -> Vec<String> {
        self.state().token_errors.clone()
    }

    /// Every `code_verifier` presented (secrets the leak scans cannot recognise).
    pub fn verifiers(&self) -> Vec<String> {
        self.state().verifiers.clone()
    }

    /// The refresh token the chain accepts now (`None` before the first offline grant).
    pub fn latest_refresh_token(&self) -> Option<String> {
        self.state().current_refresh_token.clone()
    }

    pub fn latest_access_token(&self) -> Option<String> {
        self.state().latest_access_token.clone()
    }

    /// Waits until at least `n` token requests have arrived; panics after [`WAIT`].
    pub async fn wait_for_token_calls(&self, n: u64) {
        let mut rx = self.shared.token_calls.subscribe();
        let reached = tokio::time::timeout(WAIT, rx.wait_for(|seen| *seen >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "timed out after {WAIT:?} waiting for {n} token requests; saw {}",
            self.token_calls()
        );
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === serving ===

/// An answer before it becomes an HTTP response.
enum Reply {
    Json(StatusCode, Value),
    Page(StatusCode, String),
    Redirect(Url),
}

impl Reply {
    fn error(status: StatusCode, error: &str, description: &str) -> Self {
        Self::Json(
            status,
            json!({ "error": error, "error_description": description }),
        )
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let builder = Response::builder().header(CACHE_CONTROL, "no-store");
        let (builder, body) = match self {
            Self::Json(status, value) => (
                builder
                    .status(status)
                    .header(CONTENT_TYPE, "application/json"),
                value.to_string(),
            ),
            Self::Page(status, text) => (
                builder
                    .status(status)
                    .header(CONTENT_TYPE, "text/plain; charset=utf-8"),
                text,
            ),
            Self::Redirect(location) => (
                builder
                    .status(StatusCode::FOUND)
                    .header(LOCATION, location.as_str()),
                String::new(),
            ),
        };
        builder
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let path = parts.uri.path().to_owned();
    let reply = match (&parts.method, path.as_str()) {
        (&Method::GET, "/authorize") => shared.state().authorize(query),
        (&Method::POST, "/authorize/consent") => {
            let form: BTreeMap<String, String> =
                form_urlencoded::parse(&body).into_owned().collect();
            shared.state().consent(&form)
        }
        (&Method::POST, "/token") => {
            let recorded = RecordedRequest::new(parts.method, path, parts.headers, body);
            let reply = {
                let mut state = shared.state();
                let reply = state.token(&recorded);
                if let Reply::Json(status, value) = &reply
                    && !status.is_success()
                {
                    let error = value["error"].as_str().unwrap_or_default().to_owned();
                    state.token_errors.push(error);
                }
                state.token_requests.push(recorded);
                reply
            };
            shared.token_calls.send_modify(|n| *n += 1);
            reply
        }
        _ => Reply::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    Ok(reply.into_response())
}

// === impl State ===

impl State {
    fn next(&mut self) -> u64 {
        self.issued += 1;
        self.issued
    }

    /// `GET /authorize`: the consent form, or why not.
    fn authorize(&mut self, query: BTreeMap<String, String>) -> Reply {
        self.authorization_requests.push(query.clone());
        let get = |name: &str| query.get(name).map(String::as_str);
        // No redirect to a client or URI we cannot vouch for (RFC 6749 §4.1.2.1).
        if get("client_id") != Some(self.client_id.as_str()) {
            return Reply::Page(StatusCode::BAD_REQUEST, "unknown client_id".to_owned());
        }
        if get("redirect_uri") != Some(self.redirect_uri.as_str()) {
            return Reply::Page(
                StatusCode::BAD_REQUEST,
                "redirect_uri is not registered for this client".to_owned(),
            );
        }
        let state = query.get("state").cloned();
        let problem = if get("response_type") != Some("code") {
            Some("response_type must be code")
        } else if get("code_challenge_method") != Some("S256") {
            Some("code_challenge_method must be S256")
        } else if get("code_challenge").is_none_or(|c| c.len() != 43) {
            Some("code_challenge must be a base64url SHA-256 (43 characters)")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Reply::Redirect(redirect(
                &self.redirect_uri,
                &[("error", "invalid_request"), ("error_description", problem)],
                state.as_deref(),
            ));
        }
        let request_id = format!("req-{}", random_hex());
        self.pending.insert(
            request_id.clone(),
            Pending {
                redirect_uri: self.redirect_uri.clone(),
                state,
                challenge: get("code_challenge").unwrap_or_default().to_owned(),
                offline: get("token_access_type") == Some("offline"),
                scope: query.get("scope").cloned(),
            },
        );
        Reply::Json(
            StatusCode::OK,
            json!({
                "client_id": self.client_id,
                "scope": query.get("scope"),
                "consent": {
                    "method": "POST",
                    "action": "/authorize/consent",
                    "fields": { "request_id": request_id },
                    "decisions": ["approve", "deny"],
                },
            }),
        )
    }

    /// `POST /authorize/consent`: back to the client with a code or `access_denied`.
    fn consent(&mut self, form: &BTreeMap<String, String>) -> Reply {
        let Some(pending) = form
            .get("request_id")
            .and_then(|id| self.pending.remove(id))
        else {
            return Reply::Page(
                StatusCode::BAD_REQUEST,
                "unknown or already decided authorization request".to_owned(),
            );
        };
        self.consents += 1;
        match form.get("decision").map(String::as_str) {
            Some("approve") => {
                let n = self.next();
                let code = format!("code-SECRET-{n}-{}", random_hex());
                let challenge = if self.corrupt_challenges {
                    s256(&format!("not-the-verifier-{}", random_hex()))
                } else {
                    pending.challenge.clone()
                };
                self.codes.insert(
                    code.clone(),
                    Grant {
                        redirect_uri: pending.redirect_uri.clone(),
                        challenge,
                        offline: pending.offline,
                        scope: pending.scope.clone(),
                        presented: false,
                    },
                );
                Reply::Redirect(redirect(
                    &pending.redirect_uri,
                    &[("code", &code)],
                    pending.state.as_deref(),
                ))
            }
            Some("deny") => Reply::Redirect(redirect(
                &pending.redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", DENIED_DESCRIPTION),
                ],
                pending.state.as_deref(),
            )),
            _ => Reply::Page(
                StatusCode::BAD_REQUEST,
                "decision must be approve or deny".to_owned(),
            ),
        }
    }

    /// `POST /token`.
    fn token(&mut self, req: &RecordedRequest) -> Reply {
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
        match fields.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.exchange_code(req),
            Some("refresh_token") => self.refresh(req),
            _ => Reply::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            ),
        }
    }

    /// `None` when the client is authenticated; RFC 6749 §2.3: exactly one method.
    fn authenticate(&self, req: &RecordedRequest) -> Option<Reply> {
        let invalid_client = || {
            Reply::error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            )
        };
        let (id, secret) = match (req.auth_scheme().is_some(), req.field("client_secret")) {
            (true, Some(_)) => {
                return Some(Reply::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "more than one client authentication method",
                ));
            }
            (true, None) => match req.basic_credentials() {
                Some(credentials) => credentials,
                None => return Some(invalid_client()),
            },
            (false, Some(secret)) => (
                req.field("client_id").unwrap_or_default().to_owned(),
                secret.to_owned(),
            ),
            (false, None) => return Some(invalid_client()),
        };
        (id != self.client_id || secret != self.client_secret).then(invalid_client)
    }

    fn exchange_code(&mut self, req: &RecordedRequest) -> Reply {
        let code = req.field("code").unwrap_or_default().to_owned();
        let verifier = req.field("code_verifier").unwrap_or_default().to_owned();
        if !verifier.is_empty() {
            self.verifiers.push(verifier.clone());
        }
        let echo = if self.echo_secrets {
            format!(
                " (code {code}, code_verifier {verifier}, client_secret {})",
                self.client_secret
            )
        } else {
            String::new()
        };
        let invalid_grant = |why: &str| {
            Reply::error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                &format!("{why}{echo}"),
            )
        };
        let Some(grant) = self.codes.get_mut(&code) else {
            return invalid_grant("unknown authorization code");
        };
        // One presentation per code, whatever its outcome (RFC 6749 §4.1.2).
        if std::mem::replace(&mut grant.presented, true) {
            return invalid_grant("authorization code already used");
        }
        if req.field("redirect_uri") != Some(grant.redirect_uri.as_str()) {
            return invalid_grant("redirect_uri does not match the authorization request");
        }
        // RFC 7636 §4.1: 43 to 128 unreserved characters.
        let well_formed = (43..=128).contains(&verifier.len())
            && verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !well_formed || s256(&verifier) != grant.challenge {
            return invalid_grant("PKCE verification failed: code_verifier does not match");
        }
        let (offline, scope) = (grant.offline, grant.scope.clone());
        self.code_exchanges += 1;
        let n = self.next();
        let refresh_token = offline.then(|| {
            let token = format!("rt-SECRET-{n}-{}", random_hex());
            // A new authorization starts a new chain.
            if let Some(old) = self.current_refresh_token.replace(token.clone()) {
                self.retired_refresh_tokens.insert(old);
            }
            token
        });
        self.issue(n, refresh_token, scope)
    }

    fn refresh(&mut self, req: &RecordedRequest) -> Reply {
        let presented = req.field("refresh_token").unwrap_or_default();
        if self.current_refresh_token.as_deref() != Some(presented) {
            let why = if self.retired_refresh_tokens.contains(presented) {
                "refresh token reused"
            } else {
                "unknown refresh token"
            };
            return Reply::error(StatusCode::BAD_REQUEST, "invalid_grant", why);
        }
        self.refreshes += 1;
        let n = self.next();
        let next = format!("rt-SECRET-{n}-{}", random_hex());
        if let Some(old) = self.current_refresh_token.replace(next.clone()) {
            self.retired_refresh_tokens.insert(old);
        }
        self.issue(n, Some(next), None)
    }

    fn issue(&mut self, n: u64, refresh_token: Option<String>, scope: Option<String>) -> Reply {
        let access_token = format!("at-SECRET-{n}-{}", random_hex());
        self.latest_access_token = Some(access_token.clone());
        let mut body = json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": 3600,
        });
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = json!(refresh_token);
        }
        if let Some(scope) = scope {
            body["scope"] = json!(scope);
        }
        Reply::Json(StatusCode::OK, body)
    }
}

/// `redirect_uri` with `params` and `state` (when the request had one) added.
fn redirect(redirect_uri: &str, params: &[(&str, &str)], state: Option<&str>) -> Url {
    let mut url = Url::parse(redirect_uri).expect("the registered redirect_uri is a URL");
    {
        let mut query = url.query_pairs_mut();
        for (key, value) in params {
            query.append_pair(key, value);
        }
        if let Some(state) = state {
            query.append_pair("state", state);
        }
    }
    url
}

// === Browser ===

/// The test playing the user's browser: trusts the test CA, uses no proxy, and follows
/// no redirect by itself, so each hop can be looked at (and tampered with).
pub struct Browser {
    http: reqwest::Client,
}

/// The consent form of one authorization request.
#[derive(Debug, Clone)]
pub struct Consent {
    pub action: Url,
    pub request_id: String,
    /// The whole page, as JSON.
    pub page: Value,
}

#[derive(Clone, Copy, Debug)]
pub enum Decision {
    Approve,
    Deny,
}

/// A page as the browser shows it.
#[derive(Debug)]
pub struct Page {
    pub status: StatusCode,
    /// Where a redirect points.
    pub location: Option<String>,
    pub body: String,
}

impl Browser {
    pub fn new(ca: &TestCa) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(ca.client_config())
            .timeout(WAIT)
            .build()
            .expect("building the browser's client");
        Self { http }
    }

    /// Opens the authorization URL and reads the consent form; panics unless it is one.
    pub async fn open(&self, url: &str) -> Consent {
        let page = self.get(url).await;
        assert_eq!(
            page.status,
            StatusCode::OK,
            "the authorization page did not offer consent: {}",
            page.body
        );
        let page: Value = serde_json::from_str(&page.body)
            .unwrap_or_else(|e| panic!("the consent page is not JSON ({e}): {}", page.body));
        let base = Url::parse(url).expect("the authorization URL parses");
        let action = base
            .join(page["consent"]["action"].as_str().expect("consent.action"))
            .expect("consent.action is a URL path");
        let request_id = page["consent"]["fields"]["request_id"]
            .as_str()
            .expect("consent.fields.request_id")
            .to_owned();
        Consent {
            action,
            request_id,
            page,
        }
    }

    /// Posts the decision and returns where the server redirects to (the `Location`).
    pub async fn decide(&self, consent: &Consent, decision: Decision) -> String {
        let decision = match decision {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        };
        let response = self
            .http
            .post(consent.action.clone())
            .form(&[
                ("request_id", consent.request_id.as_str()),
                ("decision", decision),
            ])
            .send()
            .await
            .unwrap_or_else(|e| panic!("posting the consent: {e}"));
        assert_eq!(response.status(), StatusCode::FOUND, "consent answer");
        response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("the consent answer redirects")
            .to_owned()
    }

    /// Opens `url`, decides, and returns the redirect's `Location`.
    pub async fn authorize(&self, url: &str, decision: Decision) -> String {
        let consent = self.open(url).await;
        self.decide(&consent, decision).await
    }

    /// `GET url` with no redirect following: the page, whatever its status.
    pub async fn get(&self, url: &str) -> Page {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading GET {url}: {e}"));
        Page {
            status,
            location,
            body,
        }
    }

    /// A token request as a client would send it (Basic client auth, form body).
    pub async fn token(
        &self,
        server: &AuthzServer,
        fields: &[(&str, &str)],
        client_secret: &str,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(client_secret))
            .form(fields)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /token: {e}"));
        let status = response.status();
        let body = response.text().await.expect("reading the token answer");
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("the token answer is not JSON ({e}): {body}"));
        (status, value)
    }
}

// === AuthorizeRun ===

/// `credproxy authorize …` as a child process whose stdout the test reads line by line
/// while it runs (the URL to open, then "Waiting up to …"), with stdin for `--manual`.
pub struct AuthorizeRun {
    child: Child,
    args: Vec<String>,
    stdin: Option<ChildStdin>,
    stdout: Arc<Lines>,
    stderr: JoinHandle<String>,
}

#[derive(Default)]
struct LinesState {
    text: String,
    closed: bool,
}

struct Lines {
    state: Mutex<LinesState>,
    changed: watch::Sender<u64>,
}

impl Lines {
    fn state(&self) -> MutexGuard<'_, LinesState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AuthorizeRun {
    /// Starts `credproxy ARGS` in `dir` (stdin closed).
    pub fn spawn(dir: &TestDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start(dir.path(), args, env, false)
    }

    /// Starts `credproxy ARGS` in `dir` with stdin open for [`paste`](Self::paste).
    pub fn spawn_with_stdin(dir: &TestDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start(dir.path(), args, env, true)
    }

    fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)], stdin: bool) -> Self {
        let mut command = cli::command(cwd, args, env);
        if stdin {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cli::bin().display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Lines {
            state: Mutex::new(LinesState::default()),
            changed: watch::Sender::new(0),
        });
        let reader = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                {
                    let mut state = reader.state();
                    state.text.push_str(&line);
                    state.text.push('\n');
                }
                reader.changed.send_modify(|n| *n += 1);
            }
            reader.state().closed = true;
            reader.changed.send_modify(|n| *n += 1);
        });
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Self {
            child,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            stdin,
            stdout: lines,
            stderr,
        }
    }

    /// stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.state().text.clone()
    }

    /// Waits for a stdout line `matches` accepts and returns it; panics (showing stdout)
    /// after [`WAIT`] or when stdout ends first.
    pub async fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let mut changed = self.stdout.changed.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let state = self.stdout.state();
                if let Some(line) = state.text.lines().find(|l| matches(l)) {
                    return line.to_owned();
                }
                assert!(
                    !state.closed,
                    "credproxy ended its output without {what}; stdout:\n{}",
                    state.text
                );
            }
            let waited = tokio::time::timeout_at(deadline, changed.changed()).await;
            assert!(
                matches!(waited, Ok(Ok(()))),
                "timed out after {WAIT:?} waiting for {what}; stdout:\n{}",
                self.stdout()
            );
        }
    }

    /// The URL to open: the stdout line that is two spaces and a URL.
    pub async fn url(&self) -> String {
        let line = self
            .wait_for_line("the URL to open", |l| {
                l.strip_prefix("  ")
                    .is_some_and(|rest| rest.starts_with("https://"))
            })
            .await;
        line.trim().to_owned()
    }

    /// Types `text` and Enter on the command's stdin.
    pub async fn paste(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("started with spawn_with_stdin");
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .await
            .expect("writing to credproxy's stdin");
        stdin.flush().await.expect("flushing credproxy's stdin");
    }

    /// Waits (bounded) for the command to exit and returns its output, scanned for test
    /// secrets on both streams like every CLI run.
    pub async fn finish(mut self) -> Output {
        drop(self.stdin.take());
        let status = tokio::time::timeout(RUN_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "credproxy {:?} did not exit within {RUN_TIMEOUT:?}; stdout:\n{}",
                    self.args,
                    self.stdout()
                )
            })
            .expect("waiting for credproxy");
        let mut changed = self.stdout.changed.subscribe();
        let closed = tokio::time::timeout(WAIT, async {
            while !self.stdout.state().closed {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "credproxy's stdout stayed open after exit");
        let stderr = tokio::time::timeout(WAIT, &mut self.stderr)
            .await
            .expect("credproxy's stderr stayed open after exit")
            .expect("reading credproxy's stderr");
        let output = Output {
            code: status.code(),
            stdout: self.stdout(),
            stderr,
        };
        cli::assert_no_secret_markers(&output.stdout);
        cli::assert_no_secret_markers(&output.stderr);
        output
    }
}
