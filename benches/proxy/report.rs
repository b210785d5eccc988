//! The result: one markdown table and one JSON document, each scenario with
//! the direct figure, credproxy's figure, their ratio and the target.

use serde_json::{Value, json};

/// A target from the issue.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// credproxy / direct must be at least this.
    MinRatio(f64),
    /// credproxy / direct must be at most this.
    MaxRatio(f64),
    /// credproxy's figure must be at most this.
    MaxProxy(f64),
    /// credproxy's figure must be exactly this.
    ExactProxy(f64),
}

impl Goal {
    fn text(self) -> String {
        match self {
            Self::MinRatio(r) => format!("ratio ≥ {r}"),
            Self::MaxRatio(r) => format!("ratio ≤ {r}"),
            Self::MaxProxy(v) => format!("≤ {v}"),
            Self::ExactProxy(v) => format!("= {v}"),
        }
    }

    fn met(self, direct: Option<f64>, proxy: Option<f64>) -> Option<bool> {
        let proxy = proxy.filter(|p| p.is_finite())?;
        match self {
            Self::MinRatio(r) => Some(proxy / direct.filter(|d| *d > 0.0)? >= r),
            Self::MaxRatio(r) => Some(proxy / direct.filter(|d| *d > 0.0)? <= r),
            Self::MaxProxy(v) => Some(proxy <= v),
            Self::ExactProxy(v) => Some((proxy - v).abs() < f64::EPSILON),
        }
    }
}

pub struct Metric {
    pub name: String,
    pub direct: Option<f64>,
    pub proxy: Option<f64>,
    pub goal: Option<Goal>,
}

impl Metric {
    pub fn new(name: &str, direct: Option<f64>, proxy: Option<f64>) -> Self {
        Self {
            name: name.to_owned(),
            direct,
            proxy,
            goal: None,
        }
    }

    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }

    pub fn goal_opt(mut self, goal: Option<Goal>) -> Self {
        self.goal = goal;
        self
    }

    fn ratio(&self) -> Option<f64> {
        let (d, p) = (self.direct?, self.proxy?);
        (d > 0.0 && d.is_finite() && p.is_finite()).then(|| p / d)
    }
}

pub struct Scenario {
    pub key: &'static str,
    pub title: String,
    pub metrics: Vec<Metric>,
    /// Proxy CPU: value and unit ("s/10k req", "s/GiB").
    pub cpu: Option<(f64, &'static str)>,
    pub peak_rss_mib: Option<f64>,
    pub errors: (u64, u64),
    pub notes: Vec<String>,
    /// Raw figures of the runs (requests, seconds, CPU busy, steal), for the JSON.
    pub runs: Value,
}

fn num(value: Option<f64>) -> String {
    match value {
        None => "–".into(),
        Some(v) if !v.is_finite() => "–".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn finite(value: Option<f64>) -> Value {
    value
        .filter(|v| v.is_finite())
        .map_or(Value::Null, Value::from)
}

pub fn markdown(scenarios: &[Scenario]) -> String {
    let mut out = String::from(
        "| scenario | metric | direct | credproxy | ratio | target | met | proxy CPU | proxy peak RSS MiB | errors direct/proxy |\n\
         |---|---|---:|---:|---:|---|---|---:|---:|---:|\n",
    );
    for scenario in scenarios {
        for (i, metric) in scenario.metrics.iter().enumerate() {
            let first = i == 0;
            let met = metric
                .goal
                .and_then(|g| g.met(metric.direct, metric.proxy))
                .map_or("", |m| if m { "yes" } else { "**no**" });
            let cpu = match (first, scenario.cpu) {
                (true, Some((v, unit))) => format!("{v:.3} {unit}"),
                _ => String::new(),
            };
            let rss = if first {
                scenario
                    .peak_rss_mib
                    .map_or(String::new(), |v| format!("{v:.1}"))
            } else {
                String::new()
            };
            let errors = if first {
                format!("{}/{}", scenario.errors.0, scenario.errors.1)
            } else {
                String::new()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                if first { scenario.title.as_str() } else { "" },
                metric.name,
                num(metric.direct),
                num(metric.proxy),
                metric.ratio().map_or("–".into(), |r| format!("{r:.2}")),
                metric.goal.map_or(String::new(), Goal::text),
                met,
                cpu,
                rss,
                errors,
            ));
        }
    }
    out
}

pub fn json(scenarios: &[Scenario]) -> Value {
    Value::Array(
        scenarios
            .iter()
            .map(|s| {
                json!({
                    "key": s.key,
                    "scenario": s.title,
                    "metrics": s.metrics.iter().map(|m| json!({
                        "metric": m.name,
                        "direct": finite(m.direct),
                        "credproxy": finite(m.proxy),
                        "ratio": finite(m.ratio()),
                        "target": m.goal.map(Goal::text),
                        "met": m.goal.and_then(|g| g.met(m.direct, m.proxy)),
                    })).collect::<Vec<_>>(),
                    "proxy_cpu": s.cpu.map(|(v, unit)| json!({ "value": v, "unit": unit })),
                    "proxy_cpu_s_per_10k_requests": s.cpu.filter(|(_, u)| *u == "s/10k req").map(|(v, _)| v),
                    "proxy_peak_rss_mib": s.peak_rss_mib,
                    "errors": { "direct": s.errors.0, "credproxy": s.errors.1 },
                    "notes": s.notes,
                    "runs": s.runs,
                })
            })
            .collect(),
    )
}
