//! The status page (`GET /`): one server-rendered HTML document, every value
//! escaped (provider error messages are attacker-influenced text), no inline
//! script or style (the Content-Security-Policy forbids both), and no secret:
//! it is built from `Status`, route names, listener addresses and the store's
//! description only. Its live update swaps in `#live` from a fresh copy of this
//! same page, so there is one renderer and one escaping path. Its links are
//! relative, so it also works behind a path prefix (e.g. `kubectl proxy`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::figures::{RouteFigures, STATUS_CLASSES};
use crate::state::StoreInfo;
use crate::tokens::{Health, Status};

/// Sent with every admin response. `script-src 'self'`: only `/status.js` runs.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub const SCRIPT: &str = include_str!("status.js");
pub const STYLE: &str = include_str!("status.css");

/// Everything the page shows.
pub struct View<'a> {
    pub statuses: &'a [Status],
    /// (route name, integration) in config order.
    pub routes: &'a [(Arc<str>, Option<String>)],
    pub figures: &'a BTreeMap<String, RouteFigures>,
    /// (role, address), e.g. ("proxy", 127.0.0.1:8080).
    pub listeners: &'a [(String, SocketAddr)],
    pub store: &'a StoreInfo,
    pub version: &'a str,
    pub uptime: time::Duration,
    pub now: OffsetDateTime,
    /// The outcome of a refresh posted by a form (no JavaScript).
    pub notice: Option<Notice<'a>>,
}

/// What the page says after a form-posted refresh.
pub enum Notice<'a> {
    Refreshed(&'a str),
    RefreshFailed(&'a str),
}

/// `text` with the five HTML-significant characters escaped: safe in element
/// content and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(view: &View) -> String {
    let mut html = String::with_capacity(8192);
    html.push_str(concat!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>credproxy status</title>",
        "<link rel=\"stylesheet\" href=\"status.css\">",
        "<script src=\"status.js\" defer></script></head><body>\n",
    ));
    html.push_str("<p id=\"notice\" role=\"status\" aria-live=\"polite\">");
    match view.notice {
        Some(Notice::Refreshed(name)) => {
            let _ = write!(html, "Refreshed {}.", escape(name));
        }
        Some(Notice::RefreshFailed(name)) => {
            let _ = write!(
                html,
                "Refreshing {} failed: see its last error.",
                escape(name)
            );
        }
        None => {}
    }
    html.push_str("</p>\n<main id=\"live\">\n");
    header(&mut html, view);
    integrations(&mut html, view);
    routes(&mut html, view);
    listeners(&mut html, view);
    let _ = writeln!(
        html,
        "<footer>Updated <time id=\"updated\" datetime=\"{now}\">{now}</time> · \
         <a href=\"integrations\">/integrations</a> · <a href=\"metrics\">/metrics</a></footer>",
        now = escape(&rfc3339(view.now)),
    );
    html.push_str("</main>\n</body></html>\n");
    html
}

fn header(html: &mut String, view: &View) {
    let store = view.store;
    let _ = writeln!(
        html,
        "<header><h1>credproxy <span class=\"version\">{version}</span></h1>\
         <p>Up {uptime} · state store: <span id=\"store\">{kind} {location}, {sealed}</span></p></header>",
        version = escape(view.version),
        uptime = escape(&human(view.uptime)),
        kind = escape(store.kind),
        location = escape(&store.location),
        sealed = if store.sealed { "sealed" } else { "not sealed" },
    );
}

fn integrations(html: &mut String, view: &View) {
    html.push_str(concat!(
        "<section><h2>Integrations</h2><table id=\"integrations\"><thead><tr>",
        "<th>Name</th><th>Grant</th><th>State</th><th>Token expires in</th><th>Last refresh</th>",
        "<th class=\"count\">Refreshes</th><th>Recent</th><th>Last error</th><th></th>",
        "</tr></thead><tbody>\n",
    ));
    for status in view.statuses {
        let name = escape(&status.name);
        let state = health(status.state);
        let _ = write!(
            html,
            "<tr id=\"integration-{name}\" data-state=\"{state}\"><td class=\"name\">{name}</td>\
             <td class=\"grant\">{grant}</td><td><span class=\"state state-{state}\">{label}</span></td>",
            label = state.replace('_', " "),
            grant = escape(status.grant),
        );
        let expires = match status.expires_at {
            Some(at) if at > view.now => human(at - view.now),
            Some(at) => format!("expired {} ago", human(view.now - at)),
            None => "no token".to_owned(),
        };
        cell_with_time(html, &expires, status.expires_at);
        let last = status.last_refresh_at.map_or_else(
            || "never".to_owned(),
            |at| format!("{} ago", human(view.now - at)),
        );
        cell_with_time(html, &last, status.last_refresh_at);
        let _ = write!(html, "<td class=\"count\">{}</td>", status.refresh_count);
        sparkline(html, status);
        let _ = write!(
            html,
            "<td class=\"error\">{}</td>",
            status.last_error.as_deref().map(escape).unwrap_or_default()
        );
        let _ = writeln!(
            html,
            "<td><form class=\"refresh\" method=\"post\" action=\"integrations/{name}/refresh\">\
             <button type=\"submit\">Refresh now</button></form></td></tr>"
        );
    }
    html.push_str("</tbody></table></section>\n");
}

