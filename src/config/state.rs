//! `[state]`: where tokens persist, and the key that seals them there.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::secret::StateKey;

pub(super) const DEFAULT_STATE_PATH: &str = "state/tokens.json";

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
    /// Seals every token in the store (AES-256-GCM).
    pub key: Option<StateKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) path: Option<String>,
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
        Ok(StateConfig {
            path: raw.path.unwrap_or_else(|| DEFAULT_STATE_PATH.into()).into(),
            key,
        })
    }
}
