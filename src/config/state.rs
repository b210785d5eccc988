//! `[state]`: where tokens persist — a file (`path`, the default) or a
//! PostgreSQL database shared by many replicas (`url`) — and the key that
//! seals them there.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::secret::StateKey;
use crate::state::DatabaseUrl;

pub(super) const DEFAULT_STATE_PATH: &str = "state/tokens.json";

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub store: StoreConfig,
    /// Seals every token in the store (AES-256-GCM).
    pub key: Option<StateKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    File { path: PathBuf },
    Postgres { url: Box<DatabaseUrl> },
}

impl fmt::Display for StateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            StoreConfig::File { path } => write!(f, "{}", path.display()),
            StoreConfig::Postgres { url } => write!(f, "the PostgreSQL database {url}"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) path: Option<String>,
    pub(super) url: Option<String>,
    pub(super) key: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn state(&self, raw: RawState) -> Result<StateConfig, ConfigError> {
        let key = raw
            .key
            .map(|text| {
                StateKey::from_base64(&text).map_err(|e| self.err("state.key", e.to_string()))
            })
            .transpose()?;
        let store = match (raw.path, raw.url) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "state.url",
                    "set either state.path (a file) or state.url (PostgreSQL), not both",
                ));
            }
            (None, Some(url)) => DatabaseUrl::parse(&url)
                .map(|url| StoreConfig::Postgres { url: Box::new(url) })
                .map_err(|message| self.err("state.url", message))?,
            (path, None) => StoreConfig::File {
                path: path.unwrap_or_else(|| DEFAULT_STATE_PATH.into()).into(),
            },
        };
        Ok(StateConfig { store, key })
    }
}
