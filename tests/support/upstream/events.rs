//! The test API's server-sent events endpoint, `GET /events/NAME`: [`COUNT`] events,
//! [`EVERY`] apart, each handed to the connection as its own frame the moment it is
//! made. When each was sent is recorded under NAME, so a test can compare it with
//! when the event reached the client.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ApiBody, Shared};

pub const COUNT: usize = 3;
pub const EVERY: Duration = Duration::from_millis(1500);

/// The text of event `n`.
pub fn event(n: usize) -> String {
    format!("id: {n}\ndata: event {n}\n\n")
}

pub(super) fn answer(shared: &Arc<Shared>, name: &str) -> Response<ApiBody> {
    let (events, rx) = mpsc::channel(1);
    let shared = Arc::clone(shared);
    let name = name.to_owned();
    tokio::spawn(async move {
        for n in 0..COUNT {
            tokio::time::sleep(EVERY).await;
            shared
                .state()
                .events_sent
                .entry(name.clone())
                .or_default()
                .push(Instant::now());
            if events.send(Bytes::from(event(n))).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(Events(rx).boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A body of whatever arrives on the channel, one frame per message.
struct Events(mpsc::Receiver<Bytes>);

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|e| Ok(Frame::data(e))))
    }
}
