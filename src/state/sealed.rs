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

use super::seal::Sealer;
use super::{Entry, StateError, StateLock, StateStore, StoreInfo};
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
    pub fn open(inner: Arc<dyn StateStore>, key: Option<&StateKey>) -> Result<Self, StateError> {
        let store = Self {
            inner,
            sealer: ArcSwapOption::empty(),
        };
        store.use_key(key)?;
        Ok(store)
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
    pub fn use_key(&self, key: Option<&StateKey>) -> Result<(), StateError> {
        let sealer = key.map(|key| Arc::new(Sealer::new(key)));
        let mut plain = false;
        for (name, entry) in self.inner.entries()? {
            plain |= !entry.sealed;
            self.open_entry(sealer.as_deref(), &name, entry)?;
        }
        let sealing = sealer.is_some();
        self.sealer.store(sealer);
        if sealing && plain {
            // Content-preserving, so no refresh lock is needed: the file is
            // re-read under the store's write lock.
            self.update_all(&mut |_, entry| Ok(entry))?;
        }
        Ok(())
    }

    /// Re-seals every entry under `new_key` in one atomic step, holding the
    /// refresh lock of every integration in the store and of `also_lock`, so
    /// no refresh runs across it. Returns the number of entries re-sealed.
    pub fn rekey(&self, new_key: &StateKey, also_lock: &[&str]) -> Result<usize, StateError> {
        let names: BTreeSet<String> = self
            .inner
            .entries()?
            .into_keys()
            .chain(also_lock.iter().map(|name| (*name).to_owned()))
            .collect();
        // In name order, so two rekeys cannot each hold a lock the other wants.
        let _locks = names
            .iter()
            .map(|name| self.inner.lock(name))
            .collect::<Result<Vec<StateLock>, _>>()?;
        let old = self.sealer.load_full();
        let new = Arc::new(Sealer::new(new_key));
        let mut count = 0;
        self.inner.update_all(&mut |name, entry| {
            count += 1;
            let plain = self.open_entry(old.as_deref(), name, entry)?;
            self.stored_form(Some(&new), name, plain)
        })?;
        self.sealer.store(Some(new));
        Ok(count)
    }

    fn open_entry(
        &self,
        sealer: Option<&Sealer>,
        integration: &str,
        entry: Entry,
    ) -> Result<Entry, StateError> {
        let key_error = |reason: String| StateError::Key {
            store: self.inner.describe().location,
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
        &self,
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
                store: self.inner.describe().location,
                integration: integration.to_owned(),
                source,
            })
    }
}

impl StateStore for SealedStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            sealed: self.sealer.load().is_some(),
            ..self.inner.describe()
        }
    }

    fn load(&self, integration: &str) -> Result<Option<Entry>, StateError> {
        let sealer = self.sealer.load();
        self.inner
            .load(integration)?
            .map(|entry| self.open_entry(sealer.as_deref(), integration, entry))
            .transpose()
    }

    fn lock(&self, integration: &str) -> Result<StateLock, StateError> {
        self.inner.lock(integration)
    }

    fn save(&self, integration: &str, entry: &Entry) -> Result<(), StateError> {
        let stored = self.stored_form(self.sealer.load().as_deref(), integration, entry.clone())?;
        self.inner.save(integration, &stored)
    }

    fn entries(&self) -> Result<BTreeMap<String, Entry>, StateError> {
        let sealer = self.sealer.load();
        self.inner
            .entries()?
            .into_iter()
            .map(|(name, entry)| {
                let entry = self.open_entry(sealer.as_deref(), &name, entry)?;
                Ok((name, entry))
            })
            .collect()
    }

    fn update_all(
        &self,
        f: &mut dyn FnMut(&str, Entry) -> Result<Entry, StateError>,
    ) -> Result<(), StateError> {
        let sealer = self.sealer.load_full();
        self.inner.update_all(&mut |name, entry| {
            let plain = self.open_entry(sealer.as_deref(), name, entry)?;
            let updated = f(name, plain)?;
            self.stored_form(sealer.as_deref(), name, updated)
        })
    }
}
