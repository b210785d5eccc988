//! credproxy keeps OAuth access tokens fresh (refresh_token grant, rotated
//! refresh tokens persisted before use) and injects them into API calls.
//!
//! # Layout
//! - `cli`, `commands`, `error`: the command line, one-shot commands, exit codes.
//! - `config` (+ `config/`): the TOML file, validated; one file per section
//!   (proxy, upstream, integration, routes, state, ca, limits), `${VAR}`,
//!   durations, header templates.
//! - `secret`: the redacting type every token and client secret lives in.
//! - `oauth`: one refresh_token exchange with a token endpoint.
//! - `state`: the state file (atomic writes, 0600, cross-process lock).
//! - `tokens` (+ `tokens/`): per-integration `ArcSwap` token, single-flight refresh,
//!   the background refresher and its pure schedule.
//! - `routes`: host → route lookup.
//! - `ca` (+ `ca/mint`): the local CA and the leaf certificates minted from it.
//! - `tls`: the crypto provider and root store for outbound TLS.
//! - `app`: `credproxy run` — refreshers, proxy and admin listener, graceful stop.
//! - `proxy` (+ `proxy/`): the forward proxy: CONNECT interception or tunnel,
//!   injection, upstream pool, 401 retry, error responses.
//! - `admin`: health, readiness, integration status, forced refresh, metrics, reload.
//! - `metrics`: Prometheus counters, histograms and gauges.
//! - `server`: accept loops and graceful shutdown.
//! - `demo`: the demo OAuth and API servers behind `credproxy demo`.

pub mod admin;
pub mod app;
pub mod authorize;
pub mod ca;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod routes;
pub mod secret;
pub mod server;
pub mod state;
pub mod tls;
pub mod tokens;
