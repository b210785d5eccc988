//! Clients that talk to credproxy as real programs do: the system `curl`, reqwest, and a
//! hand-driven hyper client (CONNECT, then TLS with a chosen ALPN, then HTTP/1.1 or h2),
//! for the cases where a test must see the tunnel, the certificate or the protocol.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::token::WAIT;

/// Upper bound for one client exchange (a 200 MiB transfer has its own).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

pub type BoxedBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A response with its body read to the end.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a credproxy-made error: `status`, JSON `{"error": code, "message": …}` and
    /// `x-credproxy-error: code`.
    pub fn assert_credproxy_error(&self, status: StatusCode, code: &str) {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            self.text()
        );
        let body = self.json();
        assert_eq!(body["error"], code, "error code in {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message in {body}"
        );
        assert_eq!(
            self.header("x-credproxy-error"),
            Some(code),
            "x-credproxy-error header; headers: {:?}",
            self.headers
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "content-type of {body}"
        );
    }
}

/// Reads `response` to the end.
pub async fn read<B>(response: http::Response<B>) -> Answer
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(CLIENT_TIMEOUT, body.collect())
        .await
        .expect("response body did not finish in time")
        .expect("reading the response body")
        .to_bytes();
    Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

pub fn empty() -> BoxedBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

// === the tunnel ===

/// Where a CONNECT left us: a tunnel, or the proxy's refusal read to the end.
pub enum Connected {
    Tunnel(TokioIo<hyper::upgrade::Upgraded>),
    Refused(Answer),
}

impl Connected {
    pub fn tunnel(self) -> TokioIo<hyper::upgrade::Upgraded> {
        match self {
            Self::Tunnel(io) => io,
            Self::Refused(answer) => {
                panic!("CONNECT refused with {}: {}", answer.status, answer.text())
            }
        }
    }

    pub fn refused(self) -> Answer {
        match self {
            Self::Refused(answer) => answer,
            Self::Tunnel(_) => panic!("CONNECT was accepted; expected a refusal"),
        }
    }
}

/// `CONNECT target HTTP/1.1` to the proxy, with `headers` (e.g. `Proxy-Authorization`).
pub async fn connect(proxy: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Connected {
    let tcp = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("connecting to the proxy at {proxy}: {e}"));
    let (mut sender, connection) = http1::handshake::<_, BoxedBody>(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake with the proxy");
    tokio::spawn(connection.with_upgrades());
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header("host", target);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(empty()).expect("a valid CONNECT request");
    let response = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(request))
        .await
        .expect("the proxy did not answer CONNECT in time")
        .expect("sending CONNECT");
    if response.status() != StatusCode::OK {
        return Connected::Refused(read(response).await);
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .expect("upgrading the CONNECT tunnel");
    Connected::Tunnel(TokioIo::new(upgraded))
}

/// TLS over `io` to `server_name` with `config` (its ALPN list as given).
pub async fn tls<S>(io: S, server_name: &str, config: ClientConfig) -> TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_owned()).expect("a valid server name");
    tokio::time::timeout(
        CLIENT_TIMEOUT,
        TlsConnector::from(Arc::new(config)).connect(name, io),
    )
    .await
    .expect("TLS handshake did not finish in time")
    .unwrap_or_else(|e| panic!("TLS handshake with {server_name}: {e}"))
}

/// `config` offering `alpn` (e.g. `[b"h2"]`).
pub fn with_alpn(mut config: ClientConfig, alpn: &[&[u8]]) -> ClientConfig {
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// The certificate the server presented on `stream`.
pub fn peer_leaf<S>(stream: &TlsStream<S>) -> CertificateDer<'static> {
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// An HTTP/1.1 client connection over `io`.
pub async fn h1<S>(io: S) -> http1::SendRequest<BoxedBody>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 client handshake");
    tokio::spawn(connection);
    sender
}

/// An h2 client connection over `io`.
pub async fn h2<S>(io: S) -> http2::SendRequest<BoxedBody>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("h2 client handshake");
    tokio::spawn(connection);
    sender
}

