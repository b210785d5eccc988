//! The background refresher: one loop per integration around the pure timing
//! functions of `schedule`. It refreshes ahead of expiry, keeps serving the
//! current token while retrying transient failures with backoff, and after a
//! permanent failure waits long (status `failed`) instead of hammering.

use std::sync::Arc;

use time::OffsetDateTime;

use super::{Integration, Reason, schedule};
use crate::config::Grant;

pub async fn run(integration: Arc<Integration>) {
    if matches!(integration.config().grant, Grant::Static(_)) {
        // Published at start and never refreshed.
        return;
    }
    let mut published = integration.subscribe();
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
            None => (0, std::time::Duration::ZERO),
        };
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // A refresh elsewhere (a request, a 401, the admin API) moved the schedule.
                _ = published.changed() => continue,
            }
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
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = published.changed() => failures = 0,
                }
            }
        }
    }
}
