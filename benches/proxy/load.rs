//! The load generator: hyper client connections, either straight to the API
//! (TLS, the client sets the bearer token itself) or through credproxy
//! (CONNECT and TLS to its minted leaf, or plain-HTTP absolute-form requests), driven by
//! a fixed number of workers with one request in flight each. Every worker
//! keeps a fixed-size latency histogram: memory does not grow with the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::BoxError;
use crate::pki::API_HOST;
use crate::process::ProxyProcess;
use crate::servers::{Chunks, World};

/// Through credproxy or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Proxied,
}

/// How the client talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTPS, HTTP/1.1 (via CONNECT when proxied).
    H1,
    /// HTTPS, h2 (via CONNECT when proxied; h2 between client and proxy).
    H2,
    /// Plain HTTP absolute-form to the proxy (credproxy adds upstream TLS).
    /// Direct, this is HTTPS/1.1 to the API: what the program would do without
    /// the proxy.
    PlainForward,
}

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Small,
    Download(u64),
    Upload(u64),
}

/// Everything a connection needs.
pub struct Net {
    pub api: SocketAddr,
    pub proxy: SocketAddr,
    pub world: Arc<World>,
    /// Trusting the bench CA (the API's real certificate).
    pub direct_h1: TlsConnector,
    pub direct_h2: TlsConnector,
    /// Trusting credproxy's local CA (its minted leaves).
    pub proxied_h1: TlsConnector,
    pub proxied_h2: TlsConnector,
    pub chunk: Bytes,
    /// Client TLS handshakes that resumed a session, and all of them.
    pub resumed: AtomicU64,
    pub handshakes: AtomicU64,
}

pub enum Sender {
    H1(http1::SendRequest<Chunks>),
    H2(http2::SendRequest<Chunks>),
}

impl Sender {
    async fn send(&mut self, request: Request<Chunks>) -> Result<Response<Incoming>, BoxError> {
        match self {
            Self::H1(sender) => {
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            Self::H2(sender) => {
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
        }
    }
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TCP to the proxy, `CONNECT api.bench.test:443`, 200.
async fn tunnel(proxy: SocketAddr) -> Result<TcpStream, BoxError> {
    let mut stream = tcp(proxy).await?;
    let head = format!("CONNECT {API_HOST}:443 HTTP/1.1\r\nHost: {API_HOST}:443\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    // The proxy sends nothing after its answer until the client speaks, so
    // reading up to the blank line cannot swallow TLS bytes.
    let mut buf = [0u8; 1024];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err("proxy closed the connection during CONNECT".into());
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if len == buf.len() {
            return Err("CONNECT answer too long".into());
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        let line = String::from_utf8_lossy(&buf[..len.min(80)]).into_owned();
        return Err(format!("CONNECT refused: {line}").into());
    }
    Ok(stream)
}

impl Net {
    async fn tls(
        &self,
        stream: TcpStream,
        connector: &TlsConnector,
    ) -> Result<TlsStream<TcpStream>, BoxError> {
        let name = ServerName::try_from(API_HOST)?.to_owned();
        let tls = connector.connect(name, stream).await?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(tls)
    }

    /// A new client connection of the given kind, its driver spawned.
    pub async fn connect(&self, mode: Mode, proto: Proto) -> Result<Sender, BoxError> {
        match (mode, proto) {
            (Mode::Direct, Proto::H1 | Proto::PlainForward) => {
                h1(self.tls(tcp(self.api).await?, &self.direct_h1).await?).await
            }
            (Mode::Direct, Proto::H2) => {
                h2(self.tls(tcp(self.api).await?, &self.direct_h2).await?).await
            }
            (Mode::Proxied, Proto::H1) => {
                h1(self
                    .tls(tunnel(self.proxy).await?, &self.proxied_h1)
                    .await?)
                .await
            }
            (Mode::Proxied, Proto::H2) => {
                h2(self
                    .tls(tunnel(self.proxy).await?, &self.proxied_h2)
                    .await?)
                .await
            }
            (Mode::Proxied, Proto::PlainForward) => h1(tcp(self.proxy).await?).await,
        }
    }

    /// The request for `op`. Direct requests carry the token; proxied ones none.
    pub fn request(
        &self,
        mode: Mode,
        proto: Proto,
        op: Op,
        path: &str,
    ) -> Result<Request<Chunks>, BoxError> {
        let (method, path, body) = match op {
            Op::Small => (Method::GET, path.to_owned(), Chunks::empty()),
            Op::Download(len) => (Method::GET, format!("/download/{len}"), Chunks::empty()),
            Op::Upload(len) => (
                Method::POST,
                "/upload".to_owned(),
                Chunks::new(len, self.chunk.clone()),
            ),
        };
        let uri = match (mode, proto) {
            (_, Proto::H2) => format!("https://{API_HOST}{path}"),
            (Mode::Proxied, Proto::PlainForward) => format!("http://{API_HOST}{path}"),
            _ => path,
        };
        let mut request = Request::builder().method(method).uri(uri);
        if proto != Proto::H2 {
            request = request.header(header::HOST, HeaderValue::from_static(API_HOST));
        }
        if mode == Mode::Direct {
            let bearer = self.world.bearer().ok_or("no token issued yet")?;
            request = request.header(header::AUTHORIZATION, HeaderValue::clone(&bearer));
        }
        Ok(request.body(body)?)
    }
}

async fn h1<S>(io: S) -> Result<Sender, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Sender::H1(sender))
}

async fn h2<S>(io: S) -> Result<Sender, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Sender::H2(sender))
}

