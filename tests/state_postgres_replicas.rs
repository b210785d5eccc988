//! Many `credproxy run` replicas on one PostgreSQL database (tests/support/replicas.rs),
//! against a token endpoint that rotates refresh tokens and detects their re-use: they
//! refresh as one (one refresh per expiry across all of them, never a re-used token),
//! a forced refresh on one reaches the others within a second, and a replica that missed
//! a change re-reads the store on a 401 instead of refreshing.

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::client;
use crate::support::pg::TestDb;
use crate::support::prom::Scrape;
use crate::support::proxy::{API_HOST, INTEGRATION, ProxyOptions, Setup};
use crate::support::replicas::{REPLICA_HEADER, Replicas};
use crate::support::token::Issuance;
use crate::support::wait;

const REPLICAS: usize = 3;
/// The tokens' lifetime (`expires_in`).
const LIFETIME: Duration = Duration::from_secs(8);
/// How long before expiry credproxy refreshes such a token: `refresh_skew` (60 s by
/// default) capped at half the lifetime (src/tokens/schedule.rs, `lead`), so every replica
/// finds a token due 4 s after it was issued.
const LEAD: Duration = Duration::from_secs(4);
/// How long requests run.
const SOAK: Duration = Duration::from_secs(60);
/// Concurrent clients, each sending through every replica in turn.
const CLIENTS: usize = 6;
/// Each client's request rate: one per this interval (120 requests/s in all). The soak
/// runs beside the whole suite on CI's two cores: its load is kept to a fifth of a core.
const PACE: Duration = Duration::from_millis(50);
/// The bound: a token one replica obtained is served by every other one within it.
const PROPAGATION: Duration = Duration::from_secs(1);
/// A scheduled refresh is never earlier than its due point; allowed noise between the
/// replicas' wall clock (the due point comes from the stored `updated_at`, in
/// microseconds) and the test's monotonic clock.
const CLOCK_SLACK: Duration = Duration::from_millis(100);

/// What the load clients saw.
#[derive(Default)]
struct Load {
    requests: u64,
    /// Answers other than 200: replica, status, body.
    failures: Vec<(usize, StatusCode, String)>,
}

/// One client: a keep-alive connection to each replica's proxy, used in turn, one request
/// per [`PACE`], until `until`.
async fn client(id: usize, proxies: Vec<std::net::SocketAddr>, until: Instant) -> Load {
    let mut senders = Vec::with_capacity(proxies.len());
    for proxy in &proxies {
        let tcp = TcpStream::connect(proxy)
            .await
            .expect("connecting to a proxy");
        senders.push(client::h1(tcp).await);
    }
    let mut load = Load::default();
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turn = id;
    while Instant::now() < until {
        pace.tick().await;
        let replica = turn % proxies.len();
        turn += 1;
        let tag = replica.to_string();
        let request = client::get(
            &format!("http://{API_HOST}/soak/{id}"),
            API_HOST,
            &[(REPLICA_HEADER, &tag)],
        );
        let answer = client::send1(&mut senders[replica], request).await;
        load.requests += 1;
        if answer.status != StatusCode::OK {
            load.failures.push((replica, answer.status, answer.text()));
        }
    }
    load
}

/// A forced refresh: on which replica, when its POST was sent and answered, and how long
/// each other replica took to serve the token it obtained.
struct Forced {
    replica: usize,
    sent: Instant,
    answered: Instant,
    delays: Vec<Duration>,
}

