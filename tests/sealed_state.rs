//! Sealed state: with `[state] key`, the state file holds no token (nor any base64 form
//! of one); a wrong or missing key, a truncated or swapped entry stop credproxy without
//! touching the file or calling the provider; a store written in clear is sealed on the
//! first write once a key is configured; `state rekey` moves the whole store to a new key
//! in one step, while `credproxy run` serves and refreshes, and a rekey killed at any
//! point leaves the store entirely under the old key or entirely under the new; secrets
//! come from `${file:PATH}`. The database store keeps the same contract (`TestDb`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use credproxy::secret::Secret;
use credproxy::secret::StateKey;
use credproxy::state::{Entry, FileStore, SealedStore, StateStore};
use http::StatusCode;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::admin::Admin;
use crate::support::cli::{self, ConfigBuilder, TestDir};
use crate::support::client;
use crate::support::fixture::Fixture;
use crate::support::pg::TestDb;
use crate::support::proxy::{
    API_HOST, INTEGRATION, ProxyOptions, ProxyProcess, Setup, integration_toml,
};
use crate::support::token::{self, TokenServer};

const NEW_KEY_VAR: &str = "TEST_NEW_STATE_KEY";

/// A key from `credproxy state keygen`, as the operator gets one.
async fn keygen() -> String {
    let out = cli::run(&["state", "keygen"], &[]).await;
    out.assert_code(0);
    out.line().to_owned()
}

/// Writes `key` (with the newline `echo` adds) to `name` in `dir`; returns the path.
fn write_key(dir: &TestDir, name: &str, key: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

fn key_line(key_path: &str) -> String {
    format!("key = \"${{file:{key_path}}}\"")
}

/// `token` and the base64 encodings that could carry it: both alphabets, at each of the
/// three byte alignments it could sit at inside a longer encoded value.
fn with_base64_forms(token: &str) -> Vec<String> {
    let mut forms = vec![token.to_owned()];
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for shift in 0..3 {
            let mut bytes = vec![0u8; shift];
            bytes.extend_from_slice(token.as_bytes());
            let encoded = engine.encode(&bytes);
            // Drop the characters the padding bytes and the cut-off end influence.
            let start = if shift == 0 { 0 } else { 4 };
            forms.push(encoded[start..encoded.len() - 4].to_owned());
        }
    }
    forms
}

/// Panics if the state file holds any of `tokens`, in clear or base64.
fn assert_no_token_in(path: &Path, tokens: &[String]) {
    let bytes = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert_no_token_in_text(&text, tokens, &path.display().to_string());
}

/// Panics if `text` (what `place` holds) contains any of `tokens`, in clear or base64.
fn assert_no_token_in_text(text: &str, tokens: &[String], place: &str) {
    for token in tokens {
        for form in with_base64_forms(token) {
            assert!(
                !text.contains(&form),
                "{place} holds {form:?} (from token {token:?}):\n{text}"
            );
        }
    }
}

/// The state file at `path`, sealed with `key` (entries in clear get sealed).
async fn open_file(
    path: &Path,
    key: Option<&StateKey>,
) -> Result<Arc<SealedStore>, credproxy::state::StateError> {
    let file = Arc::new(FileStore::open(path)?);
    SealedStore::open(file, key).await.map(Arc::new)
}

/// Every entry of the file at `path` opens with `key` (and none is in clear).
async fn opens_with(path: &Path, key: Option<&StateKey>) -> bool {
    open_file(path, key).await.is_ok()
}

fn parse_key(text: &str) -> StateKey {
    StateKey::from_base64(text).unwrap()
}

// === round trip ===

/// Three refreshes through the configured (sealed) store, each presenting the refresh
/// token the previous one stored: `check`, `check` once the token has expired, and
/// `token` after it expired again, which must read the sealed refresh token to refresh.
async fn refresh_through_the_store(fx: &Fixture) {
    fx.run(&["check"]).await.assert_code(0);
    fx.server.set_expires_in(0);
    fx.run(&["check"]).await.assert_code(0);
    fx.server.set_expires_in(3600);
    let out = fx.run(&["token", "demo"]).await;
    out.assert_code(0);
    assert!(fx.server.is_valid_access_token(out.line()));
    assert_eq!(
        fx.server.invalid_grant_count(),
        0,
        "every refresh presented the latest token"
    );
}

