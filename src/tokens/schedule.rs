//! Pure timing decisions of the refresher: when to refresh, how long to back off.
//! `now` and the jitter are inputs, so these are table-tested without a clock.

use std::time::Duration;

use time::OffsetDateTime;

/// Scheduled refreshes of one integration are at least this far apart.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// After a permanent failure (`invalid_grant`, not authorized): look again this
/// often for a new refresh token in the state store (`credproxy authorize`).
/// The rejected one is never sent again, so this costs the provider nothing.
pub const FAILED_RECHECK: Duration = Duration::from_secs(15);

/// How long before expiry to refresh: `skew` plus up to 10 % of it as jitter
/// (so replicas do not refresh in lock-step), but never more than half the
/// token's lifetime, so short-lived tokens are still used for a while.
pub fn lead(
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    skew: Duration,
    jitter: f64,
) -> Duration {
    let lifetime: Duration = (expires_at - issued_at)
        .try_into()
        .unwrap_or(Duration::ZERO);
    (skew + skew.mul_f64(0.1 * jitter.clamp(0.0, 1.0))).min(lifetime / 2)
}

/// Time from `now` until the refresh is due (zero when already due).
pub fn refresh_in(
    now: OffsetDateTime,
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    skew: Duration,
    jitter: f64,
) -> Duration {
    let due = expires_at - lead(issued_at, expires_at, skew, jitter);
    (due - now).try_into().unwrap_or(Duration::ZERO)
}

/// The refresher's wait: `refresh_in`, but never sooner than `MIN_INTERVAL`
/// after the token was issued, so a provider answering `expires_in: 0` cannot
/// drive it into a loop.
pub fn scheduled_wait(
    now: OffsetDateTime,
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    skew: Duration,
    jitter: f64,
) -> Duration {
    let floor: Duration = (issued_at + MIN_INTERVAL - now)
        .try_into()
        .unwrap_or(Duration::ZERO);
    refresh_in(now, issued_at, expires_at, skew, jitter).max(floor)
}

/// Back-off after the `failures`-th consecutive transient failure: doubling from
/// 1 s to 5 min, then a random point in the upper half of that ("equal jitter").
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let doubling = 2u32.saturating_pow(failures.saturating_sub(1));
    let base = MIN_BACKOFF.saturating_mul(doubling).min(MAX_BACKOFF);
    base / 2 + (base / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    #[test]
    fn refresh_in_table() {
        let hour = time::Duration::hours(1);
        let secs = Duration::from_secs;
        // (now offset, lifetime, skew, jitter) -> wait
        let cases = [
            (0, hour, secs(60), 0.0, secs(3540)),
            (0, hour, secs(60), 1.0, secs(3534)),
            (3000, hour, secs(60), 0.0, secs(540)),
            (3590, hour, secs(60), 0.0, secs(0)),
            (0, time::Duration::seconds(20), secs(60), 0.0, secs(10)),
            (0, time::Duration::seconds(2), secs(1), 0.0, secs(1)),
        ];
        for (offset, lifetime, skew, jitter, want) in cases {
            let now = T0 + time::Duration::seconds(offset);
            assert_eq!(
                refresh_in(now, T0, T0 + lifetime, skew, jitter),
                want,
                "{offset} {lifetime} {skew:?} {jitter}"
            );
        }
    }

    #[test]
    fn scheduled_wait_is_at_least_the_minimum_interval_after_issue() {
        let expired_at_once = T0;
        assert_eq!(
            scheduled_wait(T0, T0, expired_at_once, Duration::from_secs(60), 0.0),
            MIN_INTERVAL
        );
        let later = T0 + time::Duration::seconds(5);
        assert_eq!(
            scheduled_wait(later, T0, expired_at_once, Duration::from_secs(60), 0.0),
            Duration::ZERO
        );
        let hour = T0 + time::Duration::hours(1);
        assert_eq!(
            scheduled_wait(T0, T0, hour, Duration::from_secs(60), 0.0),
            Duration::from_secs(3540)
        );
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        let secs = Duration::from_secs;
        assert_eq!(backoff(1, 1.0), secs(1));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(4, 1.0), secs(8));
        assert_eq!(backoff(9, 1.0), secs(256));
        assert_eq!(backoff(10, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(1000, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(1000, 0.0), MAX_BACKOFF / 2);
    }
}
