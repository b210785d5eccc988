//! `credproxy run`: the token refreshers, the proxy, the sidecars and the
//! admin listener, started together, reloaded live, stopped gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;

use crate::admin;
use crate::ca::{self, mint::LeafCache};
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::live::{Overrides, State};
use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use crate::proxy::dial::{Resolve, SystemResolver};
use crate::proxy::{Proxy, sidecar};
use crate::server::{self, Admission, ShutdownTrigger};
use crate::state::{self, StateStore};
use crate::tokens::Tokens;

/// How long a stop waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The admin listener serves operators and probes, not traffic.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A started credproxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    /// None when no admin listener runs (`exec` without an `[admin]` table).
    pub admin_addr: Option<SocketAddr>,
    pub sidecar_addrs: Vec<SocketAddr>,
    pub state: Arc<State>,
    trigger: ShutdownTrigger,
}

/// Checks, loads and binds everything, then starts serving. Returns once the
/// listeners accept connections.
pub async fn start(config: &Config) -> Result<Running, Error> {
    start_with(config, Overrides::default(), Arc::new(SystemResolver)).await
}

/// `start`, with `overrides` applied to `config` (and to every reload of it),
/// and names upstream resolved by `resolver` (tests choose DNS answers).
pub async fn start_with(
    config: &Config,
    overrides: Overrides,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, Error> {
    let mut config = config.clone();
    overrides.apply(&mut config);
    let config = &config;
    refuse_open_listeners(config, !overrides.no_admin)?;
    let store = state::open(&config.state, &config.upstream).await?;
    let tokens = Tokens::new(config, store.clone(), OAuthClient::new(&config.upstream)?).await?;
    let tokens = Arc::new(ArcSwap::from_pointee(tokens));
    let metrics = Arc::new(Metrics::new(tokens.clone(), store.metrics()));
    let (ca, created) = ca::load_or_create(&config.ca)?;
    if created {
        tracing::info!(cert = %ca.cert_path.display(), "created the local CA; clients must trust it");
    }
    let leaves = LeafCache::new(ca, metrics.cert_cache.clone())
        .map_err(|e| Error::Failed(crate::report::chain(&e)))?;

    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = if overrides.no_admin {
        None
    } else {
        Some(bind("admin.listen", config.admin.listen).await?)
    };
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
        resolver,
    )?);
    let state = Arc::new(State::new(
        tokens,
        proxy.clone(),
        metrics.clone(),
        store,
        config.clone(),
        overrides,
    ));

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
            move |stream, peer, slot| {
                sidecar::serve_connection(proxy.clone(), upstream.clone(), stream, peer, slot)
            },
        ));
    }
    let admin_addr = match admin_listener {
        Some(listener) => {
            let admin_addr = local_addr(&listener)?;
            let mut listeners = vec![
                ("proxy".to_owned(), proxy_addr),
                ("admin".to_owned(), admin_addr),
            ];
            for (addr, sidecar) in sidecar_addrs.iter().zip(&config.sidecars) {
                // The origin only: a URL may carry credentials.
                let upstream = sidecar.upstream.origin().ascii_serialization();
                listeners.push((format!("sidecar → {upstream}"), *addr));
            }
            let admin = Arc::new(admin::Admin::new(
                state.clone(),
                config,
                shutdown.clone(),
                listeners,
            ));
            let admission =
                Admission::new(ADMIN_MAX_CONNECTIONS, Gauge::default(), Counter::default());
            tokio::spawn(server::accept_loop(
                listener,
                shutdown,
                admission,
                move |stream, peer, _slot| admin.clone().serve_connection(stream, peer),
            ));
            Some(admin_addr)
        }
        None => None,
    };
    tracing::info!(
        %proxy_addr,
        admin_addr = admin_addr.map(tracing::field::display),
        sidecars = ?sidecar_addrs,
        "credproxy listening"
    );
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
fn refuse_open_listeners(config: &Config, admin_runs: bool) -> Result<(), Error> {
    let open = |key: &str, addr: SocketAddr, what: &str| ConfigError::Invalid {
        path: config.source.clone(),
        key: key.into(),
        message: format!(
            "required because {what} ({addr}) is not a loopback address: anyone who can reach the port could use the tokens"
        ),
    };
    if !config.proxy.listen.ip().is_loopback() && config.proxy.clients.is_empty() {
        let key = "proxy.auth (or [[proxy.clients]])";
        return Err(open(key, config.proxy.listen, "proxy.listen").into());
    }
    if admin_runs && !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
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
        self.state.stop_refreshers();
        self.state.tokens().quiesce(SHUTDOWN_GRACE).await;
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.state.tokens()
    }
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
