//! The PostgreSQL store when things break, against real servers: replicas SIGKILLed while
//! they hold an integration's refresh lock; the database stopped for 20 s while replicas
//! serve; `sslmode` against a server that speaks TLS only.

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::support::admin::Admin;
use crate::support::ca::TestCa;
use crate::support::fixture::Fixture;
use crate::support::kill::KillPoint;
use crate::support::pg::{self, AdvisoryLock, PgServer, TestDb};
use crate::support::proxy::{INTEGRATION, ProxyOptions, Setup, integration_toml};
use crate::support::replicas::Replicas;
use crate::support::token::{self, TokenServer};

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

// === the database stopped for 20 s ===

/// The outage the issue fixes.
const OUTAGE: Duration = Duration::from_secs(20);
/// How long after the database is back every replica must have recovered: a reconnect
/// backs off up to 5 s, and CI is loaded.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// Requests through every replica, one after another per replica, until stopped: each
/// answer's status and whether the token it carried was valid when it came back.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
}

#[derive(Default)]
struct LoadResult {
    requests: u64,
    failures: Vec<String>,
}

impl Load {
    fn start(replicas: &Replicas<'_>, tokens: &TokenServer) -> Self {
        let stop = tokio::sync::watch::Sender::new(false);
        let tasks = (0..replicas.len())
            .map(|i| {
                let proxy = replicas.replica(i).proxy_addr;
                let issued = tokens.issued();
                let mut stopped = stop.subscribe();
                tokio::spawn(async move {
                    let mut result = LoadResult::default();
                    let mut pace = tokio::time::interval(Duration::from_millis(25));
                    while !*stopped.borrow_and_update() {
                        tokio::select! {
                            _ = pace.tick() => {}
                            _ = stopped.changed() => break,
                        }
                        let answer = Replicas::get_via(proxy, i, "/echo").await;
                        result.requests += 1;
                        let bearer = Replicas::bearer(&answer);
                        if answer.status != StatusCode::OK
                            || !bearer.as_deref().is_some_and(|t| issued.is_valid(t))
                        {
                            result.failures.push(format!(
                                "replica {i}: {} {}",
                                answer.status,
                                answer.text()
                            ));
                        }
                    }
                    result
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the load; (requests, failures) over all replicas.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.send_replace(true);
        let (mut requests, mut failures) = (0, Vec::new());
        for task in self.tasks {
            let result = task.await.unwrap();
            requests += result.requests;
            failures.extend(result.failures);
        }
        (requests, failures)
    }
}

/// An RFC 3339 time from `/integrations`.
fn instant(value: &serde_json::Value) -> time::OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// `/readyz` of replica `i`: status and body.
async fn readyz(replicas: &Replicas<'_>, i: usize) -> (StatusCode, serde_json::Value) {
    let answer = replicas.admin(i).get("/readyz").await;
    (answer.status, answer.json())
}

/// Three replicas serve `demo` (a token valid for an hour) under a steady stream of
/// requests while their database (a server of the test's own, with a password) is
/// stopped for 20 s. A second integration, `other`, holds a 12 s token, refreshed just
/// before the stop, so it runs out during the outage. Every request is answered 200 with
/// a valid token throughout; `/readyz` stays 200 while the store is down but no token is
/// needed, turns 503 `state_store_unreachable` once `other`'s token has expired, and 200
/// again after the database is back — without a restart; `check` and `token` fail with
/// one line naming the store (no password) while it is down; after the restart a forced
/// refresh reaches every replica again within 1 s (LISTEN is back); nothing is re-used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stopped_for_20s_replicas_serve_and_recover() {
    let Some(mut server) = PgServer::start_with_password("pw-SECRET-database").await else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no PostgreSQL binaries in CI"
        );
        return;
    };
    let db = TestDb::create_on(&server.admin_url()).await;
    let setup = Setup::start().await;
    let other_rt = token::new_refresh_token(0);
    let other = TokenServer::start(&setup.ca, &other_rt).await;
    other.set_expires_in(12);
    let other_toml = integration_toml("other", &other, &other_rt, None) + "refresh_skew = \"1s\"\n";
    let options = ProxyOptions::default().extra(&other_toml);
    let replicas = Replicas::start(&setup, &db.url, REPLICAS, options).await;
    for i in 0..REPLICAS {
        replicas.admin(i).wait_for_readyz(StatusCode::OK).await;
    }
    let load = Load::start(&replicas, &setup.tokens);

    // `other` gets a fresh 12 s token, and every replica has it.
    let answer = replicas.admin(0).force_refresh("other").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let expires_at = answer.json()["expires_at"].clone();
    for i in 1..REPLICAS {
        let admin = replicas.admin(i);
        pg::until("every replica holds other's new token", || async {
            // The database keeps microseconds, the refreshing replica nanoseconds.
            let theirs = admin.integration("other").await["expires_at"].clone();
            (instant(&theirs) - instant(&expires_at)).abs() < time::Duration::milliseconds(1)
        })
        .await;
    }

    tokio::task::block_in_place(|| server.stop());
    let stopped = Instant::now();
    // The replicas notice (their listening connection's ping fails) and still serve:
    // no token is needed, so they are ready.
    for i in 0..REPLICAS {
        replicas
            .admin(i)
            .wait_for_metrics("the replica sees the store down", |scrape| {
                scrape.value("credproxy_state_store_up", &[]) == Some(0.0)
            })
            .await;
        let (status, body) = readyz(&replicas, i).await;
        assert_eq!(status, StatusCode::OK, "replica {i}: {body}");
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "other's token (12 s) was still valid for every readiness check above"
    );
    let location = format!("postgres://postgres@127.0.0.1:{}/", server.port());
    let store = format!("PostgreSQL state store {location}");
    for args in [&["check"][..], &["token", "demo"]] {
        let out = replicas.run(args).await;
        out.assert_code(1);
        let line = out.error_line();
        assert!(line.contains(&store), "{args:?}: {line}");
    }

    // `other`'s token runs out: now a token is needed and cannot be had.
    let mut not_ready_at = Vec::new();
    for i in 0..REPLICAS {
        pg::until_within("readyz says the store is unreachable", OUTAGE, || async {
            readyz(&replicas, i).await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        not_ready_at.push(stopped.elapsed());
        let (_, body) = readyz(&replicas, i).await;
        assert_eq!(
            body["error"], "state_store_unreachable",
            "replica {i}: {body}"
        );
        assert_eq!(
            body["not_ready"],
            serde_json::json!(["other"]),
            "replica {i}: {body}"
        );
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&store) && m.ends_with(": unreachable")),
            "replica {i}, the store named as the CLI names it: {body}"
        );
    }
    assert!(
        stopped.elapsed() < OUTAGE,
        "the 503 came while the database was down"
    );
    let other_calls = other.calls();

