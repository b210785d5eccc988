//! The state store's metrics: operations and errors by kind, and how long a
//! refresh waited for its integration's lock (another process's refresh, or
//! the database). The store records them; `crate::metrics` registers them.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::StateError;

const LOCK_WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: &'static str,
    kind: &'static str,
}

#[derive(Clone)]
pub struct StoreMetrics {
    operations: Family<OpLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    lock_wait: Histogram,
    up: Gauge,
}

impl StoreMetrics {
    pub fn new() -> Self {
        let up = Gauge::default();
        up.set(1);
        Self {
            operations: Family::default(),
            errors: Family::default(),
            lock_wait: Histogram::new(LOCK_WAIT_BUCKETS),
            up,
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "state_operations",
            "State store operations (load, list, lock, save, connect), by operation",
            self.operations.clone(),
        );
        registry.register(
            "state_errors",
            "Failed state store operations, by operation and kind (unreachable, timeout, query, conflict, io, corrupt)",
            self.errors.clone(),
        );
        registry.register(
            "state_lock_wait_seconds",
            "Time a refresh waited for its integration's lock in the state store",
            self.lock_wait.clone(),
        );
        registry.register(
            "state_store_up",
            "1 while the state store is reachable, 0 after an attempt to reach it failed",
            self.up.clone(),
        );
    }

    /// Counts one operation and, if it failed, its error.
    pub fn record<T>(&self, op: &'static str, result: &Result<T, StateError>) {
        self.operations.get_or_create(&OpLabels { op }).inc();
        if let Err(error) = result {
            let kind = error.kind();
            self.errors.get_or_create(&ErrorLabels { op, kind }).inc();
        }
    }

    pub fn lock_waited(&self, waited: Duration) {
        self.lock_wait.observe(waited.as_secs_f64());
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}
