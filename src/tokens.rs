//! The token store: per integration, the current access token in an `ArcSwap`
//! (lock-free reads on the request path) and a single-flight refresh.
//!
//! Any number of callers wanting a refresh at once cause one token-endpoint
//! call: the first takes the flight lock and runs the exchange on its own task
//! (so a caller that goes away cannot abandon a rotation half-way); the others
//! wait for the lock and take that attempt's outcome. Across processes the state
//! store's lock does the same, and the state is re-read under it: another
//! process may have refreshed already.

pub mod refresh;
pub mod schedule;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, Grant, IntegrationConfig};
use crate::oauth::{OAuthClient, TokenError};
use crate::secret::Secret;
use crate::state::{self, Entry, StateError, StateStore};

/// The expiry of a token that never expires (a static one).
pub const NEVER: OffsetDateTime = time::macros::datetime!(9999-12-31 00:00 UTC);
/// How long a request with no valid token waits for a refresh before its 503.
pub const ON_DEMAND_WAIT: Duration = Duration::from_secs(10);
/// On-demand refreshes: at most one per this interval.
const ON_DEMAND_INTERVAL: Duration = Duration::from_secs(1);
/// Forced refreshes (an upstream 401): at most one per this interval, so an API
/// that rejects every token cannot make us hammer the provider.
const FORCED_INTERVAL: Duration = Duration::from_secs(10);
/// Refresh attempts `Status::recent` keeps: the status page's sparkline.
pub const RECENT_ATTEMPTS: usize = 20;

/// One published access token. Immutable; replaced whole on refresh.
#[derive(Debug)]
pub struct Snapshot {
    pub access_token: Secret,
    pub token_type: String,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    /// Counts publications in this process; the 401 path uses it to tell
    /// whether the token it sent is still the current one.
    pub generation: u64,
}

impl Snapshot {
    pub fn is_valid(&self, now: OffsetDateTime) -> bool {
        now < self.expires_at
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ok,
    Refreshing,
    BackingOff,
    Failed,
}

/// What `/integrations` and `check` show. No secrets.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    /// How tokens are obtained: `refresh_token`, `client_credentials`, …
    pub grant: &'static str,
    pub state: Health,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_refresh_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub refresh_count: u64,
    /// Failed refresh attempts, for metrics.
    #[serde(skip)]
    pub failure_count: u64,
    /// The last `RECENT_ATTEMPTS` refresh attempts, oldest first.
    pub recent: Vec<Attempt>,
}

/// One refresh attempt's outcome, for the status page.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub ok: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{integration}: state store failed")]
    State {
        integration: String,
        #[source]
        source: Arc<StateError>,
    },
    #[error(
        "{0}: not authorized yet: no refresh token in the config or the state file (run `credproxy authorize {0}`)"
    )]
    NotAuthorized(String),
    #[error("{0}: no valid token: the refresh did not finish within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: the refresh task stopped unexpectedly")]
    Aborted(String),
}

impl RefreshError {
    /// True when retrying cannot help until someone fixes the credentials.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Token(e) => e.is_permanent(),
            Self::NotAuthorized(_) => true,
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Token(e) => e.retry_after,
            _ => None,
        }
    }
}

type Outcome = Result<Arc<Snapshot>, RefreshError>;

/// Why a refresh is wanted; decides whether an existing token is good enough.
#[derive(Debug, Clone, Copy)]
pub enum Reason {
    /// A request found no valid token.
    Missing,
    /// A script (`credproxy token`) wants a token that is not about to expire.
    Due,
    /// The refresher's timer fired for this generation.
    Scheduled { generation: u64 },
    /// The upstream answered 401 to this generation's token.
    Rejected { generation: u64 },
    /// `check` or an operator: call the provider even if the token looks fine.
    Always,
}

// === impl Tokens ===

/// Every integration of a config.
pub struct Tokens {
    integrations: Vec<Arc<Integration>>,
}

