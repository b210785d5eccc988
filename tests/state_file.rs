//! The state file: a rotated refresh token is stored before the new access token is
//! served and is what every later run uses; a corrupt or unreadable file stops credproxy
//! without being touched; the file is private; a stored valid token is used as is, and a
//! changed config refresh token starts the chain over.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use credproxy::tokens::Health;
use time::{Duration, OffsetDateTime};

use crate::support::fixture::{Fixture, Seed};
use crate::support::token::{self, WAIT};
use crate::support::wait;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The refresh token in the state file is the one the provider currently expects.
fn assert_stored_is_latest(fx: &Fixture) {
    assert_eq!(
        Some(fx.dir.stored_refresh_token("demo")),
        fx.server.latest_refresh_token()
    );
}

/// Runs `credproxy token demo`, asserts it succeeded with an access token the provider
/// issued and still honours, and returns that token.
async fn token_served(fx: &Fixture) -> String {
    let out = fx.run(&["token", "demo"]).await;
    out.assert_code(0);
    assert!(fx.server.is_valid_access_token(out.line()));
    out.line().to_owned()
}

/// The refresh tokens presented to the provider, in order.
fn presented(fx: &Fixture) -> Vec<String> {
    fx.server
        .requests()
        .iter()
        .map(|r| r.field("refresh_token").unwrap_or_default().to_owned())
        .collect()
}

// === rotation ===

/// `check` stores the provider's rotated refresh token, in the documented format; later
/// processes (`check`, then `token` once the access token has expired) each present the
/// latest stored token, and the config's original one is never sent again.
#[tokio::test]
async fn rotated_refresh_token_survives_into_later_processes() {
    let fx = Fixture::start().await;
    fx.write_config();
    let config_before = std::fs::read(fx.dir.config_path()).expect("config");

    fx.run(&["check"]).await.assert_code(0);
    let rt1 = fx.server.latest_refresh_token().expect("rotated");
    assert_ne!(rt1, fx.rt0);
    let state = fx.dir.read_state();
    assert_eq!(state["version"], 1, "{state}");
    let entry = &state["integrations"]["demo"];
    let mut keys: Vec<&str> = entry
        .as_object()
        .expect("entry is an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_at",
            "refresh_token",
            "seed_fingerprint",
            "token_type",
            "updated_at"
        ]
    );
    assert_eq!(entry["refresh_token"], rt1.as_str());
    assert_eq!(
        entry["access_token"].as_str(),
        fx.server.current_access_token().as_deref()
    );
    let expires_at = entry["expires_at"].as_str().expect("expires_at");
    OffsetDateTime::parse(expires_at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("expires_at {expires_at:?} is not RFC 3339: {e}"));
    let seed = entry["seed_fingerprint"]
        .as_str()
        .expect("seed_fingerprint");
    assert!(
        !seed.contains(&fx.rt0),
        "the fingerprint is a hash, not the token"
    );
    assert_eq!(
        std::fs::read(fx.dir.config_path()).expect("config"),
        config_before,
        "the config file is never rewritten"
    );

    // The next process: the stored rt1, not the config's rt0 (which the provider would
    // still accept once, as a grace token: the server counts that as a grace redemption).
    fx.server.set_expires_in(0);
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(presented(&fx), [fx.rt0.clone(), rt1.clone()]);
    let rt2 = fx.dir.stored_refresh_token("demo");
    assert_eq!(Some(rt2.clone()), fx.server.latest_refresh_token());

    // The stored access token has expired: `token` refreshes, again from the state.
    fx.server.set_expires_in(token::DEFAULT_EXPIRES_IN);
    token_served(&fx).await;
    assert_eq!(presented(&fx), [fx.rt0.clone(), rt1, rt2]);
    assert_eq!(fx.server.grace_redemptions(), 0);
    assert_eq!(fx.server.invalid_grant_count(), 0);
    assert_stored_is_latest(&fx);
}

/// A provider answering an absurd `expires_in` (10^13 s, past any date a clock can
/// hold) has still rotated the refresh token: credproxy must not panic, and must store
/// the new refresh token so the next run continues the chain.
#[tokio::test]
async fn absurd_expires_in_neither_panics_nor_loses_the_rotation() {
    let fx = Fixture::start().await;
    fx.write_config();
    fx.server.set_expires_in(10_u64.pow(13));
    let out = fx.run(&["check"]).await;
    assert!(
        !out.stderr.contains("panicked"),
        "a provider's answer made credproxy panic:\n{}",
        out.stderr
    );
    assert!(matches!(out.code, Some(0 | 1)), "{out:?}");
    assert!(
        fx.dir.state_path().exists(),
        "the rotated refresh token was never stored"
    );
    assert_stored_is_latest(&fx);

    fx.server.set_expires_in(token::DEFAULT_EXPIRES_IN);
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(fx.server.grace_redemptions(), 0);
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

/// In-process, the moment a new token is published (the `subscribe()` channel fires), the
/// state file on disk already holds the rotated refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_token_finds_rotated_refresh_token_on_disk() {
    let fx = Fixture::start().await;
    let config = fx.config().load(&fx.dir);
    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("opening the token store");
    let integration = tokens.get("demo").expect("demo").clone();
    let mut published = integration.subscribe();

    let caller = {
        let integration = integration.clone();
        tokio::spawn(async move { integration.ready().await })
    };
    tokio::time::timeout(WAIT, published.changed())
        .await
        .expect("a token is published")
        .expect("integration alive");
    // Read at once, before anything else can happen.
    let on_disk = fx.dir.stored_refresh_token("demo");
    assert_eq!(Some(on_disk), fx.server.latest_refresh_token());

    let snapshot = caller.await.expect("caller").expect("a token");
    assert_eq!(
        fx.dir.stored_refresh_token("demo"),
        fx.server.latest_refresh_token().expect("rotated")
    );
    assert_eq!(
        Some(snapshot.access_token.expose().to_owned()),
        fx.server.current_access_token()
    );
}

