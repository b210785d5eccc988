//! A strict parser for the Prometheus text exposition format, version 0.0.4, so tests read
//! `/metrics` as Prometheus would instead of grepping it. Every line is validated:
//! `# HELP name doc` (escapes `\\` and `\n` only), `# TYPE name counter|gauge|histogram|
//! summary|untyped` (at most once, before the family's samples), and samples
//! `name{label="value",…} value [timestamp]` (valid names, escapes `\\` `\"` `\n`, no
//! duplicate label, a Go-style float). On top of the syntax it checks what a scraper
//! relies on: each family's lines form one group, no series appears twice, counters are
//! non-negative, and each histogram has `_bucket{le}` lines in increasing `le`, cumulative
//! counts, a `+Inf` bucket equal to `_count`, and a `_sum`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Kind {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "summary" => Self::Summary,
            "untyped" => Self::Untyped,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{}{{{}}} {}", self.name, labels.join(","), self.value)
    }
}

#[derive(Clone, Debug)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub families: Vec<Family>,
    text: String,
}

impl Scrape {
    /// The exposition as received.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Every sample named `name` (e.g. `credproxy_requests_total`, `…_bucket`).
    pub fn samples(&self, name: &str) -> Vec<&Sample> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == name)
            .collect()
    }

    /// The value of the series `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples(name)
            .into_iter()
            .find(|s| s.labels == wanted)
            .map(|s| s.value)
    }

    /// As [`value`](Self::value); panics, showing the exposition, when the series is missing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in /metrics:\n{}", self.text))
    }

    /// Every label value in the exposition (for checks that labels stay bounded).
    pub fn label_values(&self) -> BTreeSet<(String, String)> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .flat_map(|s| s.labels.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect()
    }
}

/// Parses `text`; the error names the line and what is wrong with it.
pub fn parse(text: &str) -> Result<Scrape, String> {
    Parser::default().parse(text)
}

#[derive(Default)]
struct Parser {
    families: Vec<Family>,
    /// Families whose group of lines has ended (another family's lines came after).
    closed: BTreeSet<String>,
    current: Option<String>,
    /// Families that had a `# TYPE` line.
    typed: BTreeSet<String>,
    series: BTreeSet<(String, Vec<(String, String)>)>,
}

impl Parser {
    fn parse(mut self, text: &str) -> Result<Scrape, String> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the exposition does not end with a line feed".into());
        }
        for (index, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", index + 1);
            self.line(line).map_err(at)?;
        }
        for family in &self.families {
            check_family(family)?;
        }
        Ok(Scrape {
            families: self.families,
            text: text.to_owned(),
        })
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        if line.trim().is_empty() {
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix('#') {
            return self.comment(comment);
        }
        self.sample(line)
    }

    fn comment(&mut self, comment: &str) -> Result<(), String> {
        let comment = comment.trim_start_matches([' ', '\t']);
        let mut words = comment.splitn(3, [' ', '\t']);
        let keyword = words.next().unwrap_or_default();
        if keyword != "HELP" && keyword != "TYPE" {
            return Ok(()); // any other comment is ignored
        }
        let name = words.next().unwrap_or_default();
        if !is_metric_name(name) {
            return Err(format!("invalid metric name {name:?} after # {keyword}"));
        }
        let rest = words.next().unwrap_or_default();
        let first_type = keyword == "TYPE" && self.typed.insert(name.to_owned());
        let family = self.open(name)?;
        if !family.samples.is_empty() {
            return Err(format!("# {keyword} {name} after its samples"));
        }
        if keyword == "HELP" {
            if family.help.is_some() {
                return Err(format!("second # HELP for {name}"));
            }
            family.help = Some(unescape(rest)?);
        } else {
            let kind = Kind::parse(rest.trim_end())
                .ok_or_else(|| format!("unknown metric type {rest:?}"))?;
            if !first_type {
                return Err(format!("second # TYPE for {name}"));
            }
            family.kind = kind;
        }
        Ok(())
    }

    fn sample(&mut self, line: &str) -> Result<(), String> {
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("invalid metric name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(after)?;
            labels = parsed;
            rest = after;
        }
        if !rest.starts_with([' ', '\t']) {
            return Err("no whitespace before the value".into());
        }
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or("no value")?)?;
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .map_err(|_| format!("invalid timestamp {timestamp:?}"))?;
        }
        if fields.next().is_some() {
            return Err("text after the timestamp".into());
        }
        let key = (
            name.to_owned(),
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
        if !self.series.insert(key) {
            return Err("the same series appears twice".into());
        }
        let family_name = self.family_of(name);
        let family = self.open(&family_name)?;
        family.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
        Ok(())
    }

    /// The family a sample belongs to: its own name, or for `_bucket`/`_sum`/`_count`
    /// the histogram or summary it is part of.
    fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some(family) = self.families.iter().find(|f| f.name == base)
                && matches!(family.kind, Kind::Histogram | Kind::Summary)
                && (suffix != "_bucket" || family.kind == Kind::Histogram)
            {
                return base.to_owned();
            }
        }
        name.to_owned()
    }

    /// The family `name`, created if new; an error if its group of lines already ended.
    fn open(&mut self, name: &str) -> Result<&mut Family, String> {
        if self.current.as_deref() != Some(name) {
            if self.closed.contains(name) {
                return Err(format!(
                    "the lines of {name} are not one group (another family came between)"
                ));
            }
            if let Some(previous) = self.current.replace(name.to_owned()) {
                self.closed.insert(previous);
            }
        }
        if let Some(index) = self.families.iter().position(|f| f.name == name) {
            return Ok(&mut self.families[index]);
        }
        self.families.push(Family {
            name: name.to_owned(),
            kind: Kind::Untyped,
            help: None,
            samples: Vec::new(),
        });
        Ok(self.families.last_mut().expect("just pushed"))
    }
}

