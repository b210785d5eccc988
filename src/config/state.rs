//! `[state]`: where tokens persist.

use std::path::PathBuf;

use serde::Deserialize;

use super::Validator;

pub(super) const DEFAULT_STATE_PATH: &str = "state/tokens.json";

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) path: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn state(&self, raw: RawState) -> StateConfig {
        StateConfig {
            path: raw.path.unwrap_or_else(|| DEFAULT_STATE_PATH.into()).into(),
        }
    }
}