    tokio::time::sleep_until(stopped + OUTAGE).await; // the outage the issue fixes
    server.resume().await;
    let resumed = Instant::now();
    let mut recovered = Vec::new();
    for i in 0..REPLICAS {
        replicas
            .replica(i)
            .wait_for_log("state store reachable again")
            .await;
        pg::until_within("the replica is ready again", RECOVERY_WAIT, || async {
            readyz(&replicas, i).await.0 == StatusCode::OK
        })
        .await;
        recovered.push(resumed.elapsed());
    }
    assert!(
        other.successes() > 0 && other.calls() > other_calls,
        "other refreshed after the restart"
    );
    let client = db.client().await;
    assert_eq!(
        Some(stored_refresh_token(&client, "other").await),
        other.latest_refresh_token()
    );

    // LISTEN is back: a forced refresh on one replica reaches the others within 1 s.
    let answer = replicas.admin(0).force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let refreshed = Instant::now();
    let latest = setup.current_token();
    let mut propagation = Vec::new();
    for i in 1..REPLICAS {
        pg::until("the replica serves the new token", || async {
            Replicas::bearer(&replicas.get(i, "/echo").await).as_deref() == Some(latest.as_str())
        })
        .await;
        propagation.push(refreshed.elapsed());
    }
    let (_, slowest) = p50_max_ms(&mut propagation);
    assert!(slowest <= 1000.0, "propagation took {slowest:.0} ms");

