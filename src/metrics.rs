//! Prometheus metrics. Request-path counters are resolved to handles once per
//! route (and client) when the routing table is built, so a request increments
//! atomics and never allocates a label set. Token metrics are read from the
//! token store at scrape time. Labels are bounded: route, client and
//! integration names from the config, never raw hosts of unrouted traffic,
//! never paths.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::state::StoreMetrics;
use crate::tokens::Tokens;

/// The route label of requests that matched no route.
pub const UNROUTED: &str = "unrouted";

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    client: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<RouteLabels, Histogram>,
    retries: Family<RouteLabels, Counter>,
    connection_retries: Family<RetryLabels, Counter>,
    pub client_connections: Gauge,
    pub idle_client_connections: Gauge,
    pub refused_connections: Counter,
    tunnels: Family<KindLabels, Gauge>,
    pub cert_cache: CertCacheMetrics,
}

/// Per-route handles, resolved once per routing table.
#[derive(Clone)]
pub struct RouteMetrics {
    pub upstream_latency: Histogram,
    pub retries: Counter,
    /// Indexed by `RetryReason`.
    connection_retries: [Counter; RetryReason::ALL.len()],
}

/// Why a request was sent upstream a second time after a connection failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The upstream refused the h2 stream (REFUSED_STREAM).
    RefusedStream,
    /// The stream was above the last stream id of the upstream's GOAWAY.
    GoAway,
    /// The pooled connection had closed before any byte of the request was written.
    ClosedBeforeWrite,
    /// An idempotent request's reused connection closed before any response byte.
    ClosedBeforeResponse,
}

impl RetryReason {
    pub const ALL: [Self; 4] = [
        Self::RefusedStream,
        Self::GoAway,
        Self::ClosedBeforeWrite,
        Self::ClosedBeforeResponse,
    ];

    /// The metric label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RefusedStream => "refused_stream",
            Self::GoAway => "goaway",
            Self::ClosedBeforeWrite => "closed_before_write",
            Self::ClosedBeforeResponse => "closed_before_response",
        }
    }
}

/// One route's request counters for one client, indexed by status class:
/// 1xx .. 5xx. Resolved once per routing table.
#[derive(Clone)]
pub struct RequestCounters([Counter; 5]);

#[derive(Clone)]
pub struct CertCacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
}

#[derive(Clone, Copy)]
pub enum TunnelKind {
    Blind,
    Intercepted,
    /// A connection taken over after a 101 (WebSocket and other upgrades).
    Upgraded,
}

impl TunnelKind {
    const ALL: [Self; 3] = [Self::Blind, Self::Intercepted, Self::Upgraded];

    fn as_str(self) -> &'static str {
        match self {
            Self::Blind => "blind",
            Self::Intercepted => "intercepted",
            Self::Upgraded => "upgraded",
        }
    }
}

