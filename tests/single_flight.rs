//! At most one refresh per integration in flight: across the tasks of one process
//! (the in-process single flight) and across processes sharing a state file (the lock).

use std::collections::HashSet;
use std::future::Future as _;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::watch;

use crate::support::cli::{self, RUN_TIMEOUT};
use crate::support::fixture::Fixture;
use crate::support::token::WAIT;
use crate::support::wait;

/// 100 callers of `ready()` in one process while the only refresh is held in flight at the
/// provider: one token-endpoint call, and all 100 get its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_requests_cause_one_refresh() {
    let fx = Fixture::start().await;
    let config = fx.config().load(&fx.dir);
    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("opening the token store");
    let integration = tokens.get("demo").expect("integration demo").clone();
    fx.server.hold_responses();

    let entered = Arc::new(watch::Sender::new(0_usize));
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let integration = integration.clone();
            let entered = entered.clone();
            tokio::spawn(async move {
                let mut ready = pin!(integration.ready());
                // The first poll starts or joins the refresh; it cannot finish while the
                // provider's answer is held, so every caller is inside before any gets out.
                let first = std::future::poll_fn(|cx| Poll::Ready(ready.as_mut().poll(cx))).await;
                assert!(first.is_pending(), "a token was served before any refresh");
                entered.send_modify(|n| *n += 1);
                ready.await
            })
        })
        .collect();
    fx.server.wait_for_calls(1).await;
    let mut entered_rx = entered.subscribe();
    let all_in = tokio::time::timeout(WAIT, entered_rx.wait_for(|n| *n == 100))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(all_in, "not all callers entered: {}", *entered.borrow());
    assert_eq!(fx.server.calls(), 1, "callers overlapping one refresh");
    fx.server.release_responses();

    let mut tokens_seen = HashSet::new();
    for caller in callers {
        let snapshot = caller
            .await
            .expect("caller task")
            .unwrap_or_else(|e| panic!("ready() failed: {e}"));
        tokens_seen.insert(snapshot.access_token.expose().to_owned());
    }
    assert_eq!(tokens_seen.len(), 1, "all callers get the same token");
    let token = tokens_seen.into_iter().next().expect("one token");
    assert!(fx.server.is_valid_access_token(&token));
    assert_eq!(fx.server.current_access_token(), Some(token));
    assert_eq!(fx.server.calls(), 1);
    assert_eq!(fx.server.max_in_flight(), 1);
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

/// Two `credproxy token` processes started together on one state file: one refresh, the
/// same valid token printed by both. Even iterations hold the provider's answer until the
/// second process is seen blocked on a lock in the state directory (guaranteed overlap);
/// odd ones run free, so every interleaving of start-up and refresh gets its chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_token_processes_share_one_refresh() {
    const ITERATIONS: usize = 15;
    let args = ["token", "demo"];
    for iteration in 0..ITERATIONS {
        let fx = Fixture::start().await;
        fx.write_config();
        let held = iteration % 2 == 0;
        if held {
            fx.server.hold_responses();
        }
        let first = fx.spawn(&args);
        let second = fx.spawn(&args);
        if held {
            fx.server.wait_for_calls(1).await;
            let state_dir = fx.dir.state_path().parent().expect("state dir").to_owned();
            wait::until(
                "the second process blocks on the state lock (or calls the provider too)",
                || fx.server.calls() > 1 || wait::flock_waiters_in(&state_dir) > 0,
            )
            .await;
            fx.server.release_responses();
        }
        let (first, second) = tokio::time::timeout(RUN_TIMEOUT, async {
            tokio::join!(cli::collect(first, &args), cli::collect(second, &args))
        })
        .await
        .expect("both processes exit");
        first.assert_code(0);
        second.assert_code(0);
        assert_eq!(
            fx.server.calls(),
            1,
            "iteration {iteration}: two processes, one refresh"
        );
        assert_eq!(
            first.line(),
            second.line(),
            "iteration {iteration}: same token"
        );
        assert!(
            fx.server.is_valid_access_token(first.line()),
            "iteration {iteration}: printed a token the provider issued"
        );
        assert_eq!(fx.server.invalid_grant_count(), 0);
        assert_eq!(
            Some(fx.dir.stored_refresh_token("demo")),
            fx.server.latest_refresh_token()
        );
    }
}

/// Four `credproxy check` processes at once (each insists on a refresh): they take turns
/// under the state lock, each re-reading the state and presenting the refresh token the
/// previous one stored; no overlap, no reuse, no grace redemption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_take_turns_on_the_chain() {
    const PROCESSES: u64 = 4;
    let fx = Fixture::start().await;
    fx.write_config();
    let args = ["check"];
    let children: Vec<_> = (0..PROCESSES).map(|_| fx.spawn(&args)).collect();
    for child in children {
        let out = tokio::time::timeout(RUN_TIMEOUT, cli::collect(child, &args))
            .await
            .expect("check exits");
        out.assert_code(0);
    }
    assert_eq!(fx.server.calls(), PROCESSES);
    assert_eq!(fx.server.max_in_flight(), 1, "refreshes overlapped");
    assert_eq!(fx.server.invalid_grant_count(), 0);
    assert_eq!(
        fx.server.grace_redemptions(),
        0,
        "a process used a stale token"
    );
    let presented: HashSet<String> = fx
        .server
        .requests()
        .iter()
        .filter_map(|r| r.field("refresh_token").map(str::to_owned))
        .collect();
    assert_eq!(presented.len() as u64, PROCESSES);
    assert_eq!(
        Some(fx.dir.stored_refresh_token("demo")),
        fx.server.latest_refresh_token()
    );
}
