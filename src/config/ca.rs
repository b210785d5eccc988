//! `[ca]`: where the local CA's certificate and key live.

use std::path::PathBuf;

use serde::Deserialize;

use super::Validator;

pub(super) const DEFAULT_CA_CERT: &str = "certs/ca.pem";
pub(super) const DEFAULT_CA_KEY: &str = "certs/ca-key.pem";

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCa {
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn ca(&self, raw: RawCa) -> CaConfig {
        CaConfig {
            cert: raw.cert.unwrap_or_else(|| DEFAULT_CA_CERT.into()).into(),
            key: raw.key.unwrap_or_else(|| DEFAULT_CA_KEY.into()).into(),
        }
    }
}
