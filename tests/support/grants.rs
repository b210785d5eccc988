//! A token endpoint for the grants beyond refresh_token, over HTTPS on 127.0.0.1,
//! checking what it receives the way the real ones do:
//!
//! - `POST /token`, `grant_type=client_credentials`: the client's Basic credentials;
//! - `POST /token`, `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` (Google's
//!   service-account flow, RFC 7523): the assertion's signature with the registered
//!   public key, `iss`, `aud` (this endpoint's URL), `exp − iat` ≤ 1 h, `exp` in the
//!   future, a `jti` never seen before, `scope`;
//! - `POST /app/installations/{id}/access_tokens` (GitHub): a `User-Agent`, the app JWT
//!   as a Bearer token, RS256 with the app's public key, `iss` = the app id,
//!   `exp − iat` ≤ 10 min, the installation id; answers 201 `{token, expires_at}`.
//!
//! Keys are minted at run time ([`TestKey`]); issued tokens are `at-SECRET-…` with a
//! configurable lifetime. Counters are awaitable, so tests never sleep.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use ring::signature::{self, KeyPair as _};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

use super::ca::TestCa;
use super::serve::{self, ServerTask};

pub const CLIENT_ID: &str = "m2m-client";
pub const APP_ID: u64 = 4242;
pub const INSTALLATION_ID: u64 = 777;
pub const ISSUER: &str = "credproxy-test@project.iam.gserviceaccount.com";

// === keys ===

/// A private key as PEM (what the config is given) and its public half (what the
/// endpoint verifies with).
#[derive(Clone)]
pub struct TestKey {
    pub pem: String,
    /// The key's DER body as it appears in the PEM: must never appear in any output.
    pub marker: String,
    public: Vec<u8>,
    algorithm: &'static dyn signature::VerificationAlgorithm,
    pub alg: &'static str,
}

impl TestKey {
    /// An RSA 2048 key as PKCS#1 ("BEGIN RSA PRIVATE KEY", as GitHub hands them out) or
    /// PKCS#8 ("BEGIN PRIVATE KEY", as in Google's key files). One key per test binary:
    /// RSA key generation is slow.
    pub fn rsa(pkcs8: bool) -> Self {
        use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key generation")
        });
        let pem = if pkcs8 {
            key.to_pkcs8_pem(LineEnding::LF)
                .expect("PKCS#8 PEM")
                .to_string()
        } else {
            key.to_pkcs1_pem(LineEnding::LF)
                .expect("PKCS#1 PEM")
                .to_string()
        };
        let public = key
            .to_public_key()
            .to_pkcs1_der()
            .expect("public key DER")
            .as_bytes()
            .to_vec();
        Self::new(pem, public, &signature::RSA_PKCS1_2048_8192_SHA256, "RS256")
    }

    /// A fresh P-256 key (PKCS#8).
    pub fn ec() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("EC key");
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("EC key");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        let public = pair.public_key().as_ref().to_vec();
        Self::new(pem, public, &signature::ECDSA_P256_SHA256_FIXED, "ES256")
    }

    fn new(
        pem: String,
        public: Vec<u8>,
        algorithm: &'static dyn signature::VerificationAlgorithm,
        alg: &'static str,
    ) -> Self {
        // A run of the base64 body from the middle of the key: the secret part.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let marker = body[body.len() / 2..body.len() / 2 + 40].to_owned();
        Self {
            pem,
            marker,
            public,
            algorithm,
            alg,
        }
    }

    /// The claims of `jws` if its header names this key's algorithm and its signature
    /// verifies with this key's public half.
    fn verify(&self, jws: &str) -> Result<Value, String> {
        let mut parts = jws.split('.');
        let (Some(header), Some(claims), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS".into());
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string());
        let header: Value = serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
        if header["alg"] != self.alg || header["typ"] != "JWT" {
            return Err(format!("unexpected header {header}"));
        }
        let signed = &jws[..jws.rfind('.').unwrap_or_default()];
        signature::UnparsedPublicKey::new(self.algorithm, &self.public)
            .verify(signed.as_bytes(), &decode(sig)?)
            .map_err(|_| "bad signature".to_owned())?;
        serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())
    }
}

// === server ===

/// What the endpoint saw of one token request.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub user_agent: Option<String>,
    /// The assertion or app JWT presented, if any.
    pub jwt: Option<String>,
    /// Its verified claims.
    pub claims: Option<Value>,
    pub fields: Vec<(String, String)>,
    pub status: StatusCode,
}

