//! The admin listener: `GET /healthz` (alive), `GET /readyz` (200 only when every
//! integration holds a valid token and none has failed), `GET /integrations`
//! (status, no secrets), `POST /integrations/NAME/refresh` (force one refresh).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::net::TcpStream;

use crate::proxy::ProxyBody;
use crate::server::{self, Shutdown};
use crate::tokens::{Health, Reason, Tokens};

pub async fn serve_connection(
    tokens: Arc<Tokens>,
    shutdown: Shutdown,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let service = service_fn(move |request| {
        let tokens = tokens.clone();
        async move { Ok::<_, Infallible>(handle(&tokens, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(server::HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) =
        server::until_shutdown(connection, shutdown.signal(), |c| c.graceful_shutdown()).await
    {
        tracing::debug!(%peer, %error, "admin connection closed with an error");
    }
}

async fn handle(tokens: &Tokens, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
        (&Method::GET, ["readyz"]) => readyz(tokens),
        (&Method::GET, ["integrations"]) => {
            let statuses: Vec<_> = tokens.iter().map(|i| i.status()).collect();
            json(StatusCode::OK, &statuses)
        }
        (&Method::POST, ["integrations", name, "refresh"]) => match tokens.get(name) {
            Some(integration) => match integration.refresh(Reason::Always).await {
                Ok(_) => json(StatusCode::OK, &integration.status()),
                Err(error) => json(
                    StatusCode::BAD_GATEWAY,
                    &serde_json::json!({ "error": "refresh_failed", "message": crate::error::chain(&error) }),
                ),
            },
            None => not_found(),
        },
        (_, ["healthz" | "readyz" | "integrations"]) | (_, ["integrations", _, "refresh"]) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({ "error": "method_not_allowed", "message": format!("{} is not allowed on {path}", request.method()) }),
        ),
        _ => not_found(),
    }
}

fn readyz(tokens: &Tokens) -> Response<ProxyBody> {
    let now = OffsetDateTime::now_utc();
    let not_ready: Vec<&str> = tokens
        .iter()
        .filter(|i| i.health() == Health::Failed || !i.current().is_some_and(|s| s.is_valid(now)))
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

fn not_found() -> Response<ProxyBody> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": "not_found", "message": "no such admin endpoint" }),
    )
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ProxyBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(crate::proxy::body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