impl Tokens {
    /// Reads each integration's stored state; a stored token that is still
    /// valid is used as is, without a refresh.
    pub async fn new(
        config: &Config,
        store: Arc<dyn StateStore>,
        client: OAuthClient,
    ) -> Result<Self, StateError> {
        let none = Self {
            integrations: Vec::new(),
        };
        none.reloaded(config, store, client).await
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Integration>> {
        self.integrations.iter().find(|i| i.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Integration>> {
        self.integrations.iter()
    }

    /// Starts one background refresher per integration.
    pub fn spawn_refreshers(&self) -> Refreshers {
        let mut refreshers = Refreshers::default();
        refreshers.sync(self);
        refreshers
    }

    /// The token store for a reloaded `config`: integrations whose settings did
    /// not change are kept as they are (same token, no refresh); new or changed
    /// ones start from the state file like at start-up.
    pub async fn reloaded(
        &self,
        config: &Config,
        store: Arc<dyn StateStore>,
        client: OAuthClient,
    ) -> Result<Self, StateError> {
        let mut integrations = Vec::new();
        for wanted in &config.integrations {
            integrations.push(
                match self.integrations.iter().find(|i| i.config == *wanted) {
                    Some(kept) => kept.clone(),
                    None => Arc::new(
                        Integration::new(wanted.clone(), store.clone(), client.clone()).await?,
                    ),
                },
            );
        }
        Ok(Self { integrations })
    }

    /// Waits (bounded) for refreshes in flight, so a shutdown does not cut one
    /// between the provider's answer and the state write.
    pub async fn quiesce(&self, deadline: Duration) {
        let flights_done = async {
            for integration in &self.integrations {
                drop(integration.flight.lock().await);
            }
        };
        let _ = tokio::time::timeout(deadline, flights_done).await;
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|i| i.name()))
            .finish()
    }
}

/// The background refresher tasks, one per integration; dropping this stops them.
#[derive(Default)]
pub struct Refreshers {
    running: Vec<(Arc<Integration>, tokio::task::AbortHandle)>,
    tasks: tokio::task::JoinSet<()>,
}

impl Refreshers {
    /// Runs a refresher for exactly the integrations of `tokens`: kept ones keep
    /// theirs, dropped ones are stopped, new ones are started.
    pub fn sync(&mut self, tokens: &Tokens) {
        self.running.retain(|(integration, task)| {
            let kept = tokens.iter().any(|i| Arc::ptr_eq(i, integration));
            if !kept {
                task.abort();
            }
            kept
        });
        for integration in tokens.iter() {
            if !self
                .running
                .iter()
                .any(|(running, _)| Arc::ptr_eq(running, integration))
            {
                let task = self.tasks.spawn(refresh::run(integration.clone()));
                self.running.push((integration.clone(), task));
            }
        }
    }
}

// === impl Integration ===

pub struct Integration {
    config: IntegrationConfig,
    store: Arc<dyn StateStore>,
    client: OAuthClient,
    current: ArcSwapOption<Snapshot>,
    published: watch::Sender<u64>,
    flight: Arc<tokio::sync::Mutex<Flight>>,
    /// Refresh attempts started (always under the flight lock). A caller that
    /// sees it move while waiting for the lock takes that attempt's outcome: the
    /// attempt began after the caller asked, so it answers the caller's question.
    started: AtomicU64,
    status: Mutex<StatusInner>,
    /// The credential the provider rejected permanently (a refresh token, or
    /// another grant's identity), and its answer.
    dead_chain: Mutex<Option<(Secret, RefreshError)>>,
    /// A rotated chain whose state write failed: written first by the next
    /// attempt, so a full disk or a lost database connection cannot lose a
    /// refresh token.
    unsaved: Mutex<Option<Unsaved>>,
}

#[derive(Clone)]
struct Unsaved {
    entry: Entry,
    /// The refresh token the provider rotated away to get `entry` (None for
    /// grants without a chain).
    redeemed: Option<Secret>,
}

#[derive(Default)]
struct Flight {
    last: Option<Outcome>,
    last_finished: Option<Instant>,
    last_forced: Option<Instant>,
}

struct StatusInner {
    health: Health,
    last_refresh_at: Option<OffsetDateTime>,
    last_error: Option<String>,
    refresh_count: u64,
    failure_count: u64,
    /// Bounded: the oldest attempt drops out.
    recent: VecDeque<Attempt>,
}

impl StatusInner {
    fn record_attempt(&mut self, at: OffsetDateTime, ok: bool) {
        if self.recent.len() == RECENT_ATTEMPTS {
            self.recent.pop_front();
        }
        self.recent.push_back(Attempt { at, ok });
    }
}

/// What to present to the provider and where it came from.
struct Chain {
    /// The refresh_token grant's current refresh token.
    refresh_token: Option<Secret>,
    /// What the provider judges: the refresh token, or another grant's
    /// credentials (`Grant::identity`).
    presented: Secret,
    seed_fingerprint: Option<String>,
    /// The stored entry, when it belongs to this chain.
    stored: Option<Entry>,
}

impl Integration {
    async fn new(
        config: IntegrationConfig,
        store: Arc<dyn StateStore>,
        client: OAuthClient,
    ) -> Result<Self, StateError> {
        let stored = store.load(&config.name).await?;
        let integration = Self {
            store,
            client,
            current: ArcSwapOption::empty(),
            published: watch::Sender::new(0),
            flight: Arc::default(),
            started: AtomicU64::new(0),
            status: Mutex::new(StatusInner {
                health: Health::Refreshing,
                last_refresh_at: None,
                last_error: None,
                refresh_count: 0,
                failure_count: 0,
                recent: VecDeque::with_capacity(RECENT_ATTEMPTS),
            }),
            unsaved: Mutex::new(None),
            dead_chain: Mutex::new(None),
            config,
        };
        if let Grant::Static(fixed) = &integration.config.grant {
            // Nothing to obtain or store: the token is the config's.
            integration.publish(&Entry {
                refresh_token: None,
                access_token: Some(fixed.token.clone()),
                token_type: Some(fixed.token_type.clone()),
                expires_at: Some(NEVER),
                seed_fingerprint: None,
                scope: None,
                updated_at: OffsetDateTime::now_utc(),
                sealed: false,
            });
            return Ok(integration);
        }
        match integration.chain(stored) {
            Ok(chain) => {
                let now = OffsetDateTime::now_utc();
                if let Some(entry) = chain.stored.filter(|e| {
                    e.scope == integration.config.scope && e.expires_at.is_some_and(|at| now < at)
                }) {
                    integration.publish(&entry);
                    integration.lock_status().health = Health::Ok;
                }
            }
            Err(error) => integration.record_failure(&error),
        }
        Ok(integration)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &IntegrationConfig {
        &self.config
    }

    /// The current token, valid or not. Lock-free.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Notified with the generation of every published token.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// A valid token for a request: the current one without waiting when it is
    /// valid; otherwise starts or joins a refresh and waits for it (bounded).
    pub async fn ready(self: &Arc<Self>) -> Result<Arc<Snapshot>, RefreshError> {
        if let Some(snapshot) = self.current.load_full()
            && snapshot.is_valid(OffsetDateTime::now_utc())
        {
            return Ok(snapshot);
        }
        // Boxed: the refresh future is large, and every request's future
        // would carry it.
        tokio::time::timeout(ON_DEMAND_WAIT, Box::pin(self.refresh(Reason::Missing)))
            .await
            .unwrap_or_else(|_| {
                Err(RefreshError::Timeout(
                    self.name().to_owned(),
                    ON_DEMAND_WAIT,
                ))
            })
    }

    /// Refreshes unless `reason` finds the current token good enough. Concurrent
    /// callers share one attempt.
    pub async fn refresh(self: &Arc<Self>, reason: Reason) -> Outcome {
        let seen = self.started.load(Ordering::Acquire);
        let mut flight = self.flight.clone().lock_owned().await;
        // Holding the lock, no attempt is in flight: one that started after
        // `seen` has finished and left its outcome.
        if self.started.load(Ordering::Acquire) != seen
            && let Some(outcome) = &flight.last
        {
            return outcome.clone();
        }
        if let Reason::Rejected { generation } = reason
            && !self.is_static()
            && self.store.reachable()
            && self
                .current
                .load()
                .as_ref()
                .is_some_and(|s| s.generation == generation)
            && let Some(snapshot) = self.take_newer().await
        {
            // Another process replaced the rejected token; this process was not told (yet).
            // Not a forced refresh: the provider is not asked, so no rate limit applies.
            return Ok(snapshot);
        }
        if let Some(outcome) = self.skip(reason, &mut flight) {
            return outcome;
        }
        let this = self.clone();
        let adopt = !matches!(reason, Reason::Always);
        self.started.fetch_add(1, Ordering::Release);
        let task = tokio::spawn(async move {
            let outcome = this.exchange(adopt).await;
            flight.last = Some(outcome.clone());
            flight.last_finished = Some(Instant::now());
            outcome
        });
        task.await
            .unwrap_or_else(|_| Err(RefreshError::Aborted(self.name().to_owned())))
    }

    /// The answer to give without calling the provider, if any.
    fn skip(&self, reason: Reason, flight: &mut Flight) -> Option<Outcome> {
        let now = OffsetDateTime::now_utc();
        let current = self.current.load_full();
        if self.is_static() {
            // Never refreshed: a 401 to it passes through to the client.
            return current.map(Ok);
        }
        // On-demand refreshes: at most one per interval, whatever the outcome, so
        // neither a failing provider nor one issuing already-expired tokens is hammered.
        // A permanently rejected chain is not sent again (see `dead_chain`), so
        // retrying after the interval only re-reads the state store.
        // "Not authorized" is never remembered: looking again costs one state
        // read, and the user may have just run `credproxy authorize`.
        let recent = || match (&flight.last, flight.last_finished) {
            (Some(Err(RefreshError::NotAuthorized(_))), _) => None,
            (Some(outcome), Some(at)) if at.elapsed() < ON_DEMAND_INTERVAL => Some(outcome.clone()),
            _ => None,
        };
        match reason {
            Reason::Missing => match current {
                Some(s) if s.is_valid(now) => Some(Ok(s)),
                _ => recent(),
            },
            Reason::Due => match current {
                Some(s) if !self.is_due(&s, now) => Some(Ok(s)),
                _ => recent(),
            },
            Reason::Scheduled { generation } => {
                current.filter(|s| s.generation != generation).map(Ok)
            }
            Reason::Rejected { generation } => match current {
                Some(s) if s.generation != generation => Some(Ok(s)),
                Some(s)
                    if flight
                        .last_forced
                        .is_some_and(|at| at.elapsed() < FORCED_INTERVAL) =>
                {
                    Some(Ok(s))
                }
                _ => {
                    flight.last_forced = Some(Instant::now());
                    None
                }
            },
            Reason::Always => None,
        }
    }

    fn is_due(&self, snapshot: &Snapshot, now: OffsetDateTime) -> bool {
        schedule::refresh_in(
            now,
            snapshot.issued_at,
            snapshot.expires_at,
            self.config.refresh_skew,
            0.0,
        )
        .is_zero()
    }

    /// One refresh under the cross-process lock, with status bookkeeping.
    async fn exchange(&self, adopt: bool) -> Outcome {
        self.lock_status().health = Health::Refreshing;
        let outcome = self.exchange_locked(adopt).await;
        match &outcome {
            Ok(snapshot) => {
                tracing::info!(
                    integration = %self.name(),
                    expires_in = (snapshot.expires_at - OffsetDateTime::now_utc()).whole_seconds(),
                    "token refreshed"
                );
            }
            Err(error) => self.record_failure(error),
        }
        outcome
    }

    async fn exchange_locked(&self, adopt: bool) -> Outcome {
        let state_error = |e| self.state_error(e);
        let mut held = self.store.lock(self.name()).await.map_err(state_error)?;
        let mut stored = held.load().await.map_err(state_error)?;
        // A rotated chain whose write failed last time goes to the store before
        // anything else; until it does, nothing from it is used.
        let unsaved = lock(&self.unsaved).clone();
        if let Some(Unsaved { entry, redeemed }) = unsaved {
            let next = self.chain(stored.clone()).ok().map(|c| c.refresh_token);
            if next.as_ref() == Some(&redeemed) {
                held.save(&entry).await.map_err(state_error)?;
                stored = Some(entry);
            } else if next.as_ref() != Some(&entry.refresh_token) {
                // Another process refreshed from the store while our write was
                // failing: the provider has moved on with its chain, not ours.
                tracing::warn!(integration = %self.name(), "an unsaved rotated chain was superseded by the store's");
            }
            *lock(&self.unsaved) = None;
        }
        let chain = self.chain(stored)?;
        let now = OffsetDateTime::now_utc();
        if adopt && let Some(entry) = chain.stored.as_ref().filter(|e| self.adoptable(e, now)) {
            // Another process refreshed while we waited for the lock.
            return Ok(self.publish(entry));
        }
        if adopt && let Some((presented, error)) = lock(&self.dead_chain).as_ref() {
            // The provider said these credentials are dead; asking again would
            // only hammer it. A new chain (`authorize`, a config change) or an
            // operator's forced refresh gets through.
            if *presented == chain.presented {
                return Err(error.clone());
            }
        }
        let response = match self
            .client
            .obtain(&self.config, chain.refresh_token.as_ref())
            .await
        {
            Ok(response) => response,
            Err(error) => {
                if error.is_permanent() {
                    *lock(&self.dead_chain) = Some((chain.presented, error.clone().into()));
                }
                return Err(error.into());
            }
        };
        *lock(&self.dead_chain) = None;
        let now = OffsetDateTime::now_utc();
        let redeemed = chain.refresh_token;
        let entry = Entry {
            // Only the refresh_token grant has a chain; a rotated token replaces it.
            refresh_token: response.refresh_token.or_else(|| redeemed.clone()),
            access_token: Some(response.access_token),
            token_type: Some(response.token_type),
            expires_at: Some(
                now + response
                    .expires_in
                    .unwrap_or(self.config.default_expires_in),
            ),
            seed_fingerprint: chain.seed_fingerprint,
            scope: self.config.scope.clone(),
            updated_at: now,
            sealed: false,
        };
        {
            let mut status = self.lock_status();
            status.refresh_count += 1;
            status.last_refresh_at = Some(now);
            status.record_attempt(now, true);
        }
        // Persist the rotated refresh token before publishing the access token:
        // the provider may already have revoked the old one. If the write fails,
        // keep the chain in memory for the next attempt to write.
        if let Err(error) = held.save(&entry).await {
            *lock(&self.unsaved) = Some(Unsaved { entry, redeemed });
            return Err(state_error(error));
        }
        Ok(self.publish(&entry))
    }

    /// Takes the token another process stored, when it is newer than ours
    /// (the store announced a change). Never calls the provider.
    pub async fn follow_store(&self) {
        // A refresh of our own in flight ends with its token in the store: wait
        // for it rather than race its publication.
        let _flight = self.flight.lock().await;
        self.take_newer().await;
    }

    /// Re-reads the store (without its lock) and publishes the token there if it
    /// is newer than ours. Never calls the provider. The caller holds the flight
    /// lock.
    async fn take_newer(&self) -> Option<Arc<Snapshot>> {
        let stored = match self.store.load(self.name()).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::debug!(integration = %self.name(), error = %crate::report::chain(&error), "cannot re-read the state store");
                return None;
            }
        };
        let now = OffsetDateTime::now_utc();
        match self.chain(stored) {
            Ok(Chain {
                stored: Some(entry),
                ..
            }) if self.is_newer(&entry, now) => Some(self.publish(&entry)),
            _ => None,
        }
    }

