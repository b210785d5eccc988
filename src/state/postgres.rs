//! The PostgreSQL store: one row per integration in `credproxy_tokens`, shared
//! by any number of replicas.
//!
//! - Single flight across replicas: a refresh holds an advisory lock on its
//!   integration, taken by a session of its own. The database releases it when
//!   that session ends, so a replica killed mid-refresh frees it at once, and
//!   there is no TTL a slow refresh could outlive. Each integration has its own
//!   lock: refreshes of different integrations never wait for each other.
//! - Writes under the lock travel on the lock's own session. The server handles
//!   a session's messages in order, so a write the holder sent before dying
//!   commits before the lock is released (or never): the next holder always
//!   reads it. (A write on another connection could commit after the next
//!   holder had read the row and redeemed the old refresh token again.)
//! - Writes are compare-and-set on a revision read under the lock: if someone
//!   else wrote meanwhile, the write is refused rather than overwriting a newer
//!   chain.
//! - Propagation: a trigger NOTIFYs every change; a listening connection turns
//!   them into [`Change`]s. After a lost connection it reconnects with backoff,
//!   LISTENs again and announces [`Change::All`] so everything is re-read.
//! - Every statement is bounded by a timeout: a request never hangs on the database.

mod schema;
mod url;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Change, Entry, StateError, StateLock, StateStore, StoreFuture, StoreInfo, StoreMetrics,
    Summary, UpdateFn,
};
use crate::config::UpstreamConfig;
use crate::secret::Secret;
pub use url::{CONNECT_TIMEOUT, DatabaseUrl, SslChoice};

/// Each statement's bound (the lock wait has its own).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refresh waits for another replica's refresh of the same
/// integration; longer than a token request may take (30 s).
const LOCK_WAIT: Duration = Duration::from_secs(45);
/// The listening connection is pinged this often, so a silently dead one is
/// noticed and replaced.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The NOTIFY channel the table's trigger announces changes on.
const CHANNEL: &str = "credproxy_tokens";

const COLUMNS: &str = "refresh_token, access_token, token_type, expires_at, seed_fingerprint, scope, updated_at, sealed, revision";

pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: DatabaseUrl,
    tls: MakeRustlsConnect,
    describe: String,
    /// The connection for reads and writes, shared (pipelined) by all tasks;
    /// replaced when lost.
    shared: Mutex<Option<Arc<Client>>>,
    /// One reconnect at a time.
    connecting: tokio::sync::Mutex<()>,
    changes: broadcast::Sender<Change>,
    following: AtomicBool,
    reachable: AtomicBool,
    metrics: StoreMetrics,
}

impl PgStore {
    /// Connects, and creates or migrates the schema (safely when replicas start
    /// at once). Fails when the database cannot be reached.
    pub async fn open(url: &DatabaseUrl, upstream: &UpstreamConfig) -> Result<Self, StateError> {
        let describe = format!("PostgreSQL state store {url}");
        let tls = url.tls(upstream).map_err(|source| StateError::Tls {
            store: describe.clone(),
            source,
        })?;
        let inner = Arc::new(Inner {
            url: url.clone(),
            tls,
            describe,
            shared: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            changes: broadcast::Sender::new(256),
            following: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
            metrics: StoreMetrics::new(),
        });
        let client = inner.shared().await?;
        let migrated = schema::migrate(&inner, &client).await;
        if migrated.is_err() {
            // The session may be inside a failed transaction: start afresh.
            inner.forget(&client);
        }
        migrated?;
        Ok(Self { inner })
    }
}

impl StateStore for PgStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            kind: "postgresql",
            location: self.inner.url.to_string(),
            sealed: false,
        }
    }

    fn load<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            let sql = format!("SELECT {COLUMNS} FROM credproxy_tokens WHERE integration = $1");
            let row = self
                .inner
                .on_shared("load", |client| async move {
                    client.query_opt(&sql, &[&integration]).await
                })
                .await?;
            Ok(self.inner.entry(row.as_ref())?.map(|(entry, _)| entry))
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<Summary>> {
        Box::pin(async move {
            let rows = self
                .inner
                .on_shared("list", |client| async move {
                    client
                        .query(
                            "SELECT integration, expires_at, updated_at, sealed FROM credproxy_tokens ORDER BY integration",
                            &[],
                        )
                        .await
                })
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(Summary {
                        integration: row.try_get(0)?,
                        expires_at: row.try_get(1)?,
                        updated_at: row.try_get(2)?,
                        sealed: row.try_get(3)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(|e| self.inner.error("list", e))
        })
    }

    fn lock<'a>(&'a self, integration: &'a str) -> StoreFuture<'a, Box<dyn StateLock>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.take_lock(integration).await;
            self.inner.observe("lock", &result);
            let lock = result?;
            self.inner.metrics.lock_waited(started.elapsed());
            Ok(Box::new(lock) as Box<dyn StateLock>)
        })
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        let receiver = self.inner.changes.subscribe();
        if !self.inner.following.swap(true, Ordering::AcqRel) {
            tokio::spawn(follow(Arc::downgrade(&self.inner)));
        }
        Some(receiver)
    }

    fn entries(&self) -> StoreFuture<'_, BTreeMap<String, Entry>> {
        Box::pin(async move {
            let sql = format!("SELECT integration, {COLUMNS} FROM credproxy_tokens");
            let rows = self
                .inner
                .on_shared(
                    "list",
                    |client| async move { client.query(&sql, &[]).await },
                )
                .await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, decode(row, 1)?.0)))
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(|e| self.inner.error("list", e))
        })
    }

    fn update_all<'a>(&'a self, f: &'a mut UpdateFn<'_>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let result = self.inner.rewrite_all(f).await;
            self.inner.observe("update", &result);
            result
        })
    }

    fn reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Acquire)
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }
}