/// `keygen` prints a fresh 32-byte key each time; with it as `[state] key` (from a file,
/// as a Kubernetes secret is mounted), the refresh chain works across processes, the
/// file holds no token in any form, and expiry and fingerprint stay readable.
#[tokio::test]
async fn sealed_round_trip_leaves_no_token_in_the_file() {
    let (key, other) = (keygen().await, keygen().await);
    assert_ne!(key, other, "every key is fresh");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&key)
            .unwrap()
            .len(),
        32
    );

    let fx = Fixture::start().await;
    let key_path = write_key(&fx.dir, "state.key", &key);
    fx.config().state_line(&key_line(&key_path)).write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);
    refresh_through_the_store(&fx).await;

    let mut secrets = fx.server.issued_tokens();
    assert!(
        secrets.len() >= 8,
        "four refreshes, each an access and a refresh token"
    );
    secrets.extend([fx.rt0.clone(), fx.client_secret.clone(), key.clone()]);
    assert_no_token_in(&fx.dir.state_path(), &secrets);

    let state = fx.dir.read_state();
    let entry = &state["integrations"]["demo"];
    assert_eq!(entry["sealed"], true, "{state}");
    assert!(entry["refresh_token"].as_str().unwrap().starts_with("v1:"));
    assert!(entry["access_token"].as_str().unwrap().starts_with("v1:"));
    let expires_at = entry["expires_at"].as_str().unwrap();
    assert!(
        OffsetDateTime::parse(expires_at, &Rfc3339).is_ok(),
        "{expires_at}"
    );
    assert_eq!(
        entry["seed_fingerprint"].as_str(),
        Some(credproxy::state::fingerprint(&Secret::new(fx.rt0.as_str())).as_str())
    );
    // Through the key, the stored chain is the provider's latest.
    let store = open_file(&fx.dir.state_path(), Some(&parse_key(&key)))
        .await
        .unwrap();
    let opened = store.load("demo").await.unwrap().unwrap();
    assert_eq!(
        opened.refresh_token.map(|t| t.expose().to_owned()),
        fx.server.latest_refresh_token()
    );
}

// === refusals ===

/// Two sealed integrations (`demo`, `other`); returns the key, the other integration's
/// token server (kept alive) and the config builder.
async fn two_sealed(fx: &Fixture) -> (String, TokenServer, ConfigBuilder) {
    let key = keygen().await;
    let key_path = write_key(&fx.dir, "state.key", &key);
    let other_rt = token::new_refresh_token(0);
    let other = TokenServer::start(&fx.ca, &other_rt).await;
    let builder = fx
        .config()
        .state_line(&key_line(&key_path))
        .raw(&integration_toml("other", &other, &other_rt, None));
    builder.write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);
    (key, other, builder)
}

