//! The admin listener: `GET /healthz` (alive), `GET /readyz` (200 only when every
//! integration holds a valid token and none has failed), `GET /metrics`
//! (Prometheus text), `GET /integrations` (status, no secrets),
//! `POST /integrations/NAME/refresh` (force one refresh), `POST /reload`.
//! With `admin.token` set, everything but the probes (`/healthz`, `/readyz`)
//! needs `Authorization: Bearer`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::net::TcpStream;

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
}

impl Admin {
    pub fn new(state: Arc<State>, config: &Config, shutdown: Shutdown) -> Self {
        Self {
            state,
            token: config.admin.token.clone(),
            shutdown,
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
        let path = request.uri().path();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let probe = matches!(segments.as_slice(), ["healthz" | "readyz"]);
        if !probe && !self.authorized(&request) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin.token is set: send Authorization: Bearer <token>",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let tokens = self.state.tokens();
        match (request.method(), segments.as_slice()) {
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
                let status = if not_ready.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    &serde_json::json!({ "ready": not_ready.is_empty(), "not_ready": not_ready }),
                )
            }
            (&Method::GET, ["metrics"]) => match self.state.metrics().encode() {
                Ok(text) => {
                    let mut response = Response::new(body::full(text));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
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
                Some(integration) => match integration.refresh(Reason::Always).await {
                    Ok(_) => json(StatusCode::OK, &integration.status()),
                    Err(e) => error(
                        StatusCode::BAD_GATEWAY,
                        "refresh_failed",
                        &crate::report::chain(&e),
                    ),
                },
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no integration named {name:?}"),
                ),
            },
            (&Method::POST, ["reload"]) => match self.state.reload() {
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
                ["healthz" | "readyz" | "metrics" | "integrations"]
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

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let sent = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().as_bytes());
        sent.is_some_and(|sent| expected.matches(sent))
    }
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
