//! PostgreSQL for tests. [`TestDb::create`] gives each test its own fresh database (dropped
//! when the value drops), so tests run in parallel and leave nothing behind, on:
//! `CREDPROXY_TEST_DATABASE_URL` when set (an admin URL, e.g. `postgres://postgres@db/postgres`),
//! else the local server on 127.0.0.1:5432, else a throwaway server started for this test
//! process. Without any of them a test is skipped — except under `CI=true`, where a missing
//! PostgreSQL fails it.
//!
//! [`PgServer`] is a throwaway server of a test's own (`initdb` + `postgres` in a temp dir, as
//! `nobody` when the tests run as root): the one to stop, restart or kill, or to serve TLS
//! only ([`PgServer::start_tls`]). Never the shared one.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use super::ca::TestCa;
use super::token::WAIT;

const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long a server may take to accept connections after it was started.
const START_WAIT: Duration = Duration::from_secs(30);

// === TestDb ===

/// A database of this test's own, dropped (connections and all) on drop.
pub struct TestDb {
    name: String,
    admin_url: String,
    /// `postgres://…/NAME?sslmode=disable`, for `[state] url`.
    pub url: String,
}

impl TestDb {
    /// A fresh database on the shared test server, or `None` when there is no server and
    /// this is not CI (the caller returns early: the test is skipped, with a note on stderr).
    pub async fn create() -> Option<Self> {
        let Some(admin_url) = shared_admin_url().await else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but no PostgreSQL is reachable: set CREDPROXY_TEST_DATABASE_URL or \
                 start one on 127.0.0.1:5432 (.ci/run does)"
            );
            println!("skipped: no PostgreSQL server for the test (see tests/support/pg.rs)");
            return None;
        };
        Some(Self::create_on(&admin_url).await)
    }

    /// A fresh database on the server `admin_url` points to.
    pub async fn create_on(admin_url: &str) -> Self {
        let name = format!("credproxy_test_{:016x}", rand::random::<u64>());
        execute(admin_url, &format!("CREATE DATABASE {name}")).await;
        Self {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_owned(),
            name,
        }
    }

    /// Connects to this database (for assertions on its tables).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test database: {e}"))
    }

    /// Runs one query returning rows, on a fresh connection.
    pub async fn query(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.client()
            .await
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `[state] url = "…"`, for a config.
    pub fn state_toml(&self) -> String {
        format!("[state]\nurl = {}\n", toml::Value::String(self.url.clone()))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside any runtime's async context: a thread of its own.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            runtime.block_on(async {
                if let Ok(client) = connect(&admin_url).await {
                    let _ = client.batch_execute(&sql).await;
                }
            });
        });
        let _ = dropped.join();
    }
}

/// Connects with a bounded wait, driving the connection on the current runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

async fn execute(url: &str, sql: &str) {
    let client = connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `url` with its database replaced by `name`, TLS off (loopback test servers).
fn with_database(url: &str, name: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    parsed.set_path(&format!("/{name}"));
    parsed.set_query(Some("sslmode=disable"));
    parsed.to_string()
}

/// `url` with the URL parameter `key=value` added, e.g. `application_name=replica-1`, so
/// that `pg_stat_activity` and [`advisory_locks`] tell the connecting processes apart.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    parsed.query_pairs_mut().append_pair(key, value);
    parsed.to_string()
}

/// One advisory lock (a refresh lock or the schema lock) in the connected database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvisoryLock {
    /// The holder's (or waiter's) `application_name`.
    pub application: String,
    /// Held; `false`: waiting for it.
    pub granted: bool,
}

/// The advisory locks held or waited for in `client`'s database, holders first.
pub async fn advisory_locks(client: &tokio_postgres::Client) -> Vec<AdvisoryLock> {
    let sql = "SELECT coalesce(a.application_name, ''), l.granted FROM pg_locks l \
               JOIN pg_database d ON d.oid = l.database \
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
               WHERE d.datname = current_database() AND l.locktype = 'advisory' \
               ORDER BY l.granted DESC, a.application_name";
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("reading pg_locks: {e}"))
        .iter()
        .map(|row| AdvisoryLock {
            application: row.get(0),
            granted: row.get(1),
        })
        .collect()
}

/// The server tests share, decided once per test process.
async fn shared_admin_url() -> Option<String> {
    static DECIDED: OnceLock<Option<String>> = OnceLock::new();
    if let Some(decided) = DECIDED.get() {
        return decided.clone();
    }
    let found = if let Ok(url) = std::env::var("CREDPROXY_TEST_DATABASE_URL") {
        Some(url)
    } else if connect(LOCAL_SERVER).await.is_ok() {
        Some(LOCAL_SERVER.to_owned())
    } else {
        // Started once, on a thread that outlives every test's runtime; it stops when
        // the test process exits (see `PgServer::spawn`).
        static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
        let server = std::thread::spawn(|| {
            SERVER.get_or_init(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                runtime.block_on(PgServer::start())
            });
        });
        let _ = server.join();
        SERVER
            .get()
            .and_then(|s| s.as_ref())
            .map(PgServer::admin_url)
    };
    DECIDED.get_or_init(|| found).clone()
}

// === PgServer ===

/// A PostgreSQL server of this test's own, in a temp dir, on a free loopback port.
pub struct PgServer {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// Closing this pipe stops the server (see `spawn`).
    running: Option<(Child, ChildStdin)>,
    /// `Some(password)`: connections must authenticate as `postgres` with it.
    password: Option<String>,
}

