//! credproxy keeps OAuth access tokens fresh (refresh_token grant, rotated
//! refresh tokens persisted before use) and injects them into API calls.
//!
//! # Layout
//! - `cli`, `commands`, `error`: the command line, one-shot commands, exit codes.
//! - `config` (+ `config/`): the TOML file, validated; `${VAR}`, durations, header templates.
//! - `secret`: the redacting type every token and client secret lives in.
//! - `oauth`: one refresh_token exchange with a token endpoint.
//! - `state`: the state file (atomic writes, 0600, cross-process lock).
//! - `tokens` (+ `tokens/`): per-integration `ArcSwap` token, single-flight refresh,
//!   the background refresher and its pure schedule.
//! - `routes`: host → route lookup.
//! - `ca`, `tls`: the local CA; TLS roots and provider for upstream connections.

pub mod ca;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod oauth;
pub mod routes;
pub mod secret;
pub mod state;
pub mod tls;
pub mod tokens;
