//! End-to-end benchmark: credproxy against the direct path, side by side in one
//! run (`cargo bench --bench proxy`, about two minutes).
//!
//! Everything runs on 127.0.0.1: an HTTPS test API and token endpoint (hyper +
//! rustls, HTTP/1.1 and h2), the release `credproxy run` as a separate process
//! pinned to CPU 1 (`taskset`), and a hyper load generator pinned, with the API,
//! to CPU 0. Each load scenario gets a fresh credproxy process and runs direct
//! and through credproxy in alternating rounds after a warm-up; the median
//! round is reported. Output: a markdown table on stdout, and
//! `<target>/bench/proxy.json` + `proxy.md`.
//!
//! Environment:
//! - `BENCH_SECONDS`: measured seconds per scenario and side (default 6);
//! - `BENCH_ROUNDS`: rounds they are split into (default 3);
//! - `BENCH_QUICK=1`: smoke run (1 s, 1 round, 8 MiB transfers, 100 connections);
//! - `BENCH_ONLY=idle,storm,ka32,ka256,newconn,h2,plain,download,upload`: a subset;
//! - `BENCH_PROXY_LOG`: `RUST_LOG` for credproxy (default: unset, i.e. `info`,
//!   one line per request); `warn` shows what the request log costs;
//! - `BENCH_API_ALPN=http/1.1`: the API refuses h2 (credproxy pools HTTP/1.1);
//! - `BENCH_CALLGRIND=1`: credproxy runs under `valgrind --tool=callgrind`;
//!   each measured window is dumped to `<target>/bench/callgrind/callgrind.PID.N`
//!   and its instructions per request reported (user space only; timings are
//!   then meaningless, but instruction counts hold on a busy machine);
//! - `CREDPROXY_BIN`: another credproxy binary; `BENCH_OUT`: the JSON path.

// A bench reports on stdout/stderr; its set-up failures end the run with a message.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "proxy/load.rs"]
mod load;
#[path = "proxy/pki.rs"]
mod pki;
#[path = "proxy/process.rs"]
mod process;
#[path = "proxy/report.rs"]
mod report;
#[path = "proxy/servers.rs"]
mod servers;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use load::{LoadResult, LoadSpec, Mode, Net, Op, Proto};
use process::ProxyProcess;
use report::{Goal, Metric, Scenario};
use servers::World;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const MIB: f64 = 1024.0 * 1024.0;

struct Settings {
    quick: bool,
    /// Measured time per side and scenario, split into `rounds`.
    measure: Duration,
    rounds: u32,
    /// Measured time of one round.
    round: Duration,
    /// Warm-up before the first round, and before the others.
    warmup: Duration,
    round_warmup: Duration,
    transfer: u64,
    idle: usize,
    only: Option<Vec<String>>,
    /// Where callgrind profiles go, when credproxy runs under it.
    callgrind: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1" || v == "true");
        let seconds = std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(if quick { 1.0 } else { 6.0 });
        let warmup = if quick {
            0.3
        } else {
            (seconds * 0.25).clamp(0.5, 2.0)
        };
        let rounds = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|v| *v > 0)
            .unwrap_or(if quick { 1 } else { 3 });
        Self {
            quick,
            measure: Duration::from_secs_f64(seconds),
            rounds,
            round: Duration::from_secs_f64(seconds / f64::from(rounds)),
            warmup: Duration::from_secs_f64(warmup),
            round_warmup: Duration::from_secs_f64(warmup.min(0.5)),
            transfer: if quick { 8 << 20 } else { 64 << 20 },
            idle: if quick { 100 } else { 1000 },
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect()),
            callgrind: std::env::var("BENCH_CALLGRIND")
                .is_ok_and(|v| v == "1" || v == "true")
                .then(|| out_path().with_file_name("callgrind")),
        }
    }

    fn wants(&self, key: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|k| k == key))
    }
}

