//! `/metrics` of a running `credproxy run`, read with a strict Prometheus text parser (not
//! string matching): the exposition is valid 0.0.4 text, and its counters and gauges match
//! the traffic the test sent, with labels bounded to route names.

use http::StatusCode;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::prom::{self, Kind};
use crate::support::proxy::{API_HOST, ProxyOptions, ProxyProcess, Setup};

const REQUESTS: &str = "credproxy_requests_total";
const RETRIES: &str = "credproxy_retries_401_total";
const LATENCY: &str = "credproxy_upstream_latency_seconds";
const CONNECTIONS: &str = "credproxy_client_connections";
const TUNNELS: &str = "credproxy_tunnels";
const CERT_CACHE: &str = "credproxy_cert_cache_total";

/// A `credproxy run` holding its first token, and its admin API.
async fn started(options: ProxyOptions) -> (Setup, ProxyProcess, Admin) {
    let setup = Setup::start().await;
    let options = options.resolve("unrouted.test:80", setup.api.http_addr());
    let proxy = setup.spawn_proxy(&options).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    (setup, proxy, admin)
}

async fn stop(proxy: ProxyProcess) {
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
}

fn requests(scrape: &prom::Scrape, route: &str, class: &str) -> f64 {
    let labels = [("route", route), ("client", "-"), ("status_class", class)];
    scrape.get(REQUESTS, &labels)
}

#[test]
fn the_prometheus_parser_accepts_valid_text_and_rejects_malformed_lines() {
    let valid = "# HELP a_total Things, with a \\\\ and a \\n.\n# TYPE a_total counter\n\
        a_total{route=\"x\",class=\"q\\\"uote\"} 3\na_total 1 1700000000000\n\
        # some comment\n\n# TYPE g gauge\ng -1.5e3\n# TYPE h histogram\n\
        h_bucket{le=\"0.5\"} 1\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.9\nh_count 2\n\
        # TYPE u untyped\nu NaN\n";
    let scrape = prom::parse(valid).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        scrape.get("a_total", &[("route", "x"), ("class", "q\"uote")]),
        3.0
    );
    assert_eq!(scrape.get("g", &[]), -1500.0);
    assert_eq!(scrape.get("h_count", &[]), 2.0);
    assert_eq!(scrape.family("h").map(|f| f.kind), Some(Kind::Histogram));
    assert_eq!(
        scrape.family("a_total").and_then(|f| f.help.clone()),
        Some("Things, with a \\ and a \n.".to_owned())
    );

    let malformed = [
        ("no final line feed", "a 1"),
        ("bad metric name", "1a 1\n"),
        ("bad label name", "a{1x=\"v\"} 1\n"),
        ("unquoted label value", "a{x=v} 1\n"),
        ("bad escape", "a{x=\"\\t\"} 1\n"),
        ("unterminated labels", "a{x=\"v\" 1\n"),
        ("duplicate label", "a{x=\"1\",x=\"2\"} 1\n"),
        ("bad value", "a 1,5\n"),
        ("word value", "a infinity\n"),
        ("no value", "a{x=\"1\"}\n"),
        ("trailing text", "a 1 2 3\n"),
        ("unknown type", "# TYPE a countr\na 1\n"),
        ("second TYPE", "# TYPE a counter\n# TYPE a counter\na 1\n"),
        ("TYPE after samples", "a 1\n# TYPE a counter\n"),
        ("duplicate series", "a{x=\"1\"} 1\na{x=\"1\"} 2\n"),
        ("interleaved families", "a 1\nb 1\na{x=\"1\"} 1\n"),
        ("negative counter", "# TYPE a counter\na -1\n"),
        (
            "histogram without +Inf",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ),
        (
            "+Inf bucket is not the count",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
        ),
        (
            "buckets not cumulative",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 1\n\
             h_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
        ),
        (
            "histogram without _sum",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        ),
    ];
    for (what, text) in malformed {
        assert!(prom::parse(text).is_err(), "{what}: accepted {text:?}");
    }
}

