//! `[integrations.NAME]`: where one integration's tokens come from (its
//! `grant`) and when they are refreshed. Private keys are read and parsed
//! here, once, so a bad key is a config error rather than a failed refresh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use super::{ConfigError, Validator, duration, is_loopback_url};
use crate::jws::{Algorithm, SigningKey};
use crate::secret::Secret;

pub(super) const DEFAULT_REFRESH_SKEW: &str = "60s";
pub(super) const DEFAULT_EXPIRES_IN: &str = "1h";
pub(super) const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";
pub(super) const DEFAULT_GITHUB_API_URL: &str = "https://api.github.com";

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
    pub grant: Grant,
    pub scope: Option<String>,
    pub refresh_skew: Duration,
    pub default_expires_in: Duration,
}

/// How a token is obtained.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// RFC 6749 §6: a (rotating) refresh token.
    RefreshToken(RefreshTokenGrant),
    /// RFC 6749 §4.4: the client's own credentials.
    ClientCredentials(ClientCredentials),
    /// RFC 7523: an assertion signed with our private key.
    JwtBearer(JwtBearer),
    /// A GitHub App installation token, bought with a signed app JWT.
    GithubApp(GithubApp),
    /// A fixed secret, never refreshed.
    Static(StaticToken),
}

/// An OAuth client and its token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    pub client_id: String,
    pub client_secret: Secret,
    pub token_url: Url,
    pub request_format: RequestFormat,
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefreshTokenGrant {
    pub client: Client,
    /// None once `credproxy authorize` has stored one in the state file.
    pub refresh_token: Option<Secret>,
    pub authorize_url: Option<Url>,
    pub extra_authorize_params: BTreeMap<String, String>,
    pub redirect_uri: Url,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientCredentials {
    pub client: Client,
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtBearer {
    /// `iss`: the service account's `client_email`, or `issuer`.
    pub issuer: String,
    /// `sub`, when sent.
    pub subject: Option<String>,
    /// `aud`: `audience`, else the token URL.
    pub audience: String,
    pub key: SigningKey,
    /// The header's `kid` (a service account's `private_key_id`).
    pub key_id: Option<String>,
    pub token_url: Url,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GithubApp {
    pub app_id: String,
    pub installation_id: String,
    pub key: SigningKey,
    /// `{api_url}/app/installations/{installation_id}/access_tokens`
    pub token_url: Url,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StaticToken {
    pub token: Secret,
    pub token_type: String,
}

// === impl Grant ===

impl Grant {
    /// The `grant` value that selects this grant.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RefreshToken(_) => "refresh_token",
            Self::ClientCredentials(_) => "client_credentials",
            Self::JwtBearer(_) => "jwt_bearer",
            Self::GithubApp(_) => "github_app",
            Self::Static(_) => "static",
        }
    }

    /// The credentials a token is obtained with, as one secret string: its
    /// fingerprint in the state store tells whether a stored token came from
    /// these credentials. (The refresh_token grant tracks its chain instead.)
    pub fn identity(&self) -> Secret {
        let client = |c: &Client| {
            format!(
                "{}\n{}\n{}",
                c.token_url,
                c.client_id,
                c.client_secret.expose()
            )
        };
        let text = match self {
            Self::RefreshToken(g) => format!("refresh_token\n{}", client(&g.client)),
            Self::ClientCredentials(g) => format!(
                "client_credentials\n{}\n{}",
                client(&g.client),
                g.audience.as_deref().unwrap_or_default()
            ),
            Self::JwtBearer(g) => format!(
                "jwt_bearer\n{}\n{}\n{}\n{}\n{}",
                g.token_url,
                g.issuer,
                g.subject.as_deref().unwrap_or_default(),
                g.audience,
                g.key.digest_hex()
            ),
            Self::GithubApp(g) => format!(
                "github_app\n{}\n{}\n{}",
                g.token_url,
                g.app_id,
                g.key.digest_hex()
            ),
            Self::Static(g) => format!("static\n{}", g.token.expose()),
        };
        Secret::new(text)
    }

    /// Where tokens are requested; None for a static token.
    pub fn token_url(&self) -> Option<&Url> {
        match self {
            Self::RefreshToken(g) => Some(&g.client.token_url),
            Self::ClientCredentials(g) => Some(&g.client.token_url),
            Self::JwtBearer(g) => Some(&g.token_url),
            Self::GithubApp(g) => Some(&g.token_url),
            Self::Static(_) => None,
        }
    }
}

// === raw ===

/// An id written as a TOML number or a string (`${VAR}` yields strings).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawId {
    Number(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegration {
    pub(super) grant: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) refresh_url: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) request_format: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) service_account: Option<String>,
    pub(super) issuer: Option<String>,
    pub(super) private_key: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) algorithm: Option<String>,
    pub(super) app_id: Option<RawId>,
    pub(super) installation_id: Option<RawId>,
    pub(super) api_url: Option<String>,
    pub(super) token: Option<String>,
    pub(super) token_type: Option<String>,
    pub(super) refresh_skew: Option<String>,
    pub(super) default_expires_in: Option<String>,
    pub(super) authorize_url: Option<String>,
    pub(super) extra_authorize_params: Option<BTreeMap<String, String>>,
    pub(super) redirect_uri: Option<String>,
}

