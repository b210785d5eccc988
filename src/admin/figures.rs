//! Per-route figures for the status page, read from the Prometheus text that
//! `/metrics` serves: the page shows exactly what a scrape shows, summed over
//! any label other than the route (a histogram's buckets cannot be read back
//! from `prometheus-client`, and labels may be added to a family later).

use std::collections::BTreeMap;

const REQUESTS: &str = "credproxy_requests_total";
const RETRIES_401: &str = "credproxy_retries_401_total";
const RESENDS: &str = "credproxy_upstream_retries_total";
const LATENCY_BUCKET: &str = "credproxy_upstream_latency_seconds_bucket";

/// The status classes the requests counter knows, in column order.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RouteFigures {
    /// Requests answered, by status class (`STATUS_CLASSES` order).
    pub requests: [f64; 5],
    pub retries_401: f64,
    /// Requests resent on a fresh upstream connection (any reason).
    pub resends: f64,
    /// Upstream latency quantiles in seconds; None before the first request.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Figures by route label.
pub fn by_route(exposition: &str) -> BTreeMap<String, RouteFigures> {
    let mut figures: BTreeMap<String, RouteFigures> = BTreeMap::new();
    // Cumulative bucket counts by route and upper bound, summed over other labels.
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in exposition.lines().filter_map(Sample::parse) {
        let Some(route) = sample.label("route") else {
            continue;
        };
        match sample.name {
            REQUESTS => {
                let class = sample.label("status_class");
                if let Some(index) = STATUS_CLASSES.iter().position(|c| Some(*c) == class) {
                    figures.entry(route.to_owned()).or_default().requests[index] += sample.value;
                }
            }
            RETRIES_401 => figures.entry(route.to_owned()).or_default().retries_401 += sample.value,
            RESENDS => figures.entry(route.to_owned()).or_default().resends += sample.value,
            LATENCY_BUCKET => {
                let Some(le) = sample.label("le").and_then(parse_float) else {
                    continue;
                };
                let route_buckets = buckets.entry(route.to_owned()).or_default();
                match route_buckets.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, count)) => *count += sample.value,
                    None => route_buckets.push((le, sample.value)),
                }
            }
            _ => {}
        }
    }
    for (route, mut route_buckets) in buckets {
        route_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let entry = figures.entry(route).or_default();
        entry.p50 = quantile(0.5, &route_buckets);
        entry.p99 = quantile(0.99, &route_buckets);
    }
    figures
}

/// PromQL's `histogram_quantile`: linear interpolation inside the bucket the
/// rank falls in; the highest finite bound when it falls in `+Inf`.
/// `buckets` are (upper bound, cumulative count), sorted by bound.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let into = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * into);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// One sample line: `name{label="value",...} value`.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.trim_end().rsplit_once(' ')?;
        let value = parse_float(value)?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
            None => (series, Vec::new()),
        };
        Some(Self {
            name,
            labels,
            value,
        })
    }

    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `a="x",b="y\"z"` → pairs, with `\\`, `\"` and `\n` unescaped.
fn parse_labels(text: &str) -> Option<Vec<(&str, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (index, '"') => break index,
                (_, c) => value.push(c),
            }
        };
        labels.push((name.trim_start_matches(','), value));
        rest = &after[end + 1..];
    }
    Some(labels)
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP credproxy_requests Requests answered, by route and status class.
# TYPE credproxy_requests counter
credproxy_requests_total{route="api.test",status_class="2xx",client="a"} 3
credproxy_requests_total{route="api.test",status_class="2xx",client="b"} 4
credproxy_requests_total{route="api.test",status_class="5xx",client="a"} 1
credproxy_requests_total{route="we\"ird\\",status_class="4xx"} 2
credproxy_retries_401_total{route="api.test"} 5
credproxy_upstream_retries_total{route="api.test",reason="goaway"} 2
credproxy_upstream_retries_total{route="api.test",reason="refused_stream"} 1
credproxy_upstream_latency_seconds_sum{route="api.test"} 1.0
credproxy_upstream_latency_seconds_count{route="api.test"} 10
credproxy_upstream_latency_seconds_bucket{le="0.1",route="api.test"} 0
credproxy_upstream_latency_seconds_bucket{le="0.2",route="api.test"} 10
credproxy_upstream_latency_seconds_bucket{le="+Inf",route="api.test"} 10
credproxy_upstream_latency_seconds_bucket{le="0.1",route="slow"} 0
credproxy_upstream_latency_seconds_bucket{le="+Inf",route="slow"} 2
# EOF
"#;

    mod by_route {
        use super::*;

        #[test]
        fn sums_requests_over_other_labels_by_status_class() {
            let figures = by_route(TEXT);
            assert_eq!(figures["api.test"].requests, [0.0, 7.0, 0.0, 0.0, 1.0]);
            assert_eq!(figures["api.test"].retries_401, 5.0);
            assert_eq!(figures["api.test"].resends, 3.0);
        }

        #[test]
        fn unescapes_label_values() {
            assert_eq!(by_route(TEXT)["we\"ird\\"].requests[3], 2.0);
        }

        #[test]
        fn interpolates_quantiles_inside_the_bucket() {
            let figures = &by_route(TEXT)["api.test"];
            let p50 = figures.p50.unwrap_or_default();
            let p99 = figures.p99.unwrap_or_default();
            assert!((p50 - 0.15).abs() < 1e-9, "{p50}");
            assert!((p99 - 0.199).abs() < 1e-9, "{p99}");
        }

        #[test]
        fn a_rank_in_the_inf_bucket_is_the_highest_finite_bound() {
            assert_eq!(by_route(TEXT)["slow"].p50, Some(0.1));
        }

        #[test]
        fn no_quantile_before_the_first_observation() {
            let text = "credproxy_upstream_latency_seconds_bucket{route=\"idle\",le=\"+Inf\"} 0\n";
            assert_eq!(by_route(text)["idle"].p99, None);
        }
    }
}
