//! The PostgreSQL store when things break, against real servers: replicas SIGKILLed while
//! they hold an integration's refresh lock; the database stopped for 20 s while replicas
//! serve.

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::support::admin::Admin;
use crate::support::kill::KillPoint;
use crate::support::pg::{self, AdvisoryLock, TestDb};
use crate::support::proxy::{INTEGRATION, ProxyOptions, Setup};
use crate::support::replicas::Replicas;

const REPLICAS: usize = 3;

/// The refresh token the database holds for `name`.
async fn stored_refresh_token(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one(
            "SELECT refresh_token FROM credproxy_tokens WHERE integration = $1",
            &[&name],
        )
        .await
        .unwrap_or_else(|e| panic!("reading {name}'s row: {e}"))
        .get(0)
}

/// p50 and max of `samples`, in ms.
fn p50_max_ms(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
    )
}

// === SIGKILL while holding the lock ===

/// Where in its refresh the lock holder is killed.
#[derive(Clone, Copy, Debug)]
enum Point {
    /// As the token endpoint sees it (request held, answer sent, a few ms after).
    Provider(KillPoint),
    /// The rotated refresh token is on its way into the database: the holder's write
    /// waits for a row lock the test holds, and the holder dies before it commits.
    SaveInFlight,
}

const POINTS: [Point; 4] = [
    Point::Provider(KillPoint::RequestArrived),
    Point::SaveInFlight,
    Point::Provider(KillPoint::ResponseSent),
    Point::Provider(KillPoint::AfterResponse),
];

/// Whether `application`'s write of `demo`'s row waits for a lock.
async fn save_waits(client: &tokio_postgres::Client, application: &str) -> bool {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND wait_event_type = 'Lock' AND query LIKE 'UPDATE credproxy_tokens%'",
            &[&application],
        )
        .await
        .unwrap_or_else(|e| panic!("reading pg_stat_activity: {e}"));
    row.get::<_, i64>(0) > 0
}

/// Whether `application` holds an advisory lock on a session that waits for another lock
/// (its write of the rotated token, held up by the test's row lock).
async fn holds_while_writing(client: &tokio_postgres::Client, application: &str) -> bool {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1 \
             AND a.wait_event_type = 'Lock'",
            &[&application],
        )
        .await
        .unwrap_or_else(|e| panic!("reading pg_locks: {e}"));
    row.get::<_, i64>(0) > 0
}

fn holds(locks: &[AdvisoryLock], application: &str) -> bool {
    locks
        .iter()
        .any(|l| l.granted && l.application == application)
}

fn waits(locks: &[AdvisoryLock], application: &str) -> bool {
    locks
        .iter()
        .any(|l| !l.granted && l.application == application)
}

