//! Accept loops and graceful shutdown shared by the proxy and admin listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::metrics::GaugeGuard;

/// The stop signal and the tasks that must finish before the process exits.
#[derive(Clone)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
    tracker: TaskTracker,
}

/// Triggers a `Shutdown`.
pub struct ShutdownTrigger {
    signal: watch::Sender<bool>,
    tracker: TaskTracker,
}

pub fn shutdown() -> (ShutdownTrigger, Shutdown) {
    let (signal, receiver) = watch::channel(false);
    let tracker = TaskTracker::new();
    (
        ShutdownTrigger {
            signal,
            tracker: tracker.clone(),
        },
        Shutdown {
            signal: receiver,
            tracker,
        },
    )
}

impl Shutdown {
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.signal.clone()
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }
}

impl ShutdownTrigger {
    /// Stops the accept loops, asks connections to finish their in-flight
    /// requests, and waits for them up to `deadline`. Returns false if some
    /// were still running at the deadline.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        self.signal.send_replace(true);
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// At most `max` connections at once; the rest are refused, not queued.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    open: Gauge,
    refused: Counter,
}

/// One admitted connection's place, shared with whatever outlives the HTTP
/// connection (a CONNECT tunnel); the place is free once every clone is dropped.
pub type Slot = Arc<Admitted>;

pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    _open: GaugeGuard,
}

impl Admission {
    pub fn new(max: usize, open: Gauge, refused: Counter) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            open,
            refused,
        }
    }

    fn admit(&self) -> Option<Admitted> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Admitted {
            _permit: permit,
            _open: GaugeGuard::new(self.open.clone()),
        })
    }
}

/// Accepts connections until shutdown, each handled on its own task while
/// `admission` has room for it.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shutdown: Shutdown,
    admission: Admission,
    on_connection: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = shutdown.signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match admission.admit() {
                    Some(admitted) => {
                        let _ = stream.set_nodelay(true);
                        let slot = Arc::new(admitted);
                        let connection = on_connection(stream, peer, slot.clone());
                        shutdown.spawn(async move {
                            connection.await;
                            drop(slot);
                        });
                    }
                    None => refuse(stream, &admission),
                },
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning on a failing accept.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stopped(&mut stop) => return,
        }
    }
}

/// Tells an HTTP client why (best effort, never blocking) and closes.
fn refuse(stream: TcpStream, admission: &Admission) {
    admission.refused.inc();
    tracing::debug!("connection refused: limits.max_connections reached");
    let _ = stream.try_write(REFUSED);
}

const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
x-credproxy-error: too_many_connections\r\nconnection: close\r\ncontent-length: 92\r\n\r\n\
{\"error\":\"too_many_connections\",\"message\":\"limits.max_connections reached; try again later\"}";

/// Drives `connection` to completion; on shutdown, calls `begin_shutdown`
/// (hyper's `graceful_shutdown`), so in-flight requests finish and then the
/// connection closes.
pub async fn until_shutdown<C, E>(
    connection: C,
    mut signal: watch::Receiver<bool>,
    begin_shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        () = stopped(&mut signal) => {}
    }
    begin_shutdown(connection.as_mut());
    connection.await
}

/// Resolves once shutdown is signalled (or the trigger is gone).
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    // Not `wait_for`: its guard is not `Send`, and these futures move between threads.
    while !*signal.borrow_and_update() {
        if signal.changed().await.is_err() {
            return;
        }
    }
}
