//! Several `credproxy run` processes sharing one PostgreSQL state store: the deployment of
//! issue 10 (a sidecar in each pod of a Deployment), on loopback. Every replica has the
//! same config (a [`Setup`]'s: route `api.test` → integration `demo`, `[state] url`), its
//! own proxy and admin listener. Requests through a replica carry [`REPLICA_HEADER`], so
//! the test API's record tells which replica forwarded each one.
//!
//! Replica `i` connects to the database as `application_name=replica-i` (its `[state] url`
//! comes from `${CREDPROXY_TEST_STATE_URL}`, one value per process), so `pg_stat_activity`
//! and [`pg::advisory_locks`](super::pg::advisory_locks) tell the replicas apart. A replica
//! can be SIGKILLed ([`kill`](Replicas::kill)) and started again
//! ([`restart`](Replicas::restart)) in its slot.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::admin::Admin;
use super::cli::Output;
use super::client::{self, Answer};
use super::prom::Scrape;
use super::proxy::{API_HOST, Exit, ProxyOptions, ProxyProcess, Setup};

/// The request header naming the replica a request was sent through (its index).
pub const REPLICA_HEADER: &str = "x-replica";
/// How long [`Replicas::wait_until_injects`] probes before failing the test: longer than
/// any propagation bound a test asserts, so the figure, not a timeout, tells.
pub const PROBE_WAIT: Duration = Duration::from_secs(10);
/// The variable each replica's `[state] url` is read from.
const URL_VAR: &str = "CREDPROXY_TEST_STATE_URL";

pub struct Replica {
    pub process: ProxyProcess,
    pub admin: Admin,
}

pub struct Replicas<'s> {
    setup: &'s Setup,
    /// The database URL, without a replica's `application_name`.
    db_url: String,
    /// What the config's `${VAR}`s need besides the URL (the client secret).
    env: Vec<(String, String)>,
    /// `None` while a replica is down (killed, not started again yet).
    replicas: Vec<Option<Replica>>,
}

impl<'s> Replicas<'s> {
    /// `n` replicas of `setup`'s config with `[state] url` pointing at `db_url` (added to
    /// `options`), started one after another, each waited for until it listens. They
    /// refresh on their own from then on; see [`wait_until_injects`](Self::wait_until_injects).
    pub async fn start(setup: &'s Setup, db_url: &str, n: usize, options: ProxyOptions) -> Self {
        let builder = setup.config(&options.state_url(&format!("${{{URL_VAR}}}")));
        builder.write(&setup.dir);
        let env = builder
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut replicas = Self {
            setup,
            db_url: db_url.to_owned(),
            env,
            replicas: (0..n).map(|_| None).collect(),
        };
        // One after another: the first creates credproxy's CA in the shared directory.
        for i in 0..n {
            replicas.restart(i).await;
        }
        replicas
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// The `application_name` replica `i` connects to the database as.
    pub fn application(i: usize) -> String {
        format!("replica-{i}")
    }

    /// Replica `i`'s process; panics if it is down.
    pub fn replica(&self, i: usize) -> &ProxyProcess {
        &self.slot(i).process
    }

    /// Replica `i`'s admin API; panics if it is down.
    pub fn admin(&self, i: usize) -> &Admin {
        &self.slot(i).admin
    }

    fn slot(&self, i: usize) -> &Replica {
        self.replicas[i]
            .as_ref()
            .unwrap_or_else(|| panic!("replica {i} is down"))
    }

    /// Starts replica `i` (again) with the written config and waits until it listens.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} is running");
        let url = super::pg::with_param(&self.db_url, "application_name", &Self::application(i));
        let config = self.setup.dir.config_arg();
        let process =
            ProxyProcess::spawn(&self.setup.dir, &["run", "-c", &config], &self.env(&url)).await;
        let admin = Admin::new(process.admin_addr);
        self.replicas[i] = Some(Replica { process, admin });
    }

    /// SIGKILLs replica `i` and waits until it is gone; its slot stays empty until
    /// [`restart`](Self::restart).
    pub async fn kill(&mut self, i: usize) -> Exit {
        let replica = self.replicas[i]
            .take()
            .unwrap_or_else(|| panic!("replica {i} is down"));
        replica.process.kill().await
    }

    /// Runs `credproxy ARGS -c CONFIG` once, to completion, with the replicas' config and
    /// database (e.g. `check`, `token demo`).
    pub async fn run(&self, args: &[&str]) -> Output {
        let config = self.setup.dir.config_arg();
        let mut all = args.to_vec();
        all.extend(["-c", &config]);
        self.setup.dir.run(&all, &self.env(&self.db_url)).await
    }

    /// The environment of a process using the database at `url`.
    fn env<'a>(&'a self, url: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push((URL_VAR, url));
        env
    }

    /// `GET http://api.test<path>` through replica `i`'s proxy, on a fresh connection,
    /// tagged with [`REPLICA_HEADER`].
    pub async fn get(&self, i: usize, path: &str) -> Answer {
        Self::get_via(self.replica(i).proxy_addr, i, path).await
    }

    /// As [`get`](Self::get), given replica `i`'s `proxy_addr` (for a task of its own).
    pub async fn get_via(proxy: SocketAddr, i: usize, path: &str) -> Answer {
        let url = format!("http://{API_HOST}{path}");
        let tag = i.to_string();
        client::proxy_get(proxy, &url, &[(REPLICA_HEADER, &tag)]).await
    }

    /// The bearer token the API received, from its echo in a 200 answer.
    pub fn bearer(answer: &Answer) -> Option<String> {
        if answer.status != StatusCode::OK {
            return None;
        }
        let value = answer.json()["headers"]["authorization"][0].clone();
        value.as_str()?.strip_prefix("Bearer ").map(str::to_owned)
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
            if Self::bearer(&answer).is_some_and(|injected| at_least(&injected)) {
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

    /// Every running replica's `/metrics`.
    pub async fn metrics(&self) -> Vec<Scrape> {
        let mut scrapes = Vec::with_capacity(self.len());
        for replica in self.replicas.iter().flatten() {
            scrapes.push(replica.admin.metrics().await);
        }
        scrapes
    }

    /// Stops every running replica (SIGTERM, bounded wait; their logs are checked for
    /// leaked secrets) and returns how each ended.
    pub async fn stop_all(self) -> Vec<Exit> {
        let running: Vec<Replica> = self.replicas.into_iter().flatten().collect();
        for replica in &running {
            replica.process.terminate();
        }
        let mut exits = Vec::with_capacity(running.len());
        for replica in running {
            exits.push(replica.process.wait().await);
        }
        exits
    }
}
