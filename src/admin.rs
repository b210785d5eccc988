//! The admin listener: `GET /healthz` (alive), `GET /readyz` (200 only when every
//! integration holds a valid token and none has failed), `GET /metrics`
//! (Prometheus text), `GET /integrations` (status, no secrets),
//! `POST /integrations/NAME/refresh` (force one refresh), `POST /reload`, and
//! `GET /`: the status page for a person (`page`), with its script and style.
//! With `admin.token` set, everything but the probes (`/healthz`, `/readyz`)
//! needs `Authorization: Bearer <token>`, or Basic with the token as password
//! (what a browser can send). A POST from a browser must come from this
//! listener's own pages (the CSRF guard).

mod figures;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::live::State;
use crate::secret::Secret;
use crate::server::{self, Shutdown};
use crate::tokens::{Health, Reason};

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Admin {
    state: Arc<State>,
    token: Option<Secret>,
    shutdown: Shutdown,
    /// (role, address) of every listener, for the status page.
    listeners: Vec<(String, SocketAddr)>,
    started: Instant,
}

impl Admin {
    pub fn new(
        state: Arc<State>,
        config: &Config,
        shutdown: Shutdown,
        listeners: Vec<(String, SocketAddr)>,
    ) -> Self {
        Self {
            state,
            token: config.admin.token.clone(),
            shutdown,
            listeners,
            started: Instant::now(),
        }
    }

    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let signal = self.shutdown.signal();
        let service = service_fn(move |request| {
            let admin = self.clone();
            async move { Ok::<_, Infallible>(admin.handle(request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(error) =
            server::until_shutdown(connection, signal, |c| c.graceful_shutdown()).await
        {
            tracing::debug!(%peer, %error, "admin connection closed with an error");
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let mut response = self.route(request).await;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(page::CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    async fn route(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let path = request.uri().path();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let probe = matches!(segments.as_slice(), ["healthz" | "readyz"]);
        if !probe && !self.authorized(&request) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin.token is set: send Authorization: Bearer <token>",
            );
            let headers = response.headers_mut();
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // Lets a browser ask for the token (as the password) and send it.
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"credproxy admin\", charset=\"UTF-8\""),
            );
            return response;
        }
        // Without a token the listener is loopback-only, and a name other than a
        // loopback one is DNS rebinding: a web page's own host name pointed at
        // 127.0.0.1 so that the browser treats the admin API as that page's.
        if !probe && self.token.is_none() && !loopback_host(&request) {
            return error(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "without admin.token, the admin listener answers only to a loopback Host (127.0.0.1, [::1], localhost)",
            );
        }
        if request.method() == Method::POST && cross_site(&request) {
            return error(
                StatusCode::FORBIDDEN,
                "cross_site_request",
                "a browser may post to the admin listener only from its own pages",
            );
        }
        let tokens = self.state.tokens();
        match (request.method(), segments.as_slice()) {
            (&Method::GET, [""]) => self.page(&request),
            (&Method::GET, ["status.js"]) => typed(page::SCRIPT, "text/javascript; charset=utf-8"),
            (&Method::GET, ["status.css"]) => typed(page::STYLE, "text/css; charset=utf-8"),
            (&Method::GET, ["healthz"]) => {
                json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::GET, ["readyz"]) => {
                let now = OffsetDateTime::now_utc();
                let not_ready: Vec<&str> = tokens
                    .iter()
                    .filter(|i| {
                        i.health() == Health::Failed
                            || !i.current().is_some_and(|s| s.is_valid(now))
                    })
                    .map(|i| i.name())
                    .collect();
                let store = self.state.store();
                match (not_ready.is_empty(), store.reachable()) {
                    (true, _) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "ready": true, "not_ready": not_ready }),
                    ),
                    // A token is needed and the one place it can come from is down.
                    (false, false) => json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({
                            "ready": false,
                            "not_ready": not_ready,
                            "error": "state_store_unreachable",
                            "message": format!("{}: unreachable", store.describe()),
                        }),
                    ),
                    (false, true) => json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({ "ready": false, "not_ready": not_ready }),
                    ),
                }
            }
            (&Method::GET, ["metrics"]) => match self.state.metrics().encode() {
                Ok(text) => typed(text, "text/plain; version=0.0.4; charset=utf-8"),
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics_failed",
                    "cannot encode the metrics",
                ),
            },
            (&Method::GET, ["integrations"]) => {
                let statuses: Vec<_> = tokens.iter().map(|i| i.status()).collect();
                json(StatusCode::OK, &statuses)
            }
            (&Method::POST, ["integrations", name, "refresh"]) => match tokens.get(name) {
                Some(integration) => {
                    let outcome = integration.refresh(Reason::Always).await;
                    // A form on the status page (no JavaScript): back to the page.
                    if wants_html(&request) {
                        let notice = if outcome.is_ok() {
                            "refreshed"
                        } else {
                            "refresh_failed"
                        };
                        // Relative: back to the page also behind a path prefix.
                        return see_other(&format!("../../?{notice}={name}"));
                    }
                    match outcome {
                        Ok(_) => json(StatusCode::OK, &integration.status()),
                        Err(e) => error(
                            StatusCode::BAD_GATEWAY,
                            "refresh_failed",
                            &crate::report::chain(&e),
                        ),
                    }
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no integration named {name:?}"),
                ),
            },
            (&Method::POST, ["reload"]) => match self.state.reload().await {
                Ok(needs_restart) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "reloaded": true, "needs_restart": needs_restart }),
                ),
                Err(e) => {
                    let message = crate::report::chain(&e);
                    tracing::error!(error = %message, "config reload failed; the old config keeps serving");
                    error(StatusCode::BAD_REQUEST, "invalid_config", &message)
                }
            },
            (
                _,
                ["" | "status.js" | "status.css"]
                | ["healthz" | "readyz" | "metrics" | "integrations"]
                | ["reload"]
                | ["integrations", _, "refresh"],
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{} is not allowed on {path}", request.method()),
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    /// `GET /`: the status page, built from the same sources as `/integrations`
    /// and `/metrics`.
    fn page(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        let tokens = self.state.tokens();
        let statuses: Vec<_> = tokens.iter().map(|i| i.status()).collect();
        let routes = self.state.routes();
        let figures = self
            .state
            .metrics()
            .encode()
            .map(|text| figures::by_route(&text))
            .unwrap_or_default();
        let store = self.state.store().describe();
        // Only a configured integration's name is echoed back.
        let query: Vec<(String, String)> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let notice = query.iter().find_map(|(key, name)| {
            let name = tokens.get(name)?.name();
            match key.as_str() {
                "refreshed" => Some(page::Notice::Refreshed(name)),
                "refresh_failed" => Some(page::Notice::RefreshFailed(name)),
                _ => None,
            }
        });
        let view = page::View {
            statuses: &statuses,
            routes: &routes,
            figures: &figures,
            listeners: &self.listeners,
            store: &store,
            version: env!("CARGO_PKG_VERSION"),
            uptime: time::Duration::try_from(self.started.elapsed()).unwrap_or_default(),
            now: OffsetDateTime::now_utc(),
            notice,
        };
        typed(page::render(&view), "text/html; charset=utf-8")
    }

    /// Bearer, or Basic with any user name and the token as password.
    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let Some((scheme, credentials)) = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
        else {
            return false;
        };
        let sent = if scheme.eq_ignore_ascii_case("bearer") {
            credentials.trim().as_bytes().to_vec()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials.trim())
                .unwrap_or_default();
            match decoded.iter().position(|b| *b == b':') {
                Some(colon) => decoded[colon + 1..].to_vec(),
                None => return false,
            }
        } else {
            return false;
        };
        expected.matches(&sent)
    }
}

/// A POST a browser sent from another site's page (CSRF), judged by the
/// headers browsers add and pages cannot forge: `Sec-Fetch-Site`, else
/// `Origin` against `Host`. Clients that send neither (curl, scripts) are not
/// browsers and pass.
fn cross_site(request: &Request<Incoming>) -> bool {
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text(http::header::HeaderName::from_static("sec-fetch-site")) {
        return !matches!(site, "same-origin" | "none");
    }
    match text(header::ORIGIN) {
        None => false,
        Some(origin) => {
            let host = text(header::HOST);
            let origin_host = origin.strip_prefix("http://");
            origin_host.is_none() || origin_host != host
        }
    }
}

/// The request's `Host` names this machine's loopback (any port), or is absent
/// (HTTP/1.0: not a browser).
fn loopback_host(request: &Request<Incoming>) -> bool {
    let Some(host) = request.headers().get(header::HOST) else {
        return true;
    };
    let Ok(authority) = host
        .to_str()
        .unwrap_or_default()
        .parse::<http::uri::Authority>()
    else {
        return false;
    };
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser's form post asks for a page; fetch() and curl ask for anything.
fn wants_html(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

fn see_other(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn typed(content: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(content));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ProxyBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
