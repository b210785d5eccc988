//! The background refresher: transient failures (500, 429 + Retry-After, garbage, a
//! response without a token) back off and recover while the still-valid token keeps
//! being served; `invalid_grant` marks the integration failed and does not hammer.
//!
//! Each test starts from a state file whose access token is still valid for 30 s but
//! already inside the refresh skew, so the refresher calls the provider at once.

use std::sync::Arc;
use std::time::Duration;

use credproxy::tokens::{Health, Integration, Tokens};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::support::cli::assert_no_secret_markers;
use crate::support::fixture::{Fixture, Seed};
use crate::support::token::{Failure, WAIT};
use crate::support::wait;

/// The token an earlier run left behind (the provider has forgotten it; credproxy has not).
const OLD: &str = "at-SECRET-old-but-valid";

async fn open(fx: &Fixture) -> (Tokens, Arc<Integration>) {
    let config = fx.config().load(&fx.dir);
    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("opening the token store");
    let integration = tokens.get("demo").expect("demo").clone();
    (tokens, integration)
}

/// Opens the store over a state file holding [`OLD`], valid for 30 s and due now.
async fn open_with_due_token(fx: &Fixture) -> (Tokens, Arc<Integration>) {
    let now = OffsetDateTime::now_utc();
    fx.seed_state(&Seed {
        refresh_token: &fx.rt0,
        access_token: OLD,
        issued_at: now - time::Duration::hours(1),
        expires_at: now + time::Duration::seconds(30),
        seeded_from: Some(&fx.rt0),
    });
    let (tokens, integration) = open(fx).await;
    assert_eq!(integration.status().state, Health::Ok);
    assert_eq!(serve(&integration).await, OLD, "the stored token is used");
    assert_eq!(fx.server.calls(), 0);
    (tokens, integration)
}

/// What a request would be given right now.
async fn serve(integration: &Arc<Integration>) -> String {
    integration
        .ready()
        .await
        .unwrap_or_else(|e| panic!("no token: {e}"))
        .access_token
        .expose()
        .to_owned()
}

async fn wait_for_error(integration: &Integration, state: Health, mentioning: &str) {
    wait::until(
        &format!("state {state:?} with an error mentioning {mentioning:?}"),
        || {
            let status = integration.status();
            status.state == state
                && status
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(mentioning))
        },
    )
    .await;
    let status = integration.status();
    assert_no_secret_markers(&format!("{status:?}"));
    assert_no_secret_markers(&serde_json::to_string(&status).expect("status JSON"));
}

async fn wait_for_publication(published: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::time::timeout(WAIT, published.changed())
        .await
        .expect("a new token is published")
        .expect("integration alive");
}