    /// Changes announced by the state store (`None` for a store that does not).
    pub fn store_changes(&self) -> Option<tokio::sync::broadcast::Receiver<state::Change>> {
        self.store.changes()
    }

    fn state_error(&self, source: StateError) -> RefreshError {
        RefreshError::State {
            integration: self.name().to_owned(),
            source: Arc::new(source),
        }
    }

    /// What to present. The refresh_token grant: the stored chain when it grew
    /// from the config's current refresh token (or from `authorize`), else the
    /// config's token. Other grants: the config's credentials; a stored token
    /// counts only if those same credentials obtained it.
    fn chain(&self, stored: Option<Entry>) -> Result<Chain, RefreshError> {
        let Grant::RefreshToken(grant) = &self.config.grant else {
            let identity = self.config.grant.identity();
            let seed = Some(state::fingerprint(&identity));
            return Ok(Chain {
                refresh_token: None,
                presented: identity,
                stored: stored.filter(|e| e.seed_fingerprint == seed),
                seed_fingerprint: seed,
            });
        };
        let config_seed = grant.refresh_token.as_ref().map(state::fingerprint);
        let grown = stored.filter(|e| config_seed.is_none() || e.seed_fingerprint == config_seed);
        if let Some(entry) = grown
            && let Some(token) = entry.refresh_token.clone()
        {
            return Ok(Chain {
                refresh_token: Some(token.clone()),
                presented: token,
                seed_fingerprint: entry.seed_fingerprint.clone(),
                stored: Some(entry),
            });
        }
        match &grant.refresh_token {
            Some(token) => Ok(Chain {
                refresh_token: Some(token.clone()),
                presented: token.clone(),
                seed_fingerprint: config_seed,
                stored: None,
            }),
            None => Err(RefreshError::NotAuthorized(self.name().to_owned())),
        }
    }

