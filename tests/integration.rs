#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod support;
mod support_selftest;

// Issue 3: the token lifecycle, one concern per module.
mod commands;
mod config_errors;
mod crash;
mod refresher;
mod secrets;
mod single_flight;
mod state_file;

// Issue 4: the proxy, driven by real clients against real servers on loopback.
mod admin;
mod proxy_clients;
mod proxy_curl;
mod proxy_errors;
mod proxy_retry;
mod proxy_shutdown;
mod proxy_streaming;
mod proxy_tunnel;
mod upstream_selftest;

// Issue 4: the one-command demo.
mod demo;

// Issue 6: operations — admin API, metrics, logs, live reload, limits, sidecars.
mod ops_admin;
mod ops_limits;
mod ops_logs;
mod ops_metrics;
mod ops_reload;
mod ops_secrets;
mod ops_sidecar;

// Issue 7: `credproxy authorize`, the authorization-code flow with PKCE.
mod authorize;

// Issue 18: WebSockets and other upgrades through interception; streaming responses.
mod proxy_websocket;

// Issue 13: who may use which credential, and where unrouted traffic may go.
mod proxy_client_routes;
mod proxy_egress;

// Issue 13: a name-constrained local CA.
mod ca_constrained;

// Issue 17: the status page and the Grafana dashboard.
mod status_page;

// Issue 12: secrets at rest — sealed state, secrets from files, key rotation.
mod sealed_state;

// Issue 15: `credproxy exec -- CMD` and `credproxy env`.
mod exec;

// Issue 11: upstream connections: resends, visible causes, no spinning on EMFILE.
mod proxy_idle;
mod upstream_errors;
mod upstream_exhausted;
mod upstream_pool;
mod upstream_resend;

// Issue 14: grants beyond refresh tokens, and query injection.
mod grants;
// Issue 10: the PostgreSQL state store, many replicas sharing one grant.
mod state_postgres;
mod state_postgres_chaos;
mod state_postgres_replicas;
