//! The state store: each integration's refresh token (the one that must never be
//! lost; only the refresh_token grant has one), its current access token and
//! expiry, and the fingerprint of the config credentials it was obtained with.
//!
//! The embedded default is a JSON file, mode 0600, only ever replaced atomically
//! (temp file, fsync, rename, directory fsync). A per-integration lock file,
//! held across the token exchange, makes refreshes single-flight across
//! processes that share the file. A shared database store for many replicas can
//! implement [`StateStore`] later.
//!
//! With a `[state] key`, every store is wrapped in a [`SealedStore`], which
//! seals each token before the store sees it (`seal`, `sealed`).

pub mod seal;
pub mod sealed;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::secret::Secret;
pub use sealed::SealedStore;

const FORMAT_VERSION: u32 = 1;

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

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    integrations: BTreeMap<String, Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: cannot read state file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
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
        source: io::Error,
    },
    #[error("{}: cannot take lock", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

/// Held while one process refreshes one integration; dropping it releases the lock.
pub struct StateLock {
    _held: Box<dyn Send>,
}

/// Where tokens persist. Methods block (file or network I/O): call them from
/// `spawn_blocking`.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self, integration: &str) -> Result<Option<Entry>, StateError>;
    /// Exclusive across processes; waits for a holder to finish.
    fn lock(&self, integration: &str) -> Result<StateLock, StateError>;
    fn save(&self, integration: &str, entry: &Entry) -> Result<(), StateError>;
    /// What the status page shows about the store. Does no I/O.
    fn describe(&self) -> StoreInfo;
    /// Every entry, by integration.
    fn entries(&self) -> Result<BTreeMap<String, Entry>, StateError>;
    /// Replaces every entry with `f`'s result in one atomic step: all of them
    /// or none (an error from `f` writes nothing). The caller holds the locks
    /// that keep refreshes out.
    fn update_all(
        &self,
        f: &mut dyn FnMut(&str, Entry) -> Result<Entry, StateError>,
    ) -> Result<(), StateError>;
}

/// A store as an operator sees it: never a password or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// "file", or another store's kind.
    pub kind: &'static str,
    /// The file's path, or the database without its credentials.
    pub location: String,
    /// Tokens sealed at rest.
    pub sealed: bool,
}

/// The configured store, sealed with the `[state] key` when there is one.
/// Every sealed entry is opened once here, so a wrong or missing key is an
/// error before anything is read for use, written or refreshed.
pub fn open(
    path: &Path,
    key: Option<&crate::secret::StateKey>,
) -> Result<std::sync::Arc<SealedStore>, StateError> {
    let file = FileStore::open(path)?;
    SealedStore::open(std::sync::Arc::new(file), key).map(std::sync::Arc::new)
}

/// A hash of a config refresh token, to notice when the config's token changed
/// without keeping the token itself anywhere but in the config.
pub fn fingerprint(refresh_token: &Secret) -> String {
    let digest = Sha256::digest(format!("credproxy-seed-v1:{}", refresh_token.expose()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

// === impl FileStore ===

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Opens the store at `path`, reading it once so a corrupt or unreadable file
    /// is an error at start rather than at the first refresh.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let store = Self {
            path: path.to_owned(),
        };
        store.read()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<StateFile, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateFile::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |detail: String| StateError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        // serde_json's messages can quote the offending value, which may be a
        // token: report only the kind of error and where it is.
        let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
            corrupt(format!(
                "{} at line {}, column {}",
                match e.classify() {
                    serde_json::error::Category::Eof => "unexpected end of file",
                    serde_json::error::Category::Syntax => "invalid JSON",
                    _ => "unexpected content",
                },
                e.line(),
                e.column()
            ))
        })?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!("unknown format version {}", file.version)));
        }
        Ok(file)
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    fn lock_file(&self, suffix: &str) -> Result<StateLock, StateError> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        let lock_err = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        create_private_dir(self.dir()).map_err(lock_err)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(lock_err)?;
        // flock(2): released by the kernel if this process dies, so a crash
        // never leaves the integration locked.
        file.lock().map_err(lock_err)?;
        Ok(StateLock {
            _held: Box::new(file),
        })
    }

    fn write_atomically(&self, state: &StateFile) -> Result<(), StateError> {
        let write_err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.dir();
        create_private_dir(dir).map_err(write_err)?;
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let json = serde_json::to_vec_pretty(state).map_err(|e| write_err(io::Error::other(e)))?;
        let result = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode above only applies when the file is created.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_err)
    }
}

