//! credproxy keeps OAuth access tokens fresh (refresh_token grant, rotated
//! refresh tokens persisted before use) and injects them into API calls.
//!
//! # Layout
//! Layers, top to bottom; a module imports only from the layers below it.
//! - `cli`, `commands`, `app`, `exec`, `demo`: the command line, the one-shot
//!   commands, `credproxy run` (refreshers, proxy, sidecars and admin listener,
//!   graceful stop), `credproxy exec -- CMD` (the same, on a private port, for
//!   CMD alone), and the demo OAuth and API servers behind `credproxy demo`.
//! - `client_env`: the proxy and CA variables a program needs (`exec`, `env`).
//! - `signals`: SIGINT, SIGTERM and SIGHUP for the long-running commands.
//! - `admin` (+ `admin/`): health, readiness, integration status, forced refresh,
//!   metrics, reload, and the HTML status page (`page`, its route `figures` read
//!   from the metrics text, `status.js`/`status.css`).
//! - `live`: the running process as the admin API and a reload see it.
//! - `error`: the top-level error and its exit codes.
//! - `authorize`: `credproxy authorize`, the authorization-code flow with PKCE.
//! - `proxy` (+ `proxy/`): the forward proxy: client authentication and routes,
//!   CONNECT interception or tunnel, injection, upstream pool, the dialer that
//!   applies `egress` to unrouted traffic, 401 retry, upgrades (WebSocket)
//!   relayed as tunnels, error responses, the per-request log line.
//! - `server`: accept loops and graceful shutdown.
//! - `ca` (+ `ca/mint`): the local CA and the leaf certificates minted from it.
//! - `metrics`: Prometheus counters, histograms and gauges.
//! - `tokens` (+ `tokens/`): per-integration `ArcSwap` token, single-flight refresh,
//!   the background refresher and its pure schedule.
//! - `oauth` (+ `oauth/`): one token request by the integration's grant
//!   (refresh_token, client_credentials, jwt_bearer assertions, GitHub App
//!   installation tokens, static).
//! - `state` (+ `state/`): the state store seam and its two stores — `file` (atomic
//!   writes, 0600, `flock`) and `postgres` (many replicas: database lock, revision
//!   compare-and-set, LISTEN/NOTIFY, schema migration; `url`: libpq URL and TLS) — and
//!   their `metrics`; `seal`/`sealed`: AES-256-GCM sealing of every stored token under
//!   `[state] key`, wrapped around the store.
//! - `tls`: the crypto provider and root store for outbound TLS.
//! - `config` (+ `config/`): the TOML file, validated; one file per section
//!   (proxy, upstream, integration, routes, state, ca, limits), `${VAR}` and
//!   `${file:PATH}`, durations, header and query templates.
//! - `egress`: where unrouted traffic may go (`proxy.allow`, `proxy.block`); pure.
//! - `routes`: host → route lookup.
//! - `jws`: private keys parsed from PEM; compact JWS signatures (RS256, ES256).
//! - `secret`: the redacting types every token, client secret and the state key
//!   live in.
//! - `body`: the one HTTP body type every listener and client uses.
//! - `report`: an error and its causes as one line.
//! - `log_writer`: the thread that writes log lines to stderr in batches.

pub mod admin;
pub mod app;
pub mod authorize;
pub mod body;
pub mod ca;
pub mod cli;
pub mod client_env;
pub mod commands;
pub mod config;
pub mod demo;
pub mod egress;
pub mod error;
pub mod exec;
pub mod jws;
pub mod live;
pub mod log_writer;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod report;
pub mod routes;
pub mod secret;
pub mod server;
pub mod signals;
pub mod state;
pub mod tls;
pub mod tokens;
