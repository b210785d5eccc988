//! What the token endpoint received, kept so tests can assert on how credproxy asked:
//! grant type, scope, body format, Content-Type, client authentication.

use std::collections::BTreeMap;

use base64::prelude::{BASE64_STANDARD, Engine};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    Form,
    Json,
    /// Neither form nor JSON Content-Type.
    Other,
}

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub format: BodyFormat,
    /// Body fields (form pairs, or a JSON object's string/number/bool members);
    /// `None` when the body does not parse as its Content-Type says.
    pub fields: Option<BTreeMap<String, String>>,
}

// === impl RecordedRequest ===

impl RecordedRequest {
    pub fn new(method: Method, path: String, headers: HeaderMap, body: Bytes) -> Self {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let (format, fields) = match content_type.as_deref() {
            Some("application/x-www-form-urlencoded") => {
                (BodyFormat::Form, Some(parse_form(&body)))
            }
            Some("application/json") => (BodyFormat::Json, parse_json(&body)),
            _ => (BodyFormat::Other, None),
        };
        Self {
            method,
            path,
            headers,
            body,
            format,
            fields,
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.as_ref()?.get(name).map(String::as_str)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.header(CONTENT_TYPE.as_str())
    }

    /// The Authorization scheme as sent, e.g. `Basic`.
    pub fn auth_scheme(&self) -> Option<&str> {
        self.header(AUTHORIZATION.as_str())?.split(' ').next()
    }

    /// HTTP Basic client credentials, decoded: base64, then form-urldecoding of each half
    /// (RFC 6749 §2.3.1). `None` if absent or malformed.
    pub fn basic_credentials(&self) -> Option<(String, String)> {
        let value = self.header(AUTHORIZATION.as_str())?;
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = BASE64_STANDARD.decode(encoded.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        Some((form_decode(id)?, form_decode(secret)?))
    }
}

fn parse_form(body: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn parse_json(body: &[u8]) -> Option<BTreeMap<String, String>> {
    let object = match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::Object(object) => object,
        _ => return None,
    };
    object
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            serde_json::Value::Number(n) => Some((k, n.to_string())),
            serde_json::Value::Bool(b) => Some((k, b.to_string())),
            _ => None,
        })
        .collect()
}

/// application/x-www-form-urlencoded decoding of one value: `+` is a space, `%XX` a byte.
/// Strict on purpose: a client that skips the encoding fails for secrets that need it.
fn form_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}
