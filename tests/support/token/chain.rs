//! The refresh-token chain: which refresh tokens the provider accepts right now.
//!
//! Modelled on Auth0/Okta rotation with reuse detection. Redeeming the current token
//! rotates it; the token just redeemed stays valid as a grace token until its successor
//! has been used once, so a client that died before persisting the successor can retry.
//! Any older token is "reused" and refused. The model is strict on purpose: two clients
//! racing on one token (a missing file lock) each get a different successor, and the
//! loser's successor is dead, which a test then sees as `invalid_grant`.

use std::collections::HashSet;

pub(super) struct Chain {
    current: Option<String>,
    /// Redeemed, but its successor (`current`) has not been used yet.
    grace: Option<String>,
    /// Every token ever accepted and since superseded: presenting one is reuse.
    retired: HashSet<String>,
    pub(super) rotation: bool,
}

pub(super) enum Redeem {
    /// Accepted; the client must switch to this new refresh token.
    Rotated(String),
    /// Accepted; rotation is off, the presented token stays current.
    Kept,
    /// A superseded token: reuse.
    Reused,
    /// Never issued, or revoked by `revoke_all`.
    Unknown,
}

// === impl Chain ===

impl Chain {
    pub(super) fn new(initial: String) -> Self {
        Self {
            current: Some(initial),
            grace: None,
            retired: HashSet::new(),
            rotation: true,
        }
    }

    pub(super) fn latest(&self) -> Option<&str> {
        self.current.as_deref()
    }

    pub(super) fn is_grace(&self, token: &str) -> bool {
        self.grace.as_deref() == Some(token)
    }

    /// Redeems `presented`; `issue` mints the successor when the chain rotates.
    pub(super) fn redeem(&mut self, presented: &str, issue: impl FnOnce() -> String) -> Redeem {
        let is_current = self.current.as_deref() == Some(presented);
        let is_grace = self.is_grace(presented);
        if !is_current && !is_grace {
            return if self.retired.contains(presented) {
                Redeem::Reused
            } else {
                Redeem::Unknown
            };
        }
        if !self.rotation {
            return Redeem::Kept;
        }
        let next = issue();
        let superseded = if is_current {
            // The successor has been used: the grace token dies, this one becomes grace.
            let old_grace = self.grace.replace(presented.to_owned());
            self.current = Some(next.clone());
            old_grace
        } else {
            // Retry with the grace token: the unused successor is discarded, as the
            // client evidently never stored it.
            self.current.replace(next.clone())
        };
        self.retired.extend(superseded);
        Redeem::Rotated(next)
    }

    /// Every refresh token stops working (`invalid_grant`), as after a user revokes access.
    pub(super) fn revoke_all(&mut self) {
        self.retired.extend(self.current.take());
        self.retired.extend(self.grace.take());
    }

    /// Starts a fresh chain at `token`, as after the user re-authorizes.
    pub(super) fn reset(&mut self, token: String) {
        self.revoke_all();
        self.retired.remove(&token);
        self.current = Some(token);
    }
}
