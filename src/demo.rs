//! The outside world for `credproxy demo`: a demo OAuth provider and a demo API,
//! both HTTPS on 127.0.0.1 behind a CA minted at start, plus the credproxy config
//! that routes to them. The proxy itself runs unchanged; only the world it talks to
//! is simulated, so the demo needs no accounts.
//!
//! - `pki`: the demo upstream CA and the server leaf.
//! - `provider`: client credentials, rotating refresh token, issued access tokens.
//! - `token_endpoint`: `POST /token` on `oauth.demo.test`.
//! - `api`: `api.demo.test`, which wants a valid bearer token.
//! - `serve`: the HTTPS accept loop both servers share.

mod api;
mod pki;
mod provider;
mod serve;
mod token_endpoint;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::secret::Secret;
use pki::DemoPki;
use provider::Provider;

pub use pki::CA_NAME;
pub use provider::{ACCESS_TOKEN_LIFETIME, CLIENT_ID};

pub const API_HOST: &str = "api.demo.test";
pub const OAUTH_HOST: &str = "oauth.demo.test";
/// The integration the demo config defines and routes `api.demo.test` to.
pub const INTEGRATION: &str = "demo";
/// File name, under the demo directory, of the upstream CA certificate.
pub const UPSTREAM_CA_FILE: &str = "demo-upstream-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{}: cannot use as the demo directory", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot use as the demo directory: {reason}", path.display())]
    UnusableDir { path: PathBuf, reason: &'static str },
    #[error("{}: cannot write the demo upstream CA", path.display())]
    WriteCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the demo certificates")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot set up TLS for the demo servers")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on 127.0.0.1 for a demo server")]
    Bind(#[source] std::io::Error),
}

/// The running demo servers. Dropping it stops them (and their connections).
pub struct DemoWorld {
    dir: PathBuf,
    upstream_ca: PathBuf,
    api_addr: SocketAddr,
    oauth_addr: SocketAddr,
    provider: Arc<Provider>,
    initial_refresh_token: Secret,
    tasks: Vec<JoinHandle<()>>,
}

impl DemoWorld {
    /// Starts both servers; writes the upstream CA PEM into `dir` (created if missing).
    pub async fn start(dir: &Path) -> Result<DemoWorld, DemoError> {
        let dir = demo_dir(dir)?;
        let pki = DemoPki::generate()?;
        let upstream_ca = dir.join(UPSTREAM_CA_FILE);
        std::fs::write(&upstream_ca, &pki.ca_pem).map_err(|source| DemoError::WriteCa {
            path: upstream_ca.clone(),
            source,
        })?;
        let (provider, initial_refresh_token) = Provider::new();
        let provider = Arc::new(provider);

        let oauth_tls = pki.server_config(&[b"http/1.1"])?;
        let api_tls = pki.server_config(&[b"h2", b"http/1.1"])?;
        let oauth_listener = bind().await?;
        let api_listener = bind().await?;
        let oauth_addr = oauth_listener.local_addr().map_err(DemoError::Bind)?;
        let api_addr = api_listener.local_addr().map_err(DemoError::Bind)?;

        let for_oauth = provider.clone();
        let for_api = provider.clone();
        let tasks = vec![
            tokio::spawn(serve::serve(oauth_listener, oauth_tls, move |request| {
                token_endpoint::handle(for_oauth.clone(), request)
            })),
            tokio::spawn(serve::serve(api_listener, api_tls, move |request| {
                api::handle(for_api.clone(), request)
            })),
        ];
        Ok(DemoWorld {
            dir,
            upstream_ca,
            api_addr,
            oauth_addr,
            provider,
            initial_refresh_token,
            tasks,
        })
    }

    /// The credproxy config for the demo: local CA and state under the demo
    /// directory, the demo CA trusted upstream, both demo hosts resolved to their
    /// servers, one integration and one route; an `[admin]` table only with
    /// `admin_listen`.
    pub fn config_toml(
        &self,
        proxy_listen: SocketAddr,
        admin_listen: Option<SocketAddr>,
    ) -> String {
        let path = |p: PathBuf| toml_string(&p.to_string_lossy());
        let resolve = |host: &str, addr: SocketAddr| {
            format!(
                "{} = {}",
                toml_string(&format!("{host}:443")),
                toml_string(&addr.to_string())
            )
        };
        format!(
            "# credproxy demo: generated at start; the demo servers and their CA live only as long as this run.\n\
             \n\
             [proxy]\n\
             listen = {proxy_listen}\n\
             \n\
             {admin}\
             [ca]\n\
             cert = {ca_cert}\n\
             key = {ca_key}\n\
             \n\
             [state]\n\
             path = {state}\n\
             \n\
             [upstream]\n\
             extra_ca = {extra_ca}\n\
             resolve = {{ {api_resolve}, {oauth_resolve} }}\n\
             \n\
             [integrations.{INTEGRATION}]\n\
             client_id = {client_id}\n\
             client_secret = {client_secret}\n\
             refresh_url = {refresh_url}\n\
             refresh_token = {refresh_token}\n\
             refresh_skew = \"5s\"\n\
             \n\
             [[routes]]\n\
             host = {api_host}\n\
             integration = \"{INTEGRATION}\"\n",
            proxy_listen = toml_string(&proxy_listen.to_string()),
            admin = admin_listen.map_or_else(String::new, |addr| format!(
                "[admin]\nlisten = {}\n\n",
                toml_string(&addr.to_string())
            )),
            ca_cert = path(self.ca_cert_path()),
            ca_key = path(self.dir.join("certs/ca-key.pem")),
            state = path(self.dir.join("state/tokens.json")),
            extra_ca = path(self.upstream_ca.clone()),
            api_resolve = resolve(API_HOST, self.api_addr),
            oauth_resolve = resolve(OAUTH_HOST, self.oauth_addr),
            client_id = toml_string(CLIENT_ID),
            client_secret = toml_string(self.provider.client_secret().expose()),
            refresh_url = toml_string(&format!("https://{OAUTH_HOST}/token")),
            refresh_token = toml_string(self.initial_refresh_token.expose()),
            api_host = toml_string(API_HOST),
        )
    }