/// Every family the operator documentation lists is present, typed, and described.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_with_every_documented_family() {
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    // One intercepted and one blind tunnel, so the tunnel family has series.
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let tls = client::tls(tunnel, API_HOST, config).await;

    let scrape = admin
        .wait_for_metrics("the intercepted tunnel is counted", |s| {
            s.value(TUNNELS, &[("kind", "intercepted")]) == Some(1.0)
        })
        .await;
    let expected = [
        (REQUESTS, Kind::Counter),
        (LATENCY, Kind::Histogram),
        (RETRIES, Kind::Counter),
        (CONNECTIONS, Kind::Gauge),
        ("credproxy_refused_connections_total", Kind::Counter),
        (TUNNELS, Kind::Gauge),
        (CERT_CACHE, Kind::Counter),
        ("credproxy_refreshes_total", Kind::Counter),
        ("credproxy_token_expires_in_seconds", Kind::Gauge),
    ];
    let mut problems = Vec::new();
    for (name, kind) in expected {
        match scrape.family(name) {
            Some(family) if family.kind == kind && family.help.is_some() => {}
            Some(family) => problems.push(format!(
                "{name}: type {:?}, help {:?}",
                family.kind, family.help
            )),
            None => problems.push(format!("{name}: missing")),
        }
    }
    let names: Vec<&str> = scrape.families.iter().map(|f| f.name.as_str()).collect();
    assert!(
        problems.is_empty(),
        "/metrics families: {problems:?}\nall families: {names:?}\n{}",
        scrape.text()
    );
    drop(tls);
    stop(proxy).await;
}

/// N plain requests → `requests_total{route, 2xx}` = N; one 401 retried → the retry
/// counter is 1 and the client's single request counts once; unrouted traffic is labelled
/// `unrouted`, never with its host or path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_retry_counters_match_the_traffic_sent() {
    const N: u64 = 5;
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    let before = admin.metrics().await;
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        assert_eq!(requests(&before, API_HOST, class), 0.0, "{}", before.text());
    }
    assert_eq!(before.get(RETRIES, &[("route", API_HOST)]), 0.0);

    for _ in 0..N {
        let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let scrape = admin.metrics().await;
    assert_eq!(
        requests(&scrape, API_HOST, "2xx"),
        N as f64,
        "{}",
        scrape.text()
    );
    for class in ["1xx", "3xx", "4xx", "5xx"] {
        assert_eq!(requests(&scrape, API_HOST, class), 0.0, "{}", scrape.text());
    }

    // The API now rejects the token: credproxy refreshes and resends once.
    setup.api.revoke(&setup.current_token());
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.api.unauthorized(), 1);
    let scrape = admin.metrics().await;
    assert_eq!(
        scrape.get(RETRIES, &[("route", API_HOST)]),
        1.0,
        "{}",
        scrape.text()
    );
    assert_eq!(
        requests(&scrape, API_HOST, "2xx"),
        (N + 1) as f64,
        "the client made one request: {}",
        scrape.text()
    );
    assert_eq!(requests(&scrape, API_HOST, "4xx"), 0.0, "{}", scrape.text());

    // Unrouted traffic (plain forward to a host without a route).
    let answer =
        client::proxy_get(proxy.proxy_addr, "http://unrouted.test/echo?id=12345", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let scrape = admin.metrics().await;
    assert_eq!(
        requests(&scrape, "unrouted", "2xx"),
        1.0,
        "{}",
        scrape.text()
    );
    assert_eq!(
        requests(&scrape, API_HOST, "2xx"),
        (N + 1) as f64,
        "{}",
        scrape.text()
    );
    let unbounded: Vec<_> = scrape
        .label_values()
        .into_iter()
        .filter(|(_, v)| v.contains("unrouted.test") || v.contains('/') || v.contains("12345"))
        .collect();
    assert!(
        unbounded.is_empty(),
        "raw hosts or paths in labels: {unbounded:?}"
    );
    stop(proxy).await;
}

/// Each request sent upstream is timed: N requests → the route's histogram counts N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_latency_histogram_counts_each_request_sent_upstream() {
    const N: u64 = 3;
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    for _ in 0..N {
        let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let scrape = admin.metrics().await;
    let count = scrape.get(&format!("{LATENCY}_count"), &[("route", API_HOST)]);
    let sum = scrape.get(&format!("{LATENCY}_sum"), &[("route", API_HOST)]);
    assert_eq!(
        count,
        N as f64,
        "{N} requests went upstream, the histogram counted {count}:\n{}",
        scrape.text()
    );
    assert!(sum > 0.0, "latency sum {sum}");

    // A retried request is sent twice; the histogram counts the sends (or at least the request).
    setup.api.revoke(&setup.current_token());
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let scrape = admin.metrics().await;
    let after = scrape.get(&format!("{LATENCY}_count"), &[("route", API_HOST)]);
    assert!(
        ((N + 1) as f64..=(N + 2) as f64).contains(&after),
        "after a retried request the histogram counts {after}"
    );
    stop(proxy).await;
}

