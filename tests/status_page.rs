//! The status page (`GET /` on the admin listener) as a person sees it, in a real headless
//! chromium: every integration and its state, a failing provider's error shown as inert
//! text, "Refresh now" reaching the token endpoint exactly once (with JavaScript, and as a
//! plain form without it), the live update, and a screenshot. Over plain HTTP: the CSP
//! header, no secret in the HTML, the CSRF guard, the admin token as a Basic password.
//! And the Grafana dashboard shipped in `config/deploy/` queries only metrics that exist.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine;
use credproxy::tokens::Health;
use http::StatusCode;
use serde_json::{Value, json};

use crate::support::admin::Admin;
use crate::support::browser::Browser;
use crate::support::cli::assert_no_secrets;
use crate::support::client;
use crate::support::prom::Kind;
use crate::support::proxy::{INTEGRATION, InProcess, ProxyOptions, Setup, integration_toml};
use crate::support::token::{self, Failure, TokenServer};
use crate::support::wait;

const ADMIN_TOKEN: &str = "admin-token-5d1c9e0b7a";
/// The failing integration: its provider answers every refresh with this description.
const BROKEN: &str = "broken";
/// Attacker-influenced text: HTML that would run script if it were not escaped.
const PAYLOAD: &str =
    r#"<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> & 'quotes'"#;

/// credproxy with two integrations: `demo` (healthy) and `broken` (its provider refuses
/// the grant with [`PAYLOAD`] as the description), an admin token, and one request
/// through the route so the route table has figures.
struct Running {
    setup: Setup,
    broken: TokenServer,
    broken_rt: String,
    proxy: InProcess,
}

impl Running {
    async fn start() -> Self {
        let setup = Setup::start().await;
        let broken_rt = token::new_refresh_token(100);
        let broken = TokenServer::start(&setup.ca, &broken_rt).await;
        broken.fail_next(
            1000,
            Failure::Described {
                error: "invalid_grant",
                description: PAYLOAD.to_owned(),
            },
        );
        let options = ProxyOptions::default()
            .admin_token(ADMIN_TOKEN)
            .extra(&integration_toml(BROKEN, &broken, &broken_rt, None));
        let proxy = setup.start_proxy(&options).await;
        let tokens = proxy.tokens();
        wait::until("the broken integration has failed", || {
            tokens
                .get(BROKEN)
                .is_some_and(|i| i.status().state == Health::Failed)
        })
        .await;
        let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        Self {
            setup,
            broken,
            broken_rt,
            proxy,
        }
    }

    fn admin(&self) -> Admin {
        Admin::with_token(self.proxy.admin_addr, ADMIN_TOKEN)
    }

    /// Everything secret this setup knows of.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![
            ADMIN_TOKEN.to_owned(),
            self.setup.rt0.clone(),
            self.setup.tokens.client_secret(),
            self.setup.current_token(),
            self.broken_rt.clone(),
            self.broken.client_secret(),
        ];
        secrets.extend(self.setup.tokens.latest_refresh_token());
        secrets
    }

    async fn stop(self) {
        self.proxy.stop().await;
    }
}

