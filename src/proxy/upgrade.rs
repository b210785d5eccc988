//! HTTP upgrades (WebSocket first) to a routed host: the upgrade request gets
//! the route's credentials like any request, goes upstream on a dedicated
//! HTTP/1.1 connection, and after the upstream's 101 both connections are
//! taken over and relayed byte for byte (no frame parsing) as a tunnel.
//!
//! Clients ask with `Connection: upgrade` + `Upgrade` over HTTP/1.1, or with
//! RFC 8441's extended CONNECT (`:protocol`) over h2; the latter is bridged
//! to an HTTP/1.1 upgrade upstream and answered 200 instead of 101.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::ext::Protocol;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsConnector;

use super::error::ProxyError;
use super::forward::{self, Target};
use super::inject::{self, Rendered};
use super::observe::{Handoff, Line};
use super::upstream::Upstream;
use super::{ActiveRoute, Proxy, Routing, retry, tunnel};
use crate::body::{self, ProxyBody};
use crate::config::UpstreamConfig;
use crate::metrics::{GaugeGuard, TunnelKind};
use crate::server::Slot;
use crate::tls::{self, TlsError};
use crate::tokens::Snapshot;

/// How a client asked to switch protocols.
pub enum Asked {
    /// HTTP/1.1 `Upgrade: <protocol>` with `Connection: upgrade`; answered 101.
    Http1(HeaderValue),
    /// h2 extended CONNECT with `:protocol` (RFC 8441); answered 200.
    ExtendedConnect(HeaderValue),
}

/// The upgrade `request` asks for, if any. `h2c` is not one: RFC 9113
/// deprecates it, and clients (curl `--http2`) offer it on ordinary requests,
/// which then go the ordinary way with the offer stripped.
pub fn asked<B>(request: &Request<B>) -> Option<Asked> {
    if request.method() == Method::CONNECT {
        let protocol = request.extensions().get::<Protocol>()?;
        return HeaderValue::from_str(protocol.as_str())
            .ok()
            .map(Asked::ExtendedConnect);
    }
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let headers = request.headers();
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    let h2c = protocol
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"h2c");
    (connection_upgrade && !h2c).then(|| Asked::Http1(protocol.clone()))
}

/// Opens the connections upgrades go over: fresh, HTTP/1.1 only (ALPN
/// `http/1.1`), never pooled — the upgrade takes the connection over, and a
/// pooled h2 connection could not carry it.
pub struct Dialer {
    tls: TlsConnector,
    response_timeout: Duration,
}

impl Dialer {
    pub fn new(config: &UpstreamConfig) -> Result<Self, TlsError> {
        let tls = tls::client_config(config, &[b"http/1.1"])?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(tls)),
            response_timeout: config.response_timeout,
        })
    }

    /// Sends `request` (origin-form, with `Host`) to `target` on a new
    /// connection and waits for the response head.
    async fn send(
        &self,
        upstream: &Upstream,
        target: &Target,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let authority = target.authority();
        let exchange = async {
            let tcp = upstream.connect_tcp(&target.host, target.port).await?;
            let mut sender = if target.scheme == http::uri::Scheme::HTTPS {
                let name = ServerName::try_from(target.host.to_string())
                    .map_err(|e| ProxyError::Unreachable(format!("{authority}: {e}")))?;
                let tls = self.tls.connect(name, tcp).await.map_err(|e| {
                    ProxyError::Unreachable(format!("TLS with {authority} failed: {e}"))
                })?;
                handshake(tls, &authority).await?
            } else {
                handshake(tcp, &authority).await?
            };
            sender
                .send_request(request)
                .await
                .map_err(|e| ProxyError::Unreachable(format!("{authority}: {e}")))
        };
        tokio::time::timeout(self.response_timeout, exchange)
            .await
            .map_err(|_| {
                ProxyError::Timeout(format!(
                    "{authority} did not answer the upgrade within {:?}",
                    self.response_timeout
                ))
            })?
    }
}