impl RawIntegration {
    /// The optional keys that are set, by name.
    fn set_keys(&self) -> Vec<&'static str> {
        let keys = [
            ("client_id", self.client_id.is_some()),
            ("client_secret", self.client_secret.is_some()),
            ("refresh_url", self.refresh_url.is_some()),
            ("token_url", self.token_url.is_some()),
            ("refresh_token", self.refresh_token.is_some()),
            ("request_format", self.request_format.is_some()),
            ("client_auth", self.client_auth.is_some()),
            ("scope", self.scope.is_some()),
            ("audience", self.audience.is_some()),
            ("service_account", self.service_account.is_some()),
            ("issuer", self.issuer.is_some()),
            ("private_key", self.private_key.is_some()),
            ("subject", self.subject.is_some()),
            ("algorithm", self.algorithm.is_some()),
            ("app_id", self.app_id.is_some()),
            ("installation_id", self.installation_id.is_some()),
            ("api_url", self.api_url.is_some()),
            ("token", self.token.is_some()),
            ("token_type", self.token_type.is_some()),
            ("refresh_skew", self.refresh_skew.is_some()),
            ("default_expires_in", self.default_expires_in.is_some()),
            ("authorize_url", self.authorize_url.is_some()),
            (
                "extra_authorize_params",
                self.extra_authorize_params.is_some(),
            ),
            ("redirect_uri", self.redirect_uri.is_some()),
        ];
        keys.into_iter()
            .filter_map(|(key, set)| set.then_some(key))
            .collect()
    }
}

/// The keys each grant reads, besides `grant` itself.
fn keys_of(grant: &str) -> &'static [&'static str] {
    match grant {
        "refresh_token" => &[
            "client_id",
            "client_secret",
            "refresh_url",
            "token_url",
            "refresh_token",
            "request_format",
            "client_auth",
            "scope",
            "refresh_skew",
            "default_expires_in",
            "authorize_url",
            "extra_authorize_params",
            "redirect_uri",
        ],
        "client_credentials" => &[
            "client_id",
            "client_secret",
            "refresh_url",
            "token_url",
            "request_format",
            "client_auth",
            "scope",
            "audience",
            "refresh_skew",
            "default_expires_in",
        ],
        "jwt_bearer" => &[
            "service_account",
            "issuer",
            "private_key",
            "algorithm",
            "token_url",
            "scope",
            "subject",
            "audience",
            "refresh_skew",
            "default_expires_in",
        ],
        "github_app" => &[
            "app_id",
            "private_key",
            "installation_id",
            "api_url",
            "refresh_skew",
            "default_expires_in",
        ],
        "static" => &["token", "token_type"],
        _ => &[],
    }
}

const GRANTS: &str =
    "\"refresh_token\", \"client_credentials\", \"jwt_bearer\", \"github_app\" or \"static\"";

