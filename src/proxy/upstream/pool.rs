//! Connections kept per upstream (scheme, host, port): one shared h2
//! connection while it has stream capacity, or HTTP/1.1 keep-alive
//! connections lent to one request at a time; at most
//! `upstream.max_connections_per_host` of them.
//!
//! Until the first handshake says which protocol an upstream speaks, requests
//! wait for it instead of each dialling its own connection: with h2, one
//! connection carries them all. A connection leaves the pool as soon as it
//! closes (the upstream said GOAWAY, hung up, or stopped answering pings), as
//! soon as a request failed on it so (an h2 connection that said GOAWAY stays
//! open for the streams it still carries), and after `upstream.idle_timeout`
//! without requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Key;
use super::connection::{self, Connector, Dialed};
use crate::body::ProxyBody;
use crate::proxy::error::ProxyError;

type Hosts = Mutex<HashMap<Key, Arc<Host>>>;

pub struct Pool {
    connector: Connector,
    hosts: Arc<Hosts>,
    idle_timeout: Duration,
    max_per_host: usize,
    /// How long a request may wait for a connection when all are busy.
    wait_timeout: Duration,
}

/// The connections to one upstream.
struct Host {
    key: Key,
    pool: Weak<Hosts>,
    state: Mutex<HostState>,
    /// One per open connection: the bound on connections to this upstream.
    permits: Arc<Semaphore>,
    /// An HTTP/1.1 connection came back, idle.
    returned: Notify,
    /// Held while dialling an upstream that may speak h2: requests queue here
    /// for the handshake instead of dialling connections of their own.
    dialing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct HostState {
    next_id: u64,
    http2: Vec<Http2Conn>,
    /// Most recently used last.
    idle: Vec<IdleConn>,
    /// What the last handshake negotiated; None before the first.
    speaks_h2: Option<bool>,
    /// The last dial that failed, for the requests that waited on it.
    failed: Option<(Instant, ProxyError)>,
}

struct Http2Conn {
    id: u64,
    sender: http2::SendRequest<ProxyBody>,
    in_flight: Arc<AtomicUsize>,
    max_streams: Arc<AtomicUsize>,
    last_used: Instant,
}

struct IdleConn {
    id: u64,
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    closed: CancellationToken,
}

/// A connection lent to one request.
pub struct Lease {
    pub conn: Leased,
    /// Which connection: a resend avoids the one that failed.
    pub id: u64,
    /// Whether the connection was open before this request asked for it: only
    /// then can its closing be the pool's fault rather than the upstream's answer.
    pub reused: bool,
}

pub enum Leased {
    Http1 {
        sender: http1::SendRequest<ProxyBody>,
        /// Where the connection goes back once its response is done.
        home: Home,
    },
    Http2 {
        sender: http2::SendRequest<ProxyBody>,
        /// Counts the stream until the response body is dropped.
        stream: StreamGuard,
    },
}

/// Takes an HTTP/1.1 connection back into its pool.
pub struct Home {
    host: Arc<Host>,
    id: u64,
    /// Cancelled once the connection's task has ended.
    closed: CancellationToken,
}

/// One open stream on a shared h2 connection.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(
        connector: Connector,
        idle_timeout: Duration,
        max_per_host: usize,
        wait_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            hosts: Arc::default(),
            idle_timeout,
            max_per_host,
            wait_timeout,
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// A connection to `key` other than `avoid`: a pooled one when one is free
    /// (never an idle HTTP/1.1 one when `fresh`), else a new one within the
    /// bound, else the first to come free.
    pub async fn checkout(
        &self,
        key: &Key,
        fresh: bool,
        avoid: Option<u64>,
    ) -> Result<Lease, ProxyError> {
        let host = self.host(key);
        let wait = async {
            loop {
                if let Some(lease) = host.take(fresh, avoid, self.idle_timeout) {
                    return Ok(lease);
                }
                if host.speaks_h2() == Some(false) {
                    if fresh {
                        // At the bound, an idle connection makes room for one
                        // of this request's own.
                        host.close_idle_if_full();
                    }
                    match host.free_slot().await {
                        Some(permit) => return Box::pin(self.dial(&host, permit)).await,
                        None => continue,
                    }
                }
                // The upstream may speak h2: one dial at a time, and whoever
                // waited uses what it opened.
                let waited_since = Instant::now();
                let _dialing = host.dialing.lock().await;
                if let Some(lease) = host.take(fresh, avoid, self.idle_timeout) {
                    return Ok(lease);
                }
                if let Some(error) = host.failed_since(waited_since) {
                    return Err(error);
                }
                if host.speaks_h2() == Some(false) {
                    continue;
                }
                let permit = match host.permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    // At the bound: share the least busy h2 connection beyond
                    // its stream limit (h2 queues the stream), or wait.
                    Err(_) => match host.take_busiest_h2(avoid) {
                        Some(lease) => return Ok(lease),
                        None => match host.free_slot().await {
                            Some(permit) => permit,
                            None => continue,
                        },
                    },
                };
                return Box::pin(self.dial(&host, permit)).await;
            }
        };
        tokio::time::timeout(self.wait_timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::Timeout(format!(
                    "{}: all {} connections stayed busy for {:?}",
                    key, self.max_per_host, self.wait_timeout
                )))
            })
    }

    /// Lends connection `id` to `key` no more (it said GOAWAY or closed);
    /// streams in flight on it finish.
    pub fn retire(&self, key: &Key, id: u64) {
        let host = lock(&self.hosts).get(key).cloned();
        if let Some(host) = host {
            let mut state = lock(&host.state);
            state.http2.retain(|conn| conn.id != id);
            state.idle.retain(|idle| idle.id != id);
        }
    }

    fn host(&self, key: &Key) -> Arc<Host> {
        lock(&self.hosts)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Host {
                    key: key.clone(),
                    pool: Arc::downgrade(&self.hosts),
                    state: Mutex::default(),
                    permits: Arc::new(Semaphore::new(self.max_per_host)),
                    returned: Notify::new(),
                    dialing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Opens a connection holding `permit`, registers it, and lends it out.
    /// Callers box this future: it holds a TCP, TLS and HTTP handshake, some
    /// 7 KB that every request's future would otherwise carry (and copy).
    async fn dial(
        &self,
        host: &Arc<Host>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Lease, ProxyError> {
        let Dialed { sender, driver } = match self.connector.dial(&host.key).await {
            Ok(dialed) => dialed,
            Err(error) => {
                let error = super::connect_error(&host.key.to_string(), &error);
                lock(&host.state).failed = Some((Instant::now(), error.clone()));
                return Err(error);
            }
        };
        let mut state = lock(&host.state);
        state.failed = None;
        let id = state.next_id;
        state.next_id += 1;
        let closed = CancellationToken::new();
        let lease = match sender {
            connection::Sender::Http1(sender) => {
                state.speaks_h2 = Some(false);
                Lease {
                    conn: Leased::Http1 {
                        sender,
                        home: Home {
                            host: host.clone(),
                            id,
                            closed: closed.clone(),
                        },
                    },
                    id,
                    reused: false,
                }
            }
            connection::Sender::Http2 {
                sender,
                max_streams,
            } => {
                state.speaks_h2 = Some(true);
                let mut conn = Http2Conn {
                    id,
                    sender,
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    max_streams,
                    last_used: Instant::now(),
                };
                let lease = conn.lend(false);
                state.http2.push(conn);
                lease
            }
        };
        drop(state);
        let (host, idle_timeout, max_per_host) =
            (host.clone(), self.idle_timeout, self.max_per_host);
        tokio::spawn(async move {
            let _slot = permit;
            // Declared before `driver`, so dropped after it (and on abort too).
            let _ended = closed.drop_guard();
            tokio::pin!(driver);
            // Wakes now and then to close the connection once it idled too long.
            let mut tick = tokio::time::interval(idle_timeout / 2);
            loop {
                tokio::select! {
                    () = &mut driver => break,
                    _ = tick.tick() => host.expire(id, idle_timeout),
                }
            }
            host.forget(id, max_per_host);
        });
        Ok(lease)
    }
}

// === impl Host ===

impl Host {
    fn speaks_h2(&self) -> Option<bool> {
        lock(&self.state).speaks_h2
    }

    /// A pooled connection other than `avoid` that can take a request now.
    fn take(
        self: &Arc<Self>,
        fresh: bool,
        avoid: Option<u64>,
        idle_timeout: Duration,
    ) -> Option<Lease> {
        let mut state = lock(&self.state);
        state.http2.retain(|conn| !conn.sender.is_closed());
        let shared = state
            .http2
            .iter_mut()
            .filter(|conn| Some(conn.id) != avoid && conn.has_capacity())
            .min_by_key(|conn| conn.in_flight.load(Ordering::Relaxed));
        if let Some(conn) = shared {
            return Some(conn.lend(true));
        }
        if fresh {
            return None;
        }
        while let Some(idle) = state.idle.pop() {
            if idle.since.elapsed() < idle_timeout && !idle.sender.is_closed() {
                return Some(Lease {
                    conn: Leased::Http1 {
                        sender: idle.sender,
                        home: Home {
                            host: self.clone(),
                            id: idle.id,
                            closed: idle.closed,
                        },
                    },
                    id: idle.id,
                    reused: true,
                });
            }
        }
        None
    }

    fn take_busiest_h2(&self, avoid: Option<u64>) -> Option<Lease> {
        let mut state = lock(&self.state);
        state
            .http2
            .iter_mut()
            .filter(|conn| Some(conn.id) != avoid && !conn.sender.is_closed())
            .min_by_key(|conn| conn.in_flight.load(Ordering::Relaxed))
            .map(|conn| conn.lend(true))
    }

    /// A slot for a new connection, or waits for one; None when an HTTP/1.1
    /// connection came back idle first (the caller then takes it, or, wanting
    /// a connection of its own, closes it to make room).
    async fn free_slot(&self) -> Option<OwnedSemaphorePermit> {
        let returned = self.returned.notified();
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.ok(),
            () = returned => None,
        }
    }

    /// At the bound, closes the least recently used idle HTTP/1.1
    /// connection: its slot comes free once its task has ended.
    fn close_idle_if_full(&self) {
        if self.permits.available_permits() == 0 {
            let mut state = lock(&self.state);
            if !state.idle.is_empty() {
                state.idle.remove(0);
            }
        }
    }

    fn failed_since(&self, since: Instant) -> Option<ProxyError> {
        match &lock(&self.state).failed {
            Some((at, error)) if *at >= since => Some(error.clone()),
            _ => None,
        }
    }

    fn checkin(&self, id: u64, sender: http1::SendRequest<ProxyBody>, closed: CancellationToken) {
        lock(&self.state).idle.push(IdleConn {
            id,
            sender,
            since: Instant::now(),
            closed,
        });
        self.returned.notify_one();
    }

    /// Drops the pool's hold on connection `id` if it has idled too long; the
    /// connection then closes.
    fn expire(&self, id: u64, idle_timeout: Duration) {
        let mut state = lock(&self.state);
        state
            .idle
            .retain(|idle| idle.id != id || idle.since.elapsed() < idle_timeout);
        state.http2.retain(|conn| {
            conn.id != id
                || conn.in_flight.load(Ordering::Relaxed) > 0
                || conn.last_used.elapsed() < idle_timeout
        });
    }

    /// Connection `id` closed. A host with no connection left and nobody
    /// asking for one leaves the pool, so the map does not grow with every
    /// host ever proxied to.
    fn forget(self: &Arc<Self>, id: u64, max_per_host: usize) {
        let empty = {
            let mut state = lock(&self.state);
            state.idle.retain(|idle| idle.id != id);
            state.http2.retain(|conn| conn.id != id);
            state.idle.is_empty() && state.http2.is_empty()
        };
        let Some(hosts) = self.pool.upgrade() else {
            return;
        };
        let mut hosts = lock(&hosts);
        // Held only by the map and this connection's task, whose slot is
        // the only one taken.
        let unused =
            Arc::strong_count(self) == 2 && self.permits.available_permits() + 1 == max_per_host;
        if empty && unused && hosts.get(&self.key).is_some_and(|h| Arc::ptr_eq(h, self)) {
            hosts.remove(&self.key);
        }
    }
}

// === impl Http2Conn ===

impl Http2Conn {
    fn has_capacity(&self) -> bool {
        !self.sender.is_closed()
            && self.in_flight.load(Ordering::Relaxed) < self.max_streams.load(Ordering::Relaxed)
    }

    fn lend(&mut self, reused: bool) -> Lease {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_used = Instant::now();
        Lease {
            conn: Leased::Http2 {
                sender: self.sender.clone(),
                stream: StreamGuard(self.in_flight.clone()),
            },
            id: self.id,
            reused,
        }
    }
}

// === impl Home ===

impl Home {
    /// Sends `request` and waits for the response head; the sender comes back
    /// while the connection lives.
    ///
    /// A request queued in the very moment the connection's task ends can be
    /// left in hyper's queue (a tokio channel) by the task's final drain,
    /// neither sent nor answered until the queue's last sender is dropped
    /// (tokio-rs/tokio#7714). So once the connection has ended, the sender is
    /// dropped: such a request then comes back unsent, to be resent.
    pub async fn send(
        &self,
        mut sender: http1::SendRequest<ProxyBody>,
        request: Request<ProxyBody>,
    ) -> (
        Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>,
        Option<http1::SendRequest<ProxyBody>>,
    ) {
        let sent = sender.try_send_request(request);
        tokio::pin!(sent);
        tokio::select! {
            biased;
            result = &mut sent => return (result, Some(sender)),
            () = self.closed.cancelled() => {}
        }
        drop(sender);
        (sent.await, None)
    }

    /// Returns the connection to the pool once its response is done (the
    /// upstream may still be sending the body); a connection that closes
    /// instead is dropped.
    pub fn release(self, mut sender: http1::SendRequest<ProxyBody>) {
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                self.host.checkin(self.id, sender, self.closed);
            }
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
