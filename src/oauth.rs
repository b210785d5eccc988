//! One token request to a provider, by the integration's grant: refresh_token
//! (RFC 6749 §6), client_credentials (§4.4), jwt_bearer (RFC 7523, assertions in
//! `assertion`), a GitHub App installation token (`github`), or a static token
//! (no request at all).
//!
//! Knows nothing of scheduling or persistence: it sends the request, checks the
//! answer and classifies failures. Errors name the integration, the HTTP status
//! and the provider's `error`/`error_description`, never a token or the body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::config::{
    Client, ClientAuth, Grant, IntegrationConfig, RefreshTokenGrant, RequestFormat, UpstreamConfig,
};
use crate::jws;
use crate::secret::Secret;
use crate::tls::{self, TlsError};

mod assertion;
mod github;

/// Sent with every token request.
pub const USER_AGENT: &str = concat!("credproxy/", env!("CARGO_PKG_VERSION"));
/// RFC 7523 §2.1's grant type.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

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
    /// Present when the provider rotates refresh tokens (refresh_token grant only).
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

    fn new(
        integration: &str,
        failure: Failure,
        status: Option<StatusCode>,
        detail: String,
    ) -> Self {
        Self {
            integration: integration.to_owned(),
            failure,
            status: status.map(|s| s.as_u16()),
            code: None,
            retry_after: None,
            detail,
        }
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

/// One token request before it is sent.
struct TokenRequest<'a> {
    url: &'a Url,
    fields: Vec<(&'a str, &'a str)>,
    format: RequestFormat,
    /// `Accept`, and the client's or the app's credentials (marked sensitive).
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Redacted from any provider text we echo.
    secrets: Vec<&'a Secret>,
}

