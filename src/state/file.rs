//! The embedded default store: a JSON file, mode 0600, only ever replaced
//! atomically (temp file, fsync, rename, directory fsync). A per-integration
//! lock file, held across the token exchange, makes refreshes single-flight
//! across the processes of one machine that share the file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    Change, Entry, StateError, StateLock, StateStore, StoreFuture, StoreInfo, StoreMetrics,
    Summary, UpdateFn,
};

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    integrations: BTreeMap<String, Entry>,
}

pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    metrics: StoreMetrics,
}

impl FileStore {
    /// Opens the store at `path`, reading it once so a corrupt or unreadable file
    /// is an error at start rather than at the first refresh.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let inner = Inner {
            path: path.to_owned(),
            metrics: StoreMetrics::new(),
        };
        inner.read()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs blocking file I/O off the async workers, counted in the metrics.
    fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        work: impl FnOnce(&Inner) -> Result<T, StateError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let metrics = inner.metrics.clone();
            let result = tokio::task::spawn_blocking(move || work(&inner))
                .await
                .unwrap_or_else(|e| {
                    Err(StateError::Lock {
                        path: PathBuf::new(),
                        source: io::Error::other(e.to_string()),
                    })
                });
            metrics.record(op, &result);
            result
        })
    }
}

impl StateStore for FileStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            kind: "file",
            location: self.inner.path.display().to_string(),
            sealed: false,
        }
    }

    fn load<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Option<Entry>> {
        let integration = integration.to_owned();
        self.blocking("load", move |inner| {
            Ok(inner.read()?.integrations.remove(&integration))
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<Summary>> {
        self.blocking("list", |inner| {
            Ok(inner
                .read()?
                .integrations
                .into_iter()
                .map(|(integration, entry)| Summary {
                    integration,
                    expires_at: entry.expires_at,
                    updated_at: entry.updated_at,
                    sealed: entry.sealed,
                })
                .collect())
        })
    }

    fn lock<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Box<dyn StateLock>> {
        let suffix = format!(".{integration}.lock");
        let store = self.inner.clone();
        let started = std::time::Instant::now();
        let locked = self.blocking("lock", move |inner| inner.lock_file(&suffix));
        Box::pin(async move {
            let held = locked.await?;
            store.metrics.lock_waited(started.elapsed());
            Ok(Box::new(FileLock {
                _held: held,
                store,
                integration: integration.to_owned(),
            }) as Box<dyn StateLock>)
        })
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        None
    }

    fn entries(&self) -> StoreFuture<'_, BTreeMap<String, Entry>> {
        self.blocking("list", |inner| Ok(inner.read()?.integrations))
    }

    fn update_all<'a>(&'a self, f: &'a mut UpdateFn<'_>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The file-wide write lock, held from the read to the replace.
            let (guard, mut state) = self
                .blocking("update", |inner| {
                    Ok((inner.lock_file(".lock")?, inner.read()?))
                })
                .await?;
            if state.integrations.is_empty() {
                return Ok(());
            }
            state.integrations = std::mem::take(&mut state.integrations)
                .into_iter()
                .map(|(name, entry)| f(&name, entry).map(|entry| (name, entry)))
                .collect::<Result<_, _>>()?;
            // One rename: a crash leaves either the old file or the new one.
            self.blocking("update", move |inner| {
                let written = inner.write_atomically(&state);
                drop(guard);
                written
            })
            .await
        })
    }

    fn reachable(&self) -> bool {
        true
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }
}

/// A held `flock(2)`: released by the kernel if this process dies, so a crash
/// never leaves the integration locked.
struct FileLock {
    _held: File,
    store: Arc<Inner>,
    integration: String,
}

impl StateLock for FileLock {
    fn load(&mut self) -> StoreFuture<'_, Option<Entry>> {
        let store = FileStore {
            inner: self.store.clone(),
        };
        let integration = self.integration.clone();
        Box::pin(async move { store.load(&integration).await })
    }

    fn save<'a>(&'a mut self, entry: &'a Entry) -> StoreFuture<'a, ()> {
        let store = FileStore {
            inner: self.store.clone(),
        };
        let integration = self.integration.clone();
        let entry = entry.clone();
        // The flock cannot be lost while this process lives, so nobody else can
        // have written the entry since it was read under it.
        store.blocking("save", move |inner| inner.save(&integration, &entry))
    }
}

// === impl Inner ===

impl Inner {
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

    fn lock_file(&self, suffix: &str) -> Result<File, StateError> {
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
        file.lock().map_err(lock_err)?;
        Ok(file)
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
    use time::OffsetDateTime;

    use super::*;
    use crate::secret::Secret;

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

    /// Saves `rt-NAME` as NAME's chain the way a refresh does: under its lock.
    async fn save_under_lock(store: &FileStore, name: &str) {
        let mut held = store.lock(name).await.unwrap();
        held.save(&entry(&format!("rt-{name}"))).await.unwrap();
    }

    /// A store at `relative` in a new temp dir, holding saved chains for `a` and `b`.
    async fn store_with_a_and_b(relative: &str) -> (tempfile::TempDir, PathBuf, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(relative);
        let store = FileStore::open(&path).unwrap();
        save_under_lock(&store, "a").await;
        save_under_lock(&store, "b").await;
        (dir, path, store)
    }

    async fn stored_refresh_token(store: &FileStore, name: &str) -> String {
        let entry = store.load(name).await.unwrap().unwrap();
        entry.refresh_token.unwrap().expose().to_owned()
    }

    #[tokio::test]
    async fn save_keeps_other_integrations_and_is_private() {
        let (_dir, path, store) = store_with_a_and_b("state/tokens.json").await;
        assert_eq!(stored_refresh_token(&store, "a").await, "rt-a");
        assert_eq!(stored_refresh_token(&store, "b").await, "rt-b");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.integration)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[tokio::test]
    async fn update_all_writes_every_entry_or_none() {
        let (_dir, path, store) = store_with_a_and_b("tokens.json").await;
        let before = fs::read(&path).unwrap();
        let failed = store
            .update_all(&mut |name, entry| match name {
                "b" => Err(StateError::Corrupt {
                    path: PathBuf::new(),
                    detail: "test".into(),
                }),
                _ => Ok(entry),
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), before, "nothing written");
        store
            .update_all(&mut |name, mut entry| {
                entry.token_type = Some(name.to_uppercase());
                Ok(entry)
            })
            .await
            .unwrap();
        let entries = store.entries().await.unwrap();
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
}