/// Runs `check`, `token demo` and `run`: each exits 1 naming the store, the integration
/// and "wrong or missing [state] key"; no provider is called; the file is byte-identical.
async fn assert_refused(fx: &Fixture, other: &TokenServer, integration: &str, case: &str) {
    let before = fx.dir.state_bytes();
    let calls = (fx.server.calls(), other.calls());
    for args in [&["check"][..], &["token", "demo"], &["run"]] {
        let out = fx.run(args).await;
        out.assert_code(1);
        let line = out.last_error_line();
        for part in [
            fx.dir.state_path().to_str().unwrap(),
            &format!(": {integration}: "),
            "wrong or missing [state] key",
        ] {
            assert!(
                line.contains(part),
                "{case}: {args:?}: {part:?} not in {line:?}"
            );
        }
    }
    assert_eq!(
        (fx.server.calls(), other.calls()),
        calls,
        "{case}: nothing refreshed"
    );
    assert_eq!(
        fx.dir.state_bytes(),
        before,
        "{case}: the store is untouched"
    );
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_refused_and_changes_nothing() {
    let fx = Fixture::start().await;
    let (_key, other, builder) = two_sealed(&fx).await;

    write_key(&fx.dir, "state.key", &keygen().await);
    assert_refused(&fx, &other, "demo", "wrong key").await;

    let key_path = fx.dir.path().join("state.key");
    let no_key = builder
        .build()
        .replace(&key_line(key_path.to_str().unwrap()), "");
    fx.dir.write_config(&no_key);
    assert_refused(&fx, &other, "demo", "missing key").await;
}

#[tokio::test]
async fn a_truncated_or_swapped_entry_is_refused_and_changes_nothing() {
    let fx = Fixture::start().await;
    let (_key, other, _builder) = two_sealed(&fx).await;
    let good = fx.dir.read_state();

    let mut truncated = good.clone();
    let sealed = truncated["integrations"]["demo"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    truncated["integrations"]["demo"]["refresh_token"] = sealed[..sealed.len() - 6].into();
    fx.dir.write_state(truncated.to_string().as_bytes());
    assert_refused(&fx, &other, "demo", "truncated ciphertext").await;

    // other's sealed refresh token moved into demo: it opens only as other's.
    let mut swapped = good.clone();
    swapped["integrations"]["demo"]["refresh_token"] =
        good["integrations"]["other"]["refresh_token"].clone();
    fx.dir.write_state(swapped.to_string().as_bytes());
    assert_refused(&fx, &other, "demo", "swapped field").await;

    // The whole entries exchanged.
    let mut exchanged = good.clone();
    exchanged["integrations"]["demo"] = good["integrations"]["other"].clone();
    exchanged["integrations"]["other"] = good["integrations"]["demo"].clone();
    fx.dir.write_state(exchanged.to_string().as_bytes());
    assert_refused(&fx, &other, "demo", "swapped entries").await;

    // Put back, everything works again: nothing was lost.
    fx.dir.write_state(good.to_string().as_bytes());
    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(
        fx.server.invalid_grant_count() + other.invalid_grant_count(),
        0
    );
}

// === migration ===

/// A store written without a key is sealed by the first process that writes with one,
/// even when that process needs no refresh; the stored tokens stay in use.
#[tokio::test]
async fn a_plain_store_is_sealed_on_the_first_write_with_a_key() {
    let fx = Fixture::start().await;
    let builder = fx.write_config();
    fx.run(&["check"]).await.assert_code(0);
    let access = fx.server.current_access_token().unwrap();
    let rt1 = fx.server.latest_refresh_token().unwrap();
    assert_eq!(fx.dir.stored_refresh_token("demo"), rt1, "written in clear");

    let key_path = write_key(&fx.dir, "state.key", &keygen().await);
    builder.state_line(&key_line(&key_path)).write(&fx.dir);
    let calls = fx.server.calls();
    let out = fx.run(&["token", "demo"]).await;
    out.assert_code(0);
    assert_eq!(out.line(), access, "the stored token is used as is");
    assert_eq!(fx.server.calls(), calls, "no refresh");
    assert_eq!(fx.dir.read_state()["integrations"]["demo"]["sealed"], true);
    assert_no_token_in(&fx.dir.state_path(), &fx.server.issued_tokens());

    fx.run(&["check"]).await.assert_code(0);
    assert_eq!(
        fx.server.invalid_grant_count(),
        0,
        "the sealed chain continues"
    );
}

// === rekey ===

/// `credproxy run` serves requests non-stop and refreshes every ~2 s while the store is
/// rekeyed and the new key is rolled out by SIGHUP: no request fails, no rotation is lost,
/// and the store ends entirely under the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_while_run_serves_and_refreshes() {
    let setup = Setup::start().await;
    setup.tokens.set_expires_in(4);
    let old_key = keygen().await;
    let new_key = keygen().await;
    let key_path = write_key(&setup.dir, "state.key", &old_key);
    let builder = setup
        .config(&ProxyOptions::default())
        .state_line(&key_line(&key_path))
        .refresh_skew("2s");
    builder.write(&setup.dir);
    let config = setup.dir.config_arg();
    let proxy = ProxyProcess::spawn(&setup.dir, &["run", "-c", &config], &builder.env()).await;
    Admin::new(proxy.admin_addr)
        .wait_for_readyz(StatusCode::OK)
        .await;

    // Requests, one after another, until told to stop; every answer must be 200.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, served) = (stop.clone(), served.clone());
        // Plain HTTP to the routed host: credproxy goes upstream over TLS.
        let (addr, url) = (proxy.proxy_addr, format!("http://{API_HOST}/echo"));
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let answer = client::proxy_get(addr, &url, &[]).await;
                if answer.status != StatusCode::OK {
                    failures.push(format!("{}: {}", answer.status, answer.text()));
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            failures
        })
    };
    let refreshed = setup.tokens.successes();
    setup.tokens.wait_for_calls(setup.tokens.calls() + 1).await;

    let mut env = builder.env();
    env.push((NEW_KEY_VAR, &new_key));
    let out = setup
        .dir
        .run(
            &["state", "rekey", "--new-key", NEW_KEY_VAR, "-c", &config],
            &env,
        )
        .await;
    out.assert_code(0);
    assert!(
        out.line().contains("re-sealed 1 entry under the new key"),
        "{}",
        out.line()
    );
    let path = setup.dir.state_path();
    assert!(opens_with(&path, Some(&parse_key(&new_key))).await);
    assert!(!opens_with(&path, Some(&parse_key(&old_key))).await);

    // The fleet step: roll the new key out.
    write_key(&setup.dir, "state.key", &new_key);
    proxy.hangup();
    proxy.wait_for_log("config reloaded").await;
    let after_reload = setup.tokens.successes();
    setup.tokens.wait_for_calls(setup.tokens.calls() + 2).await;
    let api_before_stop = setup.api.requests();
    setup.api.wait_for_requests(api_before_stop + 5).await;
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.await.unwrap();

    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(served.load(Ordering::Relaxed) > 10);
    assert!(after_reload > refreshed, "refreshed before the rollout");
    assert!(
        setup.tokens.successes() >= after_reload + 2,
        "refreshes after the rollout"
    );
    assert_eq!(setup.tokens.invalid_grant_count(), 0, "no rotation lost");
    let issued = setup.tokens.issued_tokens();
    for seen in setup.api.seen() {
        for auth in seen.authorization() {
            let token = auth.strip_prefix("Bearer ").unwrap();
            assert!(
                issued.iter().any(|t| t == token),
                "a token the provider issued"
            );
        }
    }
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        !exit.log.contains(&old_key) && !exit.log.contains(&new_key),
        "no key logged"
    );
    let store = open_file(&path, Some(&parse_key(&new_key))).await.unwrap();
    assert_eq!(
        store
            .load(INTEGRATION)
            .await
            .unwrap()
            .unwrap()
            .refresh_token
            .map(|t| t.expose().to_owned()),
        setup.tokens.latest_refresh_token(),
        "the stored chain is the provider's latest"
    );
    assert_no_token_in(&path, &issued);
}

