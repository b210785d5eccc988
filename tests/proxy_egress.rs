//! Where unrouted traffic may go: the default `proxy.block` keeps proxy clients off
//! credproxy's own admin listener and the cloud metadata address in every spelling,
//! `proxy.allow` narrows destinations by name and CIDR, and the check is made on the
//! resolved addresses — the ones then connected to — with a resolver the test controls.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use credproxy::proxy::dial::{Lookup, Resolve};
use http::StatusCode;

use crate::support::client;
use crate::support::proxy::{InProcess, ProxyOptions, Setup};

/// Answers names from a table (anything else has no address) and counts the questions.
#[derive(Default)]
struct TableResolver {
    answers: HashMap<String, Vec<IpAddr>>,
    asked: Mutex<HashMap<String, usize>>,
}

impl TableResolver {
    fn new(answers: &[(&str, &[&str])]) -> Arc<Self> {
        let answers = answers
            .iter()
            .map(|(host, ips)| {
                let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
                ((*host).to_owned(), ips)
            })
            .collect();
        Arc::new(Self {
            answers,
            ..Self::default()
        })
    }

    fn asked(&self, host: &str) -> usize {
        self.asked.lock().unwrap().get(host).copied().unwrap_or(0)
    }
}

impl Resolve for TableResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        *self
            .asked
            .lock()
            .unwrap()
            .entry(host.to_owned())
            .or_default() += 1;
        let ips = self.answers.get(host).cloned().unwrap_or_default();
        Box::pin(async move {
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect())
        })
    }
}

/// CONNECT to `target` and a plain `GET http://target/` both get 403 `code`.
async fn refused_both_ways(proxy: &InProcess, target: &str, code: &str) {
    let answer = client::connect(proxy.proxy_addr, target, &[])
        .await
        .refused();
    answer.assert_credproxy_error(StatusCode::FORBIDDEN, code);
    let plain = client::proxy_get(proxy.proxy_addr, &format!("http://{target}/"), &[]).await;
    plain.assert_credproxy_error(StatusCode::FORBIDDEN, code);
}

