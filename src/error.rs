//! The top-level error and its exit code: 2 for bad usage or a bad config,
//! 127 for a command `exec` cannot start, 1 for everything else that failed
//! at run time.

use crate::authorize::AuthorizeError;
use crate::ca::CaError;
use crate::config::ConfigError;
use crate::state::StateError;
use crate::tls::TlsError;
use crate::tokens::RefreshError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
    #[error("{0}")]
    Failed(String),
    /// `exec`'s command could not be started (not found, not executable).
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Usage(_) => 2,
            Self::Authorize(error) if error.is_usage() => 2,
            // As a shell reports a command it cannot run.
            Self::Spawn { .. } => 127,
            _ => 1,
        }
    }
}
