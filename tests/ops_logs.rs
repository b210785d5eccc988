//! Logs for machines: `credproxy --log-format json run` writes one JSON object per line,
//! and each proxied request gets one line at info with its method, host, route, status,
//! bytes and latency — never its query string or a header value.

use http::StatusCode;
use serde_json::Value;

use crate::support::admin::Admin;
use crate::support::cli::assert_no_secrets;
use crate::support::client;
use crate::support::proxy::{API_HOST, ProxyOptions, Setup};

/// Every line of `log` as a JSON object; panics at the first line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => value,
            _ => panic!("not a JSON object on its own line: {line:?}\nthe log:\n{log}"),
        })
        .collect()
}

/// The event fields of a JSON log line (tracing-subscriber nests them under `fields`).
fn fields(line: &Value) -> &Value {
    line.get("fields").unwrap_or(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_fields_and_no_query_or_header_values() {
    let setup = Setup::start().await;
    let proxy = setup
        .spawn_proxy_with(&ProxyOptions::default(), &["--log-format", "json"], &[])
        .await;
    Admin::new(proxy.admin_addr)
        .wait_for_readyz(StatusCode::OK)
        .await;

    let query_secret = format!("q-SECRET-{:016x}", rand::random::<u64>());
    let header_secret = format!("client-SECRET-{:016x}", rand::random::<u64>());
    let other_header = format!("hv-SECRET-{:016x}", rand::random::<u64>());
    let url = format!("http://api.test/echo?secret={query_secret}&page=2");
    let answer = client::proxy_get(
        proxy.proxy_addr,
        &url,
        &[
            ("authorization", &format!("Bearer {header_secret}")),
            ("x-api-key", &other_header),
            ("user-agent", "logs-test/1.0"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let line = proxy.wait_for_log(r#""message":"request""#).await;
    let log = proxy.log();

    let event: Value = serde_json::from_str(&line).expect("the request line is JSON");
    let f = fields(&event);
    assert_eq!(event["level"], "INFO", "{line}");
    assert_eq!(f["method"], "GET", "{line}");
    assert_eq!(f["host"], API_HOST, "{line}");
    assert_eq!(f["route"], API_HOST, "{line}");
    assert_eq!(f["status"], 200, "{line}");
    assert_eq!(
        f["bytes"].as_u64(),
        Some(answer.body.len() as u64),
        "bytes sent back: {line}"
    );
    let latency = f["latency"].to_string();
    assert!(
        latency.chars().any(|c| c.is_ascii_digit()),
        "latency: {line}"
    );
    assert!(f.get("peer").is_some(), "client address: {line}");
    assert_eq!(f["client"], "-", "no client is configured: {line}");
    for forbidden in ["secret=", "page=2", "?", "logs-test", "Bearer"] {
        assert!(
            !line.contains(forbidden),
            "the request line carries {forbidden:?}: {line}"
        );
    }
    assert_no_secrets(&log, &[&query_secret, &header_secret, &other_header]);

    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    let lines = json_lines(&exit.log);
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| fields(l)["message"].as_str())
        .collect();
    assert!(messages.contains(&"credproxy listening"), "{messages:?}");
    assert_eq!(
        messages.iter().filter(|m| **m == "request").count(),
        1,
        "one line per request: {messages:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string()),
        "every line has a timestamp and a level"
    );
    assert_no_secrets(&exit.log, &[&query_secret, &header_secret, &other_header]);
}