    /// Where the config puts credproxy's own CA certificate (the one curl's
    /// `--cacert` needs); credproxy creates it on first use.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("certs/ca.pem")
    }

    /// The demo upstream CA certificate (trusted by credproxy via `upstream.extra_ca`).
    pub fn upstream_ca_path(&self) -> &Path {
        &self.upstream_ca
    }

    /// The demo directory, absolute.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn oauth_addr(&self) -> SocketAddr {
        self.oauth_addr
    }

    /// Successful refreshes at the token endpoint so far.
    pub fn refresh_count(&self) -> u64 {
        self.provider.refresh_count()
    }

    /// The refresh count, as a watch that changes on every successful refresh.
    pub fn refreshes(&self) -> watch::Receiver<u64> {
        self.provider.subscribe()
    }
}

impl Drop for DemoWorld {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for DemoWorld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoWorld")
            .field("dir", &self.dir)
            .field("api_addr", &self.api_addr)
            .field("oauth_addr", &self.oauth_addr)
            .finish_non_exhaustive()
    }
}

/// Creates `dir` and returns it absolute, refusing paths the config cannot carry:
/// non-UTF-8 ones, and ones with `${`, which config loading would expand.
fn demo_dir(dir: &Path) -> Result<PathBuf, DemoError> {
    let io_err = |source| DemoError::Dir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let dir = std::fs::canonicalize(dir).map_err(io_err)?;
    let unusable = |reason| DemoError::UnusableDir {
        path: dir.clone(),
        reason,
    };
    let Some(text) = dir.to_str() else {
        return Err(unusable("the path is not valid UTF-8"));
    };
    if text.contains("${") {
        return Err(unusable("the path contains \"${\""));
    }
    Ok(dir)
}

async fn bind() -> Result<TcpListener, DemoError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(DemoError::Bind)
}

