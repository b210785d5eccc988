//! One refresh_token exchange with a provider's token endpoint (RFC 6749 §6).
//!
//! Knows nothing of scheduling or persistence: it sends the request, checks the
//! answer and classifies failures. Errors name the integration, the HTTP status
//! and the provider's `error`/`error_description`, never a token or the body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use serde::Deserialize;

use crate::config::{ClientAuth, IntegrationConfig, RequestFormat, UpstreamConfig};
use crate::secret::Secret;
use crate::tls::{self, TlsError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer lifetimes are taken as a year: no clock arithmetic overflows.
const MAX_EXPIRES_IN_SECS: u64 = 365 * 24 * 3600;
/// Token responses are small; anything larger is not a token response.
const MAX_BODY: usize = 64 * 1024;

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    pub token_type: String,
    pub expires_in: Option<Duration>,
    /// Present when the provider rotates refresh tokens.
    pub refresh_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Retrying cannot help until someone fixes the credentials (`invalid_grant`,
    /// `invalid_client`, other 4xx).
    Permanent,
    /// 5xx, 429, timeouts, network errors, garbled answers.
    Transient,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{integration}: {detail}")]
pub struct TokenError {
    pub integration: String,
    pub failure: Failure,
    pub status: Option<u16>,
    /// The provider's `error` code, e.g. `invalid_grant`.
    pub code: Option<String>,
    /// From `Retry-After` on a 429/503.
    pub retry_after: Option<Duration>,
    detail: String,
}

impl TokenError {
    pub fn is_permanent(&self) -> bool {
        self.failure == Failure::Permanent
    }
}

/// The provider's JSON answer, success or error. Secrets deserialize straight
/// into `Secret` so they are redacted from the first moment.
#[derive(Deserialize)]
struct Wire {
    access_token: Option<Secret>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<Secret>,
    error: Option<String>,
    error_description: Option<String>,
}

// === impl OAuthClient ===

#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
}

impl OAuthClient {
    pub fn new(upstream: &UpstreamConfig) -> Result<Self, TlsError> {
        let tls = tls::client_config(upstream, &[b"http/1.1"])?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            // A redirect could carry the client secret to another host.
            .redirect(redirect::Policy::none())
            // Our own HTTPS_PROXY may point at this very process.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TOTAL_TIMEOUT)
            .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(Resolver::from(upstream)))
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Self { http })
    }

    /// Exchanges `refresh_token` for a new access token.
    pub async fn refresh(
        &self,
        integration: &IntegrationConfig,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, TokenError> {
        let mut fields = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        if let Some(scope) = &integration.scope {
            fields.push(("scope", scope));
        }
        self.exchange(integration, fields, &[refresh_token]).await
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3, with the PKCE verifier of
    /// RFC 7636) for the first tokens.
    pub async fn exchange_code(
        &self,
        integration: &IntegrationConfig,
        code: &Secret,
        code_verifier: &Secret,
    ) -> Result<TokenResponse, TokenError> {
        let fields = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", integration.redirect_uri.as_str()),
            ("code_verifier", code_verifier.expose()),
        ];
        self.exchange(integration, fields, &[code, code_verifier])
            .await
    }

    /// Sends a token request with `fields` plus the client authentication, and
    /// checks the answer. `secrets` are redacted from any provider text we echo.
    async fn exchange(
        &self,
        integration: &IntegrationConfig,
        mut fields: Vec<(&str, &str)>,
        secrets: &[&Secret],
    ) -> Result<TokenResponse, TokenError> {
        let fail = |failure, status: Option<StatusCode>, detail: String| TokenError {
            integration: integration.name.clone(),
            failure,
            status: status.map(|s| s.as_u16()),
            code: None,
            retry_after: None,
            detail,
        };
        let mut request = self
            .http
            .post(integration.refresh_url.clone())
            .header(ACCEPT, "application/json");
        match integration.client_auth {
            ClientAuth::Basic => {
                let mut value = HeaderValue::from_str(&basic_auth(
                    &integration.client_id,
                    &integration.client_secret,
                ))
                .map_err(|_| {
                    fail(
                        Failure::Permanent,
                        None,
                        "client credentials are not valid in a header".into(),
                    )
                })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            ClientAuth::Body => {
                fields.push(("client_id", &integration.client_id));
                fields.push(("client_secret", integration.client_secret.expose()));
            }
        }
        request = match integration.request_format {
            RequestFormat::Form => request.form(&fields),
            RequestFormat::Json => request.json(
                &fields
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
        };

        let mut response = request.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "unreachable"
            };
            fail(
                Failure::Transient,
                None,
                format!("token endpoint {what}: {}", crate::report::chain(&e)),
            )
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);

        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            fail(
                Failure::Transient,
                Some(status),
                format!(
                    "token endpoint answered {status} but the body failed: {}",
                    crate::report::chain(&e)
                ),
            )
        })? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(fail(
                    Failure::Transient,
                    Some(status),
                    format!("token endpoint answered {status} with a body over {MAX_BODY} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let wire: Option<Wire> = serde_json::from_slice(&body).ok();

        if !status.is_success() {
            let (code, description) = wire
                .map(|w| (w.error, w.error_description))
                .unwrap_or_default();
            let failure = classify(status, code.as_deref());
            let mut detail = format!("token endpoint answered {status}");
            if let Some(code) = &code {
                detail.push_str(&format!(": {}", clean(code, secrets, integration)));
            }
            if let Some(description) = &description {
                detail.push_str(&format!(" ({})", clean(description, secrets, integration)));
            }
            return Err(TokenError {
                code: code.map(|c| clean(&c, secrets, integration)),
                retry_after,
                ..fail(failure, Some(status), detail)
            });
        }
        let Some(wire) = wire else {
            return Err(fail(
                Failure::Transient,
                Some(status),
                format!("token endpoint answered {status} with a body that is not a JSON object"),
            ));
        };
        let access_token = wire.access_token.filter(|t| !t.is_empty()).ok_or_else(|| {
            fail(
                Failure::Transient,
                Some(status),
                format!("token endpoint answered {status} without an access_token"),
            )
        })?;
        Ok(TokenResponse {
            access_token,
            token_type: wire.token_type.unwrap_or_else(|| "bearer".into()),
            expires_in: wire.expires_in.as_ref().and_then(parse_expires_in),
            refresh_token: wire.refresh_token.filter(|t| !t.is_empty()),
        })
    }
}

/// RFC 6749 §2.3.1: client id and secret are form-urlencoded before base64.
fn basic_auth(client_id: &str, client_secret: &Secret) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(client_secret.expose()));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn classify(status: StatusCode, code: Option<&str>) -> Failure {
    match code {
        Some("invalid_grant" | "invalid_client" | "unauthorized_client") => Failure::Permanent,
        _ if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT =>
        {
            Failure::Transient
        }
        _ if status.is_client_error() => Failure::Permanent,
        _ => Failure::Transient,
    }
}

