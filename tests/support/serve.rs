//! The accept loop every test server shares: accept on a bound listener, TLS-accept with
//! the server's acceptor (or serve plain HTTP without one), and serve each connection with
//! hyper's auto builder (HTTP/1.1 and h2, with upgrades). The returned [`ServerTask`]
//! stops it on drop.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Binds 127.0.0.1:0 for the test server described by `what`.
pub async fn bind(what: &str) -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding the {what} on 127.0.0.1:0: {e}"))
}

/// A running accept loop; dropping it aborts the loop, whose `JoinSet` then aborts every
/// connection (parked ones included).
pub struct ServerTask(JoinHandle<()>);

impl ServerTask {
    /// Stops `task` on drop.
    pub fn new(task: JoinHandle<()>) -> Self {
        Self(task)
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns the accept loop on `listener`: TLS with `acceptor`, plain HTTP without one;
/// every request goes to `handler`.
pub fn spawn<H, Fut, B>(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    handler: H,
) -> ServerTask
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    ServerTask(tokio::spawn(accept_loop(listener, acceptor, handler)))
}

async fn accept_loop<H, Fut, B>(listener: TcpListener, acceptor: Option<TlsAcceptor>, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve_connection(tcp, acceptor.clone(), handler.clone()));
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_connection<H, Fut, B>(tcp: TcpStream, acceptor: Option<TlsAcceptor>, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let service = service_fn(handler);
    let builder = auto::Builder::new(TokioExecutor::new());
    // Connection errors (client hung up) are the client's business, not ours.
    match acceptor {
        Some(acceptor) => {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
        None => {
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        }
    }
}