/// The raw answer to a token request.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Vec<u8>,
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
            // Every token request says who sends it (GitHub refuses requests without).
            .user_agent(USER_AGENT)
            .dns_resolver(Arc::new(Resolver::from(upstream)))
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Self { http })
    }

    /// Obtains a new access token by the integration's grant. `refresh_token`
    /// is the chain's current one (refresh_token grant only).
    pub async fn obtain(
        &self,
        integration: &IntegrationConfig,
        refresh_token: Option<&Secret>,
    ) -> Result<TokenResponse, TokenError> {
        let name = &integration.name;
        let scope = integration.scope.as_deref();
        let now = OffsetDateTime::now_utc();
        let unsigned =
            |e: jws::SignError| TokenError::new(name, Failure::Permanent, None, e.to_string());
        match &integration.grant {
            Grant::RefreshToken(grant) => {
                let Some(refresh_token) = refresh_token else {
                    return Err(TokenError::new(
                        name,
                        Failure::Permanent,
                        None,
                        "no refresh token to present".into(),
                    ));
                };
                let mut fields = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose()),
                ];
                fields.extend(scope.map(|s| ("scope", s)));
                let request = with_client(name, &grant.client, fields, vec![refresh_token])?;
                self.oauth(name, request).await
            }
            Grant::ClientCredentials(grant) => {
                let mut fields = vec![("grant_type", "client_credentials")];
                fields.extend(scope.map(|s| ("scope", s)));
                fields.extend(grant.audience.as_deref().map(|a| ("audience", a)));
                let request = with_client(name, &grant.client, fields, Vec::new())?;
                let response = self.oauth(name, request).await?;
                // RFC 6749 §4.4.3: no refresh token; a stray one is not kept.
                Ok(TokenResponse {
                    refresh_token: None,
                    ..response
                })
            }
            Grant::JwtBearer(grant) => {
                let assertion = assertion::jwt_bearer(grant, scope, now).map_err(unsigned)?;
                let mut fields = vec![
                    ("grant_type", JWT_BEARER),
                    ("assertion", assertion.expose()),
                ];
                fields.extend(scope.map(|s| ("scope", s)));
                let request = TokenRequest {
                    url: &grant.token_url,
                    fields,
                    format: RequestFormat::Form,
                    headers: vec![(ACCEPT, HeaderValue::from_static("application/json"))],
                    secrets: vec![&assertion],
                };
                let response = self.oauth(name, request).await?;
                Ok(TokenResponse {
                    refresh_token: None,
                    ..response
                })
            }
            Grant::GithubApp(app) => {
                let jwt = assertion::github_app(app, now).map_err(unsigned)?;
                let bearer = sensitive(name, &format!("Bearer {}", jwt.expose()))?;
                let request = TokenRequest {
                    url: &app.token_url,
                    fields: Vec::new(),
                    format: RequestFormat::Json,
                    headers: github::headers(bearer),
                    secrets: vec![&jwt],
                };
                let answer = self.post(name, &request).await?;
                // `expires_at` is absolute: count from when the answer arrived.
                github::parse(name, answer, OffsetDateTime::now_utc())
            }
            Grant::Static(fixed) => Ok(TokenResponse {
                access_token: fixed.token.clone(),
                token_type: fixed.token_type.clone(),
                expires_in: None,
                refresh_token: None,
            }),
        }
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3, with the PKCE verifier of
    /// RFC 7636) for the first tokens.
    pub async fn exchange_code(
        &self,
        name: &str,
        grant: &RefreshTokenGrant,
        code: &Secret,
        code_verifier: &Secret,
    ) -> Result<TokenResponse, TokenError> {
        let fields = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", grant.redirect_uri.as_str()),
            ("code_verifier", code_verifier.expose()),
        ];
        let request = with_client(name, &grant.client, fields, vec![code, code_verifier])?;
        self.oauth(name, request).await
    }

    /// Sends an OAuth token request and checks the answer (RFC 6749 §5).
    async fn oauth(
        &self,
        name: &str,
        request: TokenRequest<'_>,
    ) -> Result<TokenResponse, TokenError> {
        let Answer {
            status,
            retry_after,
            body,
        } = self.post(name, &request).await?;
        let fail = |failure, detail| TokenError::new(name, failure, Some(status), detail);
        let wire: Option<Wire> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let (code, description) = wire
                .map(|w| (w.error, w.error_description))
                .unwrap_or_default();
            let failure = classify(status, code.as_deref());
            let mut detail = format!("token endpoint answered {status}");
            if let Some(code) = &code {
                detail.push_str(&format!(": {}", clean(code, &request.secrets)));
            }
            if let Some(description) = &description {
                detail.push_str(&format!(" ({})", clean(description, &request.secrets)));
            }
            return Err(TokenError {
                code: code.map(|c| clean(&c, &request.secrets)),
                retry_after,
                ..fail(failure, detail)
            });
        }
        let Some(wire) = wire else {
            return Err(fail(
                Failure::Transient,
                format!("token endpoint answered {status} with a body that is not a JSON object"),
            ));
        };
        let access_token = wire.access_token.filter(|t| !t.is_empty()).ok_or_else(|| {
            fail(
                Failure::Transient,
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

    /// POSTs `request` and reads the (bounded) answer, whatever its status.
    async fn post(&self, name: &str, request: &TokenRequest<'_>) -> Result<Answer, TokenError> {
        let mut builder = self.http.post(request.url.clone());
        for (header, value) in &request.headers {
            builder = builder.header(header, value.clone());
        }
        builder = match request.format {
            _ if request.fields.is_empty() => builder,
            RequestFormat::Form => builder.form(&request.fields),
            RequestFormat::Json => builder.json(
                &request
                    .fields
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
        };
        let mut response = builder.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "unreachable"
            };
            TokenError::new(
                name,
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
        let fail = |detail| TokenError::new(name, Failure::Transient, Some(status), detail);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            fail(format!(
                "token endpoint answered {status} but the body failed: {}",
                crate::report::chain(&e)
            ))
        })? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(fail(format!(
                    "token endpoint answered {status} with a body over {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

/// The request for `client`'s token endpoint: `fields` plus the client
/// authentication it is configured for.
fn with_client<'a>(
    name: &str,
    client: &'a Client,
    mut fields: Vec<(&'a str, &'a str)>,
    mut secrets: Vec<&'a Secret>,
) -> Result<TokenRequest<'a>, TokenError> {
    secrets.push(&client.client_secret);
    let mut headers = vec![(ACCEPT, HeaderValue::from_static("application/json"))];
    match client.client_auth {
        ClientAuth::Basic => headers.push((
            AUTHORIZATION,
            sensitive(name, &basic_auth(&client.client_id, &client.client_secret))?,
        )),
        ClientAuth::Body => {
            fields.push(("client_id", &client.client_id));
            fields.push(("client_secret", client.client_secret.expose()));
        }
    }
    Ok(TokenRequest {
        url: &client.token_url,
        fields,
        format: client.request_format,
        headers,
        secrets,
    })
}

/// A credential header value, never indexed or logged by hyper.
fn sensitive(name: &str, value: &str) -> Result<HeaderValue, TokenError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        TokenError::new(
            name,
            Failure::Permanent,
            None,
            "credentials are not valid in a header".into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
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
fn clean(text: &str, secrets: &[&Secret]) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for secret in secrets {
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
