//! The per-request log line, rendered without tracing's general-purpose
//! formatter: a reusable per-thread buffer, digits written by hand, no
//! `fmt` machinery on the hot path. The bytes are those tracing-subscriber's
//! text (no colours) and JSON formats write for the same event (a test pins
//! it), and they go to the same background writer as every other line.
//! Where no sink is installed (colours on a terminal, or a library user's own
//! subscriber), the line goes through `tracing` as any other event.
//! Filtering is unchanged: `RUST_LOG` (target `credproxy::proxy::access_log`).

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::Method;
use time::OffsetDateTime;

use crate::log_writer::LogWriter;

/// How lines are written: tracing-subscriber's text format without colours, or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

struct Sink {
    format: Format,
    writer: LogWriter,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Request lines are rendered here and written to `writer` (the writer the
/// tracing subscriber uses, so lines stay in order with the others).
pub fn install(format: Format, writer: LogWriter) {
    let _ = SINK.set(Sink { format, writer });
}

/// What the line says about a request.
pub struct Fields<'a> {
    pub method: &'a Method,
    pub host: &'a str,
    pub route: &'a str,
    pub status: u16,
    /// Bytes sent back to the client.
    pub bytes: u64,
    /// Bytes from the client, for an upgraded connection.
    pub bytes_up: Option<u64>,
    pub latency: Duration,
    /// The proxy client's name (from the config), `-` for none.
    pub client: &'a str,
    /// None inside an intercepted tunnel: its CONNECT line named the peer.
    pub peer: Option<SocketAddr>,
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
}

impl Fields<'_> {
    /// Writes the line at info, if the filter lets it through.
    pub fn log(&self) {
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        match SINK.get() {
            Some(sink) => BUFFER.with_borrow_mut(|buffer| {
                buffer.clear();
                self.render(sink.format, SystemTime::now(), buffer);
                // Queued whole; a full queue drops it, as every other line.
                sink.writer.append(buffer);
            }),
            None => self.trace(),
        }
    }

    /// The same line through `tracing`'s formatter.
    fn trace(&self) {
        let (method, host, route, status) = (self.method, self.host, self.route, self.status);
        let (bytes, bytes_up, client) = (self.bytes, self.bytes_up, self.client);
        let latency = Millis(self.latency);
        match self.peer {
            Some(peer) => {
                tracing::info!(%method, host, route, status, bytes, bytes_up, %latency, client, %peer, "request")
            }
            None => {
                tracing::info!(%method, host, route, status, bytes, bytes_up, %latency, client, "request")
            }
        }
    }

    fn render(&self, format: Format, now: SystemTime, out: &mut Vec<u8>) {
        match format {
            Format::Text => self.render_text(now, out),
            Format::Json => self.render_json(now, out),
        }
    }

    /// `2026-01-02T03:04:05.123456Z  INFO request method=GET host="h" …`
    fn render_text(&self, now: SystemTime, out: &mut Vec<u8>) {
        timestamp(now, out);
        out.extend_from_slice(b"  INFO request method=");
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.extend_from_slice(b" host=");
        debug_str(self.host, out);
        out.extend_from_slice(b" route=");
        debug_str(self.route, out);
        out.extend_from_slice(b" status=");
        decimal(u64::from(self.status), out);
        out.extend_from_slice(b" bytes=");
        decimal(self.bytes, out);
        if let Some(up) = self.bytes_up {
            out.extend_from_slice(b" bytes_up=");
            decimal(up, out);
        }
        out.extend_from_slice(b" latency=");
        Millis(self.latency).render(out);
        out.extend_from_slice(b" client=");
        debug_str(self.client, out);
        if let Some(peer) = self.peer {
            let _ = write!(out, " peer={peer}");
        }
        out.push(b'\n');
    }

    /// `{"timestamp":"…","level":"INFO","fields":{"message":"request",…}}`
    fn render_json(&self, now: SystemTime, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(now, out);
        out.extend_from_slice(
            b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":",
        );
        json_str(self.method.as_str(), out);
        out.extend_from_slice(b",\"host\":");
        json_str(self.host, out);
        out.extend_from_slice(b",\"route\":");
        json_str(self.route, out);
        out.extend_from_slice(b",\"status\":");
        decimal(u64::from(self.status), out);
        out.extend_from_slice(b",\"bytes\":");
        decimal(self.bytes, out);
        if let Some(up) = self.bytes_up {
            out.extend_from_slice(b",\"bytes_up\":");
            decimal(up, out);
        }
        out.extend_from_slice(b",\"latency\":\"");
        Millis(self.latency).render(out);
        out.extend_from_slice(b"\",\"client\":");
        json_str(self.client, out);
        if let Some(peer) = self.peer {
            let _ = write!(out, ",\"peer\":\"{peer}\"");
        }
        out.extend_from_slice(b"}}\n");
    }
}

/// A latency as milliseconds with one decimal: `12.3ms`.
struct Millis(Duration);

impl Millis {
    fn tenths(&self) -> u128 {
        (self.0.as_nanos() + 50_000) / 100_000
    }

