//! The tables, created when missing and migrated forward. Replicas starting at
//! once take turns under a transaction-scoped advisory lock, so exactly one
//! creates the tables; the version row tells later releases what to migrate.

use tokio_postgres::Client;

use super::{CHANNEL, Inner, STATEMENT_TIMEOUT, lock_key};
use crate::state::StateError;

/// `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: one row per integration; token fields are separate columns so that
    // sealing can wrap each (and `sealed` says whether they are).
    "CREATE TABLE credproxy_tokens (
        integration text PRIMARY KEY,
        refresh_token text,
        access_token text,
        token_type text,
        expires_at timestamptz,
        seed_fingerprint text,
        scope text,
        updated_at timestamptz NOT NULL,
        sealed boolean NOT NULL DEFAULT false,
        revision bigint NOT NULL
    );
    CREATE FUNCTION credproxy_tokens_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('CHANNEL', COALESCE(NEW.integration, OLD.integration));
        RETURN NULL;
    END $$;
    CREATE TRIGGER credproxy_tokens_notify AFTER INSERT OR UPDATE OR DELETE ON credproxy_tokens
        FOR EACH ROW EXECUTE FUNCTION credproxy_tokens_notify();",
];

/// Brings the schema to the latest version, or refuses a newer one.
pub(super) async fn migrate(store: &Inner, client: &Client) -> Result<(), StateError> {
    let run = |sql: String| async move {
        store
            .timed("schema", STATEMENT_TIMEOUT * 2, client.batch_execute(&sql))
            .await
    };
    run(format!(
        "BEGIN; SELECT pg_advisory_xact_lock({}); \
         CREATE TABLE IF NOT EXISTS credproxy_schema (version integer NOT NULL)",
        lock_key("credproxy-schema-v1:", "")
    ))
    .await?;
    let row = store
        .timed(
            "schema",
            STATEMENT_TIMEOUT,
            client.query_opt("SELECT max(version) FROM credproxy_schema", &[]),
        )
        .await?;
    let current: i32 = match row {
        Some(row) => row
            .try_get::<_, Option<i32>>(0)
            .map_err(|e| store.error("schema", e))?
            .unwrap_or(0),
        None => 0,
    };
    let latest = MIGRATIONS.len();
    let Ok(from) = usize::try_from(current) else {
        return Err(schema_error(
            store,
            format!("schema version {current} is invalid"),
        ));
    };
    if from > latest {
        run("ROLLBACK".into()).await?;
        return Err(schema_error(
            store,
            format!(
                "the database has schema version {from}, newer than this credproxy knows ({latest}): upgrade credproxy"
            ),
        ));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(from) {
        let to = index + 1;
        tracing::info!(store = %store.describe, version = to, "migrating the state store schema");
        run(format!(
            "{}; DELETE FROM credproxy_schema; INSERT INTO credproxy_schema (version) VALUES ({to})",
            migration.replace("CHANNEL", CHANNEL)
        ))
        .await?;
    }
    run("COMMIT".into()).await
}

fn schema_error(store: &Inner, message: String) -> StateError {
    StateError::Schema {
        store: store.describe.clone(),
        message,
    }
}