    fn is_static(&self) -> bool {
        matches!(self.config.grant, Grant::Static(_))
    }

    /// A stored token another process published: not ours, and not due.
    fn adoptable(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        let (Some(token), Some(expires_at)) = (&entry.access_token, entry.expires_at) else {
            return false;
        };
        if entry.scope != self.config.scope {
            return false;
        }
        let ours = self.current.load();
        let same = ours.as_ref().is_some_and(|s| s.access_token == *token);
        let due = schedule::refresh_in(
            now,
            entry.updated_at,
            expires_at,
            self.config.refresh_skew,
            0.0,
        )
        .is_zero();
        !same && !due
    }

    /// A valid stored token, other than ours and issued no earlier.
    fn is_newer(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        let (Some(token), Some(expires_at)) = (&entry.access_token, entry.expires_at) else {
            return false;
        };
        if entry.scope != self.config.scope || expires_at <= now {
            return false;
        }
        match self.current.load().as_ref() {
            Some(ours) => ours.access_token != *token && entry.updated_at >= ours.issued_at,
            None => true,
        }
    }

    fn publish(&self, entry: &Entry) -> Arc<Snapshot> {
        let generation = self.current.load().as_ref().map_or(0, |s| s.generation) + 1;
        let snapshot = Arc::new(Snapshot {
            access_token: entry
                .access_token
                .clone()
                .unwrap_or_else(|| Secret::new("")),
            token_type: entry.token_type.clone().unwrap_or_else(|| "bearer".into()),
            issued_at: entry.updated_at,
            expires_at: entry.expires_at.unwrap_or(entry.updated_at),
            generation,
        });
        {
            // Status first, so anyone woken by the publication sees `ok`.
            let mut status = self.lock_status();
            status.health = Health::Ok;
            status.last_error = None;
        }
        self.current.store(Some(snapshot.clone()));
        self.published.send_replace(generation);
        snapshot
    }

