//! The outside world credproxy talks to, on one HTTPS listener (hyper-util auto:
//! HTTP/1.1 and h2):
//!
//! - `GET /small`: a ~200-byte JSON answer, 401 unless the bearer token is valid;
//! - `GET /storm`: the same, but requests carrying the token current when a storm
//!   was armed wait at a barrier until `target` of them arrived; then the token is
//!   revoked (optionally) and they are all answered at once;
//! - `GET /download/N`: N bytes streamed in 64 KiB chunks (token checked);
//! - `POST /upload`: counts the bytes received (token checked);
//! - `POST /token`: the OAuth token endpoint (refresh_token grant, HTTP Basic
//!   client auth, rotating refresh tokens).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::BoxError;

pub const CLIENT_ID: &str = "bench-client";
pub const CLIENT_SECRET: &str = "bench-secret";
pub const FIRST_REFRESH_TOKEN: &str = "rt-0-bench";
/// Long enough that credproxy never refreshes on its own during a run.
const EXPIRES_IN: u64 = 3600;
/// Streams allowed per h2 connection. credproxy multiplexes every upstream
/// request on one pooled h2 connection, so the storm's 1,000 requests must fit.
const MAX_STREAMS: u32 = 4096;
/// A storm barrier gives up after this long (the report then shows how many arrived).
const STORM_HOLD: Duration = Duration::from_secs(15);

/// The ~200-byte JSON answer of `/small`.
pub static SMALL_JSON: &[u8] = br#"{"account_id":"dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc","name":{"display":"Bench User"},"email":"bench.user@example.test","country":"NL","locale":"en","plan":"pro","used":123456789,"ok":true}"#;

/// A body of `remaining` bytes sent as slices of one shared chunk: bounded
/// memory whatever its size. Used both ways (responses, uploads).
pub struct Chunks {
    remaining: u64,
    chunk: Bytes,
}

impl Chunks {
    pub fn new(len: u64, chunk: Bytes) -> Self {
        let len = if chunk.is_empty() { 0 } else { len };
        Self {
            remaining: len,
            chunk,
        }
    }

    pub fn empty() -> Self {
        Self::new(0, Bytes::new())
    }

