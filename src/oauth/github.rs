//! GitHub App installation tokens: `POST {api_url}/app/installations/{id}/access_tokens`
//! with the app JWT as a Bearer token; the answer is `{ "token", "expires_at" }`
//! (not RFC 6749), errors are `{ "message" }`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderName, HeaderValue};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{Answer, Failure, TokenError, TokenResponse, clean};
use crate::secret::Secret;

#[derive(Deserialize)]
struct Wire {
    token: Option<Secret>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    message: Option<String>,
}

/// The headers GitHub's REST API asks for, with the app JWT.
pub(super) fn headers(bearer: HeaderValue) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (
            ACCEPT,
            HeaderValue::from_static("application/vnd.github+json"),
        ),
        (AUTHORIZATION, bearer),
        (
            HeaderName::from_static("x-github-api-version"),
            HeaderValue::from_static("2022-11-28"),
        ),
    ]
}

/// The installation token, or an error classified like GitHub means it: 401
/// (the app JWT or key is rejected) and 404 (no such app or installation) are
/// permanent; rate limits and 5xx are transient.
pub(super) fn parse(
    name: &str,
    answer: Answer,
    now: OffsetDateTime,
) -> Result<TokenResponse, TokenError> {
    let status = answer.status;
    let fail = |failure, detail| TokenError::new(name, failure, Some(status), detail);
    let wire: Option<Wire> = serde_json::from_slice(&answer.body).ok();
    if !status.is_success() {
        let message = wire.and_then(|w| w.message);
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::FORBIDDEN
                && (answer.retry_after.is_some()
                    || message
                        .as_deref()
                        .is_some_and(|m| m.to_ascii_lowercase().contains("rate limit"))));
        let failure = if rate_limited || status.is_server_error() {
            Failure::Transient
        } else if status.is_client_error() {
            Failure::Permanent
        } else {
            Failure::Transient
        };
        let mut detail = format!("GitHub answered {status}");
        if let Some(message) = &message {
            detail.push_str(&format!(" ({})", clean(message, &[])));
        }
        return Err(TokenError {
            retry_after: answer.retry_after,
            ..fail(failure, detail)
        });
    }
    let token = wire
        .as_ref()
        .and_then(|w| w.token.clone())
        .filter(|t| !t.is_empty());
    let (Some(access_token), Some(expires_at)) = (token, wire.and_then(|w| w.expires_at)) else {
        return Err(fail(
            Failure::Transient,
            format!("GitHub answered {status} without a token and its expires_at"),
        ));
    };
    Ok(TokenResponse {
        access_token,
        token_type: "bearer".into(),
        expires_in: Some(Duration::try_from(expires_at - now).unwrap_or_default()),
        refresh_token: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str, retry_after: Option<u64>) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn takes_token_and_expires_at() {
        let now = time::macros::datetime!(2026-01-01 00:00 UTC);
        let body = r#"{"token":"ghs_x","expires_at":"2026-01-01T01:00:00Z","permissions":{}}"#;
        let response = parse("gh", answer(201, body, None), now).unwrap();
        assert_eq!(response.access_token.expose(), "ghs_x");
        assert_eq!(response.expires_in, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn classifies_github_errors() {
        let now = OffsetDateTime::now_utc();
        let failure = |status, body: &str, retry| {
            parse("gh", answer(status, body, retry), now)
                .err()
                .unwrap()
                .failure
        };
        let bad_jwt = r#"{"message":"A JSON web token could not be decoded"}"#;
        assert_eq!(failure(401, bad_jwt, None), Failure::Permanent);
        assert_eq!(
            failure(404, r#"{"message":"Not Found"}"#, None),
            Failure::Permanent
        );
        let limited = r#"{"message":"API rate limit exceeded"}"#;
        assert_eq!(failure(403, limited, None), Failure::Transient);
        assert_eq!(failure(403, "{}", Some(60)), Failure::Transient);
        assert_eq!(failure(502, "", None), Failure::Transient);
        assert_eq!(failure(201, "{}", None), Failure::Transient);
    }
}
