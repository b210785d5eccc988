//! The demo OAuth provider's books: its client credentials, the one refresh token
//! that is currently valid (rotated on every refresh, so a reused one fails like at a
//! strict real provider) and the access tokens issued, each with its expiry. The
//! token endpoint and the API both consult it; it does no I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use base64::Engine;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::secret::Secret;

/// How long an issued access token is valid: short, so the demo shows refreshes.
pub const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(20);

pub const CLIENT_ID: &str = "credproxy-demo";

pub struct Provider {
    client_secret: Secret,
    books: Mutex<Books>,
    /// Successful refreshes so far; a watch so callers can await the next one.
    refreshes: watch::Sender<u64>,
}

struct Books {
    refresh_token: Secret,
    /// Access token → when it expires.
    access_tokens: HashMap<String, Instant>,
}

/// The outcome of a successful refresh.
pub struct Issued {
    pub access_token: Secret,
    pub refresh_token: Secret,
    pub expires_in: Duration,
}

/// Why a refresh was refused, as the OAuth `error` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    InvalidGrant,
}

impl Provider {
    /// A provider with fresh random credentials; returns it and its first refresh token.
    pub fn new() -> (Self, Secret) {
        let refresh_token = random_token("demo-rt");
        let provider = Self {
            client_secret: random_token("demo-secret"),
            books: Mutex::new(Books {
                refresh_token: refresh_token.clone(),
                access_tokens: HashMap::new(),
            }),
            refreshes: watch::Sender::new(0),
        };
        (provider, refresh_token)
    }

    pub fn client_secret(&self) -> &Secret {
        &self.client_secret
    }

    /// Whether `id`/`secret` are this provider's client credentials.
    pub fn client_matches(&self, id: &str, secret: &str) -> bool {
        // `&` rather than `&&`: the secret is compared whatever the id says.
        (id == CLIENT_ID) & self.client_secret.matches(secret.as_bytes())
    }

    /// Redeems `presented`: on success it is spent, and a new refresh token and a new
    /// access token take its place.
    pub fn refresh(&self, presented: &str) -> Result<Issued, Refused> {
        let now = Instant::now();
        let issued = {
            let mut books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
            if !books.refresh_token.matches(presented.as_bytes()) {
                return Err(Refused::InvalidGrant);
            }
            let issued = Issued {
                access_token: random_token("demo-at"),
                refresh_token: random_token("demo-rt"),
                expires_in: ACCESS_TOKEN_LIFETIME,
            };
            books.refresh_token = issued.refresh_token.clone();
            // Forget expired tokens here so the map stays as small as the live set.
            books.access_tokens.retain(|_, expiry| *expiry > now);
            books.access_tokens.insert(
                issued.access_token.expose().to_owned(),
                now + ACCESS_TOKEN_LIFETIME,
            );
            issued
        };
        self.refreshes.send_modify(|count| *count += 1);
        Ok(issued)
    }

    /// How long `access_token` stays valid, or None if it is unknown or expired.
    pub fn remaining(&self, access_token: &str) -> Option<Duration> {
        let now = Instant::now();
        let books = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        books
            .access_tokens
            .get(access_token)
            .and_then(|expiry| expiry.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    pub fn refresh_count(&self) -> u64 {
        *self.refreshes.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.refreshes.subscribe()
    }
}

/// `prefix-` followed by 192 random bits, URL-safe.
fn random_token(prefix: &str) -> Secret {
    let bytes: [u8; 24] = rand::random();
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Secret::new(format!("{prefix}-{body}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refresh_rotates_and_access_tokens_expire() {
        let (provider, first) = Provider::new();
        let issued = provider.refresh(first.expose()).unwrap();
        assert_ne!(issued.refresh_token, first);
        assert_eq!(
            provider.refresh(first.expose()).err(),
            Some(Refused::InvalidGrant)
        );
        assert_eq!(provider.refresh_count(), 1);

        let token = issued.access_token.expose();
        assert_eq!(provider.remaining(token), Some(ACCESS_TOKEN_LIFETIME));
        assert_eq!(provider.remaining("demo-at-guess"), None);
        tokio::time::advance(ACCESS_TOKEN_LIFETIME).await;
        assert_eq!(provider.remaining(token), None);

        let next = provider.refresh(issued.refresh_token.expose()).unwrap();
        assert!(provider.remaining(next.access_token.expose()).is_some());
        assert_eq!(provider.refresh_count(), 2);
    }

    #[test]
    fn client_credentials_must_both_match() {
        let (provider, _) = Provider::new();
        let secret = provider.client_secret().expose().to_owned();
        assert!(provider.client_matches(CLIENT_ID, &secret));
        assert!(!provider.client_matches(CLIENT_ID, "wrong"));
        assert!(!provider.client_matches("someone-else", &secret));
        assert!(!provider.client_matches(CLIENT_ID, ""));
    }
}