    let (requests, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:#?}",
        failures.len()
    );
    assert_eq!(setup.tokens.invalid_grant_count(), 0);
    assert_eq!(other.invalid_grant_count(), 0);
    assert_eq!(
        Some(stored_refresh_token(&client, INTEGRATION).await),
        setup.tokens.latest_refresh_token()
    );
    let (ready_p50, ready_max) = p50_max_ms(&mut recovered);
    let (_, not_ready_max) = p50_max_ms(&mut not_ready_at);
    println!(
        "FIGURES pg_outage_20s: requests {requests} through {REPLICAS} replicas, failed {}, \
         readyz 503 state_store_unreachable from {:.1} s after the stop (other's token expired), \
         ready again after the restart p50 {ready_p50:.0} ms max {ready_max:.0} ms, \
         forced refresh on replica 0 served by the others after max {slowest:.0} ms, \
         invalid_grant 0",
        failures.len(),
        not_ready_max / 1000.0,
    );
    replicas.stop_all().await;
}

// === sslmode ===

/// `sslmode` against a server that speaks TLS only (`hostssl`), its certificate issued by
/// the test CA for `localhost` alone: `require` connects (encrypted; libpq checks no
/// certificate), `verify-ca` connects (chain checked, not the name), `verify-full`
/// connects to `localhost` with the CA trusted through `upstream.extra_ca` and a refresh
/// goes through the store; `verify-full` to `127.0.0.1` (not the certificate's name), with
/// another CA, and `disable` each fail with one line naming the store and the cause;
/// `sslrootcert=FILE` (percent-decoded) names the CA to trust instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured_against_a_tls_only_server() {
    let fx = Fixture::start().await;
    let Some(server) = PgServer::start_tls(&fx.ca, &["localhost"]).await else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no PostgreSQL binaries in CI"
        );
        return;
    };
    let port = server.port();
    let url = |host: &str, mode: &str| {
        format!("postgres://postgres@{host}:{port}/postgres?sslmode={mode}")
    };
    let store =
        |host: &str| format!("PostgreSQL state store postgres://postgres@{host}:{port}/postgres");
    let show = |url: String| {
        let fx = &fx;
        async move {
            fx.config().state_url(&url).write(&fx.dir);
            fx.run(&["state", "show"]).await
        }
    };

    for (host, mode) in [("127.0.0.1", "require"), ("127.0.0.1", "verify-ca")] {
        let out = show(url(host, mode)).await;
        assert_eq!(out.code, Some(0), "sslmode={mode}: {}", out.stderr);
    }
    fx.config()
        .state_url(&url("localhost", "verify-full"))
        .write(&fx.dir);
    let out = fx.run(&["check"]).await;
    out.assert_code(0);
    assert_eq!(fx.server.successes(), 1);
    let out = fx.run(&["state", "show"]).await;
    out.assert_code(0);
    assert!(
        out.line().starts_with("demo: grant refresh_token"),
        "{}",
        out.stdout
    );

    let failures = [
        (url("127.0.0.1", "verify-full"), "127.0.0.1", "certificate"),
        (url("localhost", "disable"), "localhost", "pg_hba.conf"),
    ];
    for (url, host, cause) in failures {
        let out = show(url.clone()).await;
        out.assert_code(1);
        let line = out.error_line();
        assert!(line.contains(&store(host)), "{url}: {line}");
        assert!(line.contains(cause), "{url}: {line}");
    }
    // Another CA in `upstream.extra_ca`: the server's chain leads nowhere trusted.
    TestCa::new().write_pem(&fx.dir.test_ca_path());
    let out = show(url("localhost", "verify-full")).await;
    out.assert_code(1);
    let line = out.error_line();
    assert!(line.contains(&store("localhost")), "{line}");
    assert!(line.contains("certificate"), "{line}");

    // libpq's `sslrootcert=FILE`: that file's CA is the one trusted.
    let root = fx.dir.path().join("db ca+.pem");
    fx.ca.write_pem(&root);
    let encoded = root.to_str().unwrap().replace(' ', "%20");
    let out = show(url("localhost", "verify-full") + "&sslrootcert=" + &encoded).await;
    assert_eq!(out.code, Some(0), "sslrootcert: {}", out.stderr);
    let out = show(url("localhost", "verify-full") + "&sslrootcert=%2Fno%2Fsuch.pem").await;
    out.assert_code(2);
    let line = out.error_line();
    assert!(
        line.contains("state.url: sslrootcert /no/such.pem: cannot read"),
        "{line}"
    );
}
