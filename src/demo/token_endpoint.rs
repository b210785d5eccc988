//! The demo OAuth token endpoint, `POST /token` on `oauth.demo.test`: the
//! refresh_token grant (RFC 6749 §6) with HTTP Basic client authentication,
//! answered like a strict real provider — JSON bodies, `invalid_client`,
//! `invalid_grant` for a spent refresh token, `unsupported_grant_type`.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use super::provider::{Provider, Refused};
use super::serve::{Body, json};

/// Refresh requests are a few hundred bytes; anything much larger is not one.
const MAX_BODY: usize = 64 * 1024;

pub async fn handle(provider: Arc<Provider>, request: Request<Incoming>) -> Response<Body> {
    if request.uri().path() != "/token" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the token endpoint is POST /token",
        );
    }
    if request.method() != Method::POST {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let authenticated = basic_credentials(request.headers().get(AUTHORIZATION))
        .is_some_and(|(id, secret)| provider.client_matches(&id, &secret));
    if !authenticated {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"oauth.demo.test\""),
        );
        return response;
    }
    let is_form = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !is_form {
        return invalid_request("the body must be application/x-www-form-urlencoded");
    }
    let Ok(body) = Limited::new(request.into_body(), MAX_BODY).collect().await else {
        return invalid_request("the request body is unreadable or too large");
    };
    let Some(params) = form_params(&body.to_bytes()) else {
        return invalid_request("a parameter appears more than once");
    };
    match params.get("grant_type").map(String::as_str) {
        None => return invalid_request("grant_type is missing"),
        Some("refresh_token") => {}
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only the refresh_token grant is supported",
            );
        }
    }
    let Some(presented) = params.get("refresh_token").filter(|t| !t.is_empty()) else {
        return invalid_request("refresh_token is missing");
    };
    match provider.refresh(presented) {
        Ok(issued) => {
            tracing::debug!("demo token endpoint issued a new access token");
            let mut response = json(
                StatusCode::OK,
                &json!({
                    "access_token": issued.access_token.expose(),
                    "token_type": "bearer",
                    "expires_in": issued.expires_in.as_secs(),
                    "refresh_token": issued.refresh_token.expose(),
                }),
            );
            response
                .headers_mut()
                .insert(PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(Refused::InvalidGrant) => error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the refresh token is invalid or was already used",
        ),
    }
}

/// The client id and secret from `Authorization: Basic`, each form-urldecoded
/// (RFC 6749 §2.3.1 encodes them before base64).
fn basic_credentials(header: Option<&HeaderValue>) -> Option<(String, String)> {
    let value = header?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (id, secret) = pair.split_once(':')?;
    Some((urldecode(id), urldecode(secret)))
}

/// Form-urldecodes one component. An encoded component holds no raw `&` or `=`, so
/// parsing it as a lone key decodes exactly it.
fn urldecode(component: &str) -> String {
    form_urlencoded::parse(component.as_bytes())
        .next()
        .map(|(key, _)| key.into_owned())
        .unwrap_or_default()
}

/// The form's parameters, or None when one appears twice (RFC 6749 §3.2 forbids it).
fn form_params(body: &Bytes) -> Option<HashMap<String, String>> {
    let mut params = HashMap::new();
    for (key, value) in form_urlencoded::parse(body) {
        if params
            .insert(key.into_owned(), value.into_owned())
            .is_some()
        {
            return None;
        }
    }
    Some(params)
}

fn invalid_request(description: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json(
        status,
        &json!({ "error": code, "error_description": description }),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn basic(pair: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[test]
    fn basic_credentials_are_urldecoded() {
        assert_eq!(
            basic_credentials(Some(&basic("my%3Aid:s%26cret+x"))),
            Some(("my:id".into(), "s&cret x".into()))
        );
        assert_eq!(
            basic_credentials(Some(&basic("id:"))),
            Some(("id".into(), String::new()))
        );
        assert_eq!(basic_credentials(Some(&basic("no-colon"))), None);
        assert_eq!(
            basic_credentials(Some(&HeaderValue::from_static("Bearer abc"))),
            None
        );
        assert_eq!(basic_credentials(None), None);
    }

    #[test]
    fn repeated_form_parameters_are_refused() {
        assert!(form_params(&Bytes::from_static(b"a=1&b=2")).is_some());
        assert!(form_params(&Bytes::from_static(b"a=1&a=2")).is_none());
    }
}
