//! The byte relay behind every tunnel: a blind CONNECT to an unrouted host and
//! an upgraded connection (WebSocket) after its 101. Bytes are copied both ways,
//! nothing inspected.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::server;

/// Bytes read from each side while a tunnel was open.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    pub from_client: u64,
    pub from_upstream: u64,
}

/// Copies until both sides have closed, the tunnel has been idle for `idle`
/// (no bytes either way), or shutdown: a tunnel has no request boundary to
/// wait for. The copy buffers are bounded, so a slow reader holds back the
/// writer on the other side.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Transferred
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last_read = Arc::new(AtomicU64::new(0));
    let mut client = Activity::new(client, epoch, last_read.clone());
    let mut upstream = Activity::new(upstream, epoch, last_read.clone());
    let watchdog = async {
        loop {
            let last = epoch + Duration::from_millis(last_read.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "tunnel closed with an error");
            }
        }
        () = watchdog => tracing::debug!(?idle, "tunnel closed after being idle"),
        () = server::stopped(&mut shutdown) => {}
    }
    Transferred {
        from_client: client.read,
        from_upstream: upstream.read,
    }
}

/// Records when bytes last arrived, in milliseconds since `epoch`, and how
/// many arrived.
struct Activity<S> {
    inner: S,
    epoch: Instant,
    last_read: Arc<AtomicU64>,
    read: u64,
}

impl<S> Activity<S> {
    fn new(inner: S, epoch: Instant, last_read: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            epoch,
            last_read,
            read: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read += read as u64;
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_read.store(now, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