/// An HTTP/1.1 client connection over `io`, driven on its own task until the
/// response is done or the connection has been handed to the upgrade.
async fn handshake<I>(io: I, authority: &str) -> Result<http1::SendRequest<ProxyBody>, ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::Unreachable(format!("{authority}: {e}")))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream upgrade connection closed with an error");
        }
    });
    Ok(sender)
}

/// Sends the upgrade request `request` to `target` with the route's
/// credentials (one resend after a 401, as for any request). On the
/// upstream's 101, spawns the relay that takes both connections over once
/// the answer has reached the client; it holds `slot` while it runs.
pub async fn routed(
    proxy: &Proxy,
    routing: &Routing,
    slot: Slot,
    route: &ActiveRoute,
    target: &Target,
    mut request: Request<Incoming>,
    asked: Asked,
) -> Result<Response<ProxyBody>, ProxyError> {
    let snapshot = forward::current_token(&route.injector).await?;
    let client = hyper::upgrade::on(&mut request);
    let (parts, _no_body) = request.into_parts();
    let head = UpstreamHead::new(&parts, target, &asked)?;
    let send = |snapshot: Option<&Snapshot>| {
        let request = head.request(&route.injector.rendered(snapshot));
        async move {
            let request = request?;
            let send = || routing.upgrades.send(&routing.upstream, target, request);
            forward::timed(route, send).await
        }
    };
    let mut response = send(snapshot.as_deref()).await?;
    if response.status() == StatusCode::UNAUTHORIZED
        && let (Some(integration), Some(snapshot)) = (&route.injector.integration, &snapshot)
        && let Some(fresh) = retry::refreshed(route, integration, snapshot).await
    {
        drop(response);
        response = send(Some(&fresh)).await?;
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        if matches!(asked, Asked::ExtendedConnect(_)) && response.status().is_success() {
            // A 2xx to an extended CONNECT would open a tunnel to nothing.
            return Err(ProxyError::Unreachable(format!(
                "{} answered the upgrade with {} instead of 101",
                target.authority(),
                response.status()
            )));
        }
        return Ok(forward::relay(response.map(body::stream)));
    }
    let upstream = hyper::upgrade::on(&mut response);
    let (line, logged) = oneshot::channel();
    proxy.shutdown.spawn(relay(
        RelayContext::new(proxy, slot),
        client,
        upstream,
        logged,
    ));
    let mut answer = switched(response, &asked);
    answer.extensions_mut().insert(Handoff::new(line));
    Ok(answer)
}

/// The parts of the upstream request that stay the same across a resend.
struct UpstreamHead {
    method: Method,
    /// The client's request target; the route's query parameters are set per attempt.
    path: Option<http::uri::PathAndQuery>,
    headers: HeaderMap,
}

