//! SIGKILL in the middle of refreshes never loses a rotated refresh token: whatever
//! point a `credproxy check` dies at, the next process refreshes successfully and the
//! provider never sees a dead (rotated-away) refresh token.

use crate::support::cli;
use crate::support::fixture::Fixture;
use crate::support::kill::KillPoint;

const POINTS: [KillPoint; 4] = [
    KillPoint::ResponseSent,
    KillPoint::RequestArrived,
    KillPoint::AfterStart,
    KillPoint::AfterResponse,
];

/// Kills `check` at each point in turn until 20 kills have hit a live process (at most
/// 60 rounds), running a fresh `check` after every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_refresh_never_loses_the_rotation() {
    const KILLS: usize = 20;
    const MAX_ROUNDS: usize = 60;
    let fx = Fixture::start().await;
    fx.write_config();
    let args = ["check"];
    let mut killed = 0;
    let mut round = 0;
    while killed < KILLS && round < MAX_ROUNDS {
        round += 1;
        let point = POINTS[round % POINTS.len()];
        let (calls, responses) = (fx.server.calls(), fx.server.responses());
        if point.holds_responses() {
            fx.server.hold_responses();
        }
        let mut child = fx.spawn(&args);
        point.reach(&fx.server, calls, responses).await;
        // Err only when it has exited already; then it simply finished first.
        let _ = child.start_kill();
        let out = cli::collect(child, &args).await;
        if out.code.is_none() {
            killed += 1;
        }
        fx.server.release_responses();

        // A fresh process carries on from whatever the killed one left behind.
        let out = fx.run(&args).await;
        assert_eq!(
            out.code,
            Some(0),
            "round {round} ({point:?}): the next check failed:\n{}",
            out.combined()
        );
        assert!(
            out.line().starts_with("demo: ok"),
            "round {round} ({point:?}): {}",
            out.stdout
        );
        assert_eq!(
            fx.server.invalid_grant_count(),
            0,
            "round {round} ({point:?}): a process presented a rotated-away refresh token"
        );
        assert_eq!(
            Some(fx.dir.stored_refresh_token("demo")),
            fx.server.latest_refresh_token(),
            "round {round} ({point:?}): the state file is behind the provider"
        );
        // The state file is always whole: the next run parsed it, and so can we.
        let _ = fx.dir.read_state();
    }
    assert!(
        killed >= KILLS,
        "only {killed} of {round} kills hit a live process"
    );
    assert_eq!(fx.server.invalid_grant_count(), 0);
}
