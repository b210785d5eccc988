//! The running process as the admin API and a reload see it: the current
//! tokens, the proxy, the metrics, and the config it started with. Below
//! `admin` and `app`, so the admin API works on it without reaching up into
//! the code that starts everything.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::config::{self, Config, ProxyClient};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use crate::proxy::Proxy;
use crate::state::{SealedStore, StateStore};
use crate::tokens::{Refreshers, Tokens};

/// What the admin API and a reload work on.
pub struct State {
    tokens: Arc<ArcSwap<Tokens>>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    store: Arc<SealedStore>,
    refreshers: Mutex<Refreshers>,
    /// The config as started: its file is re-read on reload, and its listeners
    /// and files stay in effect until a restart.
    started: Config,
    /// Applied to every config this process loads, the reloaded ones too.
    overrides: Overrides,
    /// One reload at a time (SIGHUP and the admin API may race).
    reloading: tokio::sync::Mutex<()>,
}

/// What `exec` changes in the config it runs: the proxy listens on a port of
/// its own and accepts only the one-time credentials handed to the child, and
/// the admin listener runs only when the config file has an `[admin]` table.
#[derive(Clone, Default)]
pub struct Overrides {
    /// The proxy's listener and its one client.
    pub proxy: Option<(SocketAddr, ProxyClient)>,
    /// No admin listener.
    pub no_admin: bool,
}

// === impl Overrides ===

impl Overrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some((listen, client)) = &self.proxy {
            config.proxy.listen = *listen;
            config.proxy.clients = vec![client.clone()];
        }
    }
}

// === impl State ===

impl State {
    /// Starts the refreshers of `tokens`.
    pub fn new(
        tokens: Arc<ArcSwap<Tokens>>,
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        store: Arc<SealedStore>,
        started: Config,
        overrides: Overrides,
    ) -> Self {
        let refreshers = Mutex::new(tokens.load().spawn_refreshers());
        Self {
            tokens,
            proxy,
            metrics,
            store,
            refreshers,
            started,
            overrides,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The routes in effect (name, integration).
    pub fn routes(&self) -> Vec<(Arc<str>, Option<String>)> {
        self.proxy.routes()
    }

    pub fn store(&self) -> &dyn StateStore {
        &*self.store
    }

    /// Re-reads the config file and swaps in its routes, integrations and
    /// settings. Integrations whose settings did not change keep their tokens.
    /// An invalid file changes nothing. Returns the changes that need a restart.
    pub async fn reload(&self) -> Result<Vec<String>, Error> {
        let _one_at_a_time = self.reloading.lock().await;
        let mut new = config::load(&self.started.source)?;
        self.overrides.apply(&mut new);
        // A new key (the fleet step after `credproxy state rekey`) is taken
        // only if every entry opens with it.
        if new.state.key != self.store.key() {
            self.store.use_key(new.state.key.as_ref()).await?;
        }
        let tokens = self
            .tokens
            .load()
            .reloaded(&new, self.store.clone(), OAuthClient::new(&new.upstream)?)
            .await?;
        self.proxy.reload(&new, &tokens)?;
        self.tokens.store(Arc::new(tokens));
        lock(&self.refreshers).sync(&self.tokens.load());
        Ok(needs_restart(&self.started, &new))
    }

    /// Stops the background refreshers (a refresh already running finishes).
    pub fn stop_refreshers(&self) {
        *lock(&self.refreshers) = Refreshers::default();
    }

    /// `reload`, with its outcome logged: for SIGHUP, which has no one to answer.
    pub async fn reload_logged(&self) {
        match self.reload().await {
            Ok(restart) if restart.is_empty() => tracing::info!("config reloaded"),
            Ok(restart) => {
                tracing::warn!(needs_restart = ?restart, "config reloaded; some changes need a restart")
            }
            Err(error) => {
                tracing::error!(error = %crate::report::chain(&error), "config reload failed; the old config keeps serving")
            }
        }
    }
}

/// Settings a running process cannot change: listeners, files, limits.
fn needs_restart(started: &Config, new: &Config) -> Vec<String> {
    let listens = |c: &Config| {
        c.sidecars
            .iter()
            .map(|s| (s.listen, s.upstream.clone()))
            .collect::<Vec<_>>()
    };
    [
        ("proxy.listen", started.proxy.listen != new.proxy.listen),
        (
            "admin",
            started.admin.listen != new.admin.listen || started.admin.token != new.admin.token,
        ),
        (
            "ca",
            started.ca.cert != new.ca.cert || started.ca.key != new.ca.key,
        ),
        ("state", started.state.store != new.state.store),
        ("sidecars", listens(started) != listens(new)),
        ("limits", started.limits != new.limits),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
