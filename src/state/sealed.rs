//! `SealedStore`: any [`StateStore`], with every token sealed before it is
//! stored and opened after it is read, so the file (or the database) holds no
//! token in clear. The inner store persists sealed values as it would tokens;
//! fingerprints and expiry stay readable.
//!
//! Without a key the wrapper still guards the store: a sealed entry is then an
//! error naming the store and the integration, never a "token" to send.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::broadcast;

use super::seal::Sealer;
use super::{
    Change, Entry, StateError, StateLock, StateStore, StoreFuture, StoreInfo, StoreMetrics,
    Summary, UpdateFn,
};
use crate::secret::StateKey;

pub struct SealedStore {
    inner: Arc<dyn StateStore>,
    /// Swapped whole when a reload brings a new key.
    sealer: ArcSwapOption<Sealer>,
}

impl SealedStore {
    /// Wraps `inner`, opening every sealed entry once with `key`: a wrong or
    /// missing key is an error here, before anything is used or written. With
    /// a key, entries still stored in clear are sealed now (see `use_key`).
    pub async fn open(
        inner: Arc<dyn StateStore>,
        key: Option<&StateKey>,
    ) -> Result<Self, StateError> {
        let store = Self {
            inner,
            sealer: ArcSwapOption::empty(),
        };
        store.use_key(key).await?;
        Ok(store)
    }

    /// `inner` read with `key`, sealing nothing it holds in clear: for reading
    /// another store (`credproxy state import`).
    pub fn reader(inner: Arc<dyn StateStore>, key: Option<&StateKey>) -> Self {
        Self {
            inner,
            sealer: ArcSwapOption::new(key.map(|key| Arc::new(Sealer::new(key)))),
        }
    }

    /// The key in use.
    pub fn key(&self) -> Option<StateKey> {
        self.sealer
            .load()
            .as_ref()
            .map(|sealer| sealer.key().clone())
    }

    /// Seals and opens with `key` from now on, once every stored entry opens
    /// with it; otherwise the key in use stays. With a key, entries stored in
    /// clear (written before the key was configured) are sealed in one atomic
    /// write: only the commands that write the store open it this way.
    pub async fn use_key(&self, key: Option<&StateKey>) -> Result<(), StateError> {
        let sealer = key.map(|key| Arc::new(Sealer::new(key)));
        let mut plain = false;
        let location = self.inner.describe().location;
        for (name, entry) in self.inner.entries().await? {
            plain |= !entry.sealed;
            open_entry(&location, sealer.as_deref(), &name, entry)?;
        }
        let sealing = sealer.is_some();
        self.sealer.store(sealer);
        if sealing && plain {
            // Content-preserving, so no refresh lock is needed: the store
            // re-reads under its own write lock (or transaction).
            self.update_all(&mut |_, entry| Ok(entry)).await?;
        }
        Ok(())
    }

    /// Re-seals every entry under `new_key` in one atomic step, holding the
    /// refresh lock of every integration in the store and of `also_lock`, so
    /// no refresh runs across it. Returns the number of entries re-sealed.
    pub async fn rekey(&self, new_key: &StateKey, also_lock: &[&str]) -> Result<usize, StateError> {
        let names: BTreeSet<String> = self
            .inner
            .entries()
            .await?
            .into_keys()
            .chain(also_lock.iter().map(|name| (*name).to_owned()))
            .collect();
        // In name order, so two rekeys cannot each hold a lock the other wants.
        let mut locks = Vec::new();
        for name in &names {
            locks.push(self.inner.lock(name).await?);
        }
        let old = self.sealer.load_full();
        let new = Arc::new(Sealer::new(new_key));
        let location = self.inner.describe().location;
        let mut count = 0;
        self.inner
            .update_all(&mut |name, entry| {
                count += 1;
                let plain = open_entry(&location, old.as_deref(), name, entry)?;
                stored_form(&location, Some(&new), name, plain)
            })
            .await?;
        self.sealer.store(Some(new));
        drop(locks);
        Ok(count)
    }
}