// === impl Inner ===

impl Inner {
    /// A new connection, driven on its own task. `announce` forwards its
    /// notifications; `lost` is notified when it ends.
    async fn connect(
        &self,
        announce: bool,
        lost: Option<Arc<Notify>>,
    ) -> Result<Client, StateError> {
        let (client, mut connection) = self
            .timed(
                "connect",
                CONNECT_TIMEOUT,
                self.url.config().connect(self.tls.clone()),
            )
            .await?;
        let changes = announce.then(|| self.changes.clone());
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(note))) => {
                        if let Some(changes) = &changes {
                            let _ = changes.send(Change::Entry(note.payload().to_owned()));
                        }
                    }
                    Some(Ok(_notice)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "state store connection closed");
                        break;
                    }
                    None => break,
                }
            }
            if let Some(lost) = lost {
                lost.notify_one();
            }
        });
        Ok(client)
    }

    /// The shared connection, (re)connecting if there is none.
    async fn shared(&self) -> Result<Arc<Client>, StateError> {
        if let Some(client) = self.current() {
            return Ok(client);
        }
        let _one = self.connecting.lock().await;
        if let Some(client) = self.current() {
            return Ok(client);
        }
        let result = self.connect(false, None).await.map(Arc::new);
        self.observe("connect", &result);
        let client = result?;
        *lock(&self.shared) = Some(client.clone());
        Ok(client)
    }

    fn current(&self) -> Option<Arc<Client>> {
        lock(&self.shared).clone().filter(|c| !c.is_closed())
    }

    /// Drops `client` as the shared connection (if it still is), so the next
    /// operation connects afresh.
    fn forget(&self, client: &Arc<Client>) {
        let mut shared = lock(&self.shared);
        if shared.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *shared = None;
        }
    }

    /// Runs one statement on the shared connection, bounded, counted, and
    /// dropping the connection if it turned out to be dead.
    async fn on_shared<T, F, Fut>(&self, what: &'static str, statement: F) -> Result<T, StateError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let result = async {
            let client = self.shared().await?;
            let result = self
                .timed(what, STATEMENT_TIMEOUT, statement(client.clone()))
                .await;
            if matches!(&result, Err(e) if e.is_unreachable()) {
                self.forget(&client);
            }
            result
        }
        .await;
        self.observe(what, &result);
        result
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        limit: Duration,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StateError> {
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result.map_err(|e| self.error(what, e)),
            Err(_) => Err(StateError::Timeout {
                store: self.describe.clone(),
                what,
                seconds: limit.as_secs(),
            }),
        }
    }

    /// Counts the outcome and keeps `reachable` current.
    fn observe<T>(&self, what: &'static str, result: &Result<T, StateError>) {
        self.metrics.record(what, result);
        let reachable = match result {
            Ok(_) => true,
            Err(e) => !e.is_unreachable(),
        };
        self.set_reachable(reachable);
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Release);
        self.metrics.set_up(reachable);
    }

    /// A server's answer (a bad password, a missing privilege, a failed
    /// statement) is a query error; anything else means no usable connection.
    fn error(&self, what: &'static str, error: tokio_postgres::Error) -> StateError {
        let connection_lost = error.code().is_none_or(|code| {
            let code = code.code();
            // 08: connection exception; 57P0x: the server is shutting down or
            // restarting; 53300: too many connections.
            code.starts_with("08") || code.starts_with("57P0") || code == "53300"
        });
        if connection_lost {
            StateError::Unreachable {
                store: self.describe.clone(),
                what,
                source: Box::new(error),
            }
        } else {
            StateError::Database {
                store: self.describe.clone(),
                what,
                source: error,
            }
        }
    }

    /// An entry and its revision from a row of `COLUMNS`.
    fn entry(&self, row: Option<&Row>) -> Result<Option<(Entry, i64)>, StateError> {
        row.map(|row| decode(row, 0))
            .transpose()
            .map_err(|e| self.error("load", e))
    }

    /// Every row through `f`, in one transaction on a connection of its own
    /// (rows locked while it runs): all rewritten, or none.
    async fn rewrite_all(&self, f: &mut UpdateFn<'_>) -> Result<(), StateError> {
        let client = self.connect(false, None).await?;
        self.timed("update", STATEMENT_TIMEOUT, client.batch_execute("BEGIN"))
            .await?;
        let sql = format!("SELECT integration, {COLUMNS} FROM credproxy_tokens FOR UPDATE");
        let rows = self
            .timed("update", STATEMENT_TIMEOUT, client.query(&sql, &[]))
            .await?;
        for row in &rows {
            let (name, (entry, revision)) =
                (|| Ok((row.try_get::<_, String>(0)?, decode(row, 1)?)))()
                    .map_err(|e| self.error("update", e))?;
            // An error drops the connection: the transaction is rolled back.
            let entry = f(&name, entry)?;
            self.timed(
                "update",
                STATEMENT_TIMEOUT,
                upsert(&client, &name, &entry, Some(revision)),
            )
            .await?;
        }
        self.timed("update", STATEMENT_TIMEOUT, client.batch_execute("COMMIT"))
            .await
    }

    /// A dedicated connection (session) holding `integration`'s lock.
    async fn take_lock(self: &Arc<Self>, integration: &str) -> Result<PgLock, StateError> {
        let client = self.connect(false, None).await?;
        self.timed(
            "lock",
            STATEMENT_TIMEOUT,
            client.batch_execute(&format!("SET lock_timeout = '{}s'", LOCK_WAIT.as_secs())),
        )
        .await?;
        self.timed(
            "lock",
            LOCK_WAIT + STATEMENT_TIMEOUT,
            client.execute(
                "SELECT pg_advisory_lock($1)",
                &[&lock_key("credproxy-lock-v1:", integration)],
            ),
        )
        .await?;
        let mut lock = PgLock {
            client,
            store: self.clone(),
            integration: integration.to_owned(),
            revision: None,
        };
        lock.read("lock").await?;
        Ok(lock)
    }
}