/// Deterministic form of the ordering: the test holds the state file's write lock, so
/// the state write after the provider's answer blocks. Until it is released, nobody gets
/// the new access token; once the write is done, the token is served.
///
/// Relies on the store serialising writes with a `flock` on a file in the state
/// directory (state.rs: "a file-wide lock", `<state>.lock`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_is_not_served_before_the_rotated_refresh_token_is_saved() {
    let fx = Fixture::start().await;
    let config = fx.config().load(&fx.dir);
    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("opening the token store");
    let integration = tokens.get("demo").expect("demo").clone();

    let state_dir = fx.dir.state_path().parent().expect("state dir").to_owned();
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let mut lock_name = fx.dir.state_path().into_os_string();
    lock_name.push(".lock");
    let write_lock = std::fs::File::create(&lock_name).expect("write lock file");
    write_lock.lock().expect("taking the state write lock");

    let caller = {
        let integration = integration.clone();
        tokio::spawn(async move { integration.ready().await })
    };
    fx.server.wait_for_responses(1).await;
    wait::until("the state write blocks on the test's lock", || {
        caller.is_finished()
            || integration.current().is_some()
            || wait::flock_waiters(lock_name.as_ref()) > 0
    })
    .await;
    assert!(
        integration.current().is_none(),
        "the access token was published before the rotated refresh token was saved"
    );
    assert!(!caller.is_finished(), "ready() returned before the save");
    assert!(!fx.dir.state_path().exists());

    drop(write_lock);
    let snapshot = caller.await.expect("caller").expect("a token");
    assert_stored_is_latest(&fx);
    assert!(
        fx.server
            .is_valid_access_token(snapshot.access_token.expose())
    );
}

// === start-up from the stored state ===

/// A stored, still-valid access token is used as is: `credproxy token` after `check`
/// prints it without calling the provider, and in-process it is current at once.
#[tokio::test]
async fn stored_valid_token_is_used_without_refresh() {
    let fx = Fixture::start().await;
    let builder = fx.write_config();
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(fx.server.calls(), 1);
    let stored = fx.dir.read_state()["integrations"]["demo"]["access_token"]
        .as_str()
        .expect("stored access token")
        .to_owned();

    for _ in 0..2 {
        let out = fx.run(&["token", "demo"]).await;
        out.assert_code(0);
        assert_eq!(out.line(), stored);
    }
    assert_eq!(fx.server.calls(), 1, "no refresh for a stored valid token");

    let config = builder.load(&fx.dir);
    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("opening the token store");
    let integration = tokens.get("demo").expect("demo");
    let current = integration.current().expect("current at start");
    assert_eq!(current.access_token.expose(), stored);
    assert_eq!(integration.status().state, Health::Ok);
    let ready = Arc::clone(integration).ready().await.expect("ready");
    assert_eq!(ready.access_token.expose(), stored);
    assert_eq!(fx.server.calls(), 1);
}

/// A stored token that is still valid but inside the refresh skew: `credproxy token`
/// refreshes first (from the stored chain) rather than hand out a token about to expire.
#[tokio::test]
async fn token_about_to_expire_is_refreshed_first() {
    let fx = Fixture::start().await;
    fx.write_config();
    let now = OffsetDateTime::now_utc();
    fx.seed_state(&Seed {
        refresh_token: &fx.rt0,
        access_token: "at-SECRET-expiring",
        issued_at: now - Duration::hours(1),
        expires_at: now + Duration::seconds(20),
        seeded_from: Some(&fx.rt0),
    });
    let served = token_served(&fx).await;
    assert_ne!(served, "at-SECRET-expiring");
    assert_eq!(fx.server.calls(), 1);
    assert_stored_is_latest(&fx);
}

