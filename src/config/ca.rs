//! `[ca]`: where the local CA's certificate and key live, and what a
//! name-constrained CA may vouch for beyond the routed hosts.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::routes::HostPattern;

pub(super) const DEFAULT_CA_CERT: &str = "certs/ca.pem";
pub(super) const DEFAULT_CA_KEY: &str = "certs/ca-key.pem";

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names `credproxy ca init --constrain` permits besides the routed hosts.
    pub permit: Vec<HostPattern>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCa {
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
    #[serde(default)]
    pub(super) permit: Vec<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn ca(&self, raw: RawCa) -> Result<CaConfig, ConfigError> {
        let permit = raw
            .permit
            .iter()
            .enumerate()
            .map(|(index, name)| {
                HostPattern::parse(name).map_err(|m| self.err(format!("ca.permit[{index}]"), m))
            })
            .collect::<Result<_, _>>()?;
        Ok(CaConfig {
            cert: raw.cert.unwrap_or_else(|| DEFAULT_CA_CERT.into()).into(),
            key: raw.key.unwrap_or_else(|| DEFAULT_CA_KEY.into()).into(),
            permit,
        })
    }
}
