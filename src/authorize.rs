//! `credproxy authorize NAME`: the authorization-code flow with PKCE (RFC 7636)
//! that yields an integration's first refresh token, so nobody has to copy a
//! code into a hand-made curl call before it expires.
//!
//! The steps are separate so `main` can print between them: build the URL,
//! wait for the browser's redirect on the loopback `redirect_uri` (or take a
//! pasted redirect URL or code), exchange the code, store the tokens with the
//! same locked, atomic write as a refresh.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::RngExt;
use reqwest::Url;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::body::{self, ProxyBody};
use crate::config::{Config, Grant, IntegrationConfig, RefreshTokenGrant};
use crate::oauth::OAuthClient;
use crate::secret::Secret;
use crate::state::{self, Entry, StateError, StateStore};
use crate::tls::TlsError;
use crate::tokens::RefreshError;

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("{integration}: the provider refused the authorization: {error}{}", description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        integration: String,
        error: String,
        description: Option<String>,
    },
    #[error(
        "{0}: the redirect's state does not match this authorization (a stale or forged redirect); start again"
    )]
    StateMismatch(String),
    #[error("{0}: the redirect carried no code")]
    NoCode(String),
    #[error(
        "{integration}: no redirect arrived within {waited:?}; run `credproxy authorize {integration}` again (or use --manual)"
    )]
    Timeout {
        integration: String,
        waited: Duration,
    },
    #[error(
        "{0}: the provider returned no refresh_token; it probably needs offline access in extra_authorize_params (Dropbox: token_access_type = \"offline\"; Google: access_type = \"offline\", prompt = \"consent\")"
    )]
    NoRefreshToken(String),
    #[error("{integration}: cannot listen on the redirect address {addr}")]
    Listen {
        integration: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The command line named something the config cannot authorize (exit 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Exchange(#[from] RefreshError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl AuthorizeError {
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_))
    }
}

/// One authorization in progress.
pub struct Flow {
    integration: IntegrationConfig,
    /// The integration's grant: authorization yields refresh tokens.
    grant: RefreshTokenGrant,
    state: Secret,
    verifier: Secret,
    url: Url,
}