/// How a [`PgServer`] is set up by `initdb` and its config files.
#[derive(Default)]
struct Setup<'a> {
    password: Option<String>,
    /// `ssl = on` with a leaf from this CA for these names; TCP connections only over TLS.
    tls: Option<(&'a TestCa, &'a [&'a str])>,
}

impl PgServer {
    /// initdb + postgres with trust authentication; `None` when the binaries are missing.
    pub async fn start() -> Option<Self> {
        Self::start_with(Setup::default()).await
    }

    /// As [`start`](Self::start), but `postgres` must log in with `password` (SCRAM).
    pub async fn start_with_password(password: &str) -> Option<Self> {
        Self::start_with(Setup {
            password: Some(password.to_owned()),
            ..Setup::default()
        })
        .await
    }

    /// As [`start`](Self::start), with `ssl = on` and a certificate `ca` issued for `names`;
    /// `pg_hba.conf` admits TCP connections over TLS only (`hostssl`), as a server that
    /// requires encryption does.
    pub async fn start_tls(ca: &TestCa, names: &[&str]) -> Option<Self> {
        Self::start_with(Setup {
            tls: Some((ca, names)),
            ..Setup::default()
        })
        .await
    }

    async fn start_with(setup: Setup<'_>) -> Option<Self> {
        let Setup { password, tls } = setup;
        let bin = postgres_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("credproxy-pg-")
            .tempdir()
            .expect("creating a temp dir for PostgreSQL");
        if running_as_root() {
            // initdb and postgres refuse to run as root.
            let status = Command::new("chown")
                .args(["nobody", dir.path().to_str().expect("UTF-8 temp dir")])
                .status()
                .expect("running chown");
            assert!(status.success(), "chown nobody failed");
        }
        let mut initdb = as_server_user(&bin.join("initdb"));
        initdb.args([
            "-D",
            "data",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        match &password {
            Some(password) => {
                let pwfile = dir.path().join("pwfile");
                std::fs::write(&pwfile, password).expect("writing the password file");
                let _ = Command::new("chown").arg("nobody").arg(&pwfile).status();
                initdb.args(["--auth=scram-sha-256", "--pwfile=pwfile"]);
            }
            None => {
                initdb.arg("--auth=trust");
            }
        }
        let out = initdb
            .current_dir(dir.path())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((ca, names)) = tls {
            require_tls(&dir.path().join("data"), ca, names);
        }
        let port = free_port();
        let mut server = Self {
            dir,
            bin,
            port,
            running: None,
            password,
        };
        server.resume().await;
        Some(server)
    }

    /// `postgres://postgres[:password]@127.0.0.1:PORT/postgres`
    pub fn admin_url(&self) -> String {
        let login = match &self.password {
            Some(password) => format!("postgres:{password}"),
            None => "postgres".to_owned(),
        };
        format!("postgres://{login}@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: sessions are ended) and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.running.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts the (stopped) server again on the same port and data, and waits until it
    /// accepts connections (on its Unix socket, which needs no TLS).
    pub async fn resume(&mut self) {
        assert!(self.running.is_none(), "the server is already running");
        self.running = Some(self.spawn());
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut socket = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().display(),
            self.port
        );
        if let Some(password) = &self.password {
            socket.push_str(&format!(" password={password}"));
        }
        while connect(&socket).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "PostgreSQL did not accept connections within {START_WAIT:?}; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// postgres under a shell that stops it (SIGINT, a fast shutdown) when its stdin
    /// closes: on `stop`, on drop, and when the test process exits however it exits.
    fn spawn(&self) -> (Child, ChildStdin) {
        let postgres = self.bin.join("postgres");
        let script = format!(
            "{} -D data -p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c max_connections=200 >>log 2>&1 & pid=$!; read _; kill -INT $pid; wait $pid",
            postgres.display(),
            self.port,
            self.dir.path().display()
        );
        let mut child = as_server_user(Path::new("sh"))
            .args(["-c", &script])
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        let stdin = child.stdin.take().expect("piped stdin");
        (child, stdin)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns TLS on in the data directory `data` with a leaf from `ca` for `names`, and admits
/// TCP connections over TLS only (`hostssl`); the Unix socket stays open for `resume`.
fn require_tls(data: &Path, ca: &TestCa, names: &[&str]) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    let (cert, key) = ca.issue_pem(names);
    for (name, pem) in [("server.crt", cert), ("server.key", key)] {
        let path = data.join(name);
        std::fs::write(&path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        // The server refuses a key others can read, or one it does not own.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        if running_as_root() {
            let status = Command::new("chown")
                .arg("nobody")
                .arg(&path)
                .status()
                .expect("running chown");
            assert!(status.success(), "chown nobody {} failed", path.display());
        }
    }
    let conf = data.join("postgresql.conf");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut file| {
            file.write_all(b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        })
        .unwrap_or_else(|e| panic!("appending to {}: {e}", conf.display()));
    let hba = data.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", hba.display()));
}

/// The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin), or
/// one on PATH.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| dir.join("initdb").exists())
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn as_server_user(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "nobody", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `condition` (an async check, e.g. a query) until it holds; panics after [`WAIT`].
pub async fn until<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    until_within(what, WAIT, condition).await;
}

/// As [`until`], bounded by `limit` (e.g. a reconnect whose backoff may reach seconds).
pub async fn until_within<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