impl UpstreamHead {
    fn new(
        parts: &http::request::Parts,
        target: &Target,
        asked: &Asked,
    ) -> Result<Self, ProxyError> {
        let mut headers = parts.headers.clone();
        inject::strip_hop_by_hop(&mut headers);
        // As for any request, Host names the target, never what the client said.
        let host = HeaderValue::from_str(&target.authority())
            .map_err(|e| ProxyError::BadRequest(format!("invalid upstream host: {e}")))?;
        headers.insert(header::HOST, host);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let method = match asked {
            Asked::Http1(protocol) => {
                headers.insert(header::UPGRADE, protocol.clone());
                parts.method.clone()
            }
            Asked::ExtendedConnect(protocol) => {
                headers.insert(header::UPGRADE, protocol.clone());
                // RFC 8441 §5: h2 has no key; HTTP/1.1 needs one (RFC 6455 §4.1).
                if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
                    let key = base64::engine::general_purpose::STANDARD
                        .encode(rand::random::<[u8; 16]>());
                    let key = HeaderValue::from_str(&key)
                        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
                    headers.insert(header::SEC_WEBSOCKET_KEY, key);
                }
                Method::GET
            }
        };
        Ok(Self {
            method,
            path: parts.uri.path_and_query().cloned(),
            headers,
        })
    }

    fn request(&self, rendered: &Rendered) -> Result<Request<ProxyBody>, ProxyError> {
        let mut headers = self.headers.clone();
        inject::apply(&mut headers, &rendered.headers);
        let mut request = Request::new(body::empty());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = rendered.path(self.path.as_ref())?.into();
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// The upstream's 101 as the client must see it: 101 with the upstream's
/// `Upgrade` over HTTP/1.1, 200 for an extended CONNECT.
fn switched(response: Response<Incoming>, asked: &Asked) -> Response<ProxyBody> {
    let (parts, _empty) = response.into_parts();
    let mut headers = parts.headers;
    let upgrade = headers.get(header::UPGRADE).cloned();
    inject::strip_hop_by_hop(&mut headers);
    let mut answer = Response::new(body::empty());
    match asked {
        Asked::Http1(protocol) => {
            *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.unwrap_or_else(|| protocol.clone()));
        }
        Asked::ExtendedConnect(_) => {
            // The accept value answers the key we made up; h2 has neither.
            headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
    }
    *answer.headers_mut() = headers;
    answer
}

/// What the relay task needs from the proxy.
struct RelayContext {
    slot: Slot,
    open: GaugeGuard,
    idle: Duration,
    shutdown: watch::Receiver<bool>,
}

impl RelayContext {
    /// Counted as an upgraded tunnel from the 101 on.
    fn new(proxy: &Proxy, slot: Slot) -> Self {
        Self {
            slot,
            open: proxy.metrics.tunnel(TunnelKind::Upgraded),
            idle: proxy.limits.tunnel_idle_timeout,
            shutdown: proxy.shutdown.signal(),
        }
    }
}

/// Waits for both sides to be handed over, relays until either closes (or
/// idle timeout, or shutdown), then writes the request's log line.
async fn relay(
    context: RelayContext,
    client: OnUpgrade,
    upstream: OnUpgrade,
    logged: oneshot::Receiver<Line>,
) {
    let RelayContext {
        slot: _place,
        open: _open,
        idle,
        shutdown,
    } = context;
    let transferred = match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            tunnel::relay(TokioIo::new(client), TokioIo::new(upstream), idle, shutdown).await
        }
        Err(error) => {
            tracing::debug!(%error, "upgrade failed after the 101");
            tunnel::Transferred::default()
        }
    };
    if let Ok(line) = logged.await {
        line.write_upgraded(transferred);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::get("/ws").version(version);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap()
    }

    fn protocol(asked: Option<Asked>) -> Option<String> {
        match asked? {
            Asked::Http1(p) | Asked::ExtendedConnect(p) => Some(p.to_str().unwrap().to_owned()),
        }
    }

    #[test]
    fn asked_needs_upgrade_named_in_connection_over_http_1_1() {
        let websocket = ("upgrade", "websocket");
        let cases = [
            (
                Version::HTTP_11,
                vec![("connection", "Upgrade"), websocket],
                Some("websocket"),
            ),
            (
                Version::HTTP_11,
                vec![("connection", "keep-alive, upgrade"), websocket],
                Some("websocket"),
            ),
            (Version::HTTP_11, vec![websocket], None),
            (Version::HTTP_11, vec![("connection", "upgrade")], None),
            (
                Version::HTTP_10,
                vec![("connection", "upgrade"), websocket],
                None,
            ),
            (
                Version::HTTP_11,
                vec![
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                ],
                None,
            ),
        ];
        for (version, headers, expected) in cases {
            let asked = asked(&request(version, &headers));
            assert_eq!(
                protocol(asked).as_deref(),
                expected,
                "{version:?} {headers:?}"
            );
        }
    }

    #[test]
    fn asked_takes_an_extended_connect_by_its_protocol() {
        let mut connect = Request::connect("https://api.test/ws").body(()).unwrap();
        assert!(
            asked(&connect).is_none(),
            "a plain CONNECT is not an upgrade"
        );
        connect
            .extensions_mut()
            .insert(Protocol::from_static("websocket"));
        assert!(matches!(asked(&connect), Some(Asked::ExtendedConnect(p)) if p == "websocket"));
    }
}
