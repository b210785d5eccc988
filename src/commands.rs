//! The one-shot commands: `check`, `token`, `ca init`, `ca bundle`, `state
//! keygen`, `state rekey`, `env`. They return what to print; `main` prints it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::client_env::{self, ClientEnv};
use crate::config::Config;
use crate::error::Error;
use crate::oauth::OAuthClient;
use crate::report;
use crate::secret::Secret;
use crate::secret::StateKey;
use crate::state::{self, FileStore, SealedStore, StateStore};
use crate::tokens::{Reason, Tokens};
use crate::{ca, tokens};

/// Opens the state store and builds the token store of `config`.
pub async fn open_tokens(config: &Config) -> Result<Tokens, Error> {
    let store = state::open(&config.state, &config.upstream).await?;
    let client = OAuthClient::new(&config.upstream)?;
    Ok(Tokens::new(config, store, client).await?)
}

/// The outcome of `check`: one line per integration, and whether all succeeded.
pub struct CheckReport {
    pub lines: Vec<String>,
    pub all_ok: bool,
}

/// Refreshes every integration once, concurrently.
pub async fn check(config: &Config) -> Result<CheckReport, Error> {
    let tokens = open_tokens(config).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, integration) in tokens.iter().enumerate() {
        let integration = integration.clone();
        tasks.spawn(async move { (index, integration.refresh(Reason::Always).await) });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.map_err(|e| Error::Failed(format!("check task failed: {e}")))?);
    }
    results.sort_by_key(|(index, _)| *index);
    let mut all_ok = true;
    let lines = results
        .into_iter()
        .zip(tokens.iter())
        .map(|((_, outcome), integration)| {
            let name = integration.name();
            match outcome {
                Ok(snapshot) if snapshot.expires_at == tokens::NEVER => {
                    format!("{name}: ok, static token (never expires)")
                }
                Ok(snapshot) => format!(
                    "{name}: ok, expires in {}",
                    human_duration(snapshot.expires_at - OffsetDateTime::now_utc())
                ),
                Err(err) => {
                    all_ok = false;
                    let text = report::chain(&err);
                    let reason = text.strip_prefix(&format!("{name}: ")).unwrap_or(&text);
                    format!("{name}: error: {reason}")
                }
            }
        })
        .collect();
    Ok(CheckReport { lines, all_ok })
}