fn entry(n: usize) -> Entry {
    Entry {
        refresh_token: Some(Secret::new(format!("rt-SECRET-{n}"))),
        access_token: Some(Secret::new(format!("at-SECRET-{n}"))),
        token_type: Some("bearer".into()),
        expires_at: Some(OffsetDateTime::now_utc()),
        seed_fingerprint: None,
        scope: None,
        updated_at: OffsetDateTime::now_utc(),
        sealed: false,
    }
}

/// The store's entries, opened with whichever of `keys` opens all of them; panics when
/// none does (a store half under one key and half under another).
async fn entries_under(path: &Path, keys: &[&StateKey]) -> (usize, Vec<(String, Entry)>) {
    for (index, key) in keys.iter().enumerate() {
        if let Ok(store) = open_file(path, Some(key)).await {
            return (index, store.entries().await.unwrap().into_iter().collect());
        }
    }
    panic!("{} is under neither key", path.display());
}

/// `state rekey` SIGKILLed at 24 random points of its run: every time, the store is
/// entirely under the old key or entirely under the new one, with every token intact.
#[tokio::test]
async fn rekey_killed_at_random_points_leaves_one_key() {
    const ENTRIES: usize = 60;
    let dir = TestDir::new();
    let keys = [parse_key(&keygen().await), parse_key(&keygen().await)];
    let texts: Vec<String> = keys.iter().map(|k| k.to_base64().to_string()).collect();
    let store = open_file(&dir.state_path(), Some(&keys[0])).await.unwrap();
    for n in 0..ENTRIES {
        let name = format!("i{n:02}");
        store
            .lock(&name)
            .await
            .unwrap()
            .save(&entry(n))
            .await
            .unwrap();
    }
    let original = entries_under(&dir.state_path(), &[&keys[0]]).await.1;
    let rekey = |current: usize| {
        let key_path = write_key(&dir, "state.key", &texts[current]);
        let state_path = dir.state_path();
        dir.write_config(&format!(
            "[state]\npath = \"{}\"\n{}\n",
            state_path.display(),
            key_line(&key_path)
        ));
        let config = dir.config_arg();
        dir.spawn(
            &["state", "rekey", "--new-key", NEW_KEY_VAR, "-c", &config],
            &[(NEW_KEY_VAR, &texts[1 - current])],
        )
    };

    // How long one whole rekey takes here: the kill points spread over that.
    let started = Instant::now();
    cli::collect(rekey(0), &["state", "rekey"])
        .await
        .assert_code(0);
    let whole = started.elapsed();
    assert_eq!(
        entries_under(&dir.state_path(), &[&keys[0], &keys[1]])
            .await
            .0,
        1
    );
    let mut current = 1;
    let mut outcomes = [0, 0];
    for _ in 0..24 {
        let mut child = rekey(current);
        let at = whole.mul_f64(rand::random::<f64>());
        tokio::time::sleep(at).await; // the random kill point, not a synchronisation
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let (now, entries) = entries_under(&dir.state_path(), &[&keys[0], &keys[1]]).await;
        assert_eq!(entries, original, "every token intact");
        outcomes[usize::from(now != current)] += 1;
        current = now;
    }
    println!(
        "rekey killed 24 times over {whole:?}: {} before the switch, {} after",
        outcomes[0], outcomes[1]
    );
}