/// Accepts `expires_in` as a number or a numeric string (some providers send one).
/// Absurd values are capped, so no clock arithmetic can overflow.
fn parse_expires_in(value: &serde_json::Value) -> Option<Duration> {
    let secs = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    Some(Duration::from_secs(secs.min(MAX_EXPIRES_IN_SECS)))
}

/// Provider text we echo in errors: bounded, printable, and with any of our
/// secrets that a provider might have echoed back redacted.
fn clean(text: &str, secrets: &[&Secret], integration: &IntegrationConfig) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for secret in secrets.iter().copied().chain([&integration.client_secret]) {
        if !secret.is_empty() {
            out = out.replace(secret.expose(), "[redacted]");
        }
    }
    out
}

/// `upstream.resolve` for token endpoints. reqwest's resolver sees only the host
/// name; hyper keeps the mapped port when the URL names none, and the URL's port
/// when it does.
struct Resolver {
    entries: Vec<(String, SocketAddr)>,
}

impl From<&UpstreamConfig> for Resolver {
    fn from(upstream: &UpstreamConfig) -> Self {
        let entries = upstream
            .resolve
            .iter()
            .filter_map(|(target, addr)| Some((target.rsplit_once(':')?.0.to_owned(), *addr)))
            .collect();
        Self { entries }
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let mapped: Vec<SocketAddr> = self
            .entries
            .iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, addr)| *addr)
            .collect();
        Box::pin(async move {
            if !mapped.is_empty() {
                return Ok(Box::new(mapped.into_iter()) as reqwest::dns::Addrs);
            }
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(Box::new(addrs.collect::<Vec<_>>().into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_urlencodes_before_base64() {
        // "a b:c/d" form-urlencoded is "a+b" and "c%2Fd".
        let header = basic_auth("a b", &Secret::new("c/d"));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.trim_start_matches("Basic "))
            .unwrap_or_default();
        assert_eq!(decoded, b"a+b:c%2Fd");
    }

    #[test]
    fn classifies_failures() {
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, Some("invalid_grant")),
            Failure::Permanent
        );
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, Some("invalid_client")),
            Failure::Permanent
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, Some("invalid_scope")),
            Failure::Permanent
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, None),
            Failure::Transient
        );
        assert_eq!(classify(StatusCode::BAD_GATEWAY, None), Failure::Transient);
        assert_eq!(
            classify(StatusCode::REQUEST_TIMEOUT, None),
            Failure::Transient
        );
    }

    #[test]
    fn expires_in_accepts_numbers_and_numeric_strings() {
        assert_eq!(
            parse_expires_in(&serde_json::json!(60)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_expires_in(&serde_json::json!("60")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_expires_in(&serde_json::json!(-1)), None);
        assert_eq!(
            parse_expires_in(&serde_json::json!(10_u64.pow(13))),
            Some(Duration::from_secs(MAX_EXPIRES_IN_SECS))
        );
    }
}