/// Sends one request and reads the whole answer; returns the body bytes seen
/// while `count` says so (download accounting).
async fn exchange(
    sender: &mut Sender,
    request: Request<Chunks>,
    counter: Option<(&Control, &mut u64)>,
) -> Result<(), BoxError> {
    let response = sender.send(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut counter = counter;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let (Some(data), Some((control, bytes))) = (frame.data_ref(), counter.as_mut())
            && control.measuring()
        {
            **bytes += data.len() as u64;
        }
    }
    if status != StatusCode::OK {
        return Err(format!("status {status}").into());
    }
    Ok(())
}

// === histogram ===

/// Log-linear latency histogram in microseconds, 32 buckets per octave (~3 %).
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub max_us: u64,
}

const SUB: u64 = 32;
const BUCKETS: usize = 40 * SUB as usize;

impl Default for Hist {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            n: 0,
            max_us: 0,
        }
    }
}

impl Hist {
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // >= 5
        let idx = (exp - 4) * SUB + (us >> (exp - 5)) - SUB;
        (idx as usize).min(BUCKETS - 1)
    }

    /// The middle of bucket `idx`, in microseconds.
    fn value(idx: usize) -> f64 {
        let idx = idx as u64;
        if idx < SUB {
            return idx as f64 + 0.5;
        }
        let exp = idx / SUB + 4;
        let mantissa = idx % SUB + SUB;
        let width = 1u64 << (exp - 5);
        (mantissa * width) as f64 + width as f64 / 2.0
    }

    pub fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::index(us)] += 1;
        self.n += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The `q` quantile (0..1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.n == 0 {
            return f64::NAN;
        }
        let rank = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (idx, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return (Self::value(idx) / 1000.0).min(self.max_us as f64 / 1000.0);
            }
        }
        self.max_us as f64 / 1000.0
    }
}

// === timed runs ===

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

pub struct Control {
    phase: AtomicU8,
    ready: AtomicUsize,
}

impl Control {
    fn measuring(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == MEASURE
    }
}

#[derive(Clone, Copy)]
pub struct LoadSpec {
    pub mode: Mode,
    pub proto: Proto,
    pub conns: usize,
    /// A new TCP connection (+ CONNECT + TLS) for every request.
    pub new_conn: bool,
    pub op: Op,
}

