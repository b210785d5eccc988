//! Errors made by credproxy itself, and the one place they become responses:
//! JSON `{"error": CODE, "message": TEXT}` with `x-credproxy-error: CODE`.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};
use crate::egress::Refusal;

/// Clone: requests that waited on one failed dial all get its error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy authentication required")]
    AuthRequired,
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    RouteNotAllowed(String),
    #[error("{0}")]
    DestinationNotAllowed(String),
    #[error("{0}")]
    BlockedAddress(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    HostMismatch(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    NoToken(String),
    #[error("{0}")]
    Timeout(String),
}

impl From<Refusal> for ProxyError {
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            Refusal::NotAllowed { .. } => Self::DestinationNotAllowed(message),
            Refusal::Blocked { .. } | Refusal::BlockedLiteral { .. } => {
                Self::BlockedAddress(message)
            }
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::Denied(_)
            | Self::RouteNotAllowed(_)
            | Self::DestinationNotAllowed(_)
            | Self::BlockedAddress(_) => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::HostMismatch(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::Unreachable(_) => StatusCode::BAD_GATEWAY,
            Self::NoToken(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::AuthRequired => "proxy_auth_required",
            Self::Denied(_) => "denied",
            Self::RouteNotAllowed(_) => "route_not_allowed",
            Self::DestinationNotAllowed(_) => "destination_not_allowed",
            Self::BlockedAddress(_) => "blocked_address",
            Self::BadRequest(_) => "bad_request",
            Self::HostMismatch(_) => "host_mismatch",
            Self::Unreachable(_) => "upstream_unreachable",
            Self::NoToken(_) => "no_token",
            Self::Timeout(_) => "upstream_timeout",
        }
    }

    /// The response for this error. A 502 or 504 is also logged, once, with
    /// its cause (the upstream's host:port and the error chain; never a
    /// path, query or header value), since the request's own line has only
    /// the status.
    pub fn into_response(self) -> Response<ProxyBody> {
        if let Self::Unreachable(cause) | Self::Timeout(cause) = &self {
            let status = self.status().as_u16();
            tracing::warn!(status, error = self.code(), cause = %cause, "upstream request failed");
        }
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut response = Response::new(body::full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-credproxy-error", HeaderValue::from_static(self.code()));
        if matches!(self, Self::AuthRequired) {
            headers.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"credproxy\""),
            );
        }
        response
    }
}
