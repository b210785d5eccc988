//! `[limits]`: bounds on what clients can make the proxy hold.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Validator};

pub(super) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub(super) const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub(super) const DEFAULT_MAX_HEADERS: usize = 100;
pub(super) const DEFAULT_HEADER_READ_TIMEOUT: &str = "30s";
pub(super) const DEFAULT_TUNNEL_IDLE_TIMEOUT: &str = "10m";

/// Bounds on what clients can make the proxy hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections (proxy and sidecar listeners together).
    pub max_connections: usize,
    /// Bytes of one request head (request line + headers).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// A client must send a complete request head within this time; an
    /// HTTP/1.1 keep-alive connection waiting for its next request is waiting
    /// for a head too, so this is also the idle timeout.
    pub header_read_timeout: Duration,
    /// A blind tunnel with no bytes either way is closed after this.
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<usize>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_headers: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) tunnel_idle_timeout: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let max_header_bytes = self.count(
            "limits.max_header_bytes",
            raw.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES,
        )?;
        if max_header_bytes < 8192 {
            return Err(self.err("limits.max_header_bytes", "must be at least 8192"));
        }
        Ok(Limits {
            max_connections: self.count(
                "limits.max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            max_header_bytes,
            max_headers: self.count("limits.max_headers", raw.max_headers, DEFAULT_MAX_HEADERS)?,
            header_read_timeout: self.duration(
                "limits.header_read_timeout",
                raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            tunnel_idle_timeout: self.duration(
                "limits.tunnel_idle_timeout",
                raw.tunnel_idle_timeout,
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
        })
    }
}