#[derive(Default)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    /// Measured seconds (summed over rounds).
    pub secs: f64,
    pub hist: Hist,
    /// Body bytes moved during the measured window (download: received by the
    /// client; upload: received by the API).
    pub bytes: u64,
    pub first_error: Option<String>,
    /// The proxy's CPU time during the measured window.
    pub cpu_secs: Option<f64>,
    /// The proxy's instructions during the window (user space, `BENCH_CALLGRIND`).
    pub instructions: Option<u64>,
    /// The bench process's (client + API) CPU time during the window.
    pub bench_cpu_secs: Option<f64>,
    /// CPU time of other user-space processes, and hypervisor steal.
    pub foreign_secs: f64,
    pub steal_secs: f64,
    /// Idle time per CPU.
    pub idle_secs: Vec<f64>,
    /// TLS connections the API accepted during the whole run (warm-up
    /// included), and how many of them were h2.
    pub api_connections: (u64, u64),
    /// Client TLS handshakes during the whole run, and how many resumed.
    pub client_handshakes: (u64, u64),
    /// Per-round requests/s and MiB/s (one entry for a single run).
    pub round_rates: Vec<f64>,
    pub round_mib_per_s: Vec<f64>,
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? + b?)
}

impl LoadResult {
    /// Requests/s: the median of the rounds (robust to one disturbed round).
    pub fn rate(&self) -> f64 {
        median(&self.round_rates).unwrap_or(self.requests as f64 / self.secs)
    }

    pub fn mib_per_s(&self) -> f64 {
        median(&self.round_mib_per_s).unwrap_or(self.bytes as f64 / self.secs / (1024.0 * 1024.0))
    }

    /// CPU used by processes other than the bench and credproxy, as a share
    /// of the measured time (other builds or tests on the machine).
    pub fn foreign_busy(&self) -> f64 {
        (self.foreign_secs / self.secs).max(0.0)
    }

    /// Idle share of each CPU during the measured time.
    pub fn idle(&self) -> Vec<f64> {
        self.idle_secs.iter().map(|i| i / self.secs).collect()
    }

    /// Adds another round of the same run.
    pub fn absorb(&mut self, round: Self) {
        let first = self.secs == 0.0;
        self.requests += round.requests;
        self.errors += round.errors;
        self.secs += round.secs;
        self.hist.merge(&round.hist);
        self.bytes += round.bytes;
        if self.first_error.is_none() {
            self.first_error = round.first_error;
        }
        if first {
            self.cpu_secs = round.cpu_secs;
            self.instructions = round.instructions;
            self.bench_cpu_secs = round.bench_cpu_secs;
        } else {
            self.cpu_secs = add(self.cpu_secs, round.cpu_secs);
            self.instructions = self
                .instructions
                .zip(round.instructions)
                .map(|(a, b)| a + b);
            self.bench_cpu_secs = add(self.bench_cpu_secs, round.bench_cpu_secs);
        }
        self.foreign_secs += round.foreign_secs;
        self.steal_secs += round.steal_secs;
        if self.idle_secs.is_empty() {
            self.idle_secs = round.idle_secs;
        } else {
            for (a, b) in self.idle_secs.iter_mut().zip(round.idle_secs) {
                *a += b;
            }
        }
        self.api_connections.0 += round.api_connections.0;
        self.api_connections.1 += round.api_connections.1;
        self.client_handshakes.0 += round.client_handshakes.0;
        self.client_handshakes.1 += round.client_handshakes.1;
        self.round_rates.extend(round.round_rates);
        self.round_mib_per_s.extend(round.round_mib_per_s);
    }
}

#[derive(Default)]
struct WorkerResult {
    requests: u64,
    errors: u64,
    bytes: u64,
    hist: Hist,
    first_error: Option<String>,
}

fn fail(result: &mut WorkerResult, control: &Control, error: BoxError) {
    if control.phase.load(Ordering::Relaxed) != WARMUP {
        result.errors += 1;
    }
    if result.first_error.is_none() {
        result.first_error = Some(error.to_string());
    }
}