/// Three replicas; again and again one of them is made to hold `demo`'s refresh lock
/// (a forced refresh) with another replica's forced refresh queued behind it, and is
/// SIGKILLed at a point of its refresh. Each time the database frees the lock with the
/// dead session, the waiting replica takes it and refreshes, every replica still serves,
/// the provider never sees a rotated-away refresh token, and the database holds the
/// provider's latest one. Grace redemptions are the waiting replica presenting the
/// refresh token the dead one had redeemed without storing its successor: the legitimate
/// retry after a lost answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_lock_holder_loses_no_rotation() {
    const HELD_KILLS: usize = 20;
    const MAX_ROUNDS: usize = 40;
    let Some(db) = TestDb::create().await else {
        return;
    };
    let setup = Setup::start().await;
    let mut replicas = Replicas::start(&setup, &db.url, REPLICAS, ProxyOptions::default()).await;
    for i in 0..REPLICAS {
        replicas.admin(i).wait_for_readyz(StatusCode::OK).await;
    }
    let watcher = db.client().await;
    let tokens = &setup.tokens;
    let (mut rounds, mut held_kills) = (0, 0);
    let mut handovers = Vec::new();
    let mut by_point = std::collections::BTreeMap::<String, usize>::new();
    while held_kills < HELD_KILLS && rounds < MAX_ROUNDS {
        let point = POINTS[rounds % POINTS.len()];
        let killed = rounds % REPLICAS;
        let waiter = (killed + 1 + rand::random_range(0..REPLICAS - 1)) % REPLICAS;
        let third = (0..REPLICAS)
            .find(|i| *i != killed && *i != waiter)
            .unwrap();
        rounds += 1;
        let context = format!("round {rounds} ({point:?}, killing replica {killed})");
        let (calls, responses) = (tokens.calls(), tokens.responses());

        // The holder takes the lock and stops at the point's first half.
        let blocker = db.client().await;
        match point {
            Point::Provider(_) => tokens.hold_responses(),
            Point::SaveInFlight => blocker
                .batch_execute(
                    "BEGIN; SELECT 1 FROM credproxy_tokens WHERE integration = 'demo' FOR UPDATE",
                )
                .await
                .unwrap(),
        }
        let holder_admin = Admin::new(replicas.replica(killed).admin_addr);
        let holder = tokio::spawn(async move { holder_admin.try_force_refresh(INTEGRATION).await });
        let holder_name = Replicas::application(killed);
        match point {
            Point::Provider(_) => tokens.wait_for_calls(calls + 1).await,
            Point::SaveInFlight => {
                pg::until("the holder's write waits for the row lock", || {
                    save_waits(&watcher, &holder_name)
                })
                .await;
                tokens.hold_responses();
            }
        }
        // Another replica's forced refresh queues behind it.
        let waiter_admin = Admin::new(replicas.replica(waiter).admin_addr);
        let queued = tokio::spawn(async move { waiter_admin.force_refresh(INTEGRATION).await });
        let waiter_name = Replicas::application(waiter);
        pg::until("the other replica waits for the lock", || async {
            let locks = pg::advisory_locks(&watcher).await;
            holds(&locks, &holder_name) && waits(&locks, &waiter_name)
        })
        .await;
        if let Point::Provider(kill_point) = point {
            kill_point.reach(tokens, calls, responses).await;
            // The waiter's own answer is held, so it keeps the lock once it has it.
            tokens.hold_responses();
        }

        let held = holds(&pg::advisory_locks(&watcher).await, &holder_name);
        let killed_at = Instant::now();
        let exit = replicas.kill(killed).await;
        assert_eq!(exit.code, None, "{context}: killed by the signal");
        // The provider's answers stay held, so the waiter keeps the lock once it has it.
        // A write the holder had sent reaches the database once the row lock goes: it
        // commits now, or never.
        if let Point::SaveInFlight = point {
            // Before the write may go on: either the lock stays with the session whose
            // write is pending, or it went with the dead holder's other sessions and the
            // waiter has read the row and asked the provider.
            pg::until(
                "the lock stays with the pending write, or passed on",
                || async {
                    holds_while_writing(&watcher, &holder_name).await || tokens.calls() > calls + 1
                },
            )
            .await;
            blocker.batch_execute("ROLLBACK").await.unwrap();
        }
        pg::until("the waiting replica holds the lock", || async {
            holds(&pg::advisory_locks(&watcher).await, &waiter_name)
        })
        .await;
        let handover = killed_at.elapsed();
        if held {
            held_kills += 1;
            handovers.push(handover);
            *by_point.entry(format!("{point:?}")).or_default() += 1;
        }
        // The dead holder's answer (if still held) goes to a dead socket.
        tokens.release_responses();

        let answer = queued.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{context}: the waiting replica's refresh failed: {}",
            answer.text
        );
        // The dead holder's request ended with the process (or had finished before).
        let _ = holder.await;
        assert_eq!(
            tokens.invalid_grant_count(),
            0,
            "{context}: a rotated-away refresh token was presented"
        );
        assert_eq!(
            Some(stored_refresh_token(&watcher, INTEGRATION).await),
            tokens.latest_refresh_token(),
            "{context}: the database is behind the provider"
        );
        let latest = setup.current_token();
        let answer = replicas.get(waiter, "/echo").await;
        assert_eq!(answer.status, StatusCode::OK, "{context}");
        assert_eq!(Replicas::bearer(&answer), Some(latest), "{context}");
        let answer = replicas.get(third, "/echo").await;
        assert_eq!(answer.status, StatusCode::OK, "{context}");
        assert!(
            Replicas::bearer(&answer).is_some_and(|t| tokens.is_valid_access_token(&t)),
            "{context}: the third replica serves a valid token"
        );
        replicas.restart(killed).await;
    }
    assert!(
        held_kills >= HELD_KILLS,
        "only {held_kills} of {rounds} kills hit the lock holder"
    );
    for i in 0..REPLICAS {
        let answer = replicas.get(i, "/echo").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(Replicas::bearer(&answer).is_some_and(|t| tokens.is_valid_access_token(&t)));
    }
    assert_eq!(tokens.invalid_grant_count(), 0);
    let (p50, max) = p50_max_ms(&mut handovers);
    println!(
        "FIGURES pg_sigkill_lock_holder: kills {rounds} ({held_kills} while holding the lock: \
         {by_point:?}), grace redemptions {}, refreshes {}, lock taken by the waiting replica \
         after the kill p50 {p50:.1} ms max {max:.1} ms",
        tokens.grace_redemptions(),
        tokens.successes()
    );
    replicas.stop_all().await;
}