/// A GET with `headers`; `uri` is sent as given (absolute-form for a proxy, or origin-form).
pub fn get(uri: &str, host: &str, headers: &[(&str, &str)]) -> Request<BoxedBody> {
    let mut request = Request::builder().method(Method::GET).uri(uri);
    if !host.is_empty() {
        request = request.header("host", host);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(empty()).expect("a valid request")
}

/// Sends `request` on an HTTP/1.1 connection and reads the answer.
pub async fn send1(
    sender: &mut http1::SendRequest<BoxedBody>,
    request: Request<BoxedBody>,
) -> Answer {
    // An HTTP/1.1 connection takes the next request once the previous response is done.
    tokio::time::timeout(CLIENT_TIMEOUT, sender.ready())
        .await
        .expect("the connection did not become ready in time")
        .expect("the connection closed");
    let response = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(request))
        .await
        .expect("no response in time")
        .expect("sending the request");
    read(response).await
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io`, reads the answer, and gives
/// `io` back between requests (keep-alive): a client holding many idle connections
/// without an HTTP client's buffers behind each.
pub async fn send1_keeping<S>(io: S, request: Request<BoxedBody>) -> (Answer, S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake::<_, BoxedBody>(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 client handshake");
    let connection = tokio::spawn(connection.without_shutdown());
    let answer = send1(&mut sender, request).await;
    drop(sender);
    let parts = tokio::time::timeout(CLIENT_TIMEOUT, connection)
        .await
        .expect("the client connection did not settle in time")
        .expect("the client connection task")
        .expect("the client connection");
    assert!(
        parts.read_buf.is_empty(),
        "the server sent bytes after the response: {:?}",
        parts.read_buf
    );
    (answer, parts.io.into_inner())
}

/// Sends `request` on an h2 connection and reads the answer.
pub async fn send2(
    sender: &mut http2::SendRequest<BoxedBody>,
    request: Request<BoxedBody>,
) -> Answer {
    let response = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(request))
        .await
        .expect("no response in time")
        .expect("sending the request");
    read(response).await
}

/// A plain (absolute-form) proxy request on a fresh connection: `GET url` to the proxy.
pub async fn proxy_get(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> Answer {
    let tcp = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("connecting to the proxy at {proxy}: {e}"));
    let mut sender = h1(tcp).await;
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    send1(&mut sender, get(url, &host, headers)).await
}

/// Writes `bytes` on a fresh TCP connection to `addr` and reads until the peer closes
/// (bounded): for requests no HTTP library would send.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    tcp.write_all(bytes).await.expect("writing raw bytes");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed the connection in time")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

// === reqwest ===

/// A reqwest client using `proxy` for everything, trusting only `roots`.
pub fn reqwest_via(proxy: SocketAddr, roots: Vec<CertificateDer<'static>>) -> reqwest::Client {
    let proxy = reqwest::Proxy::all(format!("http://{proxy}")).expect("a valid proxy URL");
    reqwest::Client::builder()
        .proxy(proxy)
        .tls_backend_preconfigured(super::ca::client_config_trusting(roots))
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("building a reqwest client")
}

/// A reqwest client for loopback services (the admin listener): no proxy, and no
/// trusted roots (reqwest wants a rustls config even for plain HTTP).
pub fn reqwest_direct() -> reqwest::Client {
    direct_builder().build().expect("building a reqwest client")
}

/// As [`reqwest_direct`], but a redirect is returned, not followed.
pub fn reqwest_direct_no_redirects() -> reqwest::Client {
    direct_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building a reqwest client")
}

fn direct_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(super::ca::client_config_trusting(Vec::new()))
        .timeout(CLIENT_TIMEOUT)
}

// === curl ===

#[derive(Debug)]
pub struct CurlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CurlOutput {
    /// Panics, showing stderr, unless curl exited 0.
    pub fn success(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "curl failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the system `curl` with `args` (no proxy variables from the environment, no
/// `~/.curlrc`), bounded by `timeout`.
pub async fn curl(args: &[&str], timeout: Duration) -> CurlOutput {
    let mut command = tokio::process::Command::new("curl");
    command
        .arg("-q") // ignore ~/.curlrc; must come first
        .args(["--silent", "--show-error"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        command.env_remove(var);
    }
    let child = command.spawn().expect("spawning curl (is it installed?)");
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("curl {args:?} did not finish within {timeout:?}"))
        .expect("waiting for curl");
    CurlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

// === PacedBody ===

/// A request body that sends `chunks` chunks of `chunk_size` zero bytes, one per `every`
/// (the first at once): an upload that takes a known time, like one over a slow link.
pub struct PacedBody {
    chunks: u64,
    chunk: Bytes,
    interval: tokio::time::Interval,
}

impl PacedBody {
    pub fn new(chunks: u64, chunk_size: usize, every: Duration) -> Self {
        Self {
            chunks,
            chunk: Bytes::from(vec![0u8; chunk_size]),
            interval: tokio::time::interval(every),
        }
    }

    pub fn len(&self) -> u64 {
        self.chunks * self.chunk.len() as u64
    }
}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        ready!(self.interval.poll_tick(cx));
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len())
    }
}
