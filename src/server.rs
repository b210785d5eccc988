//! Accept loops and graceful shutdown shared by the proxy and admin listeners.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
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
    let mut exhausted = Exhausted::new(listener.local_addr().ok());
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
                Err(error) if Exhausted::applies(&error) => {
                    exhausted.refuse_one(&listener, &error).await;
                }
                Err(error) => {
                    // A connection that failed before it was accepted (reset
                    // in the backlog): nothing to do but wait for the next.
                    tracing::debug!(%error, "accept failed");
                }
            },
            () = stopped(&mut stop) => return,
        }
    }
}

/// What the accept loop does when the process is out of file descriptors or
/// memory: the pending connection would sit in the backlog and `accept` would
/// fail again at once, a busy loop. So it frees a descriptor kept in reserve,
/// accepts that connection and closes it (the client sees it refused rather
/// than hanging), backs off briefly, and logs at most once a second with a
/// count. As soon as descriptors are free again, accepting simply works.
struct Exhausted {
    listener: Option<SocketAddr>,
    /// A descriptor held back for refusing connections when none is left.
    spare: Option<std::fs::File>,
    refused: u64,
    last_log: Option<Instant>,
}

/// Between refusals while exhausted, so the loop never spins.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(20);
const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl Exhausted {
    fn new(listener: Option<SocketAddr>) -> Self {
        Self {
            listener,
            spare: reserve(),
            refused: 0,
            last_log: None,
        }
    }

    fn applies(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    async fn refuse_one(&mut self, listener: &TcpListener, error: &io::Error) {
        // Free the reserve, take the waiting connection with it, close both.
        // Only one already waiting: one that arrives later may find
        // descriptors free again, and must not be dropped.
        self.spare = None;
        let waiting = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx))).await;
        if let Poll::Ready(Ok((stream, _))) = waiting {
            drop(stream);
            self.refused += 1;
        }
        self.spare = reserve();
        let due = self
            .last_log
            .is_none_or(|at| at.elapsed() >= EXHAUSTED_LOG_INTERVAL);
        if due {
            let listener = self.listener.map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(%listener, %error, refused = self.refused, "out of file descriptors or memory: refusing connections");
            self.refused = 0;
            self.last_log = Some(Instant::now());
        }
        tokio::time::sleep(EXHAUSTED_BACKOFF).await;
    }
}

fn reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
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
