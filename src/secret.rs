//! `Secret`: client secrets, refresh tokens and access tokens; `StateKey`: the
//! `[state] key` that seals them at rest.
//!
//! Debug and Display print a redaction, so a secret that ends up in a log line, an
//! error or a `{:?}` of a config prints `[redacted]`. The only way to read the value
//! is [`Secret::expose`], called where the secret is actually sent or stored.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret value.
    ///
    /// # Security
    /// Call only where the value leaves the process on purpose: a request to the
    /// provider, an injected header, the state file, `credproxy token`'s stdout.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is this secret, compared in constant time so the
    /// answer's timing does not reveal how much of a guess was right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

// === impl StateKey ===

const KEY_LEN: usize = 32;

/// The `[state] key`: 32 random bytes, wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct StateKey(Zeroizing<[u8; KEY_LEN]>);

/// Why a `[state] key` value is not a key. Never quotes the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "is not base64 (expected 32 random bytes in base64, as `credproxy state keygen` prints)"
    )]
    NotBase64,
    #[error(
        "is {0} bytes long, not 32 (expected 32 random bytes in base64, as `credproxy state keygen` prints)"
    )]
    Length(usize),
}

impl StateKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut_slice())?;
        Ok(Self(key))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError::NotBase64)?,
        );
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Length(bytes.len()));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&bytes);
        Ok(Self(key))
    }

    /// The key's bytes.
    ///
    /// # Security
    /// Only for the cipher that seals the state (`state::seal`).
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as `[state] key` takes it.
    ///
    /// # Security
    /// Only for `credproxy state keygen`, whose job is to print it.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0.as_slice()))
    }
}

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateKey([redacted])")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn matches_only_the_same_bytes() {
        let secret = Secret::new("hunter2");
        assert!(secret.matches(b"hunter2"));
        assert!(!secret.matches(b"hunter3"));
        assert!(!secret.matches(b"hunter"));
        assert!(!secret.matches(b""));
    }

    #[test]
    fn state_key_parses_from_base64_only_at_32_bytes() {
        let key = StateKey::generate().unwrap();
        let text = key.to_base64();
        assert_eq!(StateKey::from_base64(&format!("{}\n", *text)).unwrap(), key);
        assert_ne!(StateKey::generate().unwrap(), key, "fresh every time");
        assert_eq!(StateKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(
            StateKey::from_base64("not base64!"),
            Err(KeyError::NotBase64)
        );
        assert_eq!(format!("{key:?}"), "StateKey([redacted])");
    }
}
