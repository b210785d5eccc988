//! Host → route lookup: exact hosts and `*.` wildcards, built once per config.
//!
//! The most specific match wins: an exact host before any wildcard, a longer
//! wildcard suffix before a shorter one. A wildcard does not match its bare
//! domain, and IP addresses never match: credentials are bound to host names.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

#[derive(Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let host = normalize(text);
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(rest) => (Self::Wildcard(format!(".{rest}")), rest),
            None => (Self::Exact(host.clone()), host.as_str()),
        };
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{text:?} is an IP address; routes match host names only"
            ));
        }
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.is_empty() || !name.split('.').all(valid_label) {
            return Err(format!(
                "{text:?} is not a host name or a \"*.\" wildcard like \"*.example.com\""
            ));
        }
        Ok(pattern)
    }

    /// Whether `host` (already normalized) matches: a wildcard matches
    /// subdomains, not its bare domain; IP addresses match nothing.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == host,
            Self::Wildcard(suffix) => host.parse::<IpAddr>().is_err() && under(suffix, host),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(host) => f.write_str(host),
            Self::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Lower-cases a host and drops a trailing dot, so `API.Example.com.` routes
/// like `api.example.com`.
pub fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host` is a subdomain of the wildcard's `suffix` (".example.com").
fn under(suffix: &str, host: &str) -> bool {
    host.len() > suffix.len() && host.ends_with(suffix)
}

/// Maps a host to the index of its route in the config's route list.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, usize>,
    /// Longest suffix first, so the first match is the most specific.
    wildcards: Vec<(String, usize)>,
}

impl RouteTable {
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a HostPattern>) -> Self {
        let mut table = Self::default();
        for (index, pattern) in patterns.into_iter().enumerate() {
            match pattern {
                HostPattern::Exact(host) => {
                    table.exact.insert(host.clone(), index);
                }
                HostPattern::Wildcard(suffix) => table.wildcards.push((suffix.clone(), index)),
            }
        }
        table
            .wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        table
    }

    /// The route index for `host` (already normalized), if any.
    pub fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(&index) = self.exact.get(host) {
            return Some(index);
        }
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| under(suffix, host))
            .map(|&(_, index)| index)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table(hosts: &[&str]) -> RouteTable {
        let patterns: Vec<_> = hosts
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect();
        RouteTable::new(&patterns)
    }

    #[test]
    fn exact_beats_wildcard_and_longer_suffix_wins() {
        let t = table(&["*.example.com", "api.example.com", "*.eu.example.com"]);
        assert_eq!(t.lookup("api.example.com"), Some(1));
        assert_eq!(t.lookup("x.eu.example.com"), Some(2));
        assert_eq!(t.lookup("a.b.example.com"), Some(0));
    }

    #[test]
    fn wildcard_does_not_match_bare_domain_or_lookalikes() {
        let t = table(&["*.example.com"]);
        assert_eq!(t.lookup("example.com"), None);
        assert_eq!(t.lookup("badexample.com"), None);
        assert_eq!(t.lookup(".example.com"), None);
    }

    #[test]
    fn parse_normalizes_and_rejects_ips() {
        assert_eq!(
            HostPattern::parse("API.Example.com.").unwrap(),
            HostPattern::Exact("api.example.com".into())
        );
        for bad in ["127.0.0.1", "*.1.2.3.4", "", "a b", "*.", "::1"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
