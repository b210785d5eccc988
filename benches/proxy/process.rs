//! The release credproxy as a separate process pinned to its own core, what
//! /proc says about it, and the machine the bench runs on.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::BoxError;

/// The CPU of the proxy; the bench (client + API + token endpoint) takes CPU 0.
pub const PROXY_CPU: usize = 1;
pub const BENCH_CPU: usize = 0;

/// Pins the calling thread, and so every thread it starts afterwards, to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it, and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Online CPUs of the machine (not of this process's affinity mask).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as f64 } else { 100.0 }
}

/// Raises the open-files soft limit to the hard one (1,000 idle connections
/// take a descriptor on each side). The proxy inherits it.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct passed.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
        limit.rlim_cur
    }
}

/// The credproxy binary to run: `$CREDPROXY_BIN`, else the one cargo built
/// for this bench (same profile and target dir), else `<target>/release/credproxy`
/// next to this bench binary, built with `cargo build --release` when missing
/// or older than the sources.
pub fn credproxy_binary() -> Result<PathBuf, BoxError> {
    if let Some(path) = std::env::var_os("CREDPROXY_BIN") {
        return Ok(PathBuf::from(path));
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_credproxy"));
    if built.is_file() {
        return Ok(built);
    }
    // target/release/deps/proxy-HASH -> target/release/credproxy
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?
        .to_path_buf();
    let binary = release.join("credproxy");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !binary.is_file() || newest_source(manifest) > modified(&binary) {
        let target_dir = release
            .parent()
            .ok_or("cannot locate the target directory")?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "credproxy"])
            .current_dir(manifest)
            .env("CARGO_TARGET_DIR", target_dir)
            .status()?;
        if !status.success() {
            return Err("cargo build --release failed".into());
        }
    }
    Ok(binary)
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn newest_source(manifest: &Path) -> Option<SystemTime> {
    let mut newest = [manifest.join("Cargo.toml"), manifest.join("Cargo.lock")]
        .iter()
        .filter_map(|p| modified(p))
        .max();
    let mut dirs = vec![manifest.join("src")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                newest = newest.max(modified(&path));
            }
        }
    }
    newest
}

pub struct ProxyProcess {
    child: Child,
    pub pid: u32,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// How the pinning went, for the report.
    pub pinning: String,
    log: Arc<LogDrain>,
    /// The stderr pipe's capacity in bytes (0 if it could not be read).
    pub pipe_size: usize,
    /// Under callgrind (`BENCH_CALLGRIND`): the profile's file name; each
    /// measured window is dumped to `<file>.<n>`.
    pub callgrind: Option<PathBuf>,
}

/// credproxy's stderr, read by a thread of the bench: the `listening` line is
/// kept, everything else is counted and dropped but for a short tail. A pipe,
/// as under a service manager or a terminal; a log file on disk would make the
/// proxy's writes stall in the kernel's dirty-page throttling.
#[derive(Default)]
struct LogDrain {
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    listening: Option<String>,
    bytes: u64,
    tail: VecDeque<u8>,
}

const LOG_TAIL: usize = 4096;

impl LogDrain {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, stderr: ChildStderr) {
        let mut reader = BufReader::with_capacity(64 * 1024, stderr);
        let mut line = Vec::new();
        // Line by line until the listening line, then in blocks.
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let mut state = self.lock();
                    state.record(&line);
                    if line.windows(19).any(|w| w == b"credproxy listening") {
                        state.listening = Some(String::from_utf8_lossy(&line).into_owned());
                        break;
                    }
                }
            }
        }
        let mut block = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut block) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.lock().record(&block[..n]),
            }
        }
    }
}

impl LogState {
    fn record(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let keep = &data[data.len().saturating_sub(LOG_TAIL)..];
        let excess = (self.tail.len() + keep.len()).saturating_sub(LOG_TAIL);
        self.tail.drain(..excess.min(self.tail.len()));
        self.tail.extend(keep);
    }
}