/// One mark per recent attempt, oldest first: green ok, red failed.
fn sparkline(html: &mut String, status: &Status) {
    let failed = status.recent.iter().filter(|a| !a.ok).count();
    let _ = write!(
        html,
        "<td><span class=\"spark\" title=\"last {} refreshes: {} failed\">",
        status.recent.len(),
        failed
    );
    for attempt in &status.recent {
        let (class, word) = if attempt.ok {
            ("ok", "ok")
        } else {
            ("failed", "failed")
        };
        let _ = write!(
            html,
            "<i class=\"{class}\" title=\"{} {word}\"></i>",
            escape(&rfc3339(attempt.at))
        );
    }
    html.push_str("</span></td>");
}

fn routes(html: &mut String, view: &View) {
    html.push_str(
        "<section><h2>Routes</h2><table id=\"routes\"><thead><tr><th>Host</th><th>Integration</th>",
    );
    for class in STATUS_CLASSES {
        let _ = write!(html, "<th class=\"count\">{class}</th>");
    }
    html.push_str(concat!(
        "<th class=\"count\">Upstream p50</th><th class=\"count\">Upstream p99</th>",
        "<th class=\"count\">401 retries</th>",
        "<th class=\"count\" title=\"requests resent on a fresh upstream connection\">Resends</th>",
        "</tr></thead><tbody>\n",
    ));
    let none = RouteFigures::default();
    for (route, integration) in view.routes {
        let figures = view.figures.get(&**route).unwrap_or(&none);
        let _ = write!(
            html,
            "<tr><td class=\"name\">{}</td><td>{}</td>",
            escape(route),
            integration
                .as_deref()
                .map_or_else(|| "—".to_owned(), escape)
        );
        for count in figures.requests {
            let _ = write!(html, "<td class=\"count\">{count}</td>");
        }
        let _ = writeln!(
            html,
            "<td class=\"count\">{}</td><td class=\"count\">{}</td><td class=\"count\">{}</td>\
             <td class=\"count\">{}</td></tr>",
            latency(figures.p50),
            latency(figures.p99),
            figures.retries_401,
            figures.resends
        );
    }
    html.push_str("</tbody></table></section>\n");
}

fn listeners(html: &mut String, view: &View) {
    html.push_str("<section><h2>Listeners</h2><ul id=\"listeners\">");
    for (role, addr) in view.listeners {
        let _ = write!(
            html,
            "<li>{} <code>{}</code></li>",
            escape(role),
            escape(&addr.to_string())
        );
    }
    html.push_str("</ul></section>\n");
}

fn cell_with_time(html: &mut String, text: &str, at: Option<OffsetDateTime>) {
    match at {
        Some(at) => {
            let _ = write!(
                html,
                "<td><time datetime=\"{at}\" title=\"{at}\">{}</time></td>",
                escape(text),
                at = escape(&rfc3339(at)),
            );
        }
        None => {
            let _ = write!(html, "<td>{}</td>", escape(text));
        }
    }
}

fn health(health: Health) -> &'static str {
    match health {
        Health::Ok => "ok",
        Health::Refreshing => "refreshing",
        Health::BackingOff => "backing_off",
        Health::Failed => "failed",
    }
}

fn latency(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
        None => "—".to_owned(),
    }
}

/// "2d 3h", "1h 5m", "4m 10s", "12s": the two largest units.
fn human(duration: time::Duration) -> String {
    let secs = duration.whole_seconds().max(0);
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// To the second: a person reads these.
fn rfc3339(at: OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    mod escape {
        use super::*;

        #[test]
        fn escapes_every_html_significant_character() {
            assert_eq!(
                escape(r#"<img src=x onerror='a&b'>""#),
                "&lt;img src=x onerror=&#39;a&amp;b&#39;&gt;&quot;"
            );
        }
    }

    mod render {
        use super::*;

        #[test]
        fn names_the_store_with_its_text_escaped() {
            let store = StoreInfo {
                kind: "postgres",
                location: "db.internal:5432/credproxy?<x>".into(),
                sealed: true,
            };
            let listeners = [("proxy".to_owned(), SocketAddr::from(([127, 0, 0, 1], 8080)))];
            let view = View {
                statuses: &[],
                routes: &[],
                figures: &BTreeMap::new(),
                listeners: &listeners,
                store: &store,
                version: "1.2.3",
                uptime: time::Duration::seconds(3700),
                now: OffsetDateTime::UNIX_EPOCH,
                notice: Some(Notice::Refreshed("a<b")),
            };
            let html = render(&view);
            for expected in [
                "<span id=\"store\">postgres db.internal:5432/credproxy?&lt;x&gt;, sealed</span>",
                "Up 1h 1m",
                "<span class=\"version\">1.2.3</span>",
                "<li>proxy <code>127.0.0.1:8080</code></li>",
                "Refreshed a&lt;b.",
            ] {
                assert!(html.contains(expected), "{expected} not in {html}");
            }
        }
    }

    mod human {
        use super::*;

        #[test]
        fn shows_the_two_largest_units() {
            let cases = [
                (12, "12s"),
                (250, "4m 10s"),
                (3900, "1h 5m"),
                (2 * 86_400 + 3 * 3600 + 7, "2d 3h"),
                (-5, "0s"),
            ];
            for (secs, text) in cases {
                assert_eq!(human(time::Duration::seconds(secs)), text);
            }
        }
    }

    mod latency {
        use super::*;

        #[test]
        fn milliseconds_below_a_second() {
            assert_eq!(latency(Some(0.0123)), "12.3 ms");
            assert_eq!(latency(Some(2.5)), "2.50 s");
            assert_eq!(latency(None), "—");
        }
    }
}