    fn render(&self, out: &mut Vec<u8>) {
        let tenths = u64::try_from(self.tenths()).unwrap_or(u64::MAX);
        decimal(tenths / 10, out);
        out.push(b'.');
        out.push(b'0' + (tenths % 10) as u8);
        out.extend_from_slice(b"ms");
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenths = self.tenths();
        write!(f, "{}.{}ms", tenths / 10, tenths % 10)
    }
}

/// tracing-subscriber's timestamp: RFC 3339, UTC, microseconds.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let at = OffsetDateTime::from(now);
    let year = at.year();
    if (0..=9999).contains(&year) {
        padded(year.unsigned_abs().into(), 4, out);
    } else {
        // Outside tracing-subscriber's fast case too; render as it does.
        let _ = if year > 9999 {
            write!(out, "+{year}")
        } else {
            write!(out, "{year:05}")
        };
    }
    out.push(b'-');
    padded(u8::from(at.month()).into(), 2, out);
    out.push(b'-');
    padded(at.day().into(), 2, out);
    out.push(b'T');
    padded(at.hour().into(), 2, out);
    out.push(b':');
    padded(at.minute().into(), 2, out);
    out.push(b':');
    padded(at.second().into(), 2, out);
    out.push(b'.');
    padded(at.microsecond().into(), 6, out);
    out.push(b'Z');
}

fn decimal(n: u64, out: &mut Vec<u8>) {
    padded(n, 1, out);
}

/// `n` in decimal, zero-padded to at least `width` digits.
fn padded(mut n: u64, width: usize, out: &mut Vec<u8>) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = at.min(digits.len() - width.min(digits.len()));
    out.extend_from_slice(&digits[start..]);
}

/// `s` as `{:?}` writes it: quoted, with escapes only where needed.
fn debug_str(s: &str, out: &mut Vec<u8>) {
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if s.bytes().all(|b| b >= b' ' && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures what a tracing-subscriber fmt layer writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The line tracing-subscriber writes for `fields` in `format`.
    fn traced(fields: &Fields<'_>, format: Format) -> String {
        let capture = Capture::default();
        let writer = {
            let capture = capture.clone();
            move || capture.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_target(false)
            .with_ansi(false);
        match format {
            Format::Text => tracing::subscriber::with_default(builder.finish(), || fields.trace()),
            Format::Json => {
                tracing::subscriber::with_default(builder.json().finish(), || fields.trace())
            }
        }
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    fn rendered(fields: &Fields<'_>, format: Format) -> String {
        let mut out = Vec::new();
        fields.render(format, SystemTime::now(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The line with its timestamp (the one field that differs) blanked.
    fn without_timestamp(line: &str, format: Format) -> String {
        match format {
            Format::Text => line.split_once(' ').unwrap().1.to_owned(),
            Format::Json => {
                let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
                let stamp = value["timestamp"].as_str().unwrap().to_owned();
                assert!(stamp.ends_with('Z') && stamp.len() == 27, "{stamp}");
                value["timestamp"] = serde_json::Value::Null;
                // Also pin the key order and bytes: re-render the rest verbatim.
                let rest = line.replace(&stamp, "");
                format!("{value}|{rest}")
            }
        }
    }

    #[test]
    fn the_rendered_line_is_the_line_tracing_writes() {
        let get = Method::GET;
        let post = Method::POST;
        let cases = [
            Fields {
                method: &get,
                host: "api.test",
                route: "api.test",
                status: 200,
                bytes: 211,
                bytes_up: None,
                latency: Duration::from_micros(1_249),
                client: "-",
                peer: Some("127.0.0.1:40112".parse().unwrap()),
            },
            Fields {
                method: &post,
                host: "[::1]",
                route: "*.example.com",
                status: 101,
                bytes: 0,
                bytes_up: Some(12_345_678_901),
                latency: Duration::from_secs(75) + Duration::from_nanos(50_000),
                client: "build-agents",
                peer: None,
            },
            Fields {
                method: &get,
                host: "we\"ird\\host\u{7}é",
                route: "-",
                status: 502,
                bytes: 9,
                bytes_up: None,
                latency: Duration::ZERO,
                client: "ci \"runner\"",
                peer: Some("[2001:db8::1]:8080".parse().unwrap()),
            },
        ];
        for fields in &cases {
            for format in [Format::Text, Format::Json] {
                let ours = rendered(fields, format);
                let theirs = traced(fields, format);
                assert_eq!(
                    without_timestamp(&ours, format),
                    without_timestamp(&theirs, format),
                    "\nours:   {ours}theirs: {theirs}"
                );
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_764_559_160_012_345_678);
        let mut out = Vec::new();
        timestamp(at, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-12-01T03:19:20.012345Z"
        );
    }

    #[test]
    fn latency_is_milliseconds_with_one_decimal() {
        for (latency, text) in [
            (Duration::ZERO, "0.0ms"),
            (Duration::from_micros(49), "0.0ms"),
            (Duration::from_micros(50), "0.1ms"),
            (Duration::from_micros(1_249), "1.2ms"),
            (Duration::from_millis(12_345), "12345.0ms"),
        ] {
            let mut out = Vec::new();
            Millis(latency).render(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), text);
            assert_eq!(Millis(latency).to_string(), text);
        }
    }
}