// === ${file:} ===

/// `${file:PATH}` works for any string, with or without a trailing newline; a missing
/// file or a directory is a config error (exit 2) naming the key and the path.
#[tokio::test]
async fn file_references_in_the_config() {
    let fx = Fixture::start().await;
    for (name, contents) in [
        ("with-newline", format!("{}\n", fx.client_secret)),
        ("without", fx.client_secret.clone()),
    ] {
        let path = fx.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        fx.config()
            .client_secret_literal(&format!("${{file:{}}}", path.display()))
            .write(&fx.dir);
        fx.run(&["check"]).await.assert_code(0);
    }
    let missing = fx.dir.path().join("missing-secret");
    let directory = fx.dir.path().to_owned();
    for path in [missing, directory] {
        fx.config()
            .client_secret_literal(&format!("${{file:{}}}", path.display()))
            .write(&fx.dir);
        let out = fx.run(&["check"]).await;
        out.assert_code(2);
        let line = out.error_line();
        assert!(line.contains("integrations.demo.client_secret"), "{line}");
        assert!(
            line.contains(&format!("cannot read {}", path.display())),
            "{line}"
        );
    }
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

// === the PostgreSQL store ===

/// Every row of `credproxy_tokens`, as text (all columns).
async fn rows_text(db: &TestDb) -> String {
    db.query("SELECT t::text FROM credproxy_tokens t ORDER BY integration")
        .await
        .iter()
        .map(|row| row.get::<_, String>(0) + "\n")
        .collect()
}

/// The same contract on the database: no row holds a token in any form, every row is
/// marked sealed, and a wrong or missing key is refused with every row unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_rows_hold_no_token_and_a_wrong_key_changes_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fx = Fixture::start().await;
    let key = keygen().await;
    let key_path = write_key(&fx.dir, "state.key", &key);
    let builder = fx
        .config()
        .state_url(&db.url)
        .state_line(&key_line(&key_path));
    builder.write(&fx.dir);
    refresh_through_the_store(&fx).await;

    let rows = rows_text(&db).await;
    let mut secrets = fx.server.issued_tokens();
    secrets.extend([fx.rt0.clone(), fx.client_secret.clone(), key.clone()]);
    assert_no_token_in_text(&rows, &secrets, "credproxy_tokens");
    let sealed: Vec<bool> = db
        .query("SELECT sealed FROM credproxy_tokens")
        .await
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(sealed, [true], "{rows}");

    let calls = fx.server.calls();
    write_key(&fx.dir, "state.key", &keygen().await);
    for case in ["wrong key", "missing key"] {
        if case == "missing key" {
            let no_key = builder.build().replace(&key_line(&key_path), "");
            fx.dir.write_config(&no_key);
        }
        for args in [&["check"][..], &["token", "demo"]] {
            let out = fx.run(args).await;
            out.assert_code(1);
            let line = out.last_error_line();
            assert!(
                line.contains(": demo: wrong or missing [state] key"),
                "{case}: {line}"
            );
        }
        assert_eq!(rows_text(&db).await, rows, "{case}: every row unchanged");
    }
    assert_eq!(fx.server.calls(), calls, "nothing refreshed");
}