/// NAME's access token, refreshed first if missing or about to expire.
pub async fn token(config: &Config, name: &str) -> Result<Secret, Error> {
    let tokens = open_tokens(config).await?;
    let integration = tokens.get(name).ok_or_else(|| {
        Error::Usage(format!(
            "{}: no integration named {name:?} (configured: {})",
            config.source.display(),
            config
                .integrations
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let snapshot =
        tokio::time::timeout(tokens::ON_DEMAND_WAIT * 6, integration.refresh(Reason::Due))
            .await
            .map_err(|_| Error::Failed(format!("{name}: the refresh did not finish in time")))??;
    Ok(snapshot.access_token.clone())
}

/// `state show`: one line per stored entry, never a token.
pub async fn state_show(config: &Config) -> Result<Vec<String>, Error> {
    let store = state::open(&config.state, &config.upstream).await?;
    let now = OffsetDateTime::now_utc();
    let lines = store
        .list()
        .await?
        .into_iter()
        .map(|entry| {
            let expiry = match entry.expires_at {
                Some(at) if at > now => {
                    format!("expires {} (in {})", rfc3339(at), human_duration(at - now))
                }
                Some(at) => format!("expired {} ({} ago)", rfc3339(at), human_duration(now - at)),
                None => "no access token".to_owned(),
            };
            let configured = if config.integration(&entry.integration).is_some() {
                ""
            } else {
                " (not in the config)"
            };
            format!(
                "{}: grant refresh_token, {expiry}, updated {}, {}{configured}",
                entry.integration,
                rfc3339(entry.updated_at),
                if entry.sealed { "sealed" } else { "not sealed" },
            )
        })
        .collect();
    Ok(lines)
}

/// `state import FILE`: copies the file's entries into the configured store,
/// each under its integration's lock. Returns one line per entry.
pub async fn state_import(config: &Config, file: &Path, force: bool) -> Result<Vec<String>, Error> {
    // A missing file reads as an empty store; for an import that is a typo.
    std::fs::metadata(file)
        .map_err(|e| Error::Failed(format!("{}: cannot read state file: {e}", file.display())))?;
    // Read with the configured key (a sealed file opens with it), sealing nothing.
    let source = SealedStore::reader(Arc::new(FileStore::open(file)?), config.state.key.as_ref());
    let entries = source.entries().await?;
    let store = state::open(&config.state, &config.upstream).await?;
    let mut lines = Vec::new();
    for (name, entry) in entries {
        let mut held = store.lock(&name).await?;
        let line = match held.load().await? {
            Some(_) if !force => {
                format!("{name}: kept (the store already has it; --force replaces it)")
            }
            existing => {
                held.save(&entry).await?;
                let done = if existing.is_some() {
                    "replaced"
                } else {
                    "imported"
                };
                format!("{name}: {done}")
            }
        };
        lines.push(line);
    }
    Ok(lines)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Creates the CA if missing; with `constrain`, one limited to the routed
/// domains and `[ca] permit`. Returns the CA and whether it was created.
pub fn ca_init(config: &Config, constrain: bool) -> Result<(ca::Ca, bool), Error> {
    let constraints = match constrain {
        false => None,
        true => {
            let routed = config.routes.iter().map(|r| &r.host);
            let covering = ca::Constraints::covering(routed.chain(&config.ca.permit));
            Some(covering.ok_or_else(|| {
                Error::Usage(format!(
                    "{}: no [[routes]] and no [ca] permit: nothing to constrain the CA to",
                    config.source.display()
                ))
            })?)
        }
    };
    Ok(ca::init(&config.ca, constraints)?)
}

/// Writes the CA bundle (creating the CA if missing). Returns the bundle's path.
pub fn ca_bundle(config: &Config) -> Result<PathBuf, Error> {
    let (ca, _) = ca::load_or_create(&config.ca)?;
    Ok(ca::write_bundle(&ca)?)
}

/// A fresh `[state] key`, base64.
pub fn state_keygen() -> Result<Zeroizing<String>, Error> {
    let key = StateKey::generate().map_err(|e| Error::Failed(format!("cannot make a key: {e}")))?;
    Ok(key.to_base64())
}

/// Re-seals the store under the key in environment variable `new_key_var`.
/// Returns what to tell the operator.
pub async fn state_rekey(config: &Config, new_key_var: &str) -> Result<String, Error> {
    let text = std::env::var(new_key_var).map_err(|_| {
        Error::Usage(format!(
            "--new-key {new_key_var}: environment variable {new_key_var} is not set"
        ))
    })?;
    let new_key = StateKey::from_base64(&text)
        .map_err(|e| Error::Usage(format!("--new-key {new_key_var}: the value {e}")))?;
    let store = state::open(&config.state, &config.upstream).await?;
    // The config's integrations too: one not yet in the store must not write
    // under the old key while the others move to the new one.
    let names: Vec<&str> = config
        .integrations
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let count = store.rekey(&new_key, &names).await?;
    Ok(format!(
        "{}: re-sealed {count} {} under the new key. Now set [state] key to it for every process that shares this store (SIGHUP reloads it); until then they report \"wrong or missing [state] key\" and keep serving their current tokens.",
        config.state,
        if count == 1 { "entry" } else { "entries" }
    ))
}

/// The proxy and CA variables for the configured `run`: its listener, its
/// credentials when it has exactly one client (with several, which one is
/// meant is the caller's to say), the CA bundle (written if missing or made
/// for another CA).
pub fn env(config: &Config) -> Result<ClientEnv, Error> {
    let one_client = match config.proxy.clients.as_slice() {
        [client] => Some(client),
        _ => None,
    };
    let (ca, _) = ca::load_or_create(&config.ca)?;
    let bundle = ca::bundle_path(&ca);
    let current = std::fs::read_to_string(&bundle).is_ok_and(|pem| pem.contains(&ca.cert_pem));
    if !current {
        ca::write_bundle(&ca)?;
    }
    Ok(ClientEnv::new(
        &client_env::proxy_url(config.proxy.listen, one_client),
        &bundle,
        &ca.cert_path,
        client_env::inherited_no_proxy().as_deref(),
    ))
}

/// "1h2m3s" style, for humans.
pub fn human_duration(duration: time::Duration) -> String {
    let total = Duration::try_from(duration).unwrap_or_default().as_secs();
    let (hours, minutes, seconds) = (total / 3600, total / 60 % 60, total % 60);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m{seconds:02}s"),
        _ => format!("{hours}h{minutes:02}m{seconds:02}s"),
    }
}