/// `value` as a TOML basic string, quotes and escapes included.
fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use serde_json::Value;

    fn tls_client(world: &DemoWorld, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(world.upstream_ca_path()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    fn client(world: &DemoWorld) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls_client(world, &[]))
            .resolve(OAUTH_HOST, world.oauth_addr())
            .resolve(API_HOST, world.api_addr())
            .build()
            .unwrap()
    }

    fn client_secret(world: &DemoWorld) -> String {
        world.provider.client_secret().expose().to_owned()
    }

    async fn refresh(
        client: &reqwest::Client,
        secret: &str,
        refresh_token: &str,
    ) -> (reqwest::StatusCode, Value) {
        let response = client
            .post(format!("https://{OAUTH_HOST}/token"))
            .basic_auth(CLIENT_ID, Some(secret))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        (status, response.json().await.unwrap())
    }

    /// Refreshes with the world's current refresh token; returns the access token.
    async fn access_token(world: &DemoWorld, client: &reqwest::Client) -> String {
        let (status, body) = refresh(
            client,
            &client_secret(world),
            world.initial_refresh_token.expose(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn token_endpoint_rotates_refresh_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let world = DemoWorld::start(dir.path()).await.unwrap();
        let client = client(&world);
        let secret = client_secret(&world);
        let first = world.initial_refresh_token.expose().to_owned();

        let (status, body) = refresh(&client, &secret, &first).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 20);
        assert!(!body["access_token"].as_str().unwrap().is_empty());
        let second = body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(second, first);
        assert_eq!(world.refresh_count(), 1);

        let (status, body) = refresh(&client, &secret, &first).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");

        let (status, body) = refresh(&client, "wrong-secret", &second).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "invalid_client");

        let (status, body) = refresh(&client, &secret, &second).await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["refresh_token"].as_str().unwrap(), second);
        assert_eq!(world.refresh_count(), 2);
        assert_eq!(*world.refreshes().borrow(), 2);
    }

    #[tokio::test]
    async fn api_wants_a_valid_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let world = DemoWorld::start(dir.path()).await.unwrap();
        let client = client(&world);
        let token = access_token(&world, &client).await;
        let url = format!("https://{API_HOST}/files/list?limit=1");

        let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["message"], "hello from api.demo.test");
        assert_eq!(body["path"], "/files/list");
        let left = body["token_expires_in_s"].as_u64().unwrap();
        assert!((1..=20).contains(&left), "{left}");

        for request in [
            client.get(&url),
            client.get(&url).bearer_auth("demo-at-wrong"),
        ] {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401);
            assert_eq!(
                response.headers()[http::header::WWW_AUTHENTICATE],
                "Bearer error=\"invalid_token\""
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "invalid_token");
        }

        let count = 3 * 64 * 1024 + 7;
        let response = client
            .get(format!("https://{API_HOST}/bytes/{count}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.content_length(), Some(count));
        let bytes = response.bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, count);
        assert!(bytes.iter().all(|&b| b == 0));

        let response = client
            .post(format!("https://{API_HOST}/upload"))
            .bearer_auth(&token)
            .body(vec![7u8; 100_000])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["received_bytes"], 100_000);
    }

    #[tokio::test]
    async fn api_negotiates_h2() {
        let dir = tempfile::tempdir().unwrap();
        let world = DemoWorld::start(dir.path()).await.unwrap();
        let token = access_token(&world, &client(&world)).await;

        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client(&world, &[b"h2"])));
        let tcp = tokio::net::TcpStream::connect(world.api_addr())
            .await
            .unwrap();
        let tls = connector
            .connect(ServerName::try_from(API_HOST).unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::get(format!("https://{API_HOST}/over-h2"))
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 200);
    }

    #[tokio::test]
    async fn config_toml_is_a_valid_config() {
        // Quotes, backslashes and spaces in the path must survive TOML escaping.
        let parent = tempfile::Builder::new()
            .prefix("demo \"q\\ 'x")
            .tempdir()
            .unwrap();
        let world = DemoWorld::start(&parent.path().join("run")).await.unwrap();
        let proxy: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let admin: SocketAddr = "127.0.0.1:19090".parse().unwrap();
        let text = world.config_toml(proxy, Some(admin));
        let config = crate::config::parse(Path::new("demo.toml"), &text, &|_| None)
            .map_err(|e| format!("{e}\n{text}"))
            .unwrap();

        assert_eq!(config.proxy.listen, proxy);
        assert_eq!(config.admin.listen, admin);
        assert_eq!(config.ca.cert, world.ca_cert_path());
        assert!(config.ca.key.starts_with(world.dir()));
        assert!(matches!(
            &config.state.store,
            crate::config::StoreConfig::File { path } if path.starts_with(world.dir())
        ));
        assert!(world.dir().is_absolute());
        let extra = config.upstream.extra_ca.as_ref().unwrap();
        assert_eq!(extra.path, world.upstream_ca_path());
        assert_eq!(extra.certs.len(), 1);
        assert_eq!(
            config.upstream.resolve(API_HOST, 443),
            Some(world.api_addr())
        );
        assert_eq!(
            config.upstream.resolve(OAUTH_HOST, 443),
            Some(world.oauth_addr())
        );
        let demo = config.integration(INTEGRATION).unwrap();
        let crate::config::Grant::RefreshToken(grant) = &demo.grant else {
            unreachable!("the demo uses the refresh_token grant")
        };
        assert_eq!(grant.client.client_id, CLIENT_ID);
        assert_eq!(grant.client.client_secret, *world.provider.client_secret());
        assert_eq!(
            grant.client.token_url.as_str(),
            "https://oauth.demo.test/token"
        );
        assert_eq!(
            grant.refresh_token.as_ref(),
            Some(&world.initial_refresh_token)
        );
        assert_eq!(demo.refresh_skew, std::time::Duration::from_secs(5));
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.routes[0].integration.as_deref(), Some(INTEGRATION));
        assert!(
            crate::routes::RouteTable::new(config.routes.iter().map(|r| &r.host))
                .lookup(API_HOST)
                .is_some()
        );

        // The debug output of the world carries no secret.
        let debug = format!("{world:?}");
        assert!(!debug.contains(world.initial_refresh_token.expose()));
        assert!(!debug.contains(world.provider.client_secret().expose()));
    }

    #[tokio::test]
    async fn a_dir_config_loading_would_expand_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let err = DemoWorld::start(&parent.path().join("${HOME}"))
            .await
            .unwrap_err();
        assert!(matches!(err, DemoError::UnusableDir { .. }), "{err}");
    }

    #[tokio::test]
    async fn dropping_the_world_stops_its_servers() {
        let dir = tempfile::tempdir().unwrap();
        let world = DemoWorld::start(dir.path()).await.unwrap();
        let addrs = [world.api_addr(), world.oauth_addr()];
        drop(world);
        for addr in addrs {
            let mut refused = false;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(refused, "{addr} still accepts connections");
        }
    }
}