/// An entry and its revision from `COLUMNS`, starting at column `at`.
fn decode(row: &Row, at: usize) -> Result<(Entry, i64), tokio_postgres::Error> {
    let entry = Entry {
        refresh_token: row.try_get::<_, Option<&str>>(at)?.map(Secret::new),
        access_token: row.try_get::<_, Option<&str>>(at + 1)?.map(Secret::new),
        token_type: row.try_get(at + 2)?,
        expires_at: row.try_get(at + 3)?,
        seed_fingerprint: row.try_get(at + 4)?,
        scope: row.try_get(at + 5)?,
        updated_at: row.try_get(at + 6)?,
        sealed: row.try_get(at + 7)?,
    };
    Ok((entry, row.try_get(at + 8)?))
}

/// Re-establishes the listening connection whenever it is lost, with backoff,
/// until the store is dropped.
async fn follow(store: Weak<Inner>) {
    let mut backoff = RECONNECT_MIN;
    let mut was_lost = false;
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let lost = Arc::new(Notify::new());
        let connected = async {
            let client = inner.connect(true, Some(lost.clone())).await?;
            inner
                .timed(
                    "listen",
                    STATEMENT_TIMEOUT,
                    client.batch_execute(&format!("LISTEN {CHANNEL}")),
                )
                .await?;
            Ok::<_, StateError>(client)
        }
        .await;
        inner.observe("listen", &connected);
        match connected {
            Ok(client) => {
                if was_lost {
                    tracing::info!(store = %inner.describe, "state store reachable again; re-reading");
                }
                // Changes made before LISTEN took effect were not announced.
                let _ = inner.changes.send(Change::All);
                backoff = RECONNECT_MIN;
                drop(inner);
                watch_connection(&store, &client, &lost).await;
                if let Some(inner) = store.upgrade() {
                    tracing::warn!(store = %inner.describe, "lost the state store connection; reconnecting");
                }
                was_lost = true;
            }
            Err(error) => {
                if !was_lost {
                    tracing::warn!(error = %crate::report::chain(&error), "cannot listen for state store changes; retrying");
                }
                was_lost = true;
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Returns once the listening connection has ended or stopped answering.
async fn watch_connection(store: &Weak<Inner>, client: &Client, lost: &Notify) {
    loop {
        tokio::select! {
            () = lost.notified() => return,
            () = tokio::time::sleep(PING_INTERVAL) => {}
        }
        let Some(inner) = store.upgrade() else {
            return;
        };
        let ping = inner
            .timed("ping", STATEMENT_TIMEOUT, client.batch_execute("SELECT 1"))
            .await;
        inner.observe("ping", &ping);
        if ping.is_err() {
            return;
        }
    }
}

/// An advisory-lock key for `name`: 64 bits of its SHA-256, so two names
/// practically never share a lock.
fn lock_key(purpose: &str, name: &str) -> i64 {
    let digest = Sha256::digest(format!("{purpose}{name}"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `entry` if its row is still at revision `expected` (`None`: no row
/// yet), bumping the revision; `None` when it was not.
async fn upsert(
    client: &Client,
    integration: &str,
    entry: &Entry,
    expected: Option<i64>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let refresh_token = entry.refresh_token.as_ref().map(Secret::expose);
    let access_token = entry.access_token.as_ref().map(Secret::expose);
    let values: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &integration,
        &refresh_token,
        &access_token,
        &entry.token_type,
        &entry.expires_at,
        &entry.seed_fingerprint,
        &entry.scope,
        &entry.updated_at,
        &entry.sealed,
    ];
    match expected {
        Some(revision) => {
            let mut params = values.to_vec();
            params.push(&revision);
            client
                .query_opt(
                    "UPDATE credproxy_tokens SET refresh_token = $2, access_token = $3, token_type = $4, \
                     expires_at = $5, seed_fingerprint = $6, scope = $7, updated_at = $8, sealed = $9, \
                     revision = revision + 1 WHERE integration = $1 AND revision = $10 RETURNING revision",
                    &params,
                )
                .await
        }
        None => {
            client
                .query_opt(
                    "INSERT INTO credproxy_tokens (integration, refresh_token, access_token, token_type, \
                     expires_at, seed_fingerprint, scope, updated_at, sealed, revision) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1) \
                     ON CONFLICT (integration) DO NOTHING RETURNING revision",
                    &values,
                )
                .await
        }
    }
}

// === impl PgLock ===

/// A held integration lock: a session-level advisory lock on a dedicated
/// connection. Dropping it closes the connection, which ends the session and
/// frees the lock.
struct PgLock {
    client: Client,
    store: Arc<Inner>,
    integration: String,
    /// The entry's revision when last read through this lock (`None`: no entry).
    revision: Option<i64>,
}

impl PgLock {
    /// Reads the entry on the lock's session, remembering its revision.
    async fn read(&mut self, what: &'static str) -> Result<Option<Entry>, StateError> {
        let sql = format!("SELECT {COLUMNS} FROM credproxy_tokens WHERE integration = $1");
        let row = self
            .store
            .timed(
                what,
                STATEMENT_TIMEOUT,
                self.client.query_opt(&sql, &[&self.integration]),
            )
            .await?;
        let entry = self.store.entry(row.as_ref())?;
        self.revision = entry.as_ref().map(|(_, revision)| *revision);
        Ok(entry.map(|(entry, _)| entry))
    }

    /// Commits `entry` on the lock's session (each statement is its own
    /// transaction there): durable before it is used, and never after the lock
    /// is gone.
    async fn write(&mut self, entry: &Entry) -> Result<(), StateError> {
        let result = self
            .store
            .timed(
                "save",
                STATEMENT_TIMEOUT,
                upsert(&self.client, &self.integration, entry, self.revision),
            )
            .await
            .and_then(|row| {
                let Some(row) = row else {
                    return Err(StateError::Conflict {
                        store: self.store.describe.clone(),
                        integration: self.integration.clone(),
                    });
                };
                row.try_get(0).map_err(|e| self.store.error("save", e))
            });
        self.store.observe("save", &result);
        self.revision = Some(result?);
        Ok(())
    }
}

impl StateLock for PgLock {
    fn load(&mut self) -> StoreFuture<'_, Option<Entry>> {
        Box::pin(async move {
            let result = self.read("load").await;
            self.store.observe("load", &result);
            result
        })
    }

    fn save<'a>(&'a mut self, entry: &'a Entry) -> StoreFuture<'a, ()> {
        Box::pin(self.write(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_by_name_and_purpose() {
        let a = lock_key("credproxy-lock-v1:", "dropbox");
        assert_eq!(a, lock_key("credproxy-lock-v1:", "dropbox"));
        assert_ne!(a, lock_key("credproxy-lock-v1:", "github"));
        assert_ne!(a, lock_key("credproxy-schema-v1:", "dropbox"));
    }
}