    pub fn bytes(data: &'static [u8]) -> Self {
        Self::new(data.len() as u64, Bytes::from_static(data))
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A barrier for the refresh storm.
struct Storm {
    token: String,
    target: usize,
    revoke: bool,
    arrived: AtomicUsize,
    released: watch::Sender<bool>,
}

/// Shared state of the API and the token endpoint.
pub struct World {
    /// Access tokens the API accepts.
    valid: ArcSwap<Vec<String>>,
    /// `Bearer <newest token>`, for the direct path's client.
    latest: ArcSwapOption<HeaderValue>,
    refresh_token: Mutex<String>,
    issued: AtomicU64,
    pub token_calls: AtomicU64,
    pub uploaded: AtomicU64,
    pub unauthorized: AtomicU64,
    /// TLS connections accepted, and how many of them negotiated h2.
    pub accepted: AtomicU64,
    pub accepted_h2: AtomicU64,
    storm: ArcSwapOption<Storm>,
    chunk: Bytes,
}

pub struct StormGuard {
    storm: Arc<Storm>,
}

impl StormGuard {
    /// How many requests reached the barrier.
    pub fn arrived(&self) -> usize {
        self.storm.arrived.load(Ordering::Acquire)
    }
}

impl World {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            valid: ArcSwap::from_pointee(Vec::new()),
            latest: ArcSwapOption::empty(),
            refresh_token: Mutex::new(FIRST_REFRESH_TOKEN.to_owned()),
            issued: AtomicU64::new(0),
            token_calls: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            accepted_h2: AtomicU64::new(0),
            storm: ArcSwapOption::empty(),
            chunk: Bytes::from(vec![0x5a_u8; 64 * 1024]),
        })
    }

    /// `Authorization` for a direct request: the newest token issued.
    pub fn bearer(&self) -> Option<Arc<HeaderValue>> {
        self.latest.load_full()
    }

    /// Arms a storm on `/storm`: requests with the current token wait until
    /// `target` arrived, then (if `revoke`) that token stops being accepted.
    pub fn arm_storm(&self, target: usize, revoke: bool) -> Result<StormGuard, BoxError> {
        let latest = self.bearer().ok_or("no token issued yet")?;
        let token = latest
            .to_str()?
            .strip_prefix("Bearer ")
            .ok_or("bad bearer")?
            .to_owned();
        let (released, _) = watch::channel(false);
        let storm = Arc::new(Storm {
            token,
            target,
            revoke,
            arrived: AtomicUsize::new(0),
            released,
        });
        self.storm.store(Some(storm.clone()));
        Ok(StormGuard { storm })
    }

    pub fn disarm_storm(&self) {
        if let Some(storm) = self.storm.swap(None) {
            storm.released.send_replace(true);
        }
    }

    fn is_valid(&self, token: &str) -> bool {
        self.valid.load().iter().any(|t| t == token)
    }

    fn revoke(&self, token: &str) {
        self.valid.rcu(|valid| {
            valid
                .iter()
                .filter(|t| *t != token)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    fn issue(&self) -> Result<(String, String), BoxError> {
        let n = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let access = format!("at-{n}-{:016x}", rand::random::<u64>());
        let refresh = format!("rt-{n}-{:016x}", rand::random::<u64>());
        let bearer = HeaderValue::from_str(&format!("Bearer {access}"))?;
        self.valid.rcu(|valid| {
            let mut next = Vec::clone(valid);
            next.push(access.clone());
            next
        });
        self.latest.store(Some(Arc::new(bearer)));
        Ok((access, refresh))
    }
}

/// Serves the API and the token endpoint on `listener` until the runtime ends.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, world: Arc<World>) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let world = world.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            world.accepted.fetch_add(1, Ordering::Relaxed);
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                world.accepted_h2.fetch_add(1, Ordering::Relaxed);
            }
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(MAX_STREAMS);
            let service = service_fn(move |request| {
                let world = world.clone();
                async move { Ok::<_, Infallible>(handle(&world, request).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

pub async fn bind() -> Result<(TcpListener, SocketAddr), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

fn respond(status: StatusCode, body: Chunks) -> Response<Chunks> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn unauthorized(world: &World) -> Response<Chunks> {
    world.unauthorized.fetch_add(1, Ordering::Relaxed);
    respond(
        StatusCode::UNAUTHORIZED,
        Chunks::bytes(br#"{"error":"invalid_token"}"#),
    )
}

fn bearer_of(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn handle(world: &World, request: Request<Incoming>) -> Response<Chunks> {
    let path = request.uri().path();
    if path == "/token" {
        return token_endpoint(world, request).await;
    }
    let token = bearer_of(&request).unwrap_or_default().to_owned();
    if path == "/storm" {
        storm_barrier(world, &token).await;
    }
    if !world.is_valid(&token) {
        return unauthorized(world);
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/small" | "/storm") => respond(StatusCode::OK, Chunks::bytes(SMALL_JSON)),
        (&Method::GET, path) if path.starts_with("/download/") => {
            match path["/download/".len()..].parse::<u64>() {
                Ok(len) => respond(StatusCode::OK, Chunks::new(len, world.chunk.clone())),
                Err(_) => respond(StatusCode::BAD_REQUEST, Chunks::empty()),
            }
        }
        (&Method::POST, "/upload") => {
            let mut body = request.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return respond(StatusCode::BAD_REQUEST, Chunks::empty());
                };
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                    world
                        .uploaded
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            let answer = format!("{{\"bytes\":{total}}}");
            respond(
                StatusCode::OK,
                Chunks::new(answer.len() as u64, Bytes::from(answer)),
            )
        }
        _ => respond(StatusCode::NOT_FOUND, Chunks::empty()),
    }
}

async fn storm_barrier(world: &World, token: &str) {
    let Some(storm) = world.storm.load_full() else {
        return;
    };
    if storm.token != token || *storm.released.borrow() {
        return;
    }
    let mut released = storm.released.subscribe();
    let arrived = storm.arrived.fetch_add(1, Ordering::AcqRel) + 1;
    if arrived >= storm.target {
        if storm.revoke {
            world.revoke(&storm.token);
        }
        storm.released.send_replace(true);
        return;
    }
    let _ = tokio::time::timeout(STORM_HOLD, released.wait_for(|r| *r)).await;
}

async fn token_endpoint(world: &World, request: Request<Incoming>) -> Response<Chunks> {
    world.token_calls.fetch_add(1, Ordering::AcqRel);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if request.method() != Method::POST || !authorized {
        return respond(
            StatusCode::UNAUTHORIZED,
            Chunks::bytes(br#"{"error":"invalid_client"}"#),
        );
    }
    let Ok(body) = request.into_body().collect().await else {
        return respond(StatusCode::BAD_REQUEST, Chunks::empty());
    };
    let body = body.to_bytes();
    let mut grant = None;
    let mut presented = None;
    for (key, value) in form_urlencoded::parse(&body) {
        match &*key {
            "grant_type" => grant = Some(value.into_owned()),
            "refresh_token" => presented = Some(value.into_owned()),
            _ => {}
        }
    }
    let invalid_grant = || {
        respond(
            StatusCode::BAD_REQUEST,
            Chunks::bytes(br#"{"error":"invalid_grant"}"#),
        )
    };
    if grant.as_deref() != Some("refresh_token") {
        return invalid_grant();
    }
    let issued = {
        let mut current = match world.refresh_token.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if presented.as_deref() != Some(current.as_str()) {
            return invalid_grant();
        }
        match world.issue() {
            Ok((access, refresh)) => {
                *current = refresh.clone();
                (access, refresh)
            }
            Err(_) => return respond(StatusCode::INTERNAL_SERVER_ERROR, Chunks::empty()),
        }
    };
    let answer = serde_json::json!({
        "access_token": issued.0,
        "token_type": "bearer",
        "expires_in": EXPIRES_IN,
        "refresh_token": issued.1,
    })
    .to_string();
    respond(
        StatusCode::OK,
        Chunks::new(answer.len() as u64, Bytes::from(answer)),
    )
}