/// `state rekey` on the database, SIGKILLed at 20 random points: every time, either key
/// opens every row and the other opens none; a rekey that finishes re-seals every row
/// and the tokens stay in use without a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_in_the_database_is_one_transaction() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fx = Fixture::start().await;
    let keys = [keygen().await, keygen().await];
    let key_path = write_key(&fx.dir, "state.key", &keys[0]);
    let other_rt = token::new_refresh_token(0);
    let other = TokenServer::start(&fx.ca, &other_rt).await;
    fx.config()
        .state_url(&db.url)
        .state_line(&key_line(&key_path))
        .raw(&integration_toml("other", &other, &other_rt, None))
        .write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);
    let access = fx.server.current_access_token().unwrap();
    let access = access.as_str();
    let calls = (fx.server.calls(), other.calls());

    // Which key opens the store: `token demo` opens every row first.
    let opens_with = |index: usize| {
        let (fx, keys) = (&fx, &keys);
        async move {
            write_key(&fx.dir, "state.key", &keys[index]);
            let out = fx.run(&["token", "demo"]).await;
            if out.code == Some(0) {
                assert_eq!(out.line(), access, "the stored token, not a refresh");
            }
            out.code == Some(0)
        }
    };
    let rekey = |from: usize| {
        write_key(&fx.dir, "state.key", &keys[from]);
        let config = fx.dir.config_arg();
        fx.dir.spawn(
            &["state", "rekey", "--new-key", NEW_KEY_VAR, "-c", &config],
            &[
                (NEW_KEY_VAR, keys[1 - from].as_str()),
                (ConfigBuilder::SECRET_VAR, fx.client_secret.as_str()),
            ],
        )
    };

    let before = rows_text(&db).await;
    let started = Instant::now();
    let out = cli::collect(rekey(0), &["state", "rekey"]).await;
    out.assert_code(0);
    assert!(out.line().contains("re-sealed 2 entries"), "{}", out.line());
    let whole = started.elapsed();
    assert_ne!(rows_text(&db).await, before, "every row re-sealed");
    let mut current = 1;
    for _ in 0..20 {
        let mut child = rekey(current);
        tokio::time::sleep(whole.mul_f64(rand::random::<f64>())).await; // the kill point
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let (old, new) = (opens_with(current).await, opens_with(1 - current).await);
        assert!(
            old != new,
            "exactly one key opens every row (old {old}, new {new})"
        );
        if new {
            current = 1 - current;
        }
    }
    assert_eq!(
        (fx.server.calls(), other.calls()),
        calls,
        "no refresh at all"
    );
}