fn main() -> ExitCode {
    // Pin before the runtime starts: its threads inherit the mask.
    let bench_pinning = if process::online_cpus() > process::PROXY_CPU {
        match process::pin_current_thread(process::BENCH_CPU) {
            Ok(()) => format!(
                "client + API + token endpoint pinned to CPU {}",
                process::BENCH_CPU
            ),
            Err(e) => format!("NOT PINNED: cannot pin the bench to CPU 0: {e}"),
        }
    } else {
        "NOT PINNED: fewer than 2 CPUs; proxy, client and API share the CPU".into()
    };
    let nofile = process::raise_nofile();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(bench_pinning, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_config(dir: &Path, api: SocketAddr) -> Result<PathBuf, BoxError> {
    let path = dir.join("credproxy-bench.toml");
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::create_dir_all(dir.join("state"))?;
    let config = format!(
        r#"[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[ca]
cert = {ca_cert:?}
key = {ca_key:?}

[state]
path = {state:?}

[upstream]
extra_ca = {extra_ca:?}
resolve = {{ "{host}:443" = "{api}" }}

[integrations.bench]
client_id = "{client_id}"
client_secret = "{client_secret}"
refresh_url = "https://{api}/token"
refresh_token = "{refresh_token}"
refresh_skew = "60s"

[[routes]]
host = "{host}"
integration = "bench"
"#,
        ca_cert = p("certs/ca.pem"),
        ca_key = p("certs/ca-key.pem"),
        state = p("state/tokens.json"),
        extra_ca = p("bench-ca.pem"),
        host = pki::API_HOST,
        client_id = servers::CLIENT_ID,
        client_secret = servers::CLIENT_SECRET,
        refresh_token = servers::FIRST_REFRESH_TOKEN,
    );
    std::fs::write(&path, config)?;
    Ok(path)
}

/// `GET path` on the admin listener; the status code.
async fn admin_get(addr: SocketAddr, path: &str) -> Result<u16, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?.status().as_u16())
}

fn out_path() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_OUT") {
        return PathBuf::from(path);
    }
    // <target>/release/deps/proxy-HASH -> <target>/bench/proxy.json
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench")
        .join("proxy.json")
}

/// What it takes to (re)start credproxy and reach it.
struct Rig {
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    api: SocketAddr,
    world: Arc<World>,
    bench_ca: Vec<CertificateDer<'static>>,
    local_ca: Vec<CertificateDer<'static>>,
    callgrind: Option<PathBuf>,
}