impl Flow {
    pub fn new(config: &Config, name: &str) -> Result<Self, AuthorizeError> {
        let integration = config
            .integration(name)
            .ok_or_else(|| {
                AuthorizeError::Usage(format!(
                    "{}: no integration named {name:?}",
                    config.source.display()
                ))
            })?
            .clone();
        let Grant::RefreshToken(grant) = integration.grant.clone() else {
            return Err(AuthorizeError::Usage(format!(
                "{}: integrations.{name} uses grant {:?}, which obtains its tokens by itself; `credproxy authorize` is for grant \"refresh_token\"",
                config.source.display(),
                integration.grant.kind()
            )));
        };
        let Some(authorize_url) = &grant.authorize_url else {
            return Err(AuthorizeError::Usage(format!(
                "{}: integrations.{name}.authorize_url is not set (e.g. \"https://www.dropbox.com/oauth2/authorize\")",
                config.source.display()
            )));
        };
        let state = random_token(32);
        // RFC 7636 §4.1: 43 to 128 characters from the unreserved set.
        let verifier = random_token(64);
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.expose()));
        let mut url = authorize_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &grant.client.client_id)
                .append_pair("redirect_uri", grant.redirect_uri.as_str())
                .append_pair("state", state.expose())
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
            if let Some(scope) = &integration.scope {
                query.append_pair("scope", scope);
            }
            for (key, value) in &grant.extra_authorize_params {
                query.append_pair(key, value);
            }
        }
        Ok(Self {
            integration,
            grant,
            state,
            verifier,
            url,
        })
    }

    /// Where the browser is sent back to.
    pub fn redirect_uri(&self) -> &Url {
        &self.grant.redirect_uri
    }

    /// The URL to open in a browser. Holds no secret: the PKCE verifier stays here.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Binds the loopback redirect address; do this before showing the URL.
    pub async fn listen(&self) -> Result<TcpListener, AuthorizeError> {
        let redirect = &self.grant.redirect_uri;
        let addr = format!(
            "{}:{}",
            redirect
                .host_str()
                .unwrap_or("127.0.0.1")
                .trim_start_matches('[')
                .trim_end_matches(']'),
            redirect.port().unwrap_or(80)
        );
        TcpListener::bind(&addr)
            .await
            .map_err(|source| AuthorizeError::Listen {
                integration: self.integration.name.clone(),
                addr,
                source,
            })
    }

    /// Waits for the browser's redirect and returns its code. Answers the
    /// browser with a page saying what happened.
    pub async fn wait_for_redirect(
        &self,
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<Secret, AuthorizeError> {
        let (tx, mut rx) = mpsc::channel(1);
        let expected = Arc::new(Expected {
            integration: self.integration.name.clone(),
            state: self.state.clone(),
            path: self.grant.redirect_uri.path().to_owned(),
        });
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (tx, expected) = (tx.clone(), expected.clone());
                // Each connection on its own task: a browser may hold one open
                // (keep-alive, preconnect) while the redirect uses another.
                tokio::spawn(async move {
                    let service = service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let (tx, expected) = (tx.clone(), expected.clone());
                            async move {
                                if request.uri().path() != expected.path {
                                    return Ok::<_, Infallible>(page(
                                        StatusCode::NOT_FOUND,
                                        "Not the credproxy redirect.",
                                    ));
                                }
                                let outcome = expected.read(request.uri().query().unwrap_or(""));
                                let response = match &outcome {
                                    Ok(_) => page(
                                        StatusCode::OK,
                                        "credproxy received the authorization code; the terminal shows the outcome. You can close this tab.",
                                    ),
                                    Err(e) => {
                                        page(StatusCode::BAD_REQUEST, &format!("credproxy: {e}"))
                                    }
                                };
                                let _ = tx.send(outcome).await;
                                Ok(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        let integration = self.integration.name.clone();
        tokio::select! {
            () = accept => Err(AuthorizeError::NoCode(integration)),
            Some(outcome) = rx.recv() => outcome,
            () = tokio::time::sleep(timeout) => Err(AuthorizeError::Timeout { integration, waited: timeout }),
        }
    }

    /// `--manual`: the redirect URL the browser ended on, or just the code.
    pub fn read_pasted(&self, pasted: &str) -> Result<Secret, AuthorizeError> {
        let pasted = pasted.trim();
        match Url::parse(pasted) {
            Ok(url) => self.expected().read(url.query().unwrap_or("")),
            Err(_) if !pasted.is_empty() => Ok(Secret::new(pasted)),
            Err(_) => Err(AuthorizeError::NoCode(self.integration.name.clone())),
        }
    }

    fn expected(&self) -> Expected {
        Expected {
            integration: self.integration.name.clone(),
            state: self.state.clone(),
            path: self.grant.redirect_uri.path().to_owned(),
        }
    }

    /// Exchanges `code` and stores the tokens; the integration then works with
    /// no refresh token in the config. Returns when the access token expires.
    pub async fn complete(
        &self,
        config: &Config,
        code: &Secret,
    ) -> Result<OffsetDateTime, AuthorizeError> {
        // Opened first: a store that cannot take the tokens (a wrong key) must
        // fail before the single-use code is spent.
        let store = state::open(&config.state, &config.upstream).await?;
        let client = OAuthClient::new(&config.upstream)?;
        let response = client
            .exchange_code(&self.integration.name, &self.grant, code, &self.verifier)
            .await
            .map_err(RefreshError::from)?;
        let Some(refresh_token) = response.refresh_token else {
            return Err(AuthorizeError::NoRefreshToken(
                self.integration.name.clone(),
            ));
        };
        let now = OffsetDateTime::now_utc();
        let expires_at = now
            + response
                .expires_in
                .unwrap_or(self.integration.default_expires_in);
        let entry = Entry {
            refresh_token: Some(refresh_token),
            access_token: Some(response.access_token),
            token_type: Some(response.token_type),
            expires_at: Some(expires_at),
            scope: self.integration.scope.clone(),
            // Tied to the config's refresh token, if it still has one, so this
            // new chain is the one used rather than the config's.
            seed_fingerprint: self.grant.refresh_token.as_ref().map(state::fingerprint),
            updated_at: now,
            sealed: false,
        };
        let mut held = store.lock(&self.integration.name).await?;
        held.save(&entry).await?;
        Ok(expires_at)
    }
}

/// What a valid redirect looks like.
struct Expected {
    integration: String,
    state: Secret,
    path: String,
}

impl Expected {
    /// The code from a redirect's query, once its `state` is checked.
    fn read(&self, query: &str) -> Result<Secret, AuthorizeError> {
        let name = || self.integration.clone();
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if let Some(error) = params.get("error") {
            return Err(AuthorizeError::Refused {
                integration: name(),
                error: printable(error),
                description: params.get("error_description").map(|d| printable(d)),
            });
        }
        let state_matches = params
            .get("state")
            .is_some_and(|sent| self.state.matches(sent.as_bytes()));
        if !state_matches {
            return Err(AuthorizeError::StateMismatch(name()));
        }
        params
            .get("code")
            .filter(|code| !code.is_empty())
            .map(|code| Secret::new(code.as_str()))
            .ok_or_else(|| AuthorizeError::NoCode(name()))
    }
}

fn random_token(bytes: usize) -> Secret {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill(&mut raw[..]);
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

/// Provider text shown to the user: bounded and printable.
fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn page(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let html = format!(
        "<!doctype html><title>credproxy</title><p>{}</p>\n",
        html_escape(message)
    );
    let mut response = Response::new(body::full(html));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        let text = r#"
[integrations.box]
client_id = "id"
client_secret = "s"
refresh_url = "https://x.test/token"
authorize_url = "https://x.test/authorize?prompt=none"
scope = "read write"
extra_authorize_params = { token_access_type = "offline" }
"#;
        let config = crate::config::parse(std::path::Path::new("t.toml"), text, &|_| None).unwrap();
        Flow::new(&config, "box").unwrap()
    }

    #[test]
    fn url_carries_pkce_state_and_params() {
        let flow = flow();
        let params: HashMap<String, String> = flow.url().query_pairs().into_owned().collect();
        assert_eq!(params["prompt"], "none");
        assert_eq!(params["response_type"], "code");
        assert_eq!(params["client_id"], "id");
        assert_eq!(params["redirect_uri"], "http://127.0.0.1:8765/callback");
        assert_eq!(params["scope"], "read write");
        assert_eq!(params["token_access_type"], "offline");
        assert_eq!(params["code_challenge_method"], "S256");
        let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(flow.verifier.expose()));
        assert_eq!(params["code_challenge"], expected);
        assert_eq!(params["state"], flow.state.expose());
        assert!(!flow.url().as_str().contains(flow.verifier.expose()));
        assert!((43..=128).contains(&flow.verifier.expose().len()));
    }

    #[test]
    fn redirect_needs_the_state_and_reports_provider_errors() {
        let flow = flow();
        let state = flow.state.expose().to_owned();
        let code = flow
            .expected()
            .read(&format!("code=abc&state={state}"))
            .unwrap();
        assert_eq!(code.expose(), "abc");
        assert!(matches!(
            flow.expected().read("code=abc&state=forged"),
            Err(AuthorizeError::StateMismatch(_))
        ));
        assert!(matches!(
            flow.expected().read("code=abc"),
            Err(AuthorizeError::StateMismatch(_))
        ));
        let refused = flow
            .expected()
            .read("error=access_denied&error_description=no%0Athanks")
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "box: the provider refused the authorization: access_denied (no thanks)"
        );
    }

    #[test]
    fn pasted_url_or_code() {
        let flow = flow();
        let url = format!(
            "http://127.0.0.1:8765/callback?code=xyz&state={}",
            flow.state.expose()
        );
        assert_eq!(flow.read_pasted(&url).unwrap().expose(), "xyz");
        assert_eq!(
            flow.read_pasted("  rawcode \n").unwrap().expose(),
            "rawcode"
        );
        assert!(
            flow.read_pasted("http://127.0.0.1:8765/callback?code=xyz&state=bad")
                .is_err()
        );
    }
}