/// The merged lock-wait histogram of every replica: (upper bound, cumulative count), sum.
fn lock_wait(scrapes: &[Scrape]) -> (Vec<(f64, f64)>, f64) {
    let name = "credproxy_state_lock_wait_seconds";
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for scrape in scrapes {
        for sample in scrape.samples(&format!("{name}_bucket")) {
            let le: f64 = sample.labels["le"].parse().expect("a numeric le");
            match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, count)) => *count += sample.value,
                None => buckets.push((le, sample.value)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let sum = scrapes
        .iter()
        .map(|s| s.get(&format!("{name}_sum"), &[]))
        .sum();
    (buckets, sum)
}

/// The smallest bucket bound below which at least `fraction` of the observations lie.
fn bucket_quantile(buckets: &[(f64, f64)], fraction: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    buckets
        .iter()
        .find(|(_, count)| *count >= total * fraction)
        .map_or(f64::NAN, |(bound, _)| *bound)
}

fn ms(duration: Duration) -> String {
    format!("{} ms", duration.as_millis())
}

/// 3 replicas, 8 s tokens, up to 120 requests/s spread over all of them for 60 s, with a forced
/// refresh on one replica every other token: every request 200 (and every request reached
/// the API with a valid token); one refresh per expiry across all replicas; no refresh
/// token presented twice; each forced refresh served by the other replicas within 1 s of
/// the token endpoint issuing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_as_one_for_a_minute() {
    let setup = Setup::start().await;
    setup.tokens.set_expires_in(LIFETIME.as_secs());
    setup.api.require_issued_tokens();
    let Some(db) = TestDb::create().await else {
        return;
    };
    let replicas = Replicas::start(&setup, &db.url, REPLICAS, ProxyOptions::default()).await;
    wait::until("the first token is issued", || {
        setup.tokens.successes() >= 1
    })
    .await;
    let first = setup.current_token();
    for i in 0..REPLICAS {
        replicas.wait_until_injects(i, &first).await;
    }

    let start = Instant::now();
    let end = start + SOAK;
    let proxies: Vec<_> = (0..REPLICAS)
        .map(|i| replicas.replica(i).proxy_addr)
        .collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, proxies.clone(), end)))
        .collect();

    // Each time a token is due, one replica refreshes and every replica serves the new
    // token; after every other such refresh, one replica (in turn) is forced to refresh.
    let mut forced: Vec<Forced> = Vec::new();
    let mut cycle = 0usize;
    while Instant::now() + LEAD < end {
        let seen = setup.tokens.successes();
        let deadline = Instant::now() + LIFETIME + LEAD;
        while setup.tokens.successes() == seen {
            assert!(
                Instant::now() < deadline,
                "no refresh within {:?} of the last one",
                LIFETIME + LEAD
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let token = setup.current_token();
        for i in 0..REPLICAS {
            replicas.wait_until_injects(i, &token).await;
        }
        cycle += 1;
        if cycle % 2 == 1 {
            let replica = forced.len() % REPLICAS;
            let sent = Instant::now();
            let answer = replicas.admin(replica).force_refresh(INTEGRATION).await;
            let answered = Instant::now();
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
            let issuance: Issuance = setup
                .tokens
                .issuances()
                .into_iter()
                .rev()
                .find(|i| sent <= i.at && i.at <= answered)
                .expect("the forced refresh obtained a token");
            let mut delays = Vec::new();
            for other in (0..REPLICAS).filter(|i| *i != replica) {
                let served = replicas
                    .wait_until_injects(other, &issuance.access_token)
                    .await;
                delays.push(served.saturating_duration_since(issuance.at));
            }
            forced.push(Forced {
                replica,
                sent,
                answered,
                delays,
            });
        }
    }

    let mut load = Load::default();
    for client in clients {
        let done = client.await.expect("a load client panicked");
        load.requests += done.requests;
        load.failures.extend(done.failures);
    }
    let counted_until = Instant::now();
    let issuances = setup.tokens.issuances();
    let scrapes = replicas.metrics().await;

    assert!(
        load.failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        load.failures.len(),
        load.requests,
        &load.failures[..load.failures.len().min(5)]
    );
    assert_eq!(
        setup.api.unauthorized(),
        0,
        "a request reached the API with a token that was not valid"
    );
    assert_eq!(
        setup.tokens.invalid_grant_count(),
        0,
        "a refresh token was re-used"
    );
    assert_eq!(
        setup.tokens.grace_redemptions(),
        0,
        "a rotated-away refresh token was presented again"
    );
    let stored = db
        .query("SELECT refresh_token FROM credproxy_tokens WHERE integration = 'demo'")
        .await;
    assert_eq!(
        stored.first().map(|row| row.get::<_, String>(0)),
        setup.tokens.latest_refresh_token(),
        "the database holds the provider's current refresh token"
    );

    // One refresh per expiry. A token's due point is LEAD after it was issued; a forced
    // refresh (issued while its POST was in flight) pre-empts the due point of the token
    // before it. Every other due point that has passed is an expiry, and must see exactly
    // one refresh, across all replicas, before the next token's due point.
    let is_forced = |i: &Issuance| forced.iter().any(|f| f.sent <= i.at && i.at <= f.answered);
    for pair in issuances.windows(2) {
        let gap = pair[1].at - pair[0].at;
        let into = pair[1].at.saturating_duration_since(start);
        assert!(
            gap < LIFETIME,
            "a token expired before it was replaced ({gap:?}, {into:?} into the soak)"
        );
        assert!(
            is_forced(&pair[1]) || gap + CLOCK_SLACK >= LEAD,
            "a refresh {gap:?} after the previous one, before that token was due \
             ({into:?} into the soak)"
        );
    }
    let mut expiries = 0;
    for (n, issued) in issuances.iter().enumerate() {
        let due = issued.at + LEAD;
        let window = (due - CLOCK_SLACK)..(due + LEAD - CLOCK_SLACK);
        let preempted = issuances
            .get(n + 1)
            .is_some_and(|next| is_forced(next) && next.at < window.start);
        if preempted || due > counted_until {
            continue;
        }
        expiries += 1;
        if window.end > counted_until {
            // Its refresh may still be to come.
            continue;
        }
        let refreshes = issuances
            .iter()
            .filter(|i| !is_forced(i) && window.contains(&i.at))
            .count();
        assert_eq!(
            refreshes,
            1,
            "{refreshes} refreshes for the expiry of token {n} (issued {:?} into the soak)",
            issued.at.saturating_duration_since(start)
        );
    }
    let scheduled = issuances.iter().skip(1).filter(|i| !is_forced(i)).count();
    assert!(
        scheduled <= expiries + 1,
        "{scheduled} scheduled refreshes for {expiries} expiries"
    );
    assert!(
        expiries as u64 >= SOAK.as_secs() / LIFETIME.as_secs(),
        "only {expiries} expiries in {SOAK:?}"
    );
    // The replicas' own count of the refreshes they made adds up to the token endpoint's.
    let refreshed: f64 = scrapes
        .iter()
        .map(|s| {
            s.get(
                "credproxy_refreshes_total",
                &[("integration", INTEGRATION), ("outcome", "ok")],
            )
        })
        .sum();
    assert_eq!(refreshed, issuances.len() as f64);
    let store_errors: f64 = scrapes
        .iter()
        .flat_map(|s| s.samples("credproxy_state_errors_total"))
        .map(|s| s.value)
        .sum();
    assert_eq!(store_errors, 0.0, "state store errors during the soak");

    let mut delays: Vec<Duration> = forced.iter().flat_map(|f| f.delays.clone()).collect();
    delays.sort();
    assert!(forced.len() >= 3, "only {} forced refreshes", forced.len());
    let forced_replicas: HashSet<usize> = forced.iter().map(|f| f.replica).collect();
    assert_eq!(forced_replicas.len(), REPLICAS, "every replica was forced");
    let max = *delays.last().expect("propagation delays");
    let p50 = delays[delays.len() / 2];
    let (buckets, wait_sum) = lock_wait(&scrapes);
    let waits = buckets.last().map_or(0.0, |(_, count)| *count);
    println!(
        "FIGURES state_postgres_replicas::three_replicas_refresh_as_one_for_a_minute: \
         {REPLICAS} replicas, {SOAK:?}, {} requests all 200; refreshes per expiry across \
         replicas {:.2} ({scheduled} scheduled refreshes / {expiries} expiries, plus {} \
         forced; token endpoint successes {}, invalid_grant 0, grace re-use 0); forced \
         refresh served by the other replicas after p50 {}, max {} ({} samples); lock wait \
         (credproxy_state_lock_wait_seconds, all replicas) p50 <= {} ms, max <= {} ms, mean \
         {:.1} ms ({waits} waits)",
        load.requests,
        scheduled as f64 / expiries as f64,
        forced.len(),
        issuances.len(),
        ms(p50),
        ms(max),
        delays.len(),
        bucket_quantile(&buckets, 0.5) * 1000.0,
        bucket_quantile(&buckets, 1.0) * 1000.0,
        if waits > 0.0 {
            wait_sum / waits * 1000.0
        } else {
            0.0
        },
    );
    assert!(
        max <= PROPAGATION,
        "a forced refresh reached another replica after {max:?} (p50 {p50:?}); bound {PROPAGATION:?}"
    );
    for exit in replicas.stop_all().await {
        assert_eq!(exit.code, Some(0), "{}", exit.log);
    }
}

/// A replica holds an old token while the store already has a newer one it was never told
/// about (the table's NOTIFY trigger is off, and `credproxy check` refreshed): the API
/// answers 401 to the old token, and the replica resends with the store's token, without
/// a refresh of its own — also right after a 401 made it refresh, when the rate limit on
/// forced refreshes holds (the limit spares the provider; re-reading the store costs it
/// nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_token_the_store_replaced_rereads_instead_of_refreshing() {
    let setup = Setup::start().await;
    let Some(db) = TestDb::create().await else {
        return;
    };
    let replicas = Replicas::start(&setup, &db.url, 1, ProxyOptions::default()).await;
    wait::until("the first token is issued", || {
        setup.tokens.successes() >= 1
    })
    .await;
    let first = setup.current_token();
    replicas.wait_until_injects(0, &first).await;

    // A 401 to the current token: one forced refresh, and the rate limit starts.
    setup.api.revoke(&first);
    let answer = replicas.get(0, "/revoked").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.tokens.successes(), 2);
    let old = setup.current_token();
    assert_eq!(setup.api.last().authorization(), [format!("Bearer {old}")]);

    db.client()
        .await
        .batch_execute("ALTER TABLE credproxy_tokens DISABLE TRIGGER credproxy_tokens_notify")
        .await
        .expect("disabling the NOTIFY trigger");
    let out = replicas.run(&["check"]).await;
    out.assert_code(0);
    let new = setup.current_token();
    assert_ne!(new, old);
    assert_eq!(setup.tokens.successes(), 3);

    let answer = replicas.get(0, "/before").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        setup.api.last().authorization(),
        [format!("Bearer {old}")],
        "the replica was not told of the new token"
    );

    setup.api.revoke(&old);
    let answer = replicas.get(0, "/after").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        setup.api.last_answers(2),
        [
            (StatusCode::UNAUTHORIZED, vec![format!("Bearer {old}")]),
            (StatusCode::OK, vec![format!("Bearer {new}")]),
        ],
        "the resend carried the store's token"
    );
    assert_eq!(
        setup.tokens.calls(),
        3,
        "the replica refreshed instead of re-reading the store"
    );
    let metrics = replicas.admin(0).metrics().await;
    assert_eq!(
        metrics.get("credproxy_retries_401_total", &[("route", API_HOST)]),
        2.0
    );
    for exit in replicas.stop_all().await {
        assert_eq!(exit.code, Some(0), "{}", exit.log);
    }
}
