//! Several `credproxy run` processes sharing one PostgreSQL state store: the deployment of
//! issue 10 (a sidecar in each pod of a Deployment), on loopback. Every replica has the
//! same config (a [`Setup`]'s: route `api.test` → integration `demo`, `[state] url`), its
//! own proxy and admin listener. Requests through a replica carry [`REPLICA_HEADER`], so
//! the test API's record tells which replica forwarded each one.

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::admin::Admin;
use super::client::{self, Answer};
use super::prom::Scrape;
use super::proxy::{API_HOST, Exit, ProxyOptions, ProxyProcess, Setup};

/// The request header naming the replica a request was sent through (its index).
pub const REPLICA_HEADER: &str = "x-replica";
/// How long [`Replicas::wait_until_injects`] probes before failing the test: longer than
/// any propagation bound a test asserts, so the figure, not a timeout, tells.
pub const PROBE_WAIT: Duration = Duration::from_secs(10);

pub struct Replica {
    pub process: ProxyProcess,
    pub admin: Admin,
}

pub struct Replicas<'s> {
    setup: &'s Setup,
    replicas: Vec<Replica>,
}

impl<'s> Replicas<'s> {
    /// `n` replicas of `setup`'s config with `[state] url = db_url` (added to `options`),
    /// started one after another, each waited for until it listens. They refresh on their
    /// own from then on; see [`wait_until_injects`](Self::wait_until_injects).
    pub async fn start(setup: &'s Setup, db_url: &str, n: usize, options: ProxyOptions) -> Self {
        let options = options.state_url(db_url);
        let mut replicas = Vec::with_capacity(n);
        for _ in 0..n {
            // One after another: the first creates credproxy's CA in the shared directory.
            let process = setup.spawn_proxy(&options).await;
            let admin = Admin::new(process.admin_addr);
            replicas.push(Replica { process, admin });
        }
        Self { setup, replicas }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn replica(&self, i: usize) -> &ProxyProcess {
        &self.replicas[i].process
    }

    pub fn admin(&self, i: usize) -> &Admin {
        &self.replicas[i].admin
    }

    /// `GET http://api.test<path>` through replica `i`'s proxy, on a fresh connection,
    /// tagged with [`REPLICA_HEADER`].
    pub async fn get(&self, i: usize, path: &str) -> Answer {
        let url = format!("http://{API_HOST}{path}");
        let tag = i.to_string();
        client::proxy_get(
            self.replicas[i].process.proxy_addr,
            &url,
            &[(REPLICA_HEADER, &tag)],
        )
        .await
    }

    /// Sends requests through replica `i` until one reaches the API with `token` or a
    /// token the token endpoint issued after it (each must be answered 200), and returns
    /// when the API first saw a request through `i` carrying one of them (a probe, or any
    /// other request tagged for `i`): from then on, replica `i` serves `token` or newer.
    /// Panics after [`PROBE_WAIT`].
    pub async fn wait_until_injects(&self, i: usize, token: &str) -> Instant {
        let deadline = Instant::now() + PROBE_WAIT;
        let at_least = |injected: &str| self.token_or_newer(token).contains(injected);
        loop {
            let answer = self.get(i, "/probe").await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "a probe through replica {i} failed: {}",
                answer.text()
            );
            let injected = answer.json()["headers"]["authorization"][0]
                .as_str()
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(str::to_owned);
            if injected.is_some_and(|injected| at_least(&injected)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} did not inject the token within {PROBE_WAIT:?}; its log:\n{}",
                self.replica(i).log()
            );
        }
        let tag = i.to_string();
        let wanted = self.token_or_newer(token);
        self.setup
            .api
            .first_seen(|seen| {
                seen.header(REPLICA_HEADER) == Some(tag.as_str())
                    && seen.bearer().is_some_and(|t| wanted.contains(t))
            })
            .expect("the API recorded the probe it answered")
            .at
    }

    /// `token` and every access token the token endpoint issued after it.
    fn token_or_newer(&self, token: &str) -> HashSet<String> {
        let issuances = self.setup.tokens.issuances();
        let from = issuances
            .iter()
            .position(|i| i.access_token == token)
            .unwrap_or(issuances.len());
        let mut tokens: HashSet<String> = issuances[from..]
            .iter()
            .map(|i| i.access_token.clone())
            .collect();
        tokens.insert(token.to_owned());
        tokens
    }

    /// Every replica's `/metrics`.
    pub async fn metrics(&self) -> Vec<Scrape> {
        let mut scrapes = Vec::with_capacity(self.len());
        for replica in &self.replicas {
            scrapes.push(replica.admin.metrics().await);
        }
        scrapes
    }

    /// Stops every replica (SIGTERM, bounded wait; their logs are checked for leaked
    /// secrets) and returns how each ended.
    pub async fn stop_all(self) -> Vec<Exit> {
        for replica in &self.replicas {
            replica.process.terminate();
        }
        let mut exits = Vec::with_capacity(self.replicas.len());
        for replica in self.replicas {
            exits.push(replica.process.wait().await);
        }
        exits
    }
}