/// Sends `GET /healthz` through a blind tunnel to `target` (no TLS: the admin listener
/// and the test API's plain port speak HTTP).
async fn get_through_tunnel(proxy: &InProcess, target: &str, path: &str) -> client::Answer {
    let tunnel = client::connect(proxy.proxy_addr, target, &[])
        .await
        .tunnel();
    let mut h1 = client::h1(tunnel).await;
    client::send1(&mut h1, client::get(path, target, &[])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_block_keeps_clients_off_the_admin_listener_and_the_metadata_address() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let admin_port = proxy.admin_addr.port();
    for host in [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "0.0.0.0",
    ] {
        refused_both_ways(&proxy, &format!("{host}:{admin_port}"), "blocked_address").await;
    }
    refused_both_ways(&proxy, "169.254.169.254:80", "blocked_address").await;
    refused_both_ways(&proxy, "[::ffff:169.254.169.254]:80", "blocked_address").await;
    let answer = client::connect(proxy.proxy_addr, "169.254.169.254:80", &[])
        .await
        .refused();
    assert_eq!(
        answer.json()["message"],
        "169.254.169.254 is a link-local address, which proxy.block refuses"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_block_lets_a_client_reach_loopback() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().proxy_key("block", "[]"))
        .await;
    // The hole the default closes: the admin API, through a tunnel.
    let target = format!("127.1:{}", proxy.admin_addr.port());
    let answer = get_through_tunnel(&proxy, &target, "/healthz").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_admits_listed_names_and_cidrs_only() {
    let setup = Setup::start().await;
    let api_http = setup.api.http_addr();
    let api_port = api_http.port();

    // By name: unrouted.test is pinned (to loopback: pins are not subject to block).
    let by_name = ProxyOptions::default()
        .proxy_key("allow", r#"["unrouted.test", "*.allowed.test"]"#)
        .resolve("unrouted.test:80", api_http);
    let proxy = setup.start_proxy(&by_name).await;
    let answer = client::proxy_get(proxy.proxy_addr, "http://unrouted.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    refused_both_ways(&proxy, "other.test:443", "destination_not_allowed").await;
    refused_both_ways(&proxy, "allowed.test:443", "destination_not_allowed").await;
    // Block still applies to what allow admits.
    refused_both_ways(&proxy, &format!("127.0.0.1:{api_port}"), "blocked_address").await;
    proxy.stop().await;

    // By CIDR, with loopback unblocked: every spelling of an address inside is allowed.
    let by_cidr = ProxyOptions::default()
        .proxy_key("allow", r#"["127.0.0.0/8"]"#)
        .proxy_key("block", r#"["link-local"]"#);
    let proxy = setup.start_proxy(&by_cidr).await;
    let before = setup.api.requests();
    for host in ["127.0.0.1", "127.1", "[::ffff:127.0.0.1]"] {
        let answer = get_through_tunnel(&proxy, &format!("{host}:{api_port}"), "/echo").await;
        assert_eq!(answer.status, StatusCode::OK, "{host}: {}", answer.text());
    }
    assert_eq!(setup.api.requests(), before + 3);
    refused_both_ways(
        &proxy,
        &format!("[::1]:{api_port}"),
        "destination_not_allowed",
    )
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resolved_address_is_checked_and_the_checked_one_is_used() {
    let setup = Setup::start().await;
    let api_http = setup.api.http_addr();
    let loopback = api_http.ip().to_string();
    let resolver = TableResolver::new(&[
        ("mixed.test", &["93.184.215.14", "10.0.0.5"]),
        ("rebind.test", &[&loopback, "10.0.0.5"]),
        ("good.test", &[&loopback]),
    ]);
    // Loopback is allowed here so that the test API is reachable; private is not.
    let options = ProxyOptions::default().proxy_key("block", r#"["private"]"#);
    let proxy = setup
        .start_proxy_resolving(&options, resolver.clone())
        .await;

    // One public and one private answer: refused, whichever would be tried first.
    refused_both_ways(&proxy, "mixed.test:443", "blocked_address").await;
    assert_eq!(resolver.asked("mixed.test"), 2);
    let rebind = format!("rebind.test:{}", api_http.port());
    refused_both_ways(&proxy, &rebind, "blocked_address").await;
    let answer = client::connect(proxy.proxy_addr, &rebind, &[])
        .await
        .refused();
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        !message.contains("10.0.0.5"),
        "the client learns no internal address: {message}"
    );
    assert_eq!(setup.api.requests(), 0, "a refused destination was reached");

    // One lookup per connection: the address checked is the address connected to.
    let good = format!("good.test:{}", api_http.port());
    let answer = get_through_tunnel(&proxy, &good, "/echo").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(resolver.asked("good.test"), 1);
    let answer = client::proxy_get(proxy.proxy_addr, &format!("http://{good}/echo"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(resolver.asked("good.test"), 2);
    assert_eq!(setup.api.requests(), 2);
    proxy.stop().await;
}

/// One of this machine's non-loopback addresses: the source address the kernel would
/// pick towards a documentation address (a UDP "connect" sends nothing).
fn own_non_loopback_address() -> IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .connect("198.51.100.1:9")
        .expect("this test needs a non-loopback network interface with a route");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "{ip}");
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_hosts_own_address_counts_as_loopback() {
    let setup = Setup::start().await;
    // A service bound to every interface, as an admin listener on 0.0.0.0 would be.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = crate::support::serve::spawn(listener, None, |_request| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let target = format!("{}:{port}", own_non_loopback_address());

    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    refused_both_ways(&proxy, &target, "blocked_address").await;
    let answer = client::connect(proxy.proxy_addr, &target, &[])
        .await
        .refused();
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("an address of this host"), "{message}");
    proxy.stop().await;

    // Without loopback in proxy.block the same address is reachable.
    let open = ProxyOptions::default().proxy_key("block", r#"["link-local"]"#);
    let proxy = setup.start_proxy(&open).await;
    let answer = get_through_tunnel(&proxy, &target, "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    proxy.stop().await;
}