impl Rig {
    /// Starts credproxy and waits until `/readyz` says it holds a token.
    async fn start_proxy(&self) -> Result<ProxyProcess, BoxError> {
        let callgrind = self.callgrind.as_deref();
        let proxy = ProxyProcess::start(&self.binary, &self.config, &self.dir, callgrind).await?;
        let patience = if callgrind.is_some() { 300 } else { 20 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        loop {
            match admin_get(proxy.admin_addr, "/readyz").await {
                Ok(200) => return Ok(proxy),
                _ if Instant::now() > deadline => {
                    let tail = proxy.log_tail();
                    proxy.stop().await;
                    return Err(format!("credproxy not ready within {patience} s:\n{tail}").into());
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Client connectors for `proxy` (fresh session caches: a new credproxy
    /// process has new session ticket keys).
    fn net(&self, proxy: &ProxyProcess) -> Result<Arc<Net>, BoxError> {
        let connector = |roots: &[CertificateDer<'static>], alpn: &[&[u8]]| {
            pki::client_config(roots, alpn).map(TlsConnector::from)
        };
        Ok(Arc::new(Net {
            api: self.api,
            proxy: proxy.proxy_addr,
            world: self.world.clone(),
            direct_h1: connector(&self.bench_ca, &[b"http/1.1"])?,
            direct_h2: connector(&self.bench_ca, &[b"h2"])?,
            proxied_h1: connector(&self.local_ca, &[b"http/1.1"])?,
            proxied_h2: connector(&self.local_ca, &[b"h2"])?,
            chunk: Bytes::from(vec![0xa5_u8; 64 * 1024]),
            resumed: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
        }))
    }
}

struct Ctx {
    settings: Settings,
    rig: Rig,
    net: Arc<Net>,
    proxy: Option<ProxyProcess>,
    /// Bytes logged by the credproxy processes stopped so far.
    log_bytes: u64,
    pinning: String,
    pipe_size: usize,
    scenarios: Vec<Scenario>,
}

impl Ctx {
    fn proxy(&self) -> Result<&ProxyProcess, BoxError> {
        self.proxy
            .as_ref()
            .ok_or_else(|| "credproxy is not running".into())
    }

    fn peak_mib(&self) -> Option<f64> {
        self.proxy
            .as_ref()
            .and_then(ProxyProcess::peak_kib)
            .map(|k| k as f64 / 1024.0)
    }

    async fn stop_proxy(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            self.log_bytes += proxy.log_bytes();
            proxy.stop().await;
        }
    }

    /// A new credproxy process, so each scenario's RSS and CPU figures are its
    /// own (glibc keeps freed heap, so a previous scenario's peak would linger).
    async fn fresh_proxy(&mut self) -> Result<(), BoxError> {
        self.stop_proxy().await;
        let proxy = self.rig.start_proxy().await?;
        self.net = self.rig.net(&proxy)?;
        self.pinning = proxy.pinning.clone();
        self.pipe_size = proxy.pipe_size;
        self.proxy = Some(proxy);
        Ok(())
    }

    fn log_tail(&self) -> String {
        self.proxy
            .as_ref()
            .map_or_else(String::new, ProxyProcess::log_tail)
    }

    /// Runs `spec` direct, then through credproxy.
    async fn pair(
        &mut self,
        spec: LoadSpec,
    ) -> Result<(LoadResult, LoadResult, Option<f64>), BoxError> {
        self.fresh_proxy().await?;
        let s = &self.settings;
        let proxy = self.proxy()?;
        let reset = proxy.reset_peak();
        let mut direct = LoadResult::default();
        let mut proxied = LoadResult::default();
        // Direct and proxied alternate, so drift on the machine hits both.
        for round in 0..s.rounds {
            // A fresh proxy warms up longer (leaf minting, upstream pool).
            let warmup = if round == 0 { s.warmup } else { s.round_warmup };
            let run = |mode| LoadSpec { mode, ..spec };
            let pid = proxy.pid;
            let net = &self.net;
            direct.absorb(load::run(net, run(Mode::Direct), warmup, s.round, None, pid).await);
            let proxied_round =
                load::run(net, run(Mode::Proxied), warmup, s.round, Some(proxy), pid);
            proxied.absorb(proxied_round.await);
        }
        let peak = if reset { self.peak_mib() } else { None };
        Ok((direct, proxied, peak))
    }

    /// `tail_goal` applies to p99.9, `cpu_goal` to the proxy's CPU
    /// milliseconds per 1,000 requests.
    async fn requests(
        &mut self,
        key: &'static str,
        title: &str,
        spec: LoadSpec,
        rate_goal: Option<Goal>,
        tail_goal: Option<Goal>,
        cpu_goal: Option<Goal>,
    ) -> Result<(), BoxError> {
        if !self.settings.wants(key) {
            return Ok(());
        }
        progress(title);
        let (d, p, peak) = self.pair(spec).await?;
        let quantile = |name: &str, q: f64| {
            Metric::new(
                name,
                Some(d.hist.quantile_ms(q)),
                Some(p.hist.quantile_ms(q)),
            )
        };
        let mut metrics = vec![
            Metric::new("req/s", Some(d.rate()), Some(p.rate())).goal_opt(rate_goal),
            quantile("p50 ms", 0.5),
            quantile("p99 ms", 0.99),
            quantile("p99.9 ms", 0.999).goal_opt(tail_goal),
        ];
        let per_request = |total: f64| (p.requests > 0).then(|| total / p.requests as f64);
        let cpu_ms = p.cpu_secs.and_then(|c| per_request(c * 1_000_000.0));
        if cpu_goal.is_some() {
            metrics.push(Metric::new("proxy CPU ms/1k req", None, cpu_ms).goal_opt(cpu_goal));
        }
        if let Some(ir) = p.instructions.and_then(|i| per_request(i as f64)) {
            metrics.push(Metric::new("proxy instructions/req", None, Some(ir)));
        }
        let cpu = cpu_ms.map(|ms| (ms / 100.0, "s/10k req"));
        self.push(key, title, metrics, cpu, peak, &d, &p, Vec::new());
        Ok(())
    }

    async fn transfer(
        &mut self,
        key: &'static str,
        title: &str,
        op: Op,
        goal: Option<Goal>,
    ) -> Result<(), BoxError> {
        if !self.settings.wants(key) {
            return Ok(());
        }
        progress(title);
        let spec = LoadSpec {
            mode: Mode::Direct,
            proto: Proto::H1,
            conns: 1,
            new_conn: false,
            op,
        };
        let (d, p, peak) = self.pair(spec).await?;
        let mut rate = Metric::new("MiB/s", Some(d.mib_per_s()), Some(p.mib_per_s()));
        if let Some(goal) = goal {
            rate = rate.goal(goal);
        }
        let mut metrics = vec![rate];
        if matches!(op, Op::Download(_)) {
            metrics.push(Metric::new("proxy peak RSS MiB", None, peak).goal(Goal::MaxProxy(32.0)));
        } else {
            metrics.push(Metric::new("proxy peak RSS MiB", None, peak));
        }
        let gib = p.bytes as f64 / (1024.0 * MIB);
        if let Some(ir) = p.instructions.filter(|_| p.bytes > 0) {
            let per_mib = ir as f64 / (p.bytes as f64 / MIB);
            metrics.push(Metric::new("proxy instructions/MiB", None, Some(per_mib)));
        }
        let cpu = p.cpu_secs.filter(|_| gib > 0.0).map(|c| (c / gib, "s/GiB"));
        let notes = vec![format!(
            "{} MiB moved direct, {} MiB through credproxy in the measured window",
            (d.bytes as f64 / MIB).round(),
            (p.bytes as f64 / MIB).round()
        )];
        self.push(key, title, metrics, cpu, peak, &d, &p, notes);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key: &'static str,
        title: &str,
        metrics: Vec<Metric>,
        cpu: Option<(f64, &'static str)>,
        peak: Option<f64>,
        d: &LoadResult,
        p: &LoadResult,
        mut notes: Vec<String>,
    ) {
        for (side, r) in [("direct", d), ("credproxy", p)] {
            if let Some(e) = &r.first_error {
                notes.push(format!("{side}: first error: {e}"));
            }
        }
        notes.push(format!(
            "measured {:.1} s: {} requests direct, {} through credproxy",
            p.secs, d.requests, p.requests
        ));
        let busy = |cpu: Option<f64>, secs: f64| {
            cpu.map_or("?".to_owned(), |c| format!("{:.0} %", c / secs * 100.0))
        };
        notes.push(format!(
            "CPU busy: bench (client + API, CPU 0) {} direct, {} proxied; credproxy (CPU 1) {}",
            busy(d.bench_cpu_secs, d.secs),
            busy(p.bench_cpu_secs, p.secs),
            busy(p.cpu_secs, p.secs),
        ));
        notes.push(format!(
            "TLS connections the API accepted (warm-up included): {} direct, {} from credproxy ({} h2); client TLS handshakes resumed: {} of {} direct, {} of {} to credproxy",
            d.api_connections.0,
            p.api_connections.0,
            p.api_connections.1,
            d.client_handshakes.1,
            d.client_handshakes.0,
            p.client_handshakes.1,
            p.client_handshakes.0
        ));
        let noise = |r: &LoadResult| {
            let idle: Vec<String> = r
                .idle()
                .iter()
                .map(|i| format!("{:.0} %", i * 100.0))
                .collect();
            format!(
                "other processes {:.0} % of a CPU, steal {:.0} %, idle per CPU {}",
                r.foreign_busy() * 100.0,
                r.steal_secs / r.secs * 100.0,
                idle.join(" / ")
            )
        };
        notes.push(format!(
            "machine: direct: {}; proxied: {}",
            noise(d),
            noise(p)
        ));
        let rounds = |r: &LoadResult, mib: bool| {
            let values = if mib {
                &r.round_mib_per_s
            } else {
                &r.round_rates
            };
            values
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mib = d.bytes > 0;
        notes.push(format!(
            "rounds ({}; the median is reported): direct [{}], credproxy [{}]",
            if mib { "MiB/s" } else { "req/s" },
            rounds(d, mib),
            rounds(p, mib)
        ));
        self.scenarios.push(Scenario {
            key,
            title: title.to_owned(),
            metrics,
            cpu,
            peak_rss_mib: peak,
            errors: (d.errors, p.errors),
            notes,
            runs: serde_json::json!({
                "direct": run_json(d, None),
                "credproxy": run_json(p, p.cpu_secs),
            }),
        });
    }
}

fn run_json(r: &LoadResult, proxy_cpu: Option<f64>) -> serde_json::Value {
    serde_json::json!({
        "requests": r.requests,
        "errors": r.errors,
        "seconds": r.secs,
        "bytes": r.bytes,
        "bench_cpu_busy": r.bench_cpu_secs.map(|c| c / r.secs),
        "proxy_cpu_busy": proxy_cpu.map(|c| c / r.secs),
        "proxy_instructions": r.instructions,
        "other_processes_cpu_busy": r.foreign_busy(),
        "steal_busy": r.steal_secs / r.secs,
        "idle_per_cpu": r.idle(),
        "round_rates": r.round_rates,
        "round_mib_per_s": r.round_mib_per_s,
        "api_tls_connections": r.api_connections.0,
        "api_tls_connections_h2": r.api_connections.1,
        "client_tls_handshakes": r.client_handshakes.0,
        "client_tls_handshakes_resumed": r.client_handshakes.1,
        "first_error": r.first_error,
    })
}

fn progress(what: &str) {
    eprintln!("bench: {what} …");
}

async fn bench(bench_pinning: String, nofile: u64) -> Result<(), BoxError> {
    let settings = Settings::from_env();
    let started = Instant::now();
    let binary = process::credproxy_binary()?;
    let machine = process::machine(&binary);

    let dir = tempfile::Builder::new()
        .prefix("credproxy-bench-")
        .tempdir()?;
    let pki = pki::BenchPki::new()?;
    std::fs::write(dir.path().join("bench-ca.pem"), &pki.ca_pem)?;
    let world = World::new();
    let (listener, api) = servers::bind().await?;
    tokio::spawn(servers::serve(
        listener,
        TlsAcceptor::from(pki.server.clone()),
        world.clone(),
    ));
    let config = write_config(dir.path(), api)?;
    let mut rig = Rig {
        binary: binary.clone(),
        config,
        dir: dir.path().to_path_buf(),
        api,
        world: world.clone(),
        bench_ca: vec![pki.ca_der.clone()],
        local_ca: Vec::new(),
        callgrind: settings.callgrind.clone(),
    };
    let proxy = rig.start_proxy().await?;
    eprintln!(
        "bench: credproxy pid {} on {} (admin {}); {}",
        proxy.pid, proxy.proxy_addr, proxy.admin_addr, proxy.pinning
    );
    let rss_start = proxy.rss_kib();
    let threads = proxy.threads();
    // credproxy created its CA on first start; clients trust it from now on.
    rig.local_ca = pki::load_pem_certs(&dir.path().join("certs/ca.pem"))?;
    let mut ctx = Ctx {
        settings,
        net: rig.net(&proxy)?,
        rig,
        pinning: proxy.pinning.clone(),
        pipe_size: proxy.pipe_size,
        proxy: Some(proxy),
        log_bytes: 0,
        scenarios: Vec::new(),
    };
    let result = scenarios(&mut ctx, rss_start).await;
    let proxy_log_tail = ctx.log_tail();
    ctx.stop_proxy().await;
    let log_bytes = ctx.log_bytes;
    let pinning = ctx.pinning.clone();
    let pipe_size = ctx.pipe_size;
    if let Err(e) = result {
        return Err(format!("{e}\ncredproxy log (tail):\n{proxy_log_tail}").into());
    }

    // === report ===
    let s = &ctx.settings;
    let mut header = String::new();
    let _ = writeln!(
        header,
        "## credproxy vs direct (cargo bench --bench proxy)\n"
    );
    let _ = writeln!(
        header,
        "- machine: {} CPUs ({}), {}, RAM {}",
        machine.cpus, machine.cpu_model, machine.kernel, machine.mem_total
    );
    let _ = writeln!(
        header,
        "- versions: {}; {}",
        machine.rustc, machine.credproxy
    );
    let _ = writeln!(header, "- credproxy binary: {}", binary.display());
    let _ = writeln!(header, "- pinning: {pinning}; {bench_pinning}");
    let _ = writeln!(
        header,
        "- credproxy threads at start: {}; open-files limit {nofile}",
        threads.map_or("?".into(), |t| t.to_string())
    );
    let _ = writeln!(
        header,
        "- per scenario and side: {} round(s) of {:.1} s measured after a warm-up ({:.1} s for the first, {:.1} s for the others), direct and credproxy alternating{}; transfers {} MiB; {} idle/storm connections; credproxy logged {:.1} MiB to a {} KiB stderr pipe (RUST_LOG {})",
        s.rounds,
        s.round.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.round_warmup.as_secs_f64(),
        if s.quick { " (BENCH_QUICK)" } else { "" },
        s.transfer >> 20,
        s.idle,
        log_bytes as f64 / MIB,
        pipe_size / 1024,
        std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "unset: info".into()),
    );
    let max_foreign = ctx
        .scenarios
        .iter()
        .filter_map(|s| {
            let runs = &s.runs;
            let side = |k: &str| runs[k]["other_processes_cpu_busy"].as_f64();
            side("direct")
                .into_iter()
                .chain(side("credproxy"))
                .reduce(f64::max)
        })
        .fold(0.0_f64, f64::max);
    let _ = writeln!(
        header,
        "- other processes on the machine: up to {:.0} % of a CPU during a measured run{}",
        max_foreign * 100.0,
        if max_foreign > 0.1 {
            " — DISTURBED: the figures are noisy and pessimistic for credproxy (its path needs both CPUs); rerun on a quiet machine, and trust the CPU-per-request column most"
        } else {
            " (quiet)"
        }
    );
    let table = report::markdown(&ctx.scenarios);
    let mut notes = String::new();
    for scenario in &ctx.scenarios {
        for note in &scenario.notes {
            let _ = writeln!(notes, "- {}: {note}", scenario.title);
        }
    }
    println!("{header}\n{table}\nNotes:\n{notes}");
    println!(
        "ratio = credproxy / direct. Direct for the plain-HTTP scenario is HTTPS/1.1 straight to the API (what the program does without the proxy)."
    );

    let json = serde_json::json!({
        "machine": {
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "kernel": machine.kernel,
            "mem_total": machine.mem_total,
        },
        "versions": { "rustc": machine.rustc, "credproxy": machine.credproxy },
        "pinning": { "proxy": pinning, "bench": bench_pinning },
        "settings": {
            "quick": s.quick,
            "warmup_s": s.warmup.as_secs_f64(),
            "round_warmup_s": s.round_warmup.as_secs_f64(),
            "measure_s": s.measure.as_secs_f64(),
            "rounds": s.rounds,
            "transfer_bytes": s.transfer,
            "idle_connections": s.idle,
            "proxy_log": std::env::var("BENCH_PROXY_LOG").ok(),
        },
        "proxy_log_bytes": log_bytes,
        "max_other_processes_cpu_busy": max_foreign,
        "scenarios": report::json(&ctx.scenarios),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let out = out_path();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    std::fs::write(
        out.with_extension("md"),
        format!("{header}\n{table}\nNotes:\n{notes}"),
    )?;
    println!(
        "\nwrote {} and {} in {:.0} s",
        out.display(),
        out.with_extension("md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn scenarios(ctx: &mut Ctx, rss_start: Option<u64>) -> Result<(), BoxError> {
    let mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    ctx.scenarios.push(Scenario {
        key: "start",
        title: "after start (token fetched, no traffic)".into(),
        metrics: vec![
            Metric::new("proxy RSS MiB", None, mib(rss_start)).goal(Goal::MaxProxy(30.0)),
        ],
        cpu: None,
        peak_rss_mib: ctx.peak_mib(),
        errors: (0, 0),
        notes: Vec::new(),
        runs: serde_json::Value::Null,
    });

    // Idle connections first, while the heap is fresh; the storm reuses them.
    let n = ctx.settings.idle;
    let mut idle = Vec::new();
    if ctx.settings.wants("idle") || ctx.settings.wants("storm") {
        progress(&format!("{n} idle keep-alive TLS connections"));
        // One-time costs (leaf minting, upstream connection) before "before".
        drop(load::open_many(&ctx.net, Mode::Proxied, 8, 8).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = ctx.proxy()?.rss_kib();
        idle = load::open_many(&ctx.net, Mode::Proxied, n, 64).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = ctx.proxy()?.rss_kib();
        let per_conn = before
            .zip(after)
            .map(|(b, a)| (a.saturating_sub(b)) as f64 / n as f64);
        ctx.scenarios.push(Scenario {
            key: "idle",
            title: format!("{n} idle keep-alive TLS client connections"),
            metrics: vec![
                Metric::new("proxy RSS before MiB", None, mib(before)),
                Metric::new("proxy RSS after MiB", None, mib(after)),
                Metric::new("KiB per connection", None, per_conn).goal(Goal::MaxProxy(24.0)),
            ],
            cpu: None,
            peak_rss_mib: ctx.peak_mib(),
            errors: (0, 0),
            notes: vec![format!(
                "each connection: CONNECT + TLS + one GET, then idle; {} open",
                idle.len()
            )],
            runs: serde_json::json!({ "rss_before_kib": before, "rss_after_kib": after, "connections": idle.len() }),
        });
    }

    if ctx.settings.wants("storm") {
        progress(&format!(
            "refresh storm: {n} requests in flight when the token is revoked"
        ));
        let world = ctx.net.world.clone();
        // Direct: the same burst held at the same barrier, token left valid.
        let direct_conns = load::open_many(&ctx.net, Mode::Direct, n, 64).await?;
        let guard = world.arm_storm(n, false)?;
        let d = load::burst(&ctx.net, Mode::Direct, direct_conns).await;
        let d_arrived = guard.arrived();
        world.disarm_storm();
        drop(d.senders);

        let calls0 = world.token_calls.load(Ordering::Acquire);
        let unauthorized0 = world.unauthorized.load(Ordering::Acquire);
        let reset = ctx.proxy()?.reset_peak();
        let cpu0 = ctx.proxy()?.cpu_secs();
        let guard = world.arm_storm(n, true)?;
        let p = load::burst(&ctx.net, Mode::Proxied, std::mem::take(&mut idle)).await;
        let p_arrived = guard.arrived();
        world.disarm_storm();
        let cpu = ctx.proxy()?.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
        let calls = world.token_calls.load(Ordering::Acquire) - calls0;
        let unauthorized = world.unauthorized.load(Ordering::Acquire) - unauthorized0;
        let mut notes = vec![
            format!(
                "{d_arrived} direct and {p_arrived} proxied requests were held at the API until all {n} had arrived; then the token was revoked (proxied run) and all were answered at once ({unauthorized} × 401)"
            ),
            "direct: same burst and barrier, token left valid (nothing to refresh)".into(),
        ];
        for (side, e) in [("direct", &d.first_error), ("credproxy", &p.first_error)] {
            if let Some(e) = e {
                notes.push(format!("{side}: first error: {e}"));
            }
        }
        ctx.scenarios.push(Scenario {
            key: "storm",
            title: format!("refresh storm, {n} in flight, token revoked"),
            metrics: vec![
                Metric::new("token endpoint calls", Some(0.0), Some(calls as f64))
                    .goal(Goal::ExactProxy(1.0)),
                Metric::new(
                    "failed requests",
                    Some(d.failures as f64),
                    Some(p.failures as f64),
                )
                .goal(Goal::ExactProxy(0.0)),
                Metric::new(
                    "p50 ms",
                    Some(d.hist.quantile_ms(0.5)),
                    Some(p.hist.quantile_ms(0.5)),
                ),
                Metric::new(
                    "p99 ms",
                    Some(d.hist.quantile_ms(0.99)),
                    Some(p.hist.quantile_ms(0.99)),
                ),
            ],
            cpu: cpu.map(|c| (c / n as f64 * 10_000.0, "s/10k req")),
            peak_rss_mib: if reset { ctx.peak_mib() } else { None },
            errors: (d.failures, p.failures),
            notes,
            runs: serde_json::json!({
                "direct": { "ok": d.ok, "failures": d.failures, "arrived_at_barrier": d_arrived, "max_ms": d.hist.max_us as f64 / 1000.0 },
                "credproxy": { "ok": p.ok, "failures": p.failures, "arrived_at_barrier": p_arrived, "max_ms": p.hist.max_us as f64 / 1000.0, "token_endpoint_calls": calls, "upstream_401s": unauthorized, "proxy_cpu_s": cpu },
            }),
        });
        idle = p.senders;
    }
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let h1 = |conns, new_conn| LoadSpec {
        mode: Mode::Direct,
        proto: Proto::H1,
        conns,
        new_conn,
        op: Op::Small,
    };
    ctx.requests(
        "ka32",
        "HTTPS GET keep-alive, c=32",
        h1(32, false),
        Some(Goal::MinRatio(0.75)),
        None,
        Some(Goal::MaxProxy(18.0)),
    )
    .await?;
    ctx.requests(
        "ka256",
        "HTTPS GET keep-alive, c=256",
        h1(256, false),
        Some(Goal::MinRatio(0.7)),
        Some(Goal::MaxRatio(2.0)),
        None,
    )
    .await?;
    ctx.requests(
        "newconn",
        "HTTPS GET, new connection per request, c=16",
        h1(16, true),
        Some(Goal::MinRatio(1.3)),
        None,
        None,
    )
    .await?;
    ctx.requests(
        "h2",
        "HTTPS GET over h2 (client↔proxy), c=32",
        LoadSpec {
            proto: Proto::H2,
            ..h1(32, false)
        },
        Some(Goal::MinRatio(0.85)),
        None,
        None,
    )
    .await?;
    ctx.requests(
        "plain",
        "plain-HTTP forward (absolute form), c=32",
        LoadSpec {
            proto: Proto::PlainForward,
            ..h1(32, false)
        },
        Some(Goal::MinRatio(0.6)),
        None,
        None,
    )
    .await?;
    let size = ctx.settings.transfer;
    let label = size >> 20;
    ctx.transfer(
        "download",
        &format!("{label} MiB download"),
        Op::Download(size),
        Some(Goal::MinRatio(0.9)),
    )
    .await?;
    ctx.transfer(
        "upload",
        &format!("{label} MiB upload"),
        Op::Upload(size),
        None,
    )
    .await?;
    Ok(())
}