/// The fields of a Google service-account key file that we use.
#[derive(Deserialize)]
struct ServiceAccountFile {
    client_email: String,
    private_key: Secret,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn integration(
        &self,
        name: String,
        raw: RawIntegration,
    ) -> Result<IntegrationConfig, ConfigError> {
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
        let at = IntegrationKeys {
            validator: self,
            name: &name,
        };
        let kind = raw.grant.as_deref().unwrap_or("refresh_token");
        if keys_of(kind).is_empty() {
            return Err(at.err("grant", format!("{kind:?} is not {GRANTS}")));
        }
        if let Some(unused) = raw
            .set_keys()
            .into_iter()
            .find(|k| !keys_of(kind).contains(k))
        {
            return Err(at.err(unused, format!("is not used by grant {kind:?}")));
        }
        if raw.refresh_url.is_some() && raw.token_url.is_some() {
            return Err(at.err(
                "token_url",
                "refresh_url and token_url are the same setting; set one",
            ));
        }
        let duration = |field: &str, value: &Option<String>, default: &str| {
            duration::parse(value.as_deref().unwrap_or(default)).map_err(|m| at.err(field, m))
        };
        let refresh_skew = duration("refresh_skew", &raw.refresh_skew, DEFAULT_REFRESH_SKEW)?;
        let default_expires_in = duration(
            "default_expires_in",
            &raw.default_expires_in,
            DEFAULT_EXPIRES_IN,
        )?;
        if default_expires_in.is_zero() {
            return Err(at.err("default_expires_in", "must be longer than zero"));
        }
        let scope = raw.scope.clone().filter(|s| !s.is_empty());
        let grant = match kind {
            "refresh_token" => Grant::RefreshToken(at.refresh_token(raw)?),
            "client_credentials" => Grant::ClientCredentials(ClientCredentials {
                audience: raw.audience.clone().filter(|a| !a.is_empty()),
                client: at.client(&raw)?,
            }),
            "jwt_bearer" => Grant::JwtBearer(at.jwt_bearer(raw)?),
            "github_app" => Grant::GithubApp(at.github_app(raw)?),
            _ => Grant::Static(at.static_token(raw)?),
        };
        Ok(IntegrationConfig {
            name,
            grant,
            scope,
            refresh_skew,
            default_expires_in,
        })
    }
}

/// Errors and lookups for the keys of one `[integrations.NAME]` table.
struct IntegrationKeys<'a> {
    validator: &'a Validator<'a>,
    name: &'a str,
}

