//! The background refresher: one loop per integration around the pure timing
//! functions of `schedule`. It refreshes ahead of expiry, keeps serving the
//! current token while retrying transient failures with backoff, and after a
//! permanent failure waits long (status `failed`) instead of hammering.
//!
//! With a shared store that announces changes (PostgreSQL), it also follows
//! them: a token another replica stored is taken at once, which moves this
//! replica's schedule past it; after the store was unreachable, a refresh that
//! was backing off is retried as soon as the store is back.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{broadcast, watch};

use super::{Integration, Reason, schedule};
use crate::config::Grant;
use crate::state::Change;

pub async fn run(integration: Arc<Integration>) {
    if matches!(integration.config().grant, Grant::Static(_)) {
        // Published at start and never refreshed.
        return;
    }
    let mut published = integration.subscribe();
    let mut changes = integration.store_changes();
    let mut failures: u32 = 0;
    loop {
        published.borrow_and_update();
        let (generation, wait) = match integration.current() {
            Some(s) => (
                s.generation,
                schedule::scheduled_wait(
                    OffsetDateTime::now_utc(),
                    s.issued_at,
                    s.expires_at,
                    integration.config().refresh_skew,
                    rand::random(),
                ),
            ),
            None => (0, Duration::ZERO),
        };
        // A refresh elsewhere (a request, a 401, the admin API, another
        // replica) moves the schedule.
        if !wait.is_zero()
            && pause(&integration, &mut published, &mut changes, wait).await != Woke::Timer
        {
            continue;
        }
        match integration.refresh(Reason::Scheduled { generation }).await {
            Ok(_) => failures = 0,
            Err(error) => {
                failures += 1;
                let delay = if error.is_permanent() {
                    schedule::FAILED_RECHECK
                } else {
                    schedule::backoff(failures, rand::random())
                        .max(error.retry_after().unwrap_or_default())
                };
                tracing::info!(integration = %integration.name(), retry_in = ?delay, "refresh will be retried");
                if pause(&integration, &mut published, &mut changes, delay).await != Woke::Timer {
                    failures = 0;
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Woke {
    Timer,
    /// A new token was published.
    Published,
    /// The store was (re)connected: what was missed has been re-read.
    StoreBack,
}

/// Waits `delay`, or less when a token is published or the store comes back.
/// Announced changes of this integration are taken on the way.
async fn pause(
    integration: &Integration,
    published: &mut watch::Receiver<u64>,
    changes: &mut Option<broadcast::Receiver<Change>>,
    delay: Duration,
) -> Woke {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Woke::Timer,
            _ = published.changed() => return Woke::Published,
            change = next_change(changes) => match change {
                Change::Entry(name) if name == integration.name() => {
                    integration.follow_store().await;
                }
                Change::Entry(_) => {}
                Change::All => {
                    integration.follow_store().await;
                    return Woke::StoreBack;
                }
            },
        }
    }
}

/// The next announced change; never, for a store that announces none.
async fn next_change(changes: &mut Option<broadcast::Receiver<Change>>) -> Change {
    let Some(receiver) = changes else {
        return std::future::pending().await;
    };
    match receiver.recv().await {
        Ok(change) => change,
        // Announcements were dropped: re-read rather than guess.
        Err(broadcast::error::RecvError::Lagged(_)) => Change::All,
        Err(broadcast::error::RecvError::Closed) => {
            *changes = None;
            std::future::pending().await
        }
    }
}
