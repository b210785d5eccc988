//! Accept loops and graceful shutdown shared by the proxy and admin listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Slow or silent clients are cut after this long without a full request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Accepts connections until shutdown, each handled on its own task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, shutdown: Shutdown, on_connection: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = shutdown.signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    shutdown.spawn(on_connection(stream, peer));
                }
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
