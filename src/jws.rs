//! Private keys for signed assertions, and the compact JWS (RFC 7515) they sign.
//!
//! The crypto is ring's (already in the tree for TLS); this module only parses
//! PEM into one of ring's key pairs, once at config load, and joins
//! `base64url(header).base64url(claims).base64url(signature)`.
//! RS256 for RSA keys (PKCS#1 or PKCS#8, ≥ 2048 bits), ES256 for P-256 keys
//! (PKCS#8).

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rs256,
    Es256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "is not a PEM private key (expected \"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\")"
    )]
    NotPrivateKey,
    #[error(
        "is an EC key in SEC1 form (\"BEGIN EC PRIVATE KEY\"); convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY`"
    )]
    Sec1,
    #[error("is not an RSA (2048 to 8192 bits) or P-256 EC private key: {0}")]
    Unsupported(String),
}

/// A private key, parsed once. Debug shows only its algorithm.
#[derive(Clone)]
pub struct SigningKey {
    pair: Arc<KeyPair>,
    /// SHA-256 of the key's DER: tells a reload whether the key changed.
    digest: [u8; 32],
}

enum KeyPair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl SigningKey {
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPrivateKey)?;
        let rejected = |e: ring::error::KeyRejected| KeyError::Unsupported(e.to_string());
        let pair = match &der {
            PrivateKeyDer::Pkcs1(key) => {
                KeyPair::Rsa(RsaKeyPair::from_der(key.secret_pkcs1_der()).map_err(rejected)?)
            }
            PrivateKeyDer::Pkcs8(key) => {
                let der = key.secret_pkcs8_der();
                match RsaKeyPair::from_pkcs8(der) {
                    Ok(rsa) => KeyPair::Rsa(rsa),
                    Err(rsa_error) => EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        der,
                        &SystemRandom::new(),
                    )
                    .map(KeyPair::Ec)
                    .map_err(|_| rejected(rsa_error))?,
                }
            }
            PrivateKeyDer::Sec1(_) => return Err(KeyError::Sec1),
            _ => return Err(KeyError::NotPrivateKey),
        };
        let digest = Sha256::digest(der.secret_der()).into();
        Ok(Self {
            pair: Arc::new(pair),
            digest,
        })
    }

    /// SHA-256 of the key's DER, in hex: names the key without revealing it.
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn algorithm(&self) -> Algorithm {
        match *self.pair {
            KeyPair::Rsa(_) => Algorithm::Rs256,
            KeyPair::Ec(_) => Algorithm::Es256,
        }
    }

    /// A compact JWS of `claims`, with `kid` in the header when given.
    pub fn sign(&self, kid: Option<&str>, claims: &serde_json::Value) -> Result<Secret, SignError> {
        let mut header = serde_json::json!({ "alg": self.algorithm().name(), "typ": "JWT" });
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let mut jws = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let signature = match &*self.pair {
            KeyPair::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    jws.as_bytes(),
                    &mut signature,
                )
                .map_err(|_| SignError)?;
                signature
            }
            KeyPair::Ec(pair) => pair
                .sign(&rng, jws.as_bytes())
                .map_err(|_| SignError)?
                .as_ref()
                .to_vec(),
        };
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(Secret::new(jws))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("signing the assertion failed")]
pub struct SignError;

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, [redacted])", self.algorithm().name())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ec_pem() -> String {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    #[test]
    fn es256_signature_verifies_with_the_public_key() {
        let pem = ec_pem();
        let key = SigningKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(key.algorithm(), Algorithm::Es256);
        let jws = key
            .sign(Some("k1"), &serde_json::json!({ "iss": "me" }))
            .unwrap();
        let parts: Vec<&str> = jws.expose().split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "k1");
        let KeyPair::Ec(pair) = &*key.pair else {
            unreachable!()
        };
        use ring::signature::KeyPair as _;
        signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        )
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn rejects_what_is_not_a_usable_private_key() {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            SigningKey::from_pem(cert.as_bytes()).err(),
            Some(KeyError::NotPrivateKey)
        );
        assert_eq!(
            SigningKey::from_pem(b"not pem").err(),
            Some(KeyError::NotPrivateKey)
        );
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            SigningKey::from_pem(sec1.as_bytes()).err(),
            Some(KeyError::Sec1)
        );
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            SigningKey::from_pem(garbage.as_bytes()),
            Err(KeyError::Unsupported(_))
        ));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = SigningKey::from_pem(ec_pem().as_bytes()).unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey(ES256, [redacted])");
    }
}