impl StateStore for FileStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            kind: "file",
            location: self.path.display().to_string(),
            sealed: false,
        }
    }

    fn load(&self, integration: &str) -> Result<Option<Entry>, StateError> {
        Ok(self.read()?.integrations.remove(integration))
    }

    fn lock(&self, integration: &str) -> Result<StateLock, StateError> {
        self.lock_file(&format!(".{integration}.lock"))
    }

    fn entries(&self) -> Result<BTreeMap<String, Entry>, StateError> {
        Ok(self.read()?.integrations)
    }

    fn update_all(
        &self,
        f: &mut dyn FnMut(&str, Entry) -> Result<Entry, StateError>,
    ) -> Result<(), StateError> {
        let _guard = self.lock_file(".lock")?;
        let mut state = self.read()?;
        if state.integrations.is_empty() {
            return Ok(());
        }
        state.integrations = std::mem::take(&mut state.integrations)
            .into_iter()
            .map(|(name, entry)| f(&name, entry).map(|entry| (name, entry)))
            .collect::<Result<_, _>>()?;
        // One rename: a crash leaves either the old file or the new one.
        self.write_atomically(&state)
    }

    fn save(&self, integration: &str, entry: &Entry) -> Result<(), StateError> {
        // Other integrations' refreshes (this process or another) write the same
        // file: serialize read-modify-write with a file-wide lock.
        let _guard = self.lock_file(".lock")?;
        let mut state = self.read()?;
        state.version = FORMAT_VERSION;
        state
            .integrations
            .insert(integration.to_owned(), entry.clone());
        self.write_atomically(&state)
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(refresh: &str) -> Entry {
        Entry {
            refresh_token: Some(Secret::new(refresh)),
            access_token: Some(Secret::new("at")),
            token_type: Some("bearer".into()),
            expires_at: Some(OffsetDateTime::UNIX_EPOCH),
            seed_fingerprint: None,
            scope: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            sealed: false,
        }
    }

    #[test]
    fn save_keeps_other_integrations_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.save("a", &entry("rt-a")).unwrap();
        store.save("b", &entry("rt-b")).unwrap();
        assert_eq!(
            store
                .load("a")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-a"
        );
        assert_eq!(
            store
                .load("b")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-b"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn update_all_writes_every_entry_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        store.save("a", &entry("rt-a")).unwrap();
        store.save("b", &entry("rt-b")).unwrap();
        let before = fs::read(&path).unwrap();
        let failed = store.update_all(&mut |name, entry| match name {
            "b" => Err(StateError::Corrupt {
                path: PathBuf::new(),
                detail: "test".into(),
            }),
            _ => Ok(entry),
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), before, "nothing written");
        store
            .update_all(&mut |name, mut entry| {
                entry.token_type = Some(name.to_uppercase());
                Ok(entry)
            })
            .unwrap();
        let entries = store.entries().unwrap();
        assert_eq!(entries["a"].token_type.as_deref(), Some("A"));
        assert_eq!(entries["b"].token_type.as_deref(), Some("B"));
    }

    #[test]
    fn corrupt_file_is_an_error_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(
            &path,
            b"{\"version\": 1, \"integrations\": {\"a\": \"rt-SECRET",
        )
        .unwrap();
        let err = FileStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("corrupt"), "{err}");
        assert!(!err.contains("rt-SECRET"), "{err}");
        assert_eq!(
            fs::read(&path).unwrap(),
            b"{\"version\": 1, \"integrations\": {\"a\": \"rt-SECRET"
        );
    }

    #[test]
    fn fingerprint_hides_the_token() {
        let print = fingerprint(&Secret::new("rt-SECRET"));
        assert!(print.starts_with("sha256:") && !print.contains("rt-SECRET"));
        assert_eq!(print, fingerprint(&Secret::new("rt-SECRET")));
        assert_ne!(print, fingerprint(&Secret::new("rt-other")));
    }
}
