//! Header and query surgery: strip what must not travel upstream, then set the
//! route's credentials. Rendering happens once per published token, not per
//! request.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{InvalidUri, PathAndQuery};

use super::error::ProxyError;
use crate::config::Route;
use crate::config::template::Template;
use crate::secret::Secret;
use crate::tokens::{Integration, Snapshot};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own credentials.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including any that `Connection` names.
/// `Transfer-Encoding` is left to hyper, which re-frames the body itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass of cheap name comparisons instead of
    // a hashed lookup per hop-by-hop name. `Connection` is one of them, so a
    // message without any names none either.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// Sets `injected`, replacing whatever the client sent under those names.
pub fn apply(headers: &mut HeaderMap, injected: &[(HeaderName, HeaderValue)]) {
    for (name, value) in injected {
        headers.insert(name.clone(), value.clone());
    }
}

/// Sets the `injected` query parameters on a request target, replacing any
/// the client sent under those names; the others are kept exactly as sent.
pub fn set_query(
    target: Option<&PathAndQuery>,
    injected: &[(String, Secret)],
) -> Result<Option<PathAndQuery>, InvalidUri> {
    if injected.is_empty() {
        return Ok(target.cloned());
    }
    let mut out = target.map_or("/", PathAndQuery::path).to_owned();
    let mut separator = '?';
    let sent = target.and_then(PathAndQuery::query).unwrap_or_default();
    for pair in sent.split('&').filter(|p| !p.is_empty()) {
        let name = form_urlencoded::parse(pair.as_bytes())
            .next()
            .map(|(n, _)| n);
        if name.is_some_and(|n| injected.iter().any(|(ours, _)| *ours == n)) {
            continue;
        }
        out.push(separator);
        out.push_str(pair);
        separator = '&';
    }
    for (name, value) in injected {
        out.push(separator);
        out.extend(form_urlencoded::byte_serialize(name.as_bytes()));
        out.push('=');
        out.extend(form_urlencoded::byte_serialize(value.expose().as_bytes()));
        separator = '&';
    }
    PathAndQuery::try_from(out).map(Some)
}

/// A route's header values and query parameters, rendered for one token generation.
pub struct Rendered {
    generation: u64,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub query: Vec<(String, Secret)>,
}

impl Rendered {
    /// The upstream request target: what the client sent (or "/") with the
    /// route's query parameters set.
    pub fn path(&self, sent: Option<&PathAndQuery>) -> Result<PathAndQuery, ProxyError> {
        let path = set_query(sent, &self.query)
            .map_err(|e| ProxyError::BadRequest(format!("cannot set the query: {e}")))?;
        Ok(path.unwrap_or_else(|| PathAndQuery::from_static("/")))
    }
}

/// A route at run time: its templates, its integration and the values last
/// rendered from that integration's token.
pub struct Injector {
    templates: Vec<(HeaderName, Template)>,
    query: Vec<(String, Template)>,
    pub integration: Option<Arc<Integration>>,
    rendered: ArcSwapOption<Rendered>,
}

impl Injector {
    pub fn new(route: &Route, integration: Option<Arc<Integration>>) -> Self {
        Self {
            templates: route.headers.clone(),
            query: route.query.clone(),
            integration,
            rendered: ArcSwapOption::empty(),
        }
    }

    /// The header values and query parameters for `snapshot` (None for a route
    /// without a token): rendered on the first request after each refresh, then shared.
    pub fn rendered(&self, snapshot: Option<&Snapshot>) -> Arc<Rendered> {
        let generation = snapshot.map_or(0, |s| s.generation);
        if let Some(rendered) = self.rendered.load_full()
            && rendered.generation == generation
        {
            return rendered;
        }
        let (token, token_type) = match snapshot {
            Some(s) => (s.access_token.clone(), s.token_type.as_str()),
            None => (Secret::new(""), "bearer"),
        };
        let headers = self
            .templates
            .iter()
            // Templates were test-rendered at load; a token with bytes that are
            // illegal in a header is dropped rather than sent mangled.
            .filter_map(|(name, template)| {
                Some((name.clone(), template.render(&token, token_type).ok()?))
            })
            .collect();
        let query = self
            .query
            .iter()
            .map(|(name, template)| (name.clone(), template.render_text(&token, token_type)))
            .collect();
        let rendered = Arc::new(Rendered {
            generation,
            headers,
            query,
        });
        self.rendered.store(Some(rendered.clone()));
        rendered
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn strip_removes_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic abc"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn set_query_replaces_the_clients_parameter_and_keeps_the_others() {
        let target = PathAndQuery::from_static("/maps/api?key=client%20key&q=a%2Bb&key=2&x");
        let injected = [("key".to_owned(), Secret::new("ours &=/"))];
        let set = set_query(Some(&target), &injected).unwrap().unwrap();
        assert_eq!(set.as_str(), "/maps/api?q=a%2Bb&x&key=ours+%26%3D%2F");
        let bare = set_query(None, &injected).unwrap().unwrap();
        assert_eq!(bare.as_str(), "/?key=ours+%26%3D%2F");
        let untouched = set_query(Some(&target), &[]).unwrap().unwrap();
        assert_eq!(untouched, target);
    }

    #[test]
    fn apply_replaces_client_values() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-1"),
        );
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-2"),
        );
        apply(
            &mut headers,
            &[(
                header::AUTHORIZATION,
                HeaderValue::from_static("Bearer ours"),
            )],
        );
        let values: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(values, ["Bearer ours"]);
    }
}