impl Received {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct GrantServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _task: ServerTask,
}

struct Shared {
    state: Mutex<State>,
    issued: watch::Sender<u64>,
    calls: watch::Sender<u64>,
}

struct State {
    /// The assertions' expected `aud`.
    token_url: String,
    client_secret: String,
    /// The key assertions and app JWTs must be signed with.
    key: TestKey,
    expires_in: u64,
    /// Every credential is refused, as after a revoked key or deleted client.
    rejecting: bool,
    seen_jti: HashSet<String>,
    received: Vec<Received>,
    current: Option<String>,
    issued_tokens: Vec<(String, OffsetDateTime)>,
}

impl GrantServer {
    /// Serves with a leaf from `ca`; assertions must be signed with `key`.
    pub async fn start(ca: &TestCa, key: TestKey) -> Self {
        let listener = serve::bind("grant server").await;
        let addr = listener.local_addr().expect("grant server local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                token_url: format!("https://{addr}/token"),
                client_secret: format!("cs-SECRET-{:016x}", rand::random::<u64>()),
                key,
                expires_in: 3600,
                rejecting: false,
                seen_jti: HashSet::new(),
                received: Vec::new(),
                current: None,
                issued_tokens: Vec::new(),
            }),
            issued: watch::Sender::new(0),
            calls: watch::Sender::new(0),
        });
        let handler = Arc::clone(&shared);
        let task = serve::spawn(listener, Some(ca.acceptor()), move |req| {
            handle(Arc::clone(&handler), req)
        });
        Self {
            addr,
            shared,
            _task: task,
        }
    }

    /// `https://127.0.0.1:PORT/token`: the OAuth token URL (and the assertions' `aud`).
    pub fn token_url(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    /// `https://127.0.0.1:PORT`: GitHub's `api_url`.
    pub fn api_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn client_secret(&self) -> String {
        self.state().client_secret.clone()
    }

    pub fn set_expires_in(&self, secs: u64) {
        self.state().expires_in = secs;
    }

    /// From now on every credential is refused permanently (`invalid_client`,
    /// `invalid_grant`, GitHub's 401).
    pub fn reject_all(&self) {
        self.state().rejecting = true;
    }

    /// Token requests received, any outcome.
    pub fn calls(&self) -> u64 {
        *self.shared.calls.borrow()
    }

    /// Tokens issued.
    pub fn issued(&self) -> u64 {
        *self.shared.issued.borrow()
    }

    pub fn current_token(&self) -> String {
        self.state()
            .current
            .clone()
            .expect("the grant server has issued no token yet")
    }

    /// Issued here and not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        self.state()
            .issued_tokens
            .iter()
            .any(|(t, expires_at)| t == token && now < *expires_at)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Every JWT presented so far (assertions are secrets, too).
    pub fn jwts(&self) -> Vec<String> {
        self.received().into_iter().filter_map(|r| r.jwt).collect()
    }

    /// Waits until `n` tokens have been issued; panics after [`WAIT`](super::token::WAIT).
    pub async fn wait_for_issued(&self, n: u64) {
        super::token::wait_for(&self.shared.issued, n, "tokens to be issued").await;
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
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let fields: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let mut received = Received {
        path: parts.uri.path().to_owned(),
        user_agent: header(USER_AGENT),
        jwt: None,
        claims: None,
        fields,
        status: StatusCode::OK,
    };
    let (status, answer) = {
        let mut state = shared.state();
        let (status, answer) = if parts.method != Method::POST {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            )
        } else if let Some(installation) = received
            .path
            .strip_prefix("/app/installations/")
            .and_then(|rest| rest.strip_suffix("/access_tokens"))
        {
            let installation = installation.to_owned();
            state.github(&mut received, header(AUTHORIZATION), &installation)
        } else if received.path == "/token" {
            state.oauth(&mut received, header(AUTHORIZATION))
        } else {
            error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        };
        received.status = status;
        state.received.push(received);
        (status, answer)
    };
    shared.calls.send_modify(|n| *n += 1);
    if status.is_success() {
        shared.issued.send_modify(|n| *n += 1);
    }
    Ok(Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .expect("static response parts are valid"))
}

fn error(status: StatusCode, code: &str, description: &str) -> (StatusCode, Value) {
    (
        status,
        json!({ "error": code, "error_description": description }),
    )
}

