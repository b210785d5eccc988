//! Where a SIGKILL lands in a refresh, as the token endpoint sees it. Shared by the tests
//! that kill a `credproxy check` (the state file) and a `credproxy run` replica (the
//! database): each names a point, starts the refresh, and waits with [`KillPoint::reach`]
//! until the point has come before it kills.

use std::time::Duration;

use super::token::TokenServer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillPoint {
    /// The provider has the request (and has already rotated); its answer is held.
    RequestArrived,
    /// The provider's answer has gone out: the process is reading it or saving.
    ResponseSent,
    /// A random 0–3 ms after the answer went out: parsing, saving, renaming, printing.
    AfterResponse,
    /// A random 0–40 ms after start: anywhere from start-up to exit.
    AfterStart,
}

impl KillPoint {
    /// Whether the provider's answers must be held (`TokenServer::hold_responses`) before
    /// the refresh starts, for the point to be reached with the request still in flight.
    pub fn holds_responses(self) -> bool {
        matches!(self, Self::RequestArrived)
    }

    /// Waits until the point has come, `calls` and `responses` being the token
    /// endpoint's counters from before the refresh started. Lets held answers go out for
    /// the points after the answer.
    pub async fn reach(self, server: &TokenServer, calls: u64, responses: u64) {
        match self {
            Self::RequestArrived => server.wait_for_calls(calls + 1).await,
            Self::ResponseSent => {
                server.release_responses();
                server.wait_for_responses(responses + 1).await;
            }
            Self::AfterResponse => {
                server.release_responses();
                server.wait_for_responses(responses + 1).await;
                tokio::time::sleep(random_ms(3)).await;
            }
            Self::AfterStart => tokio::time::sleep(random_ms(40)).await,
        }
    }
}

/// A random 0..=`max` ms.
pub fn random_ms(max: u64) -> Duration {
    Duration::from_millis(rand::random::<u64>() % (max + 1))
}
