//! HTTP/1.1 client connections give their memory back while idle. For as long
//! as hyper serves a connection it keeps an 8 KiB read buffer, an 8 KiB buffer
//! for response heads and its connection state; a keep-alive connection waiting
//! for its next request needs none of it. So a connection waits for its first
//! byte outside hyper, and once hyper has waited [`PARK_AFTER`] for the next
//! request, hyper lets go of it (writing and closing nothing: the client cannot
//! tell) and the connection waits for that request's first byte on the bare
//! stream again. `limits.header_read_timeout` bounds each wait, as in hyper.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Sleep, Timer};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::observe::Observed;
use super::prefixed::Prefixed;
use crate::config::Limits;
use crate::metrics::GaugeGuard;
use crate::server;

/// How long hyper keeps a connection waiting for its next request.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves HTTP/1.1, with upgrades, on `io` until the client closes it, it is
/// upgraded, or shutdown. `parked` counts it while it waits outside hyper.
/// Parking needs `header_read_timeout` above [`PARK_AFTER`]; below, hyper
/// keeps the connection throughout.
pub async fn serve<I, S>(
    mut io: Prefixed<I>,
    mut service: S,
    limits: &Limits,
    mut signal: watch::Receiver<bool>,
    parked: &Gauge,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<Observed>, Error = Infallible>
        + Unpin
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let timeout = limits.header_read_timeout;
    let parking = timeout > PARK_AFTER;
    let phase = Arc::new(Phase::new(timeout));
    let mut deadline = now() + timeout;
    loop {
        if parking && io.prefix().is_empty() {
            let _parked = GaugeGuard::new(parked.clone());
            match first_byte(&mut io, deadline, &mut signal).await {
                Some(byte) => io = io.unread(byte),
                None => return Ok(()),
            }
        }
        phase.start();
        let held = Held {
            io,
            phase: phase.clone(),
        };
        let tracked = Tracked {
            inner: service,
            phase: phase.clone(),
        };
        // Boxed, so a parked connection keeps none of hyper's state.
        let mut connection = Box::new(
            builder(limits, &phase)
                .serve_connection(TokioIo::new(held), tracked)
                .with_upgrades(),
        );
        deadline = tokio::select! {
            biased;
            result = &mut *connection => return result,
            () = server::stopped(&mut signal) => {
                Pin::new(&mut *connection).graceful_shutdown();
                return (&mut *connection).await;
            }
            deadline = phase.parkable(), if parking => deadline,
        };
        // hyper has answered every request and waits for the next head: it
        // lets go of an idle connection without writing, and flushes first.
        phase.parking.store(true, Ordering::Relaxed);
        Pin::new(&mut *connection).graceful_shutdown();
        (&mut *connection).await?;
        let Some(parts) = connection.into_parts() else {
            return Ok(());
        };
        let (unread, inner) = parts.io.into_inner().io.into_parts();
        io = Prefixed::new(join(&parts.read_buf, &unread), inner);
        service = parts.service.inner;
    }
}

fn builder(limits: &Limits, phase: &Arc<Phase>) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer(phase.clone()))
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
}

/// The clock hyper's timers read (tokio's, which tests can pause).
fn now() -> Instant {
    TokioTimer::new().now()
}

/// The next byte from `io`, unless the client closes, `deadline` passes or
/// shutdown comes first.
async fn first_byte<I: AsyncRead + Unpin>(
    io: &mut Prefixed<I>,
    deadline: Instant,
    signal: &mut watch::Receiver<bool>,
) -> Option<u8> {
    let mut byte = [0u8; 1];
    tokio::select! {
        read = io.read(&mut byte) => matches!(read, Ok(1)).then_some(byte[0]),
        () = tokio::time::sleep_until(deadline.into()) => None,
        () = server::stopped(signal) => None,
    }
}

/// What hyper read but did not use (a request head's start), then what it
/// did not read yet: copied, as hyper's read buffer (8 KiB) holds the former.
fn join(read: &[u8], unread: &[u8]) -> Bytes {
    [read, unread].concat().into()
}

/// Where hyper is with a connection, as its service and its timer see it.
struct Phase {
    head_timeout: Duration,
    state: Mutex<State>,
    /// Set when letting go: the stream must then outlive hyper.
    parking: AtomicBool,
}

#[derive(Clone, Copy)]
enum State {
    /// No request yet: hyper would answer the first one with `Connection: close`
    /// if let go now.
    Fresh,
    /// A request is being answered.
    Busy,
    /// Every request answered; the next head is due by `deadline`.
    Idle { deadline: Instant },
}

impl Phase {
    fn new(head_timeout: Duration) -> Self {
        Self {
            head_timeout,
            state: Mutex::new(State::Fresh),
            parking: AtomicBool::new(false),
        }
    }

    fn set(&self, state: State) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    fn get(&self) -> State {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new hyper connection.
    fn start(&self) {
        self.set(State::Fresh);
        self.parking.store(false, Ordering::Relaxed);
    }

    /// hyper armed its timer for the next head, due by `deadline`: after a
    /// request, that means it has answered it.
    fn head_due(&self, deadline: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*state, State::Busy) {
            *state = State::Idle { deadline };
        }
    }

    /// Resolves, with the next head's deadline, once hyper has been idle for
    /// [`PARK_AFTER`]. Wakes at most twice per `PARK_AFTER`, busy or not.
    async fn parkable(&self) -> Instant {
        loop {
            let now = now();
            let at = match self.get() {
                State::Idle { deadline } => {
                    let at = deadline - self.head_timeout + PARK_AFTER;
                    if at <= now {
                        return deadline;
                    }
                    at
                }
                State::Fresh | State::Busy => now + PARK_AFTER,
            };
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// hyper's timer, telling [`Phase`] when hyper starts waiting for a head.
struct HeadTimer(Arc<Phase>);

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        TokioTimer::new().sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.0.head_due(deadline);
        TokioTimer::new().sleep_until(deadline)
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        self.0.head_due(new_deadline);
        TokioTimer::new().reset(sleep, new_deadline);
    }

    fn now(&self) -> Instant {
        now()
    }
}

/// The service, telling [`Phase`] when a request arrives.
pub struct Tracked<S> {
    inner: S,
    phase: Arc<Phase>,
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for Tracked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.phase.set(State::Busy);
        self.inner.call(request)
    }
}

/// The stream as hyper holds it: shutting it down while parking does nothing.
pub struct Held<I> {
    io: Prefixed<I>,
    phase: Arc<Phase>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.phase.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
