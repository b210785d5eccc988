//! The PostgreSQL state store against a real server (tests/support/pg.rs): schema creation
//! by racing processes, single flight across processes, import and show, a wrong password.

use std::collections::HashSet;

use time::OffsetDateTime;

use crate::support::cli::{self, RUN_TIMEOUT};
use crate::support::fixture::{Fixture, Seed};
use crate::support::pg::{self, PgServer, TestDb};

/// Lock requests waiting on an advisory lock in `db` (a refresh lock, or the schema lock).
async fn lock_waiters(db: &TestDb) -> usize {
    let locks = pg::advisory_locks(&db.client().await).await;
    locks.iter().filter(|lock| !lock.granted).count()
}

/// The refresh token the database holds for `demo`.
async fn stored_refresh_token(db: &TestDb) -> String {
    let rows = db
        .query("SELECT refresh_token FROM credproxy_tokens WHERE integration = 'demo'")
        .await;
    rows.first().expect("a stored entry for demo").get(0)
}

/// 30 `credproxy token` processes on one database while the only refresh is held at the
/// provider until the other 29 wait on the lock: one refresh, one token printed by all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_token_processes_cause_one_refresh() {
    const PROCESSES: usize = 30;
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fx = Fixture::start().await;
    fx.config().state_url(&db.url).write(&fx.dir);
    fx.server.hold_responses();
    let args = ["token", "demo"];
    let children: Vec<_> = (0..PROCESSES).map(|_| fx.spawn(&args)).collect();
    fx.server.wait_for_calls(1).await;
    pg::until("the other processes wait on the refresh lock", || async {
        fx.server.calls() > 1 || lock_waiters(&db).await >= PROCESSES - 1
    })
    .await;
    fx.server.release_responses();
    let mut printed = HashSet::new();
    for child in children {
        let out = tokio::time::timeout(RUN_TIMEOUT, cli::collect(child, &args))
            .await
            .expect("token exits");
        out.assert_code(0);
        printed.insert(out.line().to_owned());
    }
    assert_eq!(fx.server.calls(), 1, "{PROCESSES} processes, one refresh");
    assert_eq!(printed.len(), 1, "every process printed the same token");
    assert!(
        fx.server
            .is_valid_access_token(printed.iter().next().unwrap())
    );
    assert_eq!(fx.server.invalid_grant_count(), 0);
    assert_eq!(
        Some(stored_refresh_token(&db).await),
        fx.server.latest_refresh_token()
    );
}

/// Eight processes open a fresh database at once: each would create the schema, exactly
/// one does, and all of them work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_processes_create_the_schema_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fx = Fixture::start().await;
    fx.config().state_url(&db.url).write(&fx.dir);
    let args = ["state", "show"];
    let children: Vec<_> = (0..8).map(|_| fx.spawn(&args)).collect();
    for child in children {
        let out = cli::collect(child, &args).await;
        out.assert_code(0);
        assert_eq!(out.stdout, "", "a fresh store has no entries");
    }
    let versions = db.query("SELECT version FROM credproxy_schema").await;
    let versions: Vec<i32> = versions.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, [1], "one schema version row");
    let tables = db
        .query("SELECT count(*) FROM pg_tables WHERE tablename = 'credproxy_tokens'")
        .await;
    assert_eq!(tables[0].get::<_, i64>(0), 1);
}

/// A single-machine state file moves into PostgreSQL without re-authorizing: `state import`
/// copies it (keeping what the store has unless --force), `state show` lists it without a
/// token, and the imported token is used as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_then_show_then_use_without_refresh() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fx = Fixture::start().await;
    let now = OffsetDateTime::now_utc();
    fx.seed_state(&Seed {
        refresh_token: &fx.rt0,
        access_token: "at-SECRET-imported",
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
        seeded_from: Some(&fx.rt0),
    });
    let file = fx.dir.state_path();
    let file = file.to_str().unwrap();
    fx.config().state_url(&db.url).write(&fx.dir);

    let out = fx.run(&["state", "import", file]).await;
    out.assert_code(0);
    assert_eq!(out.stdout, "demo: imported\n");
    let out = fx.run(&["state", "show"]).await;
    out.assert_code(0);
    let line = out.line();
    assert!(
        line.starts_with("demo: grant refresh_token, expires ") && line.contains("(in 59m"),
        "{line}"
    );
    assert!(line.contains(", not sealed"), "{line}");
    let out = fx.run(&["state", "import", file]).await;
    out.assert_code(0);
    assert_eq!(
        out.stdout,
        "demo: kept (the store already has it; --force replaces it)\n"
    );
    let out = fx.run(&["state", "import", "--force", file]).await;
    assert_eq!(out.stdout, "demo: replaced\n");

    let out = fx.run(&["token", "demo"]).await;
    out.assert_code(0);
    assert_eq!(out.line(), "at-SECRET-imported");
    assert_eq!(
        fx.server.calls(),
        0,
        "the imported token was used, not refreshed"
    );
    assert_eq!(stored_refresh_token(&db).await, fx.rt0);

    let missing = fx.run(&["state", "import", "no-such-file.json"]).await;
    missing.assert_code(1);
    assert!(
        missing
            .error_line()
            .contains("no-such-file.json: cannot read state file")
    );
}

/// `state show` works on the file store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_the_state_file() {
    let fx = Fixture::start().await;
    fx.write_config();
    let out = fx.run(&["check"]).await;
    out.assert_code(0);
    let out = fx.run(&["state", "show"]).await;
    out.assert_code(0);
    assert!(
        out.line()
            .starts_with("demo: grant refresh_token, expires "),
        "{}",
        out.stdout
    );
}

/// A wrong password: exit 1, one line naming the store and the cause; the password appears
/// nowhere (every run's output is scanned for `-SECRET-`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error_without_the_password() {
    let Some(server) = PgServer::start_with_password("pw-SECRET-right").await else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no PostgreSQL binaries in CI"
        );
        return;
    };
    let fx = Fixture::start().await;
    let url = |password: &str| {
        format!(
            "postgres://postgres:{password}@127.0.0.1:{}/postgres?sslmode=disable",
            server.port()
        )
    };
    fx.config()
        .state_url(&url("pw-SECRET-wrong"))
        .write(&fx.dir);
    for command in [&["check"][..], &["token", "demo"], &["state", "show"]] {
        let out = fx.run(command).await;
        out.assert_code(1);
        let error = out.error_line();
        let store = format!(
            "PostgreSQL state store postgres://postgres@127.0.0.1:{}/postgres",
            server.port()
        );
        assert!(error.contains(&store), "{error}");
        assert!(error.contains("password authentication failed"), "{error}");
    }
    assert_eq!(fx.server.calls(), 0);

    // The right password from the environment works.
    fx.config()
        .state_url(
            "postgres://postgres:${PGPW}@127.0.0.1:PORT/postgres?sslmode=disable"
                .replace("PORT", &server.port().to_string())
                .as_str(),
        )
        .write(&fx.dir);
    let out = fx
        .run_with(&["check"], &[("PGPW", "pw-SECRET-right")])
        .await;
    out.assert_code(0);
}