/// A browser that sends the admin token, on the status page, which shows every
/// integration and its state.
async fn open_page(running: &Running, javascript: bool) -> Browser {
    let mut browser = Browser::launch().await;
    browser
        .set_header("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
        .await;
    if !javascript {
        browser.disable_javascript().await;
    }
    browser.open(&running.proxy.admin_url("/")).await;
    let rows = "[...document.querySelectorAll('#integrations tbody tr')]\
        .map(r => [r.querySelector('.name').textContent, r.querySelector('.grant').textContent, r.dataset.state]).sort()";
    assert_eq!(
        browser.eval(rows).await,
        json!([
            [BROKEN, "refresh_token", "failed"],
            [INTEGRATION, "refresh_token", "ok"]
        ])
    );
    browser
}

fn demo_cell(selector: &str) -> String {
    format!("document.querySelector('#integration-{INTEGRATION} {selector}').textContent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_browser_shows_every_integration_and_refresh_now_refreshes_once() {
    let running = Running::start().await;
    let mut browser = open_page(&running, true).await;
    // The failing provider's message is on the page, as text: no element was made from
    // it and nothing in it ran.
    let error = browser
        .eval(&format!(
            "document.querySelector('#integration-{BROKEN} td.error').textContent"
        ))
        .await;
    let error = error.as_str().unwrap_or_default();
    assert!(error.contains(PAYLOAD), "{error}");
    assert!(error.contains("invalid_grant"), "{error}");
    assert_eq!(
        browser
            .eval(&format!(
                "document.querySelectorAll('#integration-{BROKEN} td.error *').length"
            ))
            .await,
        json!(0)
    );
    assert_eq!(
        browser.eval("window.__xss === undefined").await,
        json!(true)
    );
    // The route table: the request made at the start, answered 2xx, with a latency.
    let route = browser
        .eval("[...document.querySelectorAll('#routes tbody tr td')].map(td => td.textContent)")
        .await;
    assert_eq!(route[0], "api.test", "{route}");
    assert_eq!(route[1], INTEGRATION, "{route}");
    assert_eq!(route[3], "1", "2xx column: {route}");
    assert_ne!(route[7], "—", "p50: {route}");

    // "Refresh now": exactly one call to the token endpoint, and the row shows it.
    let calls = running.setup.tokens.calls();
    assert_eq!(browser.eval(&demo_cell("td.count")).await, json!("1"));
    browser
        .eval(&format!(
            "document.querySelector('#integration-{INTEGRATION} button').click()"
        ))
        .await;
    browser
        .wait_for(&format!(
            "document.getElementById('notice').textContent === 'Refreshed {INTEGRATION}.'"
        ))
        .await;
    browser
        .wait_for(&format!("{} === '2'", demo_cell("td.count")))
        .await;
    assert_eq!(running.setup.tokens.calls(), calls + 1);

    // Live update: a refresh made elsewhere shows up without reloading the page.
    let answer = running.admin().force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    browser
        .wait_for(&format!("{} === '3'", demo_cell("td.count")))
        .await;
    assert_eq!(
        browser.eval(&demo_cell(".spark")).await,
        json!(""),
        "the sparkline is marks, not text"
    );
    assert_eq!(
        browser
            .eval(&format!(
                "document.querySelectorAll('#integration-{INTEGRATION} .spark i.ok').length"
            ))
            .await,
        json!(3)
    );

    let shot = browser
        .screenshot(&running.setup.dir.path().join("status-page.png"), true)
        .await;
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000);
    drop(browser);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_refresh_now_is_a_form_that_posts_and_comes_back() {
    let running = Running::start().await;
    let mut browser = open_page(&running, false).await;

    let calls = running.setup.tokens.calls();
    browser
        .navigate_by(&format!(
            "document.querySelector('#integration-{INTEGRATION} button').click()"
        ))
        .await;
    assert_eq!(
        browser.eval("location.pathname + location.search").await,
        json!(format!("/?refreshed={INTEGRATION}"))
    );
    assert_eq!(
        browser
            .eval("document.getElementById('notice').textContent")
            .await,
        json!(format!("Refreshed {INTEGRATION}."))
    );
    assert_eq!(browser.eval(&demo_cell("td.count")).await, json!("2"));
    assert_eq!(running.setup.tokens.calls(), calls + 1);

    // The failing one comes back with a failure notice; its row keeps the error.
    browser
        .navigate_by(&format!(
            "document.querySelector('#integration-{BROKEN} button').click()"
        ))
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('notice').textContent")
            .await,
        json!(format!("Refreshing {BROKEN} failed: see its last error."))
    );
    drop(browser);
    running.stop().await;
}

/// The bytes of the page: the CSP header, escaped provider text, no secret anywhere, and
/// the script and style it loads served by the listener itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_has_a_strict_csp_escapes_provider_text_and_holds_no_secret() {
    let running = Running::start().await;
    let admin = running.admin();
    let page = admin.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    let csp = page
        .header("content-security-policy")
        .expect("a CSP header");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(
        page.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let html = &page.text;

    assert!(
        !html.contains("<script>window"),
        "raw provider HTML: {html}"
    );
    assert!(!html.contains("<img"), "raw provider HTML: {html}");
    assert!(
        html.contains("&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;"),
        "{html}"
    );
    // No inline script or style for the CSP to have to block.
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
    let secrets = running.secrets();
    assert_no_secrets(
        html,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    for (path, content_type) in [
        ("/status.js", "text/javascript; charset=utf-8"),
        ("/status.css", "text/css; charset=utf-8"),
    ] {
        assert!(
            html.contains(&format!("\"{}\"", &path[1..])),
            "{path} not linked"
        );
        let asset = admin.get(path).await;
        assert_eq!(asset.status, StatusCode::OK, "{path}");
        assert_eq!(asset.content_type.as_deref(), Some(content_type), "{path}");
    }
    running.stop().await;
}

/// A browser keeps Basic credentials and sends them from any site's page: a POST that a
/// browser marks as cross-site is refused before anything is refreshed; curl, which marks
/// nothing, and the page's own posts pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_post_is_refused_before_any_refresh() {
    let running = Running::start().await;
    let http = client::reqwest_direct_no_redirects();
    let url = running
        .proxy
        .admin_url(&format!("/integrations/{INTEGRATION}/refresh"));
    let own_origin = format!("http://{}", running.proxy.admin_addr);
    let calls = running.setup.tokens.calls();
    for headers in [
        vec![
            ("sec-fetch-site", "cross-site"),
            ("origin", "http://evil.test"),
        ],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "http://evil.test")],
        vec![("origin", "null")],
    ] {
        let mut request = http.post(&url).bearer_auth(ADMIN_TOKEN);
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{headers:?}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"], "cross_site_request", "{headers:?}");
    }
    assert_eq!(running.setup.tokens.calls(), calls, "nothing refreshed");

    // The page's own form (no JavaScript): same origin, wants HTML → 303 back to the page.
    let answer = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("origin", &own_origin)
        .header("sec-fetch-site", "same-origin")
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        answer.headers()[http::header::LOCATION],
        format!("../../?refreshed={INTEGRATION}").as_str()
    );
    // A script (no browser headers) gets the JSON answer as before.
    let answer = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(running.setup.tokens.calls(), calls + 2);
    running.stop().await;
}

