//! Opening TCP connections upstream: an `upstream.resolve` pin, else the
//! resolver; for unrouted traffic, the egress policy judges every resolved
//! address first, and the connection goes only to addresses it passed — one
//! lookup, so a DNS answer that changes between check and connect (rebinding)
//! cannot slip past.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::egress::{self, Policy, Refusal};
use crate::routes;

pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Name resolution, behind a seam so tests can answer with chosen addresses.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The system resolver (getaddrinfo).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

#[derive(Clone)]
pub struct Dialer {
    /// `host:port` (host lower-cased) → address, like curl's `--resolve`.
    pins: Arc<HashMap<String, SocketAddr>>,
    resolver: Arc<dyn Resolve>,
    connect_timeout: Duration,
    /// Set for unrouted traffic only: routed hosts and pins are the operator's
    /// own choices.
    egress: Option<Arc<Policy>>,
}

impl Dialer {
    pub fn new(
        config: &UpstreamConfig,
        resolver: Arc<dyn Resolve>,
        egress: Option<Arc<Policy>>,
    ) -> Self {
        Self {
            pins: Arc::new(config.resolve.clone()),
            resolver,
            connect_timeout: config.connect_timeout,
            egress,
        }
    }

    /// Connects to `host:port`. A refusal by the egress policy is an
    /// `io::Error` carrying the [`Refusal`] (see [`refusal`]).
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = match self
            .pins
            .get(&format!("{}:{port}", routes::normalize(host)))
        {
            // A pin is the operator's choice of address (not subject to
            // `block`), but its name is still a destination `allow` judges.
            Some(addr) => {
                if let Some(policy) = &self.egress {
                    policy.check_allow(host, &[addr.ip()]).map_err(refused)?;
                }
                vec![*addr]
            }
            None => self.resolve(host, port).await?,
        };
        let mut last_error =
            io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(Err(error)) => last_error = error,
                Err(_) => {
                    last_error = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {addr} timed out"),
                    )
                }
            }
        }
        Err(last_error)
    }

    /// The addresses to try: for an IP literal (in any spelling) the address
    /// itself, else the resolver's answer; all of them judged by the policy.
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let literal = egress::ip_literal(host);
        if let (Some(policy), None) = (&self.egress, literal) {
            policy.may_resolve(host).map_err(refused)?;
        }
        let addrs = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => self.resolver.lookup(host, port).await?,
        };
        if let Some(policy) = &self.egress {
            let ips: Vec<_> = addrs.iter().map(SocketAddr::ip).collect();
            policy.check(host, &ips).map_err(refused)?;
            policy
                .check_this_host(host, &ips, is_local)
                .map_err(refused)?;
        }
        Ok(addrs)
    }
}

/// Whether `ip` is one of this host's own addresses: only those can be bound
/// (anything else is EADDRNOTAVAIL). No packet is sent.
fn is_local(ip: IpAddr) -> bool {
    !ip.is_unspecified() && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn refused(refusal: Refusal) -> io::Error {
    if let Refusal::Blocked { host, class, addr } = &refusal {
        tracing::info!(%host, %addr, %class, "refused an unrouted destination (proxy.block)");
    }
    io::Error::new(io::ErrorKind::PermissionDenied, refusal)
}

/// The policy's refusal inside a connect error, if that is what it was.
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        let inner = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        cause = inner.or_else(|| error.source());
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::egress::AddressClass;

    /// Answers from a table and records every question.
    #[derive(Default)]
    struct Table {
        answers: HashMap<&'static str, Vec<IpAddr>>,
        asked: Mutex<Vec<String>>,
    }

    impl Resolve for Table {
        fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
            self.asked.lock().unwrap().push(host.to_owned());
            let addrs = self.answers.get(host).cloned().unwrap_or_default();
            Box::pin(async move {
                Ok(addrs
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            })
        }
    }

    /// A dialer for `table`, with `pinned.test:443` pinned to `pin`.
    fn dialer(table: Arc<Table>, policy: Option<Policy>, pin: SocketAddr) -> Dialer {
        let config = UpstreamConfig {
            extra_ca: None,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            resolve: HashMap::from([("pinned.test:443".to_owned(), pin)]),
            idle_timeout: Duration::from_secs(2),
            max_connections_per_host: 1,
        };
        Dialer::new(&config, table, policy.map(Arc::new))
    }

    /// Whether `listener`'s next connection is `marker`, connected just now:
    /// a connection made before it would be accepted first.
    async fn next_is(listener: &tokio::net::TcpListener, marker: &TcpStream) -> bool {
        let (_, peer) = listener.accept().await.unwrap();
        peer == marker.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_public_and_a_private_answer_is_refused_without_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers = |ips: Vec<IpAddr>| {
            Arc::new(Table {
                answers: HashMap::from([("rebind.test", ips)]),
                ..Table::default()
            })
        };
        let policy = || Some(Policy::new(Vec::new(), vec![AddressClass::Private]));
        let table = answers(vec![addr.ip(), "10.0.0.5".parse().unwrap()]);
        let error = dialer(table.clone(), policy(), addr)
            .connect("rebind.test", addr.port())
            .await
            .unwrap_err();
        assert!(
            matches!(
                refusal(&error),
                Some(Refusal::Blocked {
                    class: AddressClass::Private,
                    ..
                })
            ),
            "{error}"
        );
        let marker = TcpStream::connect(addr).await.unwrap();
        assert!(
            next_is(&listener, &marker).await,
            "the allowed first address was connected to"
        );
        assert_eq!(*table.asked.lock().unwrap(), ["rebind.test"]);

        // Without the private answer, the one lookup's address is connected to.
        let table = answers(vec![addr.ip()]);
        let stream = dialer(table.clone(), policy(), addr)
            .connect("rebind.test", addr.port())
            .await
            .unwrap();
        assert!(next_is(&listener, &stream).await);
        assert_eq!(*table.asked.lock().unwrap(), ["rebind.test"]);
    }

    #[tokio::test]
    async fn literals_are_not_resolved_and_pins_are_exempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = Arc::new(Table::default());
        let dialer = dialer(table.clone(), Some(Policy::default()), addr);
        let error = dialer.connect("2130706433", addr.port()).await.unwrap_err();
        assert!(
            matches!(
                refusal(&error),
                Some(Refusal::BlockedLiteral {
                    class: AddressClass::Loopback,
                    ..
                })
            ),
            "{error}"
        );
        // The pin points at loopback, which the policy blocks: pins are exempt.
        let pinned = dialer.connect("pinned.test", 443).await.unwrap();
        assert!(
            next_is(&listener, &pinned).await,
            "the refused literal was connected to"
        );
        assert!(table.asked.lock().unwrap().is_empty());
    }
}