impl State {
    fn oauth(
        &mut self,
        received: &mut Received,
        authorization: Option<String>,
    ) -> (StatusCode, Value) {
        match received.field("grant_type") {
            Some("client_credentials") => {
                let expected = format!(
                    "Basic {}",
                    STANDARD.encode(format!("{CLIENT_ID}:{}", self.client_secret))
                );
                if self.rejecting || authorization.as_deref() != Some(expected.as_str()) {
                    return error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        "client authentication failed",
                    );
                }
                self.issue(json!({ "token_type": "bearer", "scope": received.field("scope") }))
            }
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
                let Some(assertion) = received.field("assertion").map(str::to_owned) else {
                    return error(StatusCode::BAD_REQUEST, "invalid_request", "no assertion");
                };
                received.jwt = Some(assertion.clone());
                if self.rejecting {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "account not found",
                    );
                }
                let claims = match self.key.verify(&assertion) {
                    Ok(claims) => claims,
                    Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_grant", &why),
                };
                received.claims = Some(claims.clone());
                let now = OffsetDateTime::now_utc().unix_timestamp();
                let (iat, exp) = (
                    claims["iat"].as_i64().unwrap_or_default(),
                    claims["exp"].as_i64().unwrap_or_default(),
                );
                let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
                let problem = if claims["iss"] != ISSUER {
                    Some("iss is not the service account")
                } else if claims["aud"] != self.token_url.as_str() {
                    Some("aud is not the token endpoint")
                } else if exp - iat > 3600 || exp <= now || iat > now + 5 {
                    Some("the assertion's lifetime is wrong")
                } else if jti.len() < 16 || !self.seen_jti.insert(jti) {
                    Some("jti missing or reused")
                } else {
                    None
                };
                match problem {
                    Some(why) => error(StatusCode::BAD_REQUEST, "invalid_grant", why),
                    None => self.issue(json!({ "token_type": "Bearer" })),
                }
            }
            _ => error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported grant_type",
            ),
        }
    }

    fn github(
        &mut self,
        received: &mut Received,
        authorization: Option<String>,
        installation: &str,
    ) -> (StatusCode, Value) {
        let message = |status, message: &str| (status, json!({ "message": message }));
        if received.user_agent.is_none() {
            return message(
                StatusCode::FORBIDDEN,
                "Request forbidden by administrative rules. Please make sure your request has a User-Agent header",
            );
        }
        let Some(jwt) = authorization.and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned))
        else {
            return message(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            );
        };
        received.jwt = Some(jwt.clone());
        if self.rejecting {
            return message(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            );
        }
        let claims = match self.key.verify(&jwt) {
            Ok(claims) => claims,
            Err(_) => {
                return message(
                    StatusCode::UNAUTHORIZED,
                    "A JSON web token could not be decoded",
                );
            }
        };
        received.claims = Some(claims.clone());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (iat, exp) = (
            claims["iat"].as_i64().unwrap_or_default(),
            claims["exp"].as_i64().unwrap_or_default(),
        );
        if claims["iss"] != APP_ID {
            return message(
                StatusCode::UNAUTHORIZED,
                "'Issuer' claim ('iss') must be an Integer",
            );
        }
        if exp - iat > 600 || exp <= now || iat > now {
            return message(
                StatusCode::UNAUTHORIZED,
                "'Expiration time' claim ('exp') is too far in the future",
            );
        }
        if installation != INSTALLATION_ID.to_string() {
            return message(StatusCode::NOT_FOUND, "Not Found");
        }
        let (_, mut body) = self.issue(json!({}));
        let token = body["access_token"].take();
        let expires_at = OffsetDateTime::now_utc() + Duration::from_secs(self.expires_in);
        let expires_at = expires_at.format(&Rfc3339).expect("RFC 3339");
        (
            StatusCode::CREATED,
            json!({ "token": token, "expires_at": expires_at, "permissions": { "contents": "read" } }),
        )
    }

    /// A new `at-SECRET-…` token added to `answer` (an OAuth token response).
    fn issue(&mut self, mut answer: Value) -> (StatusCode, Value) {
        let n = self.issued_tokens.len() + 1;
        let token = format!("at-SECRET-{n}-{:016x}", rand::random::<u64>());
        let expires_at = OffsetDateTime::now_utc() + Duration::from_secs(self.expires_in);
        self.issued_tokens.push((token.clone(), expires_at));
        self.current = Some(token.clone());
        answer["access_token"] = json!(token);
        answer["expires_in"] = json!(self.expires_in);
        (StatusCode::OK, answer)
    }
}