/// The config's refresh token changed since the state was written (the user
/// re-authorized): the stored chain is abandoned and the new config token is used.
#[tokio::test]
async fn changed_config_refresh_token_starts_over() {
    let fx = Fixture::start().await;
    fx.write_config();
    fx.run(&["check"]).await.assert_code(0);
    let old_seed = fx.dir.read_state()["integrations"]["demo"]["seed_fingerprint"].clone();

    let fresh = token::new_refresh_token(0);
    fx.server.reset_chain(&fresh);
    fx.config().refresh_token(&fresh).write(&fx.dir);
    token_served(&fx).await;
    assert_eq!(
        fx.server
            .last_request()
            .expect("request")
            .field("refresh_token"),
        Some(fresh.as_str())
    );
    assert_eq!(fx.server.invalid_grant_count(), 0);
    let entry = &fx.dir.read_state()["integrations"]["demo"];
    assert_ne!(entry["seed_fingerprint"], old_seed);
    assert_eq!(
        entry["refresh_token"].as_str(),
        fx.server.latest_refresh_token().as_deref()
    );

    // And the new chain is followed from then on, not the config token again.
    fx.run(&["check"]).await.assert_code(0);
    assert_ne!(
        fx.server
            .last_request()
            .expect("request")
            .field("refresh_token"),
        Some(fresh.as_str())
    );
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

/// A chain stored without a seed (as `credproxy authorize` leaves it) is used when the
/// config has no refresh token at all.
#[tokio::test]
async fn stored_chain_works_without_a_config_refresh_token() {
    let fx = Fixture::start().await;
    fx.config().no_refresh_token().write(&fx.dir);
    let now = OffsetDateTime::now_utc();
    fx.seed_state(&Seed {
        refresh_token: &fx.rt0,
        access_token: "at-SECRET-expired",
        issued_at: now - Duration::hours(2),
        expires_at: now - Duration::hours(1),
        seeded_from: None,
    });
    token_served(&fx).await;
    assert_eq!(
        fx.server
            .last_request()
            .expect("request")
            .field("refresh_token"),
        Some(fx.rt0.as_str())
    );
    assert_stored_is_latest(&fx);
}

/// No refresh token in the config nor the state: a clear runtime error, no provider call.
#[tokio::test]
async fn no_refresh_token_anywhere_is_a_clear_error() {
    let fx = Fixture::start().await;
    fx.config().no_refresh_token().write(&fx.dir);
    let out = fx.run(&["token", "demo"]).await;
    out.assert_code(1);
    let error = out.last_error_line();
    assert!(
        error.contains("demo") && error.contains("authorize"),
        "{error}"
    );
    assert_eq!(fx.server.calls(), 0);
}

// === corrupt and unreadable ===

/// Each kind of damage: exit 1, one line naming the file and "corrupt", the bytes left
/// exactly as they were (they may hold the only valid refresh token), and no refresh
/// from the config token behind the user's back.
#[tokio::test]
async fn corrupt_state_file_is_an_error_and_left_untouched() {
    let fx = Fixture::start().await;
    fx.write_config();
    let damaged: [&[u8]; 5] = [
        b"{\"version\": 1, \"integrations\": {\"demo\": {\"refresh_token\": \"rt-SECRET-9-cut",
        b"not json at all",
        b"",
        b"{\"version\": 99, \"integrations\": {}}",
        b"{\"version\": 1, \"integrations\": {\"demo\": {\"refresh_token\": 7}}}",
    ];
    let state_path = fx.dir.state_path();
    for bytes in damaged {
        fx.dir.write_state(bytes);
        for args in [&["check"][..], &["token", "demo"]] {
            let out = fx.run(args).await;
            out.assert_code(1);
            let error = out.error_line();
            assert!(
                error.contains(state_path.to_str().expect("utf-8")) && error.contains("corrupt"),
                "{args:?} on {:?}: {error}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(
                fx.dir.state_bytes(),
                bytes,
                "state file changed by {args:?}"
            );
            assert!(out.stdout.is_empty(), "{}", out.stdout);
        }
    }
    assert_eq!(fx.server.calls(), 0);
}

/// A state path that cannot be read (a directory stands in its place: tests run as root,
/// so permissions would not stop a read): exit 1 naming the file, left as it was.
#[tokio::test]
async fn unreadable_state_file_is_an_error() {
    let fx = Fixture::start().await;
    fx.write_config();
    let state_path = fx.dir.state_path();
    std::fs::create_dir_all(&state_path).expect("directory in place of the state file");
    for args in [&["check"][..], &["token", "demo"]] {
        let out = fx.run(args).await;
        out.assert_code(1);
        let error = out.error_line();
        assert!(
            error.contains(state_path.to_str().expect("utf-8")),
            "{args:?}: {error}"
        );
        assert!(state_path.is_dir());
        assert_eq!(
            std::fs::read_dir(&state_path).expect("dir").count(),
            0,
            "nothing written into it"
        );
    }
    assert_eq!(fx.server.calls(), 0);
}

// === permissions ===

/// The state file is mode 0600 when created, and a looser file left by someone else is
/// 0600 again after credproxy rewrites it.
#[tokio::test]
async fn state_file_is_private() {
    let fx = Fixture::start().await;
    fx.write_config();
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(mode(&fx.dir.state_path()), 0o600);

    std::fs::set_permissions(fx.dir.state_path(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(mode(&fx.dir.state_path()), 0o600);
    let state_dir = fx.dir.state_path().parent().expect("state dir").to_owned();
    for entry in std::fs::read_dir(&state_dir).expect("state dir") {
        let path = entry.expect("entry").path();
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is readable by others",
            path.display()
        );
    }
}
