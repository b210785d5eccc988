//! An operator's view of credproxy's admin listener: plain HTTP requests (with the bearer
//! token when one is configured), `/metrics` parsed by the strict Prometheus parser, and a
//! transcript of every answer so a test can scan all of it for secrets at the end.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

use super::client;
use super::prom::{self, Scrape};
use super::token::WAIT;

/// How often a bounded wait re-reads the admin API.
const POLL: Duration = Duration::from_millis(5);

/// One answer from the admin listener.
#[derive(Debug, Clone)]
pub struct AdminAnswer {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub www_authenticate: Option<String>,
    pub headers: http::HeaderMap,
    pub text: String,
}

impl AdminAnswer {
    /// The first `name` header, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("admin answer is not JSON ({e}): {}", self.text))
    }
}

pub struct Admin {
    addr: SocketAddr,
    token: Option<String>,
    http: reqwest::Client,
    transcript: Mutex<String>,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            token: None,
            http: client::reqwest_direct(),
            transcript: Mutex::new(String::new()),
        }
    }

    /// Sends `Authorization: Bearer token` with every request.
    pub fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..Self::new(addr)
        }
    }

    /// `method path` with `bearer` as the token (None: no Authorization header).
    pub async fn request_as(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
    ) -> AdminAnswer {
        self.try_request_as(method.clone(), path, bearer)
            .await
            .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"))
    }

    /// As [`request_as`](Self::request_as), but an answer that never came (the process
    /// died) is an error instead of a panic.
    pub async fn try_request_as(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<AdminAnswer, reqwest::Error> {
        let url = format!("http://{}{path}", self.addr);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let headers = response.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (content_type, www_authenticate) = (header("content-type"), header("www-authenticate"));
        let status = response.status();
        let text = response.text().await?;
        {
            let mut transcript = self
                .transcript
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            transcript.push_str(&format!("{method} {path} -> {status}\n{text}\n"));
        }
        Ok(AdminAnswer {
            status,
            content_type,
            www_authenticate,
            headers,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> AdminAnswer {
        self.request_as(reqwest::Method::GET, path, self.token.as_deref())
            .await
    }

    pub async fn post(&self, path: &str) -> AdminAnswer {
        self.request_as(reqwest::Method::POST, path, self.token.as_deref())
            .await
    }

    /// `POST /integrations/NAME/refresh`
    pub async fn force_refresh(&self, name: &str) -> AdminAnswer {
        self.post(&format!("/integrations/{name}/refresh")).await
    }

    /// As [`force_refresh`](Self::force_refresh), for a process that may die meanwhile.
    pub async fn try_force_refresh(&self, name: &str) -> Result<AdminAnswer, reqwest::Error> {
        let path = format!("/integrations/{name}/refresh");
        self.try_request_as(reqwest::Method::POST, &path, self.token.as_deref())
            .await
    }

    /// `name`'s entry in `GET /integrations`.
    pub async fn integration(&self, name: &str) -> Value {
        let answer = self.get("/integrations").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        let list = answer.json();
        list.as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no integration {name:?} in {list}"))
    }

    /// `GET /metrics`: 200, the 0.0.4 text content type, and a strict parse.
    pub async fn metrics(&self) -> Scrape {
        let answer = self.get("/metrics").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        let content_type = answer.content_type.as_deref().unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
            "/metrics content-type {content_type:?}"
        );
        prom::parse(&answer.text).unwrap_or_else(|e| {
            panic!(
                "/metrics is not valid Prometheus text: {e}\n{}",
                answer.text
            )
        })
    }

    /// Re-reads `/metrics` until `condition` holds (bounded by [`WAIT`]); returns that scrape.
    pub async fn wait_for_metrics(
        &self,
        what: &str,
        mut condition: impl FnMut(&Scrape) -> bool,
    ) -> Scrape {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let scrape = self.metrics().await;
            if condition(&scrape) {
                return scrape;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {WAIT:?} waiting until {what}; last /metrics:\n{}",
                scrape.text()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Re-reads `/readyz` until it answers `status` (bounded by [`WAIT`]).
    pub async fn wait_for_readyz(&self, status: StatusCode) -> AdminAnswer {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer = self.get("/readyz").await;
            if answer.status == status {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for /readyz {status}; last: {} {}",
                answer.status,
                answer.text
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every answer so far, as `METHOD PATH -> STATUS` and the body.
    pub fn transcript(&self) -> String {
        self.transcript
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
