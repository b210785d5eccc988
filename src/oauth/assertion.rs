//! The signed JWTs two grants present: an RFC 7523 assertion (jwt_bearer) and a
//! GitHub App JWT. Built per token request, with the clock passed in, so the
//! claims are table-tested; each carries a fresh `jti` or a short lifetime, so
//! one seen by someone else is of little use.

use serde_json::json;
use time::OffsetDateTime;

use crate::config::{GithubApp, JwtBearer};
use crate::jws::SignError;
use crate::secret::Secret;

/// RFC 7523 assertions live this long (Google's maximum).
pub const ASSERTION_LIFETIME: i64 = 3600;
/// GitHub accepts app JWTs that expire at most 10 minutes after they were
/// issued; `iat` is set this far in the past against clock drift.
pub const GITHUB_BACKDATE: i64 = 60;
pub const GITHUB_LIFETIME: i64 = 600;

/// An RFC 7523 §3 assertion: `iss`, `sub`, `aud`, `iat`, `exp`, a fresh `jti`,
/// and `scope` (Google reads it from the claims).
pub fn jwt_bearer(
    grant: &JwtBearer,
    scope: Option<&str>,
    now: OffsetDateTime,
) -> Result<Secret, SignError> {
    let iat = now.unix_timestamp();
    let mut claims = json!({
        "iss": grant.issuer,
        "aud": grant.audience,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME,
        "jti": jti(),
    });
    if let Some(subject) = &grant.subject {
        claims["sub"] = subject.as_str().into();
    }
    if let Some(scope) = scope {
        claims["scope"] = scope.into();
    }
    grant.key.sign(grant.key_id.as_deref(), &claims)
}

/// A GitHub App JWT: `iss` = the app id, RS256, ten minutes at most.
pub fn github_app(app: &GithubApp, now: OffsetDateTime) -> Result<Secret, SignError> {
    let iat = now.unix_timestamp() - GITHUB_BACKDATE;
    // The id was checked to be all digits; GitHub's own clients send a number.
    let iss = app
        .app_id
        .parse::<u64>()
        .map_or_else(|_| json!(app.app_id), |id| json!(id));
    let claims = json!({ "iss": iss, "iat": iat, "exp": iat + GITHUB_LIFETIME });
    app.key.sign(None, &claims)
}

/// 128 random bits: a provider that remembers `jti`s rejects a replayed assertion.
fn jti() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use time::macros::datetime;

    use super::*;
    use crate::jws::SigningKey;

    const NOW: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn key() -> SigningKey {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        SigningKey::from_pem(
            format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n").as_bytes(),
        )
        .unwrap()
    }

    fn claims(jws: &Secret) -> serde_json::Value {
        let payload = jws.expose().split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    }

    fn grant(subject: Option<&str>) -> JwtBearer {
        JwtBearer {
            issuer: "sa@project.iam.gserviceaccount.com".into(),
            subject: subject.map(str::to_owned),
            audience: "https://oauth2.googleapis.com/token".into(),
            key: key(),
            key_id: Some("kid-1".into()),
            token_url: "https://oauth2.googleapis.com/token".parse().unwrap(),
        }
    }

    #[test]
    fn jwt_bearer_claims() {
        let grant = grant(Some("user@example.com"));
        let first = claims(&jwt_bearer(&grant, Some("drive.readonly"), NOW).unwrap());
        assert_eq!(first["iss"], "sa@project.iam.gserviceaccount.com");
        assert_eq!(first["sub"], "user@example.com");
        assert_eq!(first["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(first["iat"], NOW.unix_timestamp());
        assert_eq!(first["exp"], NOW.unix_timestamp() + 3600);
        assert_eq!(first["scope"], "drive.readonly");
        let second = claims(&jwt_bearer(&grant, None, NOW).unwrap());
        assert_ne!(
            first["jti"], second["jti"],
            "every assertion has its own jti"
        );
        assert!(second.get("scope").is_none());
        let no_subject = claims(&jwt_bearer(&self::grant(None), None, NOW).unwrap());
        assert!(no_subject.get("sub").is_none());
    }

    #[test]
    fn github_app_jwt_lasts_ten_minutes_and_is_backdated() {
        let app = GithubApp {
            app_id: "12345".into(),
            installation_id: "678".into(),
            key: key(),
            token_url: "https://api.github.com/app/installations/678/access_tokens"
                .parse()
                .unwrap(),
        };
        let claims = claims(&github_app(&app, NOW).unwrap());
        assert_eq!(claims["iss"], 12345);
        assert_eq!(claims["iat"], NOW.unix_timestamp() - 60);
        assert_eq!(claims["exp"], NOW.unix_timestamp() + 540);
    }
}
