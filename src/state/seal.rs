//! Sealing tokens at rest: AES-256-GCM under the `[state] key`.
//!
//! Each token field is sealed on its own, with a fresh random 96-bit nonce, into
//! `v1:` + base64(nonce ‖ ciphertext ‖ tag). The associated data binds the
//! format version, the integration's name and the field, so a sealed value moved
//! to another integration or field does not open. Which fields are tokens is
//! decided by [`Entry::map_secrets`], which every new field must pass through.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::Entry;
use crate::secret::{Secret, StateKey};

const NONCE_LEN: usize = 12;
/// The sealed-value format; part of the associated data, so a later format
/// cannot be confused with this one.
const VERSION: &str = "v1";

/// A value that could not be sealed or opened. Never holds the value.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    /// Not sealed under this key for this integration and field, or altered.
    #[error("does not open")]
    Open,
}

// === impl Sealer ===

/// Seals and opens token fields under one key. The cipher's expanded key is
/// wiped when this is dropped (the `aes` crate's `zeroize` feature).
pub struct Sealer {
    key: StateKey,
    cipher: Aes256Gcm,
}

impl Sealer {
    pub fn new(key: &StateKey) -> Self {
        Self {
            key: key.clone(),
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.expose())),
        }
    }

    pub fn key(&self) -> &StateKey {
        &self.key
    }

    /// `entry` with every token field sealed. `entry` must hold tokens in clear.
    pub fn seal_entry(&self, integration: &str, entry: Entry) -> Result<Entry, SealError> {
        let mut sealed = entry.map_secrets(|field, value| self.seal(integration, field, &value))?;
        sealed.sealed = true;
        Ok(sealed)
    }

    /// `entry` (sealed) with every token field opened.
    pub fn open_entry(
        &self,
        integration: &str,
        entry: Entry,
    ) -> Result<Entry, (&'static str, SealError)> {
        let mut opened = entry.map_secrets(|field, value| {
            self.open(integration, field, &value)
                .map_err(|e| (field, e))
        })?;
        opened.sealed = false;
        Ok(opened)
    }

    fn seal(&self, integration: &str, field: &str, value: &Secret) -> Result<Secret, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(SealError::Random)?;
        let aad = associated_data(integration, field);
        let payload = Payload {
            msg: value.expose().as_bytes(),
            aad: &aad,
        };
        // Encryption into a Vec cannot fail for a token-sized message.
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .map_err(|_| SealError::Open)?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(Secret::new(format!(
            "{VERSION}:{}",
            STANDARD.encode(sealed)
        )))
    }

    fn open(&self, integration: &str, field: &str, sealed: &Secret) -> Result<Secret, SealError> {
        let encoded = sealed
            .expose()
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix(':'))
            .ok_or(SealError::Open)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| SealError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let aad = associated_data(integration, field);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| SealError::Open)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| SealError::Open)?;
        Ok(Secret::new(text))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

/// Binds a sealed value to where it belongs. NUL cannot occur in a TOML key
/// or a field name, so the parts cannot run into each other.
fn associated_data(integration: &str, field: &str) -> Vec<u8> {
    format!("credproxy-state\0{VERSION}\0{integration}\0{field}").into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use time::OffsetDateTime;

    use super::*;

    fn entry() -> Entry {
        Entry {
            refresh_token: Some(Secret::new("rt-SECRET")),
            access_token: Some(Secret::new("at-SECRET")),
            token_type: Some("bearer".into()),
            expires_at: Some(OffsetDateTime::UNIX_EPOCH),
            seed_fingerprint: Some("sha256:00".into()),
            scope: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            sealed: false,
        }
    }

    fn sealer() -> Sealer {
        Sealer::new(&StateKey::generate().unwrap())
    }

    #[test]
    fn round_trip_hides_every_token() {
        let sealer = sealer();
        let sealed = sealer.seal_entry("box", entry()).unwrap();
        assert!(sealed.sealed);
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(!json.contains("SECRET"), "{json}");
        assert!(json.contains("sha256:00") && json.contains("1970-01-01"));
        assert_eq!(sealer.open_entry("box", sealed).unwrap(), entry());
    }

    #[test]
    fn nonces_are_fresh() {
        let sealer = sealer();
        let a = sealer.seal_entry("box", entry()).unwrap();
        let b = sealer.seal_entry("box", entry()).unwrap();
        assert_ne!(a.refresh_token, b.refresh_token);
    }

    #[test]
    fn wrong_key_integration_or_field_does_not_open() {
        let sealer = sealer();
        let sealed = sealer.seal_entry("box", entry()).unwrap();
        let another_key = Sealer::new(&StateKey::generate().unwrap());
        assert!(another_key.open_entry("box", sealed.clone()).is_err());
        assert!(sealer.open_entry("other", sealed.clone()).is_err());
        let swapped = Entry {
            refresh_token: sealed.access_token.clone(),
            access_token: sealed.refresh_token.clone(),
            ..sealed
        };
        let (field, _) = sealer.open_entry("box", swapped).unwrap_err();
        assert_eq!(field, "refresh_token");
    }

    #[test]
    fn truncated_or_malformed_does_not_open() {
        let sealer = sealer();
        let sealed = sealer.seal_entry("box", entry()).unwrap();
        let text = sealed.refresh_token.clone().unwrap();
        let text = text.expose();
        for bad in [
            &text[..text.len() - 4],
            "v1:",
            "v1:AAAA",
            "rt-SECRET",
            "v2:AAAA",
        ] {
            let damaged = Entry {
                refresh_token: Some(Secret::new(bad)),
                ..sealed.clone()
            };
            assert!(sealer.open_entry("box", damaged).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        assert_eq!(format!("{:?}", sealer()), "Sealer([redacted])");
    }
}
