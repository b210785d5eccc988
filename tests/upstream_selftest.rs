//! The test API (`support::upstream`) against itself, directly and without credproxy, so a
//! failing proxy test points at the proxy and not at the harness.

use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::support::ca::TestCa;
use crate::support::client;
use crate::support::upstream::{TestApi, ZeroBody};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_revokes_streams_and_counts_over_h2_and_plain_http() {
    let ca = TestCa::new();
    let api = TestApi::start(&ca).await;

    let tcp = TcpStream::connect(api.https_addr()).await.expect("connect");
    let tls = client::tls(
        tcp,
        "api.test",
        client::with_alpn(ca.client_config(), &[b"h2"]),
    )
    .await;
    assert_eq!(client::peer_leaf(&tls), api.leaf_cert());
    let mut h2 = client::h2(tls).await;

    let answer = client::send2(
        &mut h2,
        client::get(
            "https://api.test/echo",
            "",
            &[("authorization", "Bearer a")],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json()["headers"]["authorization"],
        serde_json::json!(["Bearer a"])
    );
    assert_eq!(answer.json()["tls"], true);
    let seen = api.last();
    assert_eq!(
        (seen.version, seen.authorization()),
        (Version::HTTP_2, vec!["Bearer a".to_owned()])
    );

    api.revoke("a");
    let answer = client::send2(
        &mut h2,
        client::get(
            "https://api.test/echo",
            "",
            &[("authorization", "Bearer a")],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.unauthorized(), 1);

    let answer = client::send2(
        &mut h2,
        client::get("https://api.test/bytes/100000", "", &[]),
    )
    .await;
    assert_eq!(answer.body.len(), 100_000);
    assert_eq!(api.downloaded(), 100_000);

    let upload = Request::builder()
        .method(Method::POST)
        .uri("https://api.test/upload")
        .body(
            ZeroBody::new(300_000)
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("request");
    let answer = client::send2(&mut h2, upload).await;
    assert_eq!(answer.json()["received"], 300_000);
    assert_eq!(api.uploaded(), 300_000);

    // The plain listener answers the same way, and says so.
    let tcp = TcpStream::connect(api.http_addr()).await.expect("connect");
    let mut h1 = client::h1(tcp).await;
    let answer = client::send1(&mut h1, client::get("/echo", "api.test", &[])).await;
    assert_eq!(answer.json()["tls"], false);
    assert_eq!(api.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_never_answers_and_gate_answers_once_opened() {
    let ca = TestCa::new();
    let api = TestApi::start(&ca).await;
    let tcp = TcpStream::connect(api.http_addr()).await.expect("connect");
    let mut hang = client::h1(tcp).await;
    let hung = tokio::spawn(async move {
        client::send1(&mut hang, client::get("/hang", "api.test", &[])).await
    });
    let tcp = TcpStream::connect(api.http_addr()).await.expect("connect");
    let mut gate = client::h1(tcp).await;
    let gated = tokio::spawn(async move {
        client::send1(&mut gate, client::get("/gate", "api.test", &[])).await
    });
    api.wait_for_parked(2).await;
    assert!(!gated.is_finished());
    api.open_gate();
    assert_eq!(gated.await.expect("task").status, StatusCode::OK);
    assert!(!hung.is_finished());
    hung.abort();
}