/// An intercepted tunnel to `api.test`, kept open after one request inside it.
async fn intercepted_tunnel(
    setup: &Setup,
    proxy: &ProxyProcess,
) -> hyper::client::conn::http1::SendRequest<client::BoxedBody> {
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, API_HOST, config).await).await;
    let answer = client::send1(&mut h1, client::get("/echo", API_HOST, &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    h1
}

/// A blind tunnel to `unrouted.test` (no route), kept open after one request inside it.
async fn blind_tunnel(
    setup: &Setup,
    proxy: &ProxyProcess,
) -> hyper::client::conn::http1::SendRequest<client::BoxedBody> {
    let tunnel = client::connect(proxy.proxy_addr, "unrouted.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.ca.client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "unrouted.test", config).await).await;
    let answer = client::send1(&mut h1, client::get("/echo", "unrouted.test", &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    h1
}

/// A plain keep-alive connection, kept open after one absolute-form request.
async fn plain_connection(
    proxy: &ProxyProcess,
) -> hyper::client::conn::http1::SendRequest<client::BoxedBody> {
    let tcp = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .expect("connecting to the proxy");
    let mut h1 = client::h1(tcp).await;
    let answer = client::send1(&mut h1, client::get("http://api.test/echo", API_HOST, &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    h1
}

/// Minted certificates: the first interception of a host is a miss, every later one a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_cache_counts_one_miss_then_hits() {
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    let scrape = admin.metrics().await;
    assert_eq!(scrape.get(CERT_CACHE, &[("result", "miss")]), 0.0);
    assert_eq!(scrape.get(CERT_CACHE, &[("result", "hit")]), 0.0);
    for n in 1..=3 {
        drop(intercepted_tunnel(&setup, &proxy).await);
        let scrape = admin.metrics().await;
        assert_eq!(
            scrape.get(CERT_CACHE, &[("result", "miss")]),
            1.0,
            "{}",
            scrape.text()
        );
        assert_eq!(
            scrape.get(CERT_CACHE, &[("result", "hit")]),
            f64::from(n - 1),
            "{}",
            scrape.text()
        );
    }
    stop(proxy).await;
}

/// `credproxy_tunnels{kind}` counts the tunnels open now, and goes back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_gauges_follow_the_open_tunnels() {
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    let first = intercepted_tunnel(&setup, &proxy).await;
    let second = intercepted_tunnel(&setup, &proxy).await;
    let blind = blind_tunnel(&setup, &proxy).await;
    admin
        .wait_for_metrics("2 intercepted and 1 blind tunnel are counted", |s| {
            s.value(TUNNELS, &[("kind", "intercepted")]) == Some(2.0)
                && s.value(TUNNELS, &[("kind", "blind")]) == Some(1.0)
        })
        .await;
    drop(first);
    admin
        .wait_for_metrics("the closed intercepted tunnel is no longer counted", |s| {
            s.value(TUNNELS, &[("kind", "intercepted")]) == Some(1.0)
                && s.value(TUNNELS, &[("kind", "blind")]) == Some(1.0)
        })
        .await;
    drop((second, blind));
    admin
        .wait_for_metrics("every tunnel is closed", |s| {
            s.value(TUNNELS, &[("kind", "intercepted")]) == Some(0.0)
                && s.value(TUNNELS, &[("kind", "blind")]) == Some(0.0)
        })
        .await;
    stop(proxy).await;
}

/// `credproxy_client_connections` counts open client connections — plain keep-alive ones
/// and CONNECT tunnels alike — and is back to 0 once the clients closed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_gauge_counts_every_open_connection_and_returns_to_0() {
    let (setup, proxy, admin) = started(ProxyOptions::default()).await;
    assert_eq!(admin.metrics().await.get(CONNECTIONS, &[]), 0.0);

    let plain = vec![
        plain_connection(&proxy).await,
        plain_connection(&proxy).await,
    ];
    admin
        .wait_for_metrics("2 plain connections are counted", |s| {
            s.value(CONNECTIONS, &[]) == Some(2.0)
        })
        .await;
    let tunnels = vec![
        intercepted_tunnel(&setup, &proxy).await,
        blind_tunnel(&setup, &proxy).await,
    ];
    admin
        .wait_for_metrics(
            "2 plain connections and 2 CONNECT tunnels are counted as 4 client connections",
            |s| s.value(CONNECTIONS, &[]) == Some(4.0),
        )
        .await;

    drop(plain);
    drop(tunnels);
    admin
        .wait_for_metrics("every client connection is closed", |s| {
            s.value(CONNECTIONS, &[]) == Some(0.0)
        })
        .await;
    stop(proxy).await;
}
