//! `[integrations.NAME]`: one OAuth client and how its tokens are obtained.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use super::{ConfigError, Validator, duration, is_loopback_url};
use crate::secret::Secret;

pub(super) const DEFAULT_REFRESH_SKEW: &str = "60s";
pub(super) const DEFAULT_EXPIRES_IN: &str = "1h";
pub(super) const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFormat {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Body,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IntegrationConfig {
    pub name: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub refresh_url: Url,
    /// None once `credproxy authorize` has stored one in the state file.
    pub refresh_token: Option<Secret>,
    pub request_format: RequestFormat,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub refresh_skew: Duration,
    pub default_expires_in: Duration,
    pub authorize_url: Option<Url>,
    pub extra_authorize_params: BTreeMap<String, String>,
    pub redirect_uri: Url,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegration {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) refresh_url: String,
    pub(super) refresh_token: Option<String>,
    pub(super) request_format: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) refresh_skew: Option<String>,
    pub(super) default_expires_in: Option<String>,
    pub(super) authorize_url: Option<String>,
    #[serde(default)]
    pub(super) extra_authorize_params: BTreeMap<String, String>,
    pub(super) redirect_uri: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn integration(
        &self,
        name: String,
        raw: RawIntegration,
    ) -> Result<IntegrationConfig, ConfigError> {
        let key = |field: &str| format!("integrations.{name}.{field}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(self.err(
                format!("integrations.{name}"),
                "integration names may only use letters, digits, '_' and '-'",
            ));
        }
        if raw.client_id.is_empty() {
            return Err(self.err(key("client_id"), "must not be empty"));
        }
        let refresh_url = self.url(&key("refresh_url"), &raw.refresh_url)?;
        if refresh_url.scheme() != "https" && !is_loopback_url(&refresh_url) {
            return Err(self.err(
                key("refresh_url"),
                "must be https (plain http is allowed only to a loopback host): it carries the client secret",
            ));
        }
        let refresh_token = match raw.refresh_token {
            Some(token) if token.is_empty() => {
                return Err(self.err(
                    key("refresh_token"),
                    "is empty (leave it out to use `credproxy authorize`)",
                ));
            }
            token => token.map(Secret::new),
        };
        let request_format = match raw.request_format.as_deref() {
            None | Some("form") => RequestFormat::Form,
            Some("json") => RequestFormat::Json,
            Some(other) => {
                return Err(self.err(
                    key("request_format"),
                    format!("{other:?} is not \"form\" or \"json\""),
                ));
            }
        };
        let client_auth = match raw.client_auth.as_deref() {
            None | Some("basic") => ClientAuth::Basic,
            Some("body") => ClientAuth::Body,
            Some(other) => {
                return Err(self.err(
                    key("client_auth"),
                    format!("{other:?} is not \"basic\" or \"body\""),
                ));
            }
        };
        let duration = |field: &str, value: Option<String>, default: &str| {
            duration::parse(value.as_deref().unwrap_or(default))
                .map_err(|m| self.err(key(field), m))
        };
        let refresh_skew = duration("refresh_skew", raw.refresh_skew, DEFAULT_REFRESH_SKEW)?;
        let default_expires_in = duration(
            "default_expires_in",
            raw.default_expires_in,
            DEFAULT_EXPIRES_IN,
        )?;
        if default_expires_in.is_zero() {
            return Err(self.err(key("default_expires_in"), "must be longer than zero"));
        }
        let authorize_url = match raw.authorize_url {
            Some(url) => Some(self.url(&key("authorize_url"), &url)?),
            None => None,
        };
        let redirect_uri = self.url(
            &key("redirect_uri"),
            raw.redirect_uri.as_deref().unwrap_or(DEFAULT_REDIRECT_URI),
        )?;
        if redirect_uri.scheme() != "http"
            || !is_loopback_url(&redirect_uri)
            || redirect_uri.port().is_none()
        {
            return Err(self.err(
                key("redirect_uri"),
                "must be a loopback http URL with a port, like \"http://127.0.0.1:8765/callback\"",
            ));
        }
        Ok(IntegrationConfig {
            client_id: raw.client_id,
            client_secret: Secret::new(raw.client_secret),
            refresh_url,
            refresh_token,
            request_format,
            client_auth,
            scope: raw.scope.filter(|s| !s.is_empty()),
            refresh_skew,
            default_expires_in,
            authorize_url,
            extra_authorize_params: raw.extra_authorize_params,
            redirect_uri,
            name,
        })
    }
}