    fn record_failure(&self, error: &RefreshError) {
        let mut status = self.lock_status();
        status.failure_count += 1;
        status.record_attempt(OffsetDateTime::now_utc(), false);
        status.health = if error.is_permanent() {
            Health::Failed
        } else {
            Health::BackingOff
        };
        status.last_error = Some(crate::report::chain(error));
        tracing::warn!(integration = %self.name(), error = %crate::report::chain(error), "refresh failed");
    }

    pub fn health(&self) -> Health {
        self.lock_status().health
    }

    pub fn status(&self) -> Status {
        let status = self.lock_status();
        Status {
            name: self.name().to_owned(),
            grant: self.config.grant.kind(),
            state: status.health,
            // A static token does not expire.
            expires_at: self
                .current
                .load()
                .as_ref()
                .map(|s| s.expires_at)
                .filter(|at| *at != NEVER),
            last_refresh_at: status.last_refresh_at,
            last_error: status.last_error.clone(),
            refresh_count: status.refresh_count,
            failure_count: status.failure_count,
            recent: status.recent.iter().copied().collect(),
        }
    }

    fn lock_status(&self) -> MutexGuard<'_, StatusInner> {
        lock(&self.status)
    }
}

/// Status and `unsaved` are plain data; a panic elsewhere cannot leave them
/// half-written, so a poisoned lock is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    mod record_attempt {
        use super::*;

        #[test]
        fn keeps_the_last_attempts_oldest_first() {
            let mut status = StatusInner {
                health: Health::Ok,
                last_refresh_at: None,
                last_error: None,
                refresh_count: 0,
                failure_count: 0,
                recent: VecDeque::new(),
            };
            let start = OffsetDateTime::UNIX_EPOCH;
            let total = RECENT_ATTEMPTS + 5;
            for i in 0..total {
                status.record_attempt(start + Duration::from_secs(i as u64), i % 3 != 0);
            }
            assert_eq!(status.recent.len(), RECENT_ATTEMPTS);
            let seconds: Vec<i64> = status
                .recent
                .iter()
                .map(|a| (a.at - start).whole_seconds())
                .collect();
            let expected: Vec<i64> = (5..total as i64).collect();
            assert_eq!(seconds, expected);
            assert!(
                status
                    .recent
                    .iter()
                    .all(|a| a.ok == ((a.at - start).whole_seconds() % 3 != 0))
            );
        }
    }
}