/// Recovered: a new token from the provider is current, status ok, the rotation stored.
async fn assert_recovered(fx: &Fixture, integration: &Arc<Integration>, calls: u64) {
    assert_eq!(fx.server.calls(), calls);
    // The status is updated just after the token is published.
    wait::until("status is ok", || integration.status().state == Health::Ok).await;
    let status = integration.status();
    assert_eq!(status.state, Health::Ok, "{status:?}");
    assert_eq!(status.last_error, None);
    assert_eq!(status.refresh_count, 1);
    let token = serve(integration).await;
    assert_eq!(Some(token.clone()), fx.server.current_access_token());
    assert!(fx.server.is_valid_access_token(&token));
    assert_eq!(
        Some(fx.dir.stored_refresh_token("demo")),
        fx.server.latest_refresh_token()
    );
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_then_recover_serving_the_old_token() {
    let fx = Fixture::start().await;
    fx.server.fail_next(2, Failure::Status500);
    let (tokens, integration) = open_with_due_token(&fx).await;
    let mut published = integration.subscribe();
    let _refreshers = tokens.spawn_refreshers();

    fx.server.wait_for_responses(1).await;
    let first_failed = Instant::now();
    wait_for_error(&integration, Health::BackingOff, "500").await;
    // Backing off: requests get the still-valid token at once, without a provider call.
    for _ in 0..20 {
        assert_eq!(serve(&integration).await, OLD);
    }
    fx.server.wait_for_calls(2).await;
    let first_backoff = first_failed.elapsed();
    fx.server.wait_for_responses(2).await;
    let second_failed = Instant::now();
    assert_eq!(serve(&integration).await, OLD);
    fx.server.wait_for_calls(3).await;
    let second_backoff = second_failed.elapsed();
    // Exponential backoff with jitter: 0.5–1 s after the first failure, 1–2 s after the
    // second (lower bounds only: a slow machine may take longer, never shorter).
    assert!(
        first_backoff >= Duration::from_millis(400),
        "retried {first_backoff:?} after the first failure"
    );
    assert!(
        second_backoff >= Duration::from_millis(900),
        "retried {second_backoff:?} after the second failure"
    );

    wait_for_publication(&mut published).await;
    assert_recovered(&fx, &integration, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_waits_for_retry_after() {
    let fx = Fixture::start().await;
    fx.server.fail_next(
        1,
        Failure::Status429 {
            retry_after_secs: 2,
        },
    );
    let (tokens, integration) = open_with_due_token(&fx).await;
    let mut published = integration.subscribe();
    let _refreshers = tokens.spawn_refreshers();

    fx.server.wait_for_responses(1).await;
    let answered = Instant::now();
    wait_for_error(&integration, Health::BackingOff, "429").await;
    assert_eq!(serve(&integration).await, OLD);
    fx.server.wait_for_calls(2).await;
    // The first backoff alone is at most 1 s.
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "retried after {waited:?}; Retry-After said 2 s"
    );
    wait_for_publication(&mut published).await;
    assert_recovered(&fx, &integration, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_tokenless_answers_are_transient() {
    let fx = Fixture::start().await;
    fx.server.fail_next(1, Failure::Garbage);
    fx.server.fail_next(1, Failure::EmptyToken);
    let (tokens, integration) = open_with_due_token(&fx).await;
    let mut published = integration.subscribe();
    let _refreshers = tokens.spawn_refreshers();

    fx.server.wait_for_responses(1).await;
    wait_for_error(&integration, Health::BackingOff, "JSON").await;
    assert_eq!(serve(&integration).await, OLD);
    fx.server.wait_for_responses(2).await;
    wait_for_error(&integration, Health::BackingOff, "access_token").await;
    assert_eq!(serve(&integration).await, OLD);

    wait_for_publication(&mut published).await;
    assert_recovered(&fx, &integration, 3).await;
}

/// `invalid_grant` with no token to serve: status `failed` naming the cause, and 50
/// requests afterwards get the error without a single further provider call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_fails_without_hammering() {
    let fx = Fixture::start().await;
    fx.server.revoke_all();
    let (tokens, integration) = open(&fx).await;
    let _refreshers = tokens.spawn_refreshers();

    fx.server.wait_for_responses(1).await;
    wait_for_error(&integration, Health::Failed, "invalid_grant").await;

    let requests: Vec<_> = (0..50)
        .map(|_| {
            let integration = integration.clone();
            tokio::spawn(async move { integration.ready().await })
        })
        .collect();
    for request in requests {
        let error = match request.await.expect("request task") {
            Ok(_) => panic!("a token was served after invalid_grant"),
            Err(error) => credproxy::report::chain(&error),
        };
        assert!(error.contains("invalid_grant"), "{error}");
        assert_no_secret_markers(&error);
    }
    assert_eq!(fx.server.calls(), 1, "no further call after invalid_grant");
    assert_eq!(fx.server.invalid_grant_count(), 1);
    let status = integration.status();
    assert_eq!(status.state, Health::Failed);
    assert_eq!(status.refresh_count, 0);
}

/// `invalid_grant` while the current token is still valid: status `failed`, and requests
/// keep getting that token until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_keeps_serving_a_still_valid_token() {
    let fx = Fixture::start().await;
    fx.server.revoke_all();
    let (tokens, integration) = open_with_due_token(&fx).await;
    let _refreshers = tokens.spawn_refreshers();

    fx.server.wait_for_responses(1).await;
    wait_for_error(&integration, Health::Failed, "invalid_grant").await;
    for _ in 0..50 {
        assert_eq!(serve(&integration).await, OLD);
    }
    assert_eq!(fx.server.calls(), 1);
}

/// A provider that answers `expires_in: 0` (some do, for "unknown") must not drive the
/// refresher into a loop: fewer than 10 calls in the first 2 s (a loop makes hundreds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_expires_in_does_not_hammer() {
    let fx = Fixture::start().await;
    fx.server.set_expires_in(0);
    let (tokens, _integration) = open(&fx).await;
    let _refreshers = tokens.spawn_refreshers();
    fx.server.wait_for_calls(1).await;
    let hammered = tokio::time::timeout(Duration::from_secs(2), fx.server.wait_for_calls(10))
        .await
        .is_ok();
    assert!(
        !hammered,
        "{} token requests within 2 s of the first",
        fx.server.calls()
    );
}
