//! `credproxy run`: the token refreshers, the proxy listener and the admin
//! listener, started together and stopped gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin;
use crate::ca::{self, mint::LeafCache};
use crate::commands;
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::proxy::{Proxy, upstream::Upstream};
use crate::server::{self, ShutdownTrigger};
use crate::tokens::Tokens;

/// How long a stop waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A started credproxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tokens: Arc<Tokens>,
    trigger: ShutdownTrigger,
    refreshers: JoinSet<()>,
}

/// Checks, loads and binds everything, then starts serving. Returns once the
/// listeners accept connections.
pub async fn start(config: &Config) -> Result<Running, Error> {
    if !config.proxy.listen.ip().is_loopback() && config.proxy.auth.is_none() {
        return Err(ConfigError::Invalid {
            path: config.source.clone(),
            key: "proxy.auth".into(),
            message: format!(
                "required because proxy.listen ({}) is not a loopback address: anyone who can reach the port could spend the tokens",
                config.proxy.listen
            ),
        }
        .into());
    }
    let tokens = Arc::new(commands::open_tokens(config)?);
    let (ca, created) = ca::load_or_create(&config.ca)?;
    if created {
        tracing::info!(cert = %ca.cert_path.display(), "created the local CA; clients must trust it");
    }
    let leaves = LeafCache::new(ca).map_err(|e| Error::Failed(crate::error::chain(&e)))?;
    let upstream = Upstream::new(&config.upstream)?;
    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let proxy_addr = local_addr(&proxy_listener)?;
    let admin_addr = local_addr(&admin_listener)?;

    let (trigger, shutdown) = server::shutdown();
    let proxy = Arc::new(Proxy::new(
        config,
        &tokens,
        upstream,
        leaves,
        shutdown.clone(),
    ));
    let refreshers = tokens.spawn_refreshers();
    tokio::spawn(server::accept_loop(
        proxy_listener,
        shutdown.clone(),
        move |stream, peer| proxy.clone().serve_connection(stream, peer),
    ));
    let admin_tokens = tokens.clone();
    let admin_shutdown = shutdown.clone();
    tokio::spawn(server::accept_loop(
        admin_listener,
        shutdown,
        move |stream, peer| {
            admin::serve_connection(admin_tokens.clone(), admin_shutdown.clone(), stream, peer)
        },
    ));
    tracing::info!(%proxy_addr, %admin_addr, "credproxy listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        tokens,
        trigger,
        refreshers,
    })
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded), and waits for
    /// refreshes in flight so none is cut between the provider's answer and
    /// the state write.
    pub async fn stop(mut self) {
        if !self.trigger.shutdown(SHUTDOWN_GRACE).await {
            tracing::warn!("some connections were still busy at the shutdown deadline");
        }
        self.refreshers.abort_all();
        self.tokens.quiesce(SHUTDOWN_GRACE).await;
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