impl StateStore for SealedStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            sealed: self.sealer.load().is_some(),
            ..self.inner.describe()
        }
    }

    fn load<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            let sealer = self.sealer.load_full();
            let location = self.inner.describe().location;
            self.inner
                .load(integration)
                .await?
                .map(|entry| open_entry(&location, sealer.as_deref(), integration, entry))
                .transpose()
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<Summary>> {
        self.inner.list()
    }

    fn lock<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Box<dyn StateLock>> {
        Box::pin(async move {
            let inner = self.inner.lock(integration).await?;
            Ok(Box::new(SealedLock {
                inner,
                sealer: self.sealer.load_full(),
                location: self.inner.describe().location,
                integration: integration.to_owned(),
            }) as Box<dyn StateLock>)
        })
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.inner.changes()
    }

    fn entries(&self) -> StoreFuture<'_, BTreeMap<String, Entry>> {
        Box::pin(async move {
            let sealer = self.sealer.load_full();
            let location = self.inner.describe().location;
            self.inner
                .entries()
                .await?
                .into_iter()
                .map(|(name, entry)| {
                    let entry = open_entry(&location, sealer.as_deref(), &name, entry)?;
                    Ok((name, entry))
                })
                .collect()
        })
    }

    fn update_all<'a>(&'a self, f: &'a mut UpdateFn<'_>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let sealer = self.sealer.load_full();
            let location = self.inner.describe().location;
            self.inner
                .update_all(&mut |name, entry| {
                    let plain = open_entry(&location, sealer.as_deref(), name, entry)?;
                    let updated = f(name, plain)?;
                    stored_form(&location, sealer.as_deref(), name, updated)
                })
                .await
        })
    }

    fn reachable(&self) -> bool {
        self.inner.reachable()
    }

    fn metrics(&self) -> &StoreMetrics {
        self.inner.metrics()
    }
}

/// An integration's lock on the inner store, opening what it reads and
/// sealing what it writes with the key in use when it was taken.
struct SealedLock {
    inner: Box<dyn StateLock>,
    sealer: Option<Arc<Sealer>>,
    location: String,
    integration: String,
}

impl StateLock for SealedLock {
    fn load(&mut self) -> StoreFuture<'_, Option<Entry>> {
        Box::pin(async move {
            self.inner
                .load()
                .await?
                .map(|entry| {
                    open_entry(
                        &self.location,
                        self.sealer.as_deref(),
                        &self.integration,
                        entry,
                    )
                })
                .transpose()
        })
    }

    fn save<'a>(&'a mut self, entry: &'a Entry) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let stored = stored_form(
                &self.location,
                self.sealer.as_deref(),
                &self.integration,
                entry.clone(),
            )?;
            self.inner.save(&stored).await
        })
    }
}

fn open_entry(
    location: &str,
    sealer: Option<&Sealer>,
    integration: &str,
    entry: Entry,
) -> Result<Entry, StateError> {
    let key_error = |reason: String| StateError::Key {
        store: location.to_owned(),
        integration: integration.to_owned(),
        reason,
    };
    match (entry.sealed, sealer) {
        (false, _) => Ok(entry),
        (true, None) => Err(key_error(
            "its tokens are sealed, and no [state] key is set".into(),
        )),
        (true, Some(sealer)) => sealer.open_entry(integration, entry).map_err(|(field, _)| {
            key_error(format!(
                "its {field} does not open with the configured key (another key, or the entry was altered or moved from another integration); nothing was changed"
            ))
        }),
    }
}

/// As stored: sealed under `sealer`, or in clear without a key.
fn stored_form(
    location: &str,
    sealer: Option<&Sealer>,
    integration: &str,
    entry: Entry,
) -> Result<Entry, StateError> {
    let Some(sealer) = sealer else {
        return Ok(entry);
    };
    sealer
        .seal_entry(integration, entry)
        .map_err(|source| StateError::Seal {
            store: location.to_owned(),
            integration: integration.to_owned(),
            source,
        })
}