async fn worker(net: Arc<Net>, spec: LoadSpec, control: Arc<Control>) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut sender: Option<Sender> = None;
    let mut announced = false;
    if spec.new_conn {
        control.ready.fetch_add(1, Ordering::AcqRel);
        announced = true;
    }
    loop {
        if control.phase.load(Ordering::Relaxed) == STOP {
            break;
        }
        let start = Instant::now();
        if sender.is_none() {
            match net.connect(spec.mode, spec.proto).await {
                Ok(s) => sender = Some(s),
                Err(error) => {
                    fail(&mut result, &control, error);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
            if !announced {
                control.ready.fetch_add(1, Ordering::AcqRel);
                announced = true;
            }
        }
        let Some(current) = sender.as_mut() else {
            continue;
        };
        let request = match net.request(spec.mode, spec.proto, spec.op, "/small") {
            Ok(r) => r,
            Err(error) => {
                fail(&mut result, &control, error);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let start = if spec.new_conn { start } else { Instant::now() };
        let counter = match spec.op {
            Op::Download(_) => Some((&*control, &mut result.bytes)),
            _ => None,
        };
        match exchange(current, request, counter).await {
            Ok(()) => {
                if control.measuring() {
                    result.requests += 1;
                    result.hist.record(start.elapsed());
                }
            }
            Err(error) => {
                fail(&mut result, &control, error);
                sender = None;
            }
        }
        if spec.new_conn {
            sender = None;
        }
    }
    result
}

/// Opens `spec.conns` workers, waits until each has a connection, warms up,
/// then measures for `measure`.
/// `proxy` (the proxied side) has its CPU seconds, and under callgrind its
/// instructions, read at the start and end of the window; `proxy_pid` is left
/// out of the "other processes" figure.
pub async fn run(
    net: &Arc<Net>,
    spec: LoadSpec,
    warmup: Duration,
    measure: Duration,
    proxy: Option<&ProxyProcess>,
    proxy_pid: u32,
) -> LoadResult {
    let control = Arc::new(Control {
        phase: AtomicU8::new(WARMUP),
        ready: AtomicUsize::new(0),
    });
    let resumed0 = net.resumed.load(Ordering::Acquire);
    let handshakes0 = net.handshakes.load(Ordering::Acquire);
    let accepted0 = net.world.accepted.load(Ordering::Acquire);
    let accepted_h2_0 = net.world.accepted_h2.load(Ordering::Acquire);
    let mut workers = JoinSet::new();
    for _ in 0..spec.conns {
        workers.spawn(worker(net.clone(), spec, control.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while control.ready.load(Ordering::Acquire) < spec.conns && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(warmup).await;
    let uploaded = &net.world.uploaded;
    let up0 = uploaded.load(Ordering::Acquire);
    if let Some(proxy) = proxy {
        proxy.callgrind_zero().await;
    }
    let cpu0 = proxy.and_then(ProxyProcess::cpu_secs);
    let own0 = crate::process::own_cpu_secs();
    let exclude = [std::process::id(), proxy_pid];
    let foreign0 = crate::process::foreign_cpu_secs(&exclude);
    let steal0 = crate::process::steal_secs();
    let idle0 = crate::process::idle_jiffies();
    let t0 = Instant::now();
    control.phase.store(MEASURE, Ordering::Release);
    tokio::time::sleep(measure).await;
    control.phase.store(STOP, Ordering::Release);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = proxy.and_then(ProxyProcess::cpu_secs);
    let instructions = match proxy {
        Some(proxy) => proxy.callgrind_dump().await,
        None => None,
    };
    let own1 = crate::process::own_cpu_secs();
    let idle1 = crate::process::idle_jiffies();
    let foreign_secs = crate::process::foreign_cpu_secs(&exclude) - foreign0;
    let steal_secs = crate::process::steal_secs() - steal0;
    let hz = crate::process::clock_ticks_per_sec();
    let idle_secs = idle0
        .iter()
        .zip(&idle1)
        .map(|(a, b)| b.saturating_sub(*a) as f64 / hz)
        .collect();
    let up1 = uploaded.load(Ordering::Acquire);
    let mut total = LoadResult {
        secs,
        cpu_secs: cpu0.zip(cpu1).map(|(a, b)| b - a),
        instructions,
        bench_cpu_secs: own0.zip(own1).map(|(a, b)| b - a),
        foreign_secs,
        steal_secs,
        idle_secs,
        ..LoadResult::default()
    };
    while let Some(joined) = workers.join_next().await {
        let Ok(result) = joined else {
            total.errors += 1;
            continue;
        };
        total.requests += result.requests;
        total.errors += result.errors;
        total.bytes += result.bytes;
        total.hist.merge(&result.hist);
        if total.first_error.is_none() {
            total.first_error = result.first_error;
        }
    }
    if let Op::Upload(_) = spec.op {
        total.bytes = up1 - up0;
    }
    total.round_rates = vec![total.requests as f64 / total.secs];
    total.round_mib_per_s = vec![total.bytes as f64 / total.secs / (1024.0 * 1024.0)];
    total.client_handshakes = (
        net.handshakes.load(Ordering::Acquire) - handshakes0,
        net.resumed.load(Ordering::Acquire) - resumed0,
    );
    total.api_connections = (
        net.world.accepted.load(Ordering::Acquire) - accepted0,
        net.world.accepted_h2.load(Ordering::Acquire) - accepted_h2_0,
    );
    total
}

// === many connections at once ===

/// Opens `n` keep-alive HTTPS/1.1 connections (at most `parallel` handshakes
/// at a time), each after one `/small` request.
pub async fn open_many(
    net: &Arc<Net>,
    mode: Mode,
    n: usize,
    parallel: usize,
) -> Result<Vec<Sender>, BoxError> {
    let mut opened = Vec::with_capacity(n);
    let mut pending = JoinSet::new();
    let mut started = 0;
    while opened.len() < n {
        while started < n && pending.len() < parallel {
            let net = net.clone();
            pending.spawn(async move {
                let mut sender = net.connect(mode, Proto::H1).await?;
                let request = net.request(mode, Proto::H1, Op::Small, "/small")?;
                exchange(&mut sender, request, None).await?;
                Ok::<_, BoxError>(sender)
            });
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(sender))) => opened.push(sender),
            Some(Ok(Err(error))) => return Err(error),
            Some(Err(error)) => return Err(error.into()),
            None => break,
        }
    }
    Ok(opened)
}

pub struct StormResult {
    pub hist: Hist,
    pub ok: u64,
    pub failures: u64,
    pub first_error: Option<String>,
    pub senders: Vec<Sender>,
}

/// One `GET /storm` on every connection at once.
pub async fn burst(net: &Arc<Net>, mode: Mode, senders: Vec<Sender>) -> StormResult {
    let mut tasks = JoinSet::new();
    for mut sender in senders {
        let net = net.clone();
        tasks.spawn(async move {
            let start = Instant::now();
            let outcome = match net.request(mode, Proto::H1, Op::Small, "/storm") {
                Ok(request) => exchange(&mut sender, request, None).await,
                Err(error) => Err(error),
            };
            (sender, start.elapsed(), outcome)
        });
    }
    let mut result = StormResult {
        hist: Hist::default(),
        ok: 0,
        failures: 0,
        first_error: None,
        senders: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((sender, elapsed, outcome)) => {
                result.hist.record(elapsed);
                match outcome {
                    Ok(()) => result.ok += 1,
                    Err(error) => {
                        result.failures += 1;
                        result.first_error.get_or_insert(error.to_string());
                    }
                }
                result.senders.push(sender);
            }
            Err(error) => {
                result.failures += 1;
                result.first_error.get_or_insert(error.to_string());
            }
        }
    }
    result
}
