//! The state store: each integration's refresh token (the one that must never be
//! lost; only the refresh_token grant has one), its current access token and
//! expiry, and the fingerprint of the config credentials it was obtained with.
//!
//! Two stores behind one seam, [`StateStore`]: a JSON file (`file`, the embedded
//! default, one machine) and PostgreSQL (`postgres`, many replicas). Both make a
//! refresh single-flight across everything that shares them: the refresh runs
//! while holding a [`StateLock`] on its integration, and re-reads under it.
//!
//! With a `[state] key`, the store is wrapped in a [`SealedStore`], which
//! seals each token before the store sees it (`seal`, `sealed`).

pub mod file;
pub mod metrics;
pub mod postgres;
pub mod seal;
pub mod sealed;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::secret::Secret;
pub use file::FileStore;
pub use metrics::StoreMetrics;
pub use postgres::{DatabaseUrl, PgStore};
pub use sealed::SealedStore;

/// One integration's persisted tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The refresh_token grant's chain; the other grants have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    pub access_token: Option<Secret>,
    pub token_type: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// `fingerprint()` of the config refresh token this chain started from
    /// (None when it came from `credproxy authorize`), or of the credentials
    /// another grant obtained the token with.
    pub seed_fingerprint: Option<String>,
    /// The scope the access token was requested with: a token for another scope
    /// is not used after a config change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The token fields hold values sealed under the `[state] key`, not tokens.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
}

impl Entry {
    /// The entry with `f` applied to every token field (named as in the file).
    /// The destructuring is exhaustive on purpose: a field added to `Entry` must
    /// be placed here, as a token to seal or as something safe to show.
    pub fn map_secrets<E>(
        self,
        mut f: impl FnMut(&'static str, Secret) -> Result<Secret, E>,
    ) -> Result<Self, E> {
        let Entry {
            refresh_token,
            access_token,
            token_type: _,
            expires_at: _,
            seed_fingerprint: _,
            scope: _,
            updated_at: _,
            sealed: _,
        } = &self;
        let refresh_token = refresh_token
            .clone()
            .map(|t| f("refresh_token", t))
            .transpose()?;
        let access_token = access_token
            .clone()
            .map(|t| f("access_token", t))
            .transpose()?;
        Ok(Entry {
            refresh_token,
            access_token,
            ..self
        })
    }
}

/// What `credproxy state show` lists about an entry: never a token, so it can
/// be shown without any key.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub integration: String,
    pub expires_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
    /// Tokens stored sealed (encrypted) rather than in clear.
    pub sealed: bool,
}

/// A change another process (or this one) made to a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This integration's entry was written.
    Entry(String),
    /// Changes may have been missed (the connection was lost): re-read everything.
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: cannot read state file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: state file is corrupt ({detail}); it was left untouched because it may hold the only valid refresh token — repair it or move it away",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: cannot write state file", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot take lock", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{store}: unreachable ({what})")]
    Unreachable {
        store: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{store}: {what} did not finish within {seconds} s")]
    Timeout {
        store: String,
        what: &'static str,
        seconds: u64,
    },
    #[error("{store}: {what} failed")]
    Database {
        store: String,
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{store}: {message}")]
    Schema { store: String, message: String },
    #[error("{store}: cannot set up TLS")]
    Tls {
        store: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error(
        "{store}: {integration}: the entry changed while this process's lock was lost; the stored chain wins"
    )]
    Conflict { store: String, integration: String },
    #[error("{store}: {integration}: wrong or missing [state] key: {reason}")]
    Key {
        store: String,
        integration: String,
        reason: String,
    },
    #[error("{store}: {integration}: cannot seal the tokens")]
    Seal {
        store: String,
        integration: String,
        #[source]
        source: seal::SealError,
    },
}

impl StateError {
    /// The error's kind, for the `credproxy_state_errors_total` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Read { .. } | Self::Write { .. } | Self::Lock { .. } => "io",
            Self::Corrupt { .. } | Self::Schema { .. } | Self::Tls { .. } => "corrupt",
            Self::Key { .. } | Self::Seal { .. } => "key",
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Database { .. } => "query",
            Self::Conflict { .. } => "conflict",
        }
    }

    /// True when the store could not be reached at all (rather than refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}

