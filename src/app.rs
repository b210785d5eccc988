//! `credproxy run`: the token refreshers, the proxy, the sidecars and the
//! admin listener, started together, reloaded live, stopped gracefully.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;

use crate::admin;
use crate::ca::{self, mint::LeafCache};
use crate::config::{self, Config, ConfigError};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use crate::proxy::{Proxy, sidecar};
use crate::server::{self, Admission, ShutdownTrigger};
use crate::state::{FileStore, StateStore};
use crate::tokens::{Refreshers, Tokens};

/// How long a stop waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The admin listener serves operators and probes, not traffic.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A started credproxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sidecar_addrs: Vec<SocketAddr>,
    pub state: Arc<State>,
    trigger: ShutdownTrigger,
}

/// What the admin API and a reload work on.
pub struct State {
    tokens: Arc<ArcSwap<Tokens>>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    store: Arc<dyn StateStore>,
    refreshers: Mutex<Refreshers>,
    /// The config as started: its file is re-read on reload, and its listeners
    /// and files stay in effect until a restart.
    started: Config,
    /// One reload at a time (SIGHUP and the admin API may race).
    reloading: Mutex<()>,
}

/// Checks, loads and binds everything, then starts serving. Returns once the
/// listeners accept connections.
pub async fn start(config: &Config) -> Result<Running, Error> {
    refuse_open_listeners(config)?;
    let store: Arc<dyn StateStore> = Arc::new(FileStore::open(&config.state.path)?);
    let tokens = Tokens::new(config, store.clone(), OAuthClient::new(&config.upstream)?)?;
    let tokens = Arc::new(ArcSwap::from_pointee(tokens));
    let metrics = Arc::new(Metrics::new(tokens.clone()));
    let (ca, created) = ca::load_or_create(&config.ca)?;
    if created {
        tracing::info!(cert = %ca.cert_path.display(), "created the local CA; clients must trust it");
    }
    let leaves = LeafCache::new(ca, metrics.cert_cache.clone())
        .map_err(|e| Error::Failed(crate::error::chain(&e)))?;

    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let mut sidecar_listeners = Vec::new();
    for (index, sidecar) in config.sidecars.iter().enumerate() {
        sidecar_listeners.push(bind(&format!("sidecars[{index}].listen"), sidecar.listen).await?);
    }

    let (trigger, shutdown) = server::shutdown();
    let proxy = Arc::new(Proxy::new(
        config,
        &tokens.load(),
        leaves,
        metrics.clone(),
        shutdown.clone(),
    )?);
    let refreshers = Mutex::new(tokens.load().spawn_refreshers());
    let state = Arc::new(State {
        tokens,
        proxy: proxy.clone(),
        metrics: metrics.clone(),
        store,
        refreshers,
        started: config.clone(),
        reloading: Mutex::new(()),
    });

    // Proxy and sidecars share one connection budget.
    let traffic = Admission::new(
        config.limits.max_connections,
        metrics.client_connections.clone(),
        metrics.refused_connections.clone(),
    );
    let proxy_addr = local_addr(&proxy_listener)?;
    let for_proxy = proxy.clone();
    tokio::spawn(server::accept_loop(
        proxy_listener,
        shutdown.clone(),
        traffic.clone(),
        move |stream, peer, slot| for_proxy.clone().serve_connection(stream, peer, slot),
    ));
    let mut sidecar_addrs = Vec::new();
    for (listener, sidecar) in sidecar_listeners.into_iter().zip(&config.sidecars) {
        sidecar_addrs.push(local_addr(&listener)?);
        let upstream = Arc::new(sidecar::Upstream::new(sidecar));
        let proxy = proxy.clone();
        tokio::spawn(server::accept_loop(
            listener,
            shutdown.clone(),
            traffic.clone(),
            move |stream, peer, _slot| {
                sidecar::serve_connection(proxy.clone(), upstream.clone(), stream, peer)
            },
        ));
    }
    let admin_addr = local_addr(&admin_listener)?;
    let admin = Arc::new(admin::Admin::new(state.clone(), config, shutdown.clone()));
    let admission = Admission::new(ADMIN_MAX_CONNECTIONS, Gauge::default(), Counter::default());
    tokio::spawn(server::accept_loop(
        admin_listener,
        shutdown,
        admission,
        move |stream, peer, _slot| admin.clone().serve_connection(stream, peer),
    ));
    tracing::info!(%proxy_addr, %admin_addr, sidecars = ?sidecar_addrs, "credproxy listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        sidecar_addrs,
        state,
        trigger,
    })
}

/// Anyone who can reach an open port could spend the tokens (proxy) or read
/// and steer them (admin): off loopback, each needs credentials.
fn refuse_open_listeners(config: &Config) -> Result<(), Error> {
    let open = |key: &str, addr: SocketAddr, what: &str| ConfigError::Invalid {
        path: config.source.clone(),
        key: key.into(),
        message: format!(
            "required because {what} ({addr}) is not a loopback address: anyone who can reach the port could use the tokens"
        ),
    };
    if !config.proxy.listen.ip().is_loopback() && config.proxy.auth.is_none() {
        return Err(open("proxy.auth", config.proxy.listen, "proxy.listen").into());
    }
    if !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
        return Err(open("admin.token", config.admin.listen, "admin.listen").into());
    }
    Ok(())
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded), and waits for
    /// refreshes in flight so none is cut between the provider's answer and
    /// the state write.
    pub async fn stop(self) {
        if !self.trigger.shutdown(SHUTDOWN_GRACE).await {
            tracing::warn!("some connections were still busy at the shutdown deadline");
        }
        *lock(&self.state.refreshers) = Refreshers::default();
        self.state.tokens().quiesce(SHUTDOWN_GRACE).await;
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.state.tokens()
    }
}

// === impl State ===

impl State {
    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Re-reads the config file and swaps in its routes, integrations and
    /// settings. Integrations whose settings did not change keep their tokens.
    /// An invalid file changes nothing. Returns the changes that need a restart.
    pub fn reload(&self) -> Result<Vec<String>, Error> {
        let _one_at_a_time = lock(&self.reloading);
        let new = config::load(&self.started.source)?;
        let tokens = self.tokens.load().reloaded(
            &new,
            self.store.clone(),
            OAuthClient::new(&new.upstream)?,
        )?;
        self.proxy.reload(&new, &tokens)?;
        self.tokens.store(Arc::new(tokens));
        lock(&self.refreshers).sync(&self.tokens.load());
        Ok(needs_restart(&self.started, &new))
    }

    /// `reload`, with its outcome logged: for SIGHUP, which has no one to answer.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(restart) if restart.is_empty() => tracing::info!("config reloaded"),
            Ok(restart) => {
                tracing::warn!(needs_restart = ?restart, "config reloaded; some changes need a restart")
            }
            Err(error) => {
                tracing::error!(error = %crate::error::chain(&error), "config reload failed; the old config keeps serving")
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
        ("state.path", started.state.path != new.state.path),
        ("sidecars", listens(started) != listens(new)),
        ("limits", started.limits != new.limits),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Failed(format!("{key}: cannot listen on {addr}: {e}")))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(|e| Error::Failed(format!("cannot read the listening address: {e}")))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