impl IntegrationKeys<'_> {
    fn key(&self, field: &str) -> String {
        format!("integrations.{}.{field}", self.name)
    }

    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        self.validator.err(self.key(field), message)
    }

    fn required<T>(&self, field: &str, value: Option<T>, grant: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(field, format!("is required for grant {grant:?}")))
    }

    fn non_empty(&self, field: &str, value: String) -> Result<String, ConfigError> {
        if value.is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(value)
    }

    /// An endpoint that receives credentials: https, or http to loopback only.
    fn credential_url(&self, field: &str, text: &str) -> Result<Url, ConfigError> {
        let url = self.validator.url(&self.key(field), text)?;
        if url.scheme() != "https" && !is_loopback_url(&url) {
            return Err(self.err(
                field,
                "must be https (plain http is allowed only to a loopback host): it carries credentials",
            ));
        }
        Ok(url)
    }

    fn client(&self, raw: &RawIntegration) -> Result<Client, ConfigError> {
        let grant = raw.grant.as_deref().unwrap_or("refresh_token");
        let client_id = self.required("client_id", raw.client_id.clone(), grant)?;
        let client_id = self.non_empty("client_id", client_id)?;
        let client_secret = self.required("client_secret", raw.client_secret.clone(), grant)?;
        let (field, url) = match (&raw.refresh_url, &raw.token_url) {
            (Some(url), _) => ("refresh_url", url),
            (None, Some(url)) => ("token_url", url),
            (None, None) => {
                return Err(self.err(
                    "token_url",
                    format!("is required for grant {grant:?} (refresh_url is another name for it)"),
                ));
            }
        };
        let token_url = self.credential_url(field, url)?;
        let request_format = match raw.request_format.as_deref() {
            None | Some("form") => RequestFormat::Form,
            Some("json") => RequestFormat::Json,
            Some(other) => {
                return Err(self.err(
                    "request_format",
                    format!("{other:?} is not \"form\" or \"json\""),
                ));
            }
        };
        let client_auth = match raw.client_auth.as_deref() {
            None | Some("basic") => ClientAuth::Basic,
            Some("body") => ClientAuth::Body,
            Some(other) => {
                return Err(self.err(
                    "client_auth",
                    format!("{other:?} is not \"basic\" or \"body\""),
                ));
            }
        };
        Ok(Client {
            client_id,
            client_secret: Secret::new(client_secret),
            token_url,
            request_format,
            client_auth,
        })
    }

    fn refresh_token(&self, raw: RawIntegration) -> Result<RefreshTokenGrant, ConfigError> {
        let client = self.client(&raw)?;
        let refresh_token = match raw.refresh_token {
            Some(token) if token.is_empty() => {
                return Err(self.err(
                    "refresh_token",
                    "is empty (leave it out to use `credproxy authorize`)",
                ));
            }
            token => token.map(Secret::new),
        };
        let authorize_url = match raw.authorize_url {
            Some(url) => Some(self.validator.url(&self.key("authorize_url"), &url)?),
            None => None,
        };
        let redirect_uri = self.validator.url(
            &self.key("redirect_uri"),
            raw.redirect_uri.as_deref().unwrap_or(DEFAULT_REDIRECT_URI),
        )?;
        if redirect_uri.scheme() != "http"
            || !is_loopback_url(&redirect_uri)
            || redirect_uri.port().is_none()
        {
            return Err(self.err(
                "redirect_uri",
                "must be a loopback http URL with a port, like \"http://127.0.0.1:8765/callback\"",
            ));
        }
        Ok(RefreshTokenGrant {
            client,
            refresh_token,
            authorize_url,
            extra_authorize_params: raw.extra_authorize_params.unwrap_or_default(),
            redirect_uri,
        })
    }

    fn jwt_bearer(&self, raw: RawIntegration) -> Result<JwtBearer, ConfigError> {
        let (issuer, key, key_id, file_token_url, default_subject) = match raw.service_account {
            Some(path) => {
                if let Some(field) = [("issuer", &raw.issuer), ("private_key", &raw.private_key)]
                    .into_iter()
                    .find_map(|(field, value)| value.as_ref().map(|_| field))
                {
                    return Err(self.err(
                        field,
                        "comes from the service_account key file; set one or the other",
                    ));
                }
                let file = self.service_account(&path)?;
                let key = self.parse_key("service_account", file.private_key.expose())?;
                // Google's form: `sub` only for domain-wide delegation.
                (
                    file.client_email,
                    key,
                    file.private_key_id,
                    file.token_uri,
                    None,
                )
            }
            None => {
                let issuer = self.required("issuer", raw.issuer, "jwt_bearer")?;
                let issuer = self.non_empty("issuer", issuer)?;
                let pem = self.required("private_key", raw.private_key, "jwt_bearer")?;
                let key = self.private_key(&pem)?;
                // RFC 7523 §3: a self-issued assertion's subject is the client.
                let subject = Some(issuer.clone());
                (issuer, key, None, None, subject)
            }
        };
        if let Some(algorithm) = &raw.algorithm {
            let wanted = match algorithm.as_str() {
                "RS256" => Algorithm::Rs256,
                "ES256" => Algorithm::Es256,
                other => {
                    return Err(self.err(
                        "algorithm",
                        format!("{other:?} is not \"RS256\" or \"ES256\""),
                    ));
                }
            };
            if key.algorithm() != wanted {
                return Err(self.err(
                    "algorithm",
                    format!(
                        "is {algorithm} but the private key is a {} key",
                        key_kind(key.algorithm())
                    ),
                ));
            }
        }
        let (field, url) = match (raw.token_url, file_token_url) {
            (Some(url), _) => ("token_url", url),
            (None, Some(url)) => ("service_account", url),
            (None, None) => {
                return Err(self.err("token_url", "is required for grant \"jwt_bearer\""));
            }
        };
        let token_url = self.credential_url(field, &url)?;
        Ok(JwtBearer {
            issuer,
            subject: raw.subject.filter(|s| !s.is_empty()).or(default_subject),
            audience: raw
                .audience
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| token_url.to_string()),
            key,
            key_id,
            token_url,
        })
    }

    fn github_app(&self, raw: RawIntegration) -> Result<GithubApp, ConfigError> {
        let app_id = self.id("app_id", self.required("app_id", raw.app_id, "github_app")?)?;
        let installation_id = self.id(
            "installation_id",
            self.required("installation_id", raw.installation_id, "github_app")?,
        )?;
        let key =
            self.private_key(&self.required("private_key", raw.private_key, "github_app")?)?;
        if key.algorithm() != Algorithm::Rs256 {
            return Err(self.err(
                "private_key",
                "is an EC key; GitHub Apps sign with RS256 and need the app's RSA key",
            ));
        }
        let api_url = raw.api_url.as_deref().unwrap_or(DEFAULT_GITHUB_API_URL);
        let api_url = self.credential_url("api_url", api_url.trim_end_matches('/'))?;
        let token_url = format!(
            "{}/app/installations/{installation_id}/access_tokens",
            api_url.as_str().trim_end_matches('/')
        );
        let token_url = self.credential_url("api_url", &token_url)?;
        Ok(GithubApp {
            app_id,
            installation_id,
            key,
            token_url,
        })
    }

    fn static_token(&self, raw: RawIntegration) -> Result<StaticToken, ConfigError> {
        let token = self.required("token", raw.token, "static")?;
        if token.is_empty() {
            return Err(self.err("token", "must not be empty"));
        }
        let token_type = raw.token_type.unwrap_or_else(|| "bearer".into());
        Ok(StaticToken {
            token: Secret::new(token),
            token_type: self.non_empty("token_type", token_type)?,
        })
    }

    fn id(&self, field: &str, raw: RawId) -> Result<String, ConfigError> {
        let text = match raw {
            RawId::Number(n) => n.to_string(),
            RawId::Text(text) => text,
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.err(field, format!("{text:?} is not a numeric id")));
        }
        Ok(text)
    }

    /// `private_key`: the PEM text itself (say from `${file:…}`), or a PEM file's path.
    fn private_key(&self, value: &str) -> Result<SigningKey, ConfigError> {
        if value.trim_start().starts_with("-----BEGIN") {
            return self.parse_key("private_key", value);
        }
        let pem = std::fs::read_to_string(value)
            .map_err(|e| self.err("private_key", format!("cannot read {value:?}: {e}")))?;
        self.parse_key("private_key", &pem)
    }

    fn parse_key(&self, field: &str, pem: &str) -> Result<SigningKey, ConfigError> {
        SigningKey::from_pem(pem.as_bytes()).map_err(|e| self.err(field, e.to_string()))
    }

    /// `service_account`: the key file's path (or its JSON, say from `${file:…}`).
    fn service_account(&self, value: &str) -> Result<ServiceAccountFile, ConfigError> {
        let (what, json) = if value.trim_start().starts_with('{') {
            ("the key file".to_owned(), value.to_owned())
        } else {
            let json = std::fs::read_to_string(Path::new(value))
                .map_err(|e| self.err("service_account", format!("cannot read {value:?}: {e}")))?;
            (format!("{value:?}"), json)
        };
        // serde_json's message could quote the private key: report only where.
        serde_json::from_str(&json).map_err(|e| {
            self.err(
                "service_account",
                format!(
                    "{what} is not a service-account key file with client_email and private_key (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })
    }
}

fn key_kind(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Rs256 => "RSA (RS256)",
        Algorithm::Es256 => "P-256 EC (ES256)",
    }
}