impl ProxyProcess {
    /// Starts `credproxy run -c config` on [`PROXY_CPU`] (via `taskset`), and
    /// waits for the `credproxy listening` line. With `callgrind` (a directory),
    /// credproxy runs under `valgrind --tool=callgrind`, profiles written there.
    pub async fn start(
        binary: &Path,
        config: &Path,
        dir: &Path,
        callgrind: Option<&Path>,
    ) -> Result<Self, BoxError> {
        let cpu = PROXY_CPU.to_string();
        let taskset_works = online_cpus() > PROXY_CPU
            && Command::new("taskset")
                .args(["-c", &cpu, "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if taskset_works {
            argv.extend(["taskset".into(), "-c".into(), cpu.into()]);
        }
        if let Some(out) = callgrind {
            fs::create_dir_all(out)?;
            let file = out.join("callgrind.%p");
            argv.extend([
                "valgrind".into(),
                "--tool=callgrind".into(),
                format!("--callgrind-out-file={}", file.display()).into(),
            ]);
        }
        argv.push(binary.into());
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .arg("run")
            .arg("-c")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env_remove("CREDPROXY_CONFIG");
        if let Ok(level) = std::env::var("BENCH_PROXY_LOG") {
            // The bench needs the `credproxy listening` line whatever the level.
            command.env("RUST_LOG", format!("{level},credproxy::app=info"));
        }
        let mut child = command.spawn()?;
        let pid = child.id();
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        // A large pipe: the drain thread shares CPU 0 with the busy client, and
        // credproxy's log writes must not wait for it to be scheduled.
        let pipe_size = {
            use std::os::fd::AsRawFd;
            // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
            unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) }
        };
        let log = Arc::new(LogDrain::default());
        {
            let log = log.clone();
            std::thread::Builder::new()
                .name("credproxy-log".into())
                .spawn(move || log.run(stderr))?;
        }
        let mut process = Self {
            child,
            pid,
            proxy_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pinning: String::new(),
            log,
            pipe_size: usize::try_from(pipe_size).unwrap_or(0),
            callgrind: callgrind.map(|out| out.join(format!("callgrind.{pid}"))),
        };
        // Valgrind starts a program some fifty times slower.
        let patience = if callgrind.is_some() { 300 } else { 30 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        loop {
            if let Some(status) = process.child.try_wait()? {
                // Let the drain thread read what is left.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!(
                    "credproxy exited ({status}) before listening:\n{}",
                    process.log_tail()
                )
                .into());
            }
            let listening = process.log.lock().listening.clone();
            if let Some(line) = listening {
                process.proxy_addr = field(&line, "proxy_addr=")?;
                process.admin_addr = field(&line, "admin_addr=")?;
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "credproxy did not say it was listening within {patience} s:\n{}",
                    process.log_tail()
                )
                .into());
            }
            // Async: the token endpoint runs on this thread and must answer
            // credproxy's first refresh.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let allowed = process
            .status_field("Cpus_allowed_list")
            .unwrap_or_default();
        process.pinning = if taskset_works {
            format!(
                "credproxy pinned with taskset to CPU {PROXY_CPU} (Cpus_allowed_list {allowed})"
            )
        } else {
            format!(
                "NOT PINNED: taskset unavailable or the machine has fewer than {} CPUs; credproxy may use CPUs {allowed}",
                PROXY_CPU + 1
            )
        };
        Ok(process)
    }

    /// The last lines credproxy logged.
    pub fn log_tail(&self) -> String {
        let state = self.log.lock();
        let bytes: Vec<u8> = state.tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // Drop a partial first line.
        match text.split_once('\n') {
            Some((_, rest)) if state.bytes > LOG_TAIL as u64 => rest.to_owned(),
            _ => text,
        }
    }

    /// Bytes credproxy wrote to stderr so far.
    pub fn log_bytes(&self) -> u64 {
        self.log.lock().bytes
    }

    fn status_field(&self, name: &str) -> Option<String> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }

    fn kib(&self, name: &str) -> Option<u64> {
        self.status_field(name)?
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// Resident set size now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.kib("VmRSS")
    }

    /// Peak resident set size since start or the last [`Self::reset_peak`], in KiB.
    pub fn peak_kib(&self) -> Option<u64> {
        self.kib("VmHWM")
    }

    /// Resets VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`).
    pub fn reset_peak(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// User + system CPU time of every thread so far, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        stat_cpu_secs(&self.pid.to_string())
    }

    pub fn threads(&self) -> Option<u64> {
        self.status_field("Threads")?.parse().ok()
    }

    /// Under callgrind: zeroes the instruction counter (the measured window starts).
    pub async fn callgrind_zero(&self) {
        if self.callgrind.is_some() {
            let _ = callgrind_control("-z", self.pid).await;
        }
    }

    /// Under callgrind: dumps the profile since the last zero and returns its
    /// instruction count.
    pub async fn callgrind_dump(&self) -> Option<u64> {
        let file = self.callgrind.as_ref()?;
        if !callgrind_control("-d", self.pid).await {
            return None;
        }
        // Dumps are numbered <file>.1, <file>.2, …: the newest is this one.
        let dir = file.parent()?;
        let prefix = format!("{}.", file.file_name()?.to_string_lossy());
        let newest = fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let n: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, entry.path()))
            })
            .max()?;
        fs::read_to_string(newest.1)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("summary:")?.trim().parse().ok())
    }

    /// SIGTERM, then up to 15 s for the graceful stop, then SIGKILL. Async:
    /// the API on this thread may have to answer during the stop.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `callgrind_control FLAG PID`, awaited (the API on this thread keeps serving).