/// Without `admin.token`, a page whose host name was re-pointed at 127.0.0.1 (DNS
/// rebinding) would be same-origin with the admin listener: only loopback names are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_a_loopback_host_is_served() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let calls = setup.tokens.calls();
    let admin = proxy.admin_addr;
    let exchange =
        |request: String| async move { client::raw_exchange(admin, request.as_bytes()).await };
    for host in ["evil.test:9090", "127.0.0.1.evil.test", "10.0.0.1"] {
        for request in [
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            format!(
                "POST /integrations/{INTEGRATION}/refresh HTTP/1.1\r\nHost: {host}\r\n\
                 Origin: http://{host}\r\nSec-Fetch-Site: same-origin\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        ] {
            let answer = exchange(request).await;
            assert!(answer.starts_with("HTTP/1.1 403"), "Host {host}: {answer}");
            assert!(answer.contains("host_not_allowed"), "Host {host}: {answer}");
        }
    }
    assert_eq!(setup.tokens.calls(), calls, "nothing refreshed");
    for host in [
        "127.0.0.1:9090",
        "localhost:9090",
        "[::1]:9090",
        "LOCALHOST",
    ] {
        let answer = exchange(format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "Host {host}: {answer}");
    }
    // Probes answer whatever the name (a kubelet uses the pod's address).
    let answer =
        exchange("GET /healthz HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n".into())
            .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.stop().await;
}

/// The header names the state store (kind and location) and whether its tokens are sealed
/// at rest; the key itself is not on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_names_the_state_store_and_whether_it_is_sealed() {
    let setup = Setup::start().await;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let location = setup.dir.state_path().display().to_string();
    for (key_line, shown) in [
        (None, "not sealed"),
        (Some(format!("key = \"{key}\"")), "sealed"),
    ] {
        let mut config = setup.config(&ProxyOptions::default());
        if let Some(line) = &key_line {
            config = config.state_line(line);
        }
        let proxy = InProcess::start(&config.load(&setup.dir)).await;
        let page = Admin::new(proxy.admin_addr).get("/").await;
        let store = format!("<span id=\"store\">file {location}, {shown}</span>");
        assert!(page.text.contains(&store), "{store} not in {}", page.text);
        assert_no_secrets(&page.text, &[&key]);
        proxy.stop().await;
    }
}

/// A browser cannot send a bearer token; it can send Basic, after asking the person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_may_send_the_admin_token_as_a_basic_password() {
    let running = Running::start().await;
    let http = client::reqwest_direct();
    let url = running.proxy.admin_url("/");
    let answer = http.get(&url).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    let challenges: Vec<&str> = answer
        .headers()
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(challenges[0], "Bearer");
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic realm=")),
        "{challenges:?}"
    );
    for (password, status) in [
        ("wrong", StatusCode::UNAUTHORIZED),
        (ADMIN_TOKEN, StatusCode::OK),
    ] {
        let answer = http
            .get(&url)
            .basic_auth("anyone", Some(password))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "password {password}");
    }
    running.stop().await;
}

/// `config/deploy/grafana-dashboard.json` parses, and every `credproxy_*` series it
/// queries is one that `/metrics` exposes (a family's name, or its histogram series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 8,
        "too few queries in {}: {queries:?}",
        path.display()
    );
    let queried: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();

    let running = Running::start().await;
    let scrape = running.admin().metrics().await;
    let mut exposed = BTreeSet::new();
    for family in &scrape.families {
        let suffixes: &[&str] = match family.kind {
            Kind::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        exposed.extend(suffixes.iter().map(|s| format!("{}{s}", family.name)));
        exposed.extend(family.samples.iter().map(|s| s.name.clone()));
    }
    let missing: Vec<_> = queried.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "queried but not in /metrics: {missing:?}\n{}",
        scrape.text()
    );
    for wanted in [
        "credproxy_requests_total",
        "credproxy_upstream_latency_seconds_bucket",
        "credproxy_refreshes_total",
        "credproxy_token_expires_in_seconds",
        "credproxy_client_connections",
        "credproxy_retries_401_total",
    ] {
        assert!(
            queried.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
    running.stop().await;
}

/// Every PromQL expression in the dashboard: panel targets' `expr` and template queries.
fn collect_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", Value::String(query)) => out.push(query.clone()),
                    _ => collect_queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

/// The `credproxy_…` identifiers in a query.
fn metric_names(query: &str) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("credproxy_"))
        .map(str::to_owned)
        .collect()
}