fn check_family(family: &Family) -> Result<(), String> {
    let name = &family.name;
    match family.kind {
        Kind::Counter | Kind::Gauge | Kind::Untyped => {
            for sample in &family.samples {
                if sample.name != *name {
                    return Err(format!("sample {sample} in family {name}"));
                }
                if family.kind == Kind::Counter && (sample.value.is_nan() || sample.value < 0.0) {
                    return Err(format!("counter {sample} is negative or NaN"));
                }
            }
        }
        Kind::Summary => {
            for sample in &family.samples {
                let ok = (sample.name == *name && sample.labels.contains_key("quantile"))
                    || sample.name == format!("{name}_sum")
                    || sample.name == format!("{name}_count");
                if !ok {
                    return Err(format!("sample {sample} in summary {name}"));
                }
            }
        }
        Kind::Histogram => check_histogram(family)?,
    }
    Ok(())
}

fn check_histogram(family: &Family) -> Result<(), String> {
    let name = &family.name;
    let (bucket, sum, count) = (
        format!("{name}_bucket"),
        format!("{name}_sum"),
        format!("{name}_count"),
    );
    // Per label set (without `le`): buckets in order, sum, count.
    type Series = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
    let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for sample in &family.samples {
        let mut labels = sample.labels.clone();
        let le = labels.remove("le");
        let key: Vec<(String, String)> = labels.into_iter().collect();
        let entry = series.entry(key).or_default();
        if sample.name == bucket {
            let le = le.ok_or_else(|| format!("{sample}: a bucket without le"))?;
            let le = parse_value(&le).map_err(|e| format!("{sample}: le: {e}"))?;
            entry.0.push((le, sample.value));
        } else if sample.name == sum && le.is_none() {
            entry.1 = Some(sample.value);
        } else if sample.name == count && le.is_none() {
            entry.2 = Some(sample.value);
        } else {
            return Err(format!("sample {sample} in histogram {name}"));
        }
    }
    for (labels, (buckets, sum, count)) in &series {
        let what = format!("histogram {name}{labels:?}");
        let count = count.ok_or_else(|| format!("{what} has no _count"))?;
        sum.ok_or_else(|| format!("{what} has no _sum"))?;
        for pair in buckets.windows(2) {
            if pair[0].0.partial_cmp(&pair[1].0) != Some(std::cmp::Ordering::Less) {
                return Err(format!("{what}: le not increasing: {buckets:?}"));
            }
            if pair[1].1 < pair[0].1 {
                return Err(format!("{what}: bucket counts not cumulative: {buckets:?}"));
            }
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && *le > 0.0 => {
                if *n != count {
                    return Err(format!("{what}: +Inf bucket {n} != _count {count}"));
                }
            }
            _ => return Err(format!("{what}: no +Inf bucket last: {buckets:?}")),
        }
    }
    Ok(())
}

/// `name="value",…}` → the labels and what follows the `}`.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([' ', '\t']);
        if let Some(after) = text.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = text.find('=').ok_or("a label without =")?;
        let name = text[..eq].trim_end_matches([' ', '\t']);
        if !is_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        let after = text[eq + 1..].trim_start_matches([' ', '\t']);
        let after = after
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: value not quoted"))?;
        let (value, after) = quoted(after)?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        text = after.trim_start_matches([' ', '\t']);
        if let Some(after) = text.strip_prefix(',') {
            text = after;
        } else if !text.starts_with('}') {
            return Err(format!("expected , or }} after label {name}"));
        }
    }
}

/// The rest of a quoted label value (after its opening quote), unescaped, and what follows
/// the closing quote.
fn quoted(text: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => return Err(format!("invalid escape \\{other:?} in a label value")),
            },
            '\n' => return Err("a line feed in a label value".into()),
            c => out.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// A HELP docstring: `\\` and `\n` are the only escapes.
fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("invalid escape \\{other:?} in # HELP")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// A Go `ParseFloat` value: decimal or exponent notation, `+Inf`, `-Inf`, `NaN`.
fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let numeric = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if !numeric {
        return Err(format!("invalid value {text:?}"));
    }
    text.parse::<f64>()
        .map_err(|_| format!("invalid value {text:?}"))
}

fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("__")
}