/// What `update_all` applies to each entry.
pub type UpdateFn<'f> = dyn FnMut(&str, Entry) -> Result<Entry, StateError> + Send + 'f;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'a>>;

/// Where tokens persist.
pub trait StateStore: Send + Sync + 'static {
    /// What the status page and messages show about the store. Does no I/O.
    fn describe(&self) -> StoreInfo;

    /// The stored entry, read without any lock.
    fn load<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Option<Entry>>;

    /// Every entry, sorted by integration.
    fn list(&self) -> StoreFuture<'_, Vec<Summary>>;

    /// Exclusive across every process sharing the store; waits for a holder to
    /// finish. Released when the returned guard drops, or when this process dies.
    fn lock<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Box<dyn StateLock>>;

    /// Changes made by anyone sharing the store, for stores that announce them
    /// (the file store does not: `None`). The first call starts following them.
    fn changes(&self) -> Option<broadcast::Receiver<Change>>;

    /// Every entry, by integration.
    fn entries(&self) -> StoreFuture<'_, BTreeMap<String, Entry>>;

    /// Replaces every entry with `f`'s result in one atomic step: all of them
    /// or none (an error from `f` writes nothing). The caller holds the locks
    /// that keep refreshes out.
    fn update_all<'a>(&'a self, f: &'a mut UpdateFn<'_>) -> StoreFuture<'a, ()>;

    /// False while the store cannot be reached (the last attempt failed).
    fn reachable(&self) -> bool;

    fn metrics(&self) -> &StoreMetrics;
}

/// A store as an operator sees it: never a password or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// "file" or "postgresql".
    pub kind: &'static str,
    /// The file's path, or the database without its credentials.
    pub location: String,
    /// Tokens sealed at rest.
    pub sealed: bool,
}

impl std::fmt::Display for StoreInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As the CLI's errors name it.
        let kind = match self.kind {
            "postgresql" => "PostgreSQL",
            other => other,
        };
        write!(f, "{kind} state store {}", self.location)
    }
}

/// One integration's lock, held. Reads and writes through it see and make the
/// integration's latest state.
pub trait StateLock: Send {
    /// Re-reads the entry: another process may have refreshed while we waited.
    fn load(&mut self) -> StoreFuture<'_, Option<Entry>>;

    /// Writes the entry; it is committed (durable, visible to every sharer)
    /// when this returns Ok. Refused with `Conflict` when someone else wrote the
    /// entry since it was last read through this lock (the lock was lost).
    fn save<'a>(&'a mut self, entry: &'a Entry) -> StoreFuture<'a, ()>;
}

/// The configured store, sealed with the `[state] key` when there is one.
/// Every sealed entry is opened once here, so a wrong or missing key is an
/// error before anything is read for use, written or refreshed.
pub async fn open(
    config: &crate::config::StateConfig,
    upstream: &crate::config::UpstreamConfig,
) -> Result<Arc<SealedStore>, StateError> {
    let inner: Arc<dyn StateStore> = match &config.store {
        crate::config::StoreConfig::File { path } => Arc::new(FileStore::open(path)?),
        crate::config::StoreConfig::Postgres { url } => {
            Arc::new(PgStore::open(url, upstream).await?)
        }
    };
    SealedStore::open(inner, config.key.as_ref())
        .await
        .map(Arc::new)
}

/// A hash of a config refresh token, to notice when the config's token changed
/// without keeping the token itself anywhere but in the config.
pub fn fingerprint(refresh_token: &Secret) -> String {
    let digest = Sha256::digest(format!("credproxy-seed-v1:{}", refresh_token.expose()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_hides_the_token() {
        let print = fingerprint(&Secret::new("rt-SECRET"));
        assert!(print.starts_with("sha256:") && !print.contains("rt-SECRET"));
        assert_eq!(print, fingerprint(&Secret::new("rt-SECRET")));
        assert_ne!(print, fingerprint(&Secret::new("rt-other")));
    }
}