async fn callgrind_control(flag: &str, pid: u32) -> bool {
    tokio::process::Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// CPU time of every user-space process except `exclude` (this bench and
/// credproxy), in seconds: other builds or tests competing for the CPUs.
/// Kernel threads are left out (they mostly carry our own network traffic).
pub fn foreign_cpu_secs(exclude: &[u32]) -> f64 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        // After the name: state(3) ppid(4) … flags(9) … utime(14) stime(15).
        if field(6).is_some_and(|flags| flags & PF_KTHREAD != 0) {
            continue;
        }
        // Children that exited were reaped into cutime/cstime (16, 17).
        ticks += [11, 12, 13, 14]
            .iter()
            .filter_map(|&i| field(i))
            .sum::<u64>();
    }
    ticks as f64 / clock_ticks_per_sec()
}

/// Per-CPU idle time from `/proc/stat`, in jiffies, indexed by CPU number.
pub fn idle_jiffies() -> Vec<u64> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // idle + iowait
            v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0)
        })
        .collect()
}

/// Steal time of the whole machine, in seconds so far.
pub fn steal_secs() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0.0, |t| t as f64 / clock_ticks_per_sec())
}

impl Drop for ProxyProcess {
    /// Whatever went wrong, no credproxy outlives the bench (`stop` reaps it
    /// first; std does not signal a child it has already waited for).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system CPU seconds of `/proc/<pid>/stat`.
fn stat_cpu_secs(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_sec())
}

/// This process's CPU seconds (client + API + token endpoint).
pub fn own_cpu_secs() -> Option<f64> {
    stat_cpu_secs("self")
}

fn field(line: &str, key: &str) -> Result<SocketAddr, BoxError> {
    let start = line
        .find(key)
        .ok_or_else(|| format!("no {key} in {line:?}"))?
        + key.len();
    let value = line[start..]
        .split(|c: char| c.is_whitespace())
        .next()
        .unwrap_or_default();
    Ok(value.parse()?)
}

// === machine and versions ===

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total: String,
    pub rustc: String,
    pub credproxy: String,
}

pub fn machine(binary: &Path) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| output("uname", &["-sr"]));
    let mem_total = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Machine {
        cpus: online_cpus(),
        cpu_model,
        kernel,
        mem_total,
        rustc: output(&rustc, &["-V"]),
        credproxy: output(&binary.to_string_lossy(), &["--version"]),
    }
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}