impl Metrics {
    /// `tokens` is read at each scrape (it is swapped on reload).
    pub fn new(tokens: Arc<ArcSwap<Tokens>>, store: &StoreMetrics) -> Self {
        let mut registry = Registry::with_prefix("credproxy");
        store.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, client and status class",
            requests.clone(),
        );
        let upstream_latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            upstream_latency.clone(),
        );
        let retries = Family::<RouteLabels, Counter>::default();
        registry.register(
            "retries_401",
            "Requests resent after a 401 and a forced refresh",
            retries.clone(),
        );
        let connection_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests resent on a fresh upstream connection, by route and reason",
            connection_retries.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Open client connections",
            client_connections.clone(),
        );
        let idle_client_connections = Gauge::default();
        registry.register(
            "idle_client_connections",
            "HTTP/1.1 client connections waiting for their next request with their buffers released",
            idle_client_connections.clone(),
        );
        let refused_connections = Counter::default();
        registry.register(
            "refused_connections",
            "Client connections refused at limits.max_connections",
            refused_connections.clone(),
        );
        let tunnels = Family::<KindLabels, Gauge>::default();
        registry.register(
            "tunnels",
            "Open tunnels: blind or intercepted CONNECT, and upgraded connections",
            tunnels.clone(),
        );
        // Every kind from the start: a dashboard shows 0, not "no data".
        for kind in TunnelKind::ALL {
            let _ = tunnels.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        let cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cert_cache",
            "Minted-certificate cache lookups",
            cache.clone(),
        );
        // The leaf cache increments the family's own counters. One statement
        // each: `get_or_create` returns a read guard, held to the statement's end.
        let hits = cache.get_or_create(&ResultLabels { result: "hit" }).clone();
        let misses = cache
            .get_or_create(&ResultLabels { result: "miss" })
            .clone();
        let cert_cache = CertCacheMetrics { hits, misses };
        registry.register_collector(Box::new(TokenCollector { tokens }));
        Self {
            registry,
            requests,
            upstream_latency,
            retries,
            connection_retries,
            client_connections,
            idle_client_connections,
            refused_connections,
            tunnels,
            cert_cache,
        }
    }

    pub fn route(&self, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        let upstream_latency = self.upstream_latency.get_or_create(&labels).clone();
        let retries = self.retries.get_or_create(&labels).clone();
        let connection_retries = RetryReason::ALL.map(|reason| {
            let labels = RetryLabels {
                route: route.to_owned(),
                reason: reason.as_str(),
            };
            self.connection_retries.get_or_create(&labels).clone()
        });
        RouteMetrics {
            upstream_latency,
            retries,
            connection_retries,
        }
    }

    /// The request counters of `route` for `client` (names from the config).
    pub fn requests(&self, route: &str, client: &str) -> RequestCounters {
        let class = |status_class| {
            let labels = RequestLabels {
                route: route.to_owned(),
                client: client.to_owned(),
                status_class,
            };
            self.requests.get_or_create(&labels).clone()
        };
        RequestCounters(["1xx", "2xx", "3xx", "4xx", "5xx"].map(class))
    }

    /// Counts an open tunnel until the returned guard drops.
    pub fn tunnel(&self, kind: TunnelKind) -> GaugeGuard {
        let labels = KindLabels {
            kind: kind.as_str(),
        };
        GaugeGuard::new(self.tunnels.get_or_create(&labels).clone())
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl RequestCounters {
    pub fn record(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[class].inc();
    }
}

impl RouteMetrics {
    pub fn retried(&self, reason: RetryReason) {
        self.connection_retries[reason as usize].inc();
    }
}

/// Increments a gauge now, decrements it on drop.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-integration refresh counts and token lifetimes, read at scrape time.
#[derive(Debug)]
struct TokenCollector {
    tokens: Arc<ArcSwap<Tokens>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    integration: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IntegrationLabels {
    integration: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    integration: String,
    grant: &'static str,
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let tokens = self.tokens.load();
        let now = OffsetDateTime::now_utc();
        let statuses: Vec<_> = tokens.iter().map(|i| i.status()).collect();

        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "refreshes",
            "Token refreshes by integration and outcome",
            None,
            counter.metric_type(),
        )?;
        for status in &statuses {
            for (outcome, count) in [
                ("ok", status.refresh_count),
                ("error", status.failure_count),
            ] {
                let labels = RefreshLabels {
                    integration: status.name.clone(),
                    outcome,
                };
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }

        // The Prometheus "info" idiom: join on `integration` to break any
        // series down by grant.
        let info = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "integration_info",
            "1 per integration, labelled with how its tokens are obtained",
            None,
            info.metric_type(),
        )?;
        for status in &statuses {
            let labels = GrantLabels {
                integration: status.name.clone(),
                grant: status.grant,
            };
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }

        let gauge = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "token_expires_in_seconds",
            "Seconds until the current access token expires (negative: expired)",
            None,
            gauge.metric_type(),
        )?;
        for status in &statuses {
            if let Some(expires_at) = status.expires_at {
                let labels = IntegrationLabels {
                    integration: status.name.clone(),
                };
                ConstGauge::new((expires_at - now).as_seconds_f64())
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
