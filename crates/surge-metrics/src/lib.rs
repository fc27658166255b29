//! Prometheus metrics: the shared registry, the label types every component uses, and the
//! text exposition. Each component registers its own families (the gateway its request
//! metrics, the pools their instance metrics), so this crate knows no business logic.
//!
//! Labels are typed and bounded: a service name comes from the configuration, a status is a
//! class (`2xx`), never a free-form string.

mod latency;

use std::sync::Mutex;

pub use latency::{LatencyCounts, LatencyHistogram};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
pub use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
pub use prometheus_client::registry::Registry;

/// The registry, filled at start-up and read by the admin API's `/metrics`.
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { registry: Mutex::new(Registry::with_prefix("surge")) }
    }

    /// Lets a component register its families.
    pub fn register(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        register(&mut registry);
    }

    /// The OpenMetrics text exposition of every registered family.
    pub fn encode(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

impl Metrics {
    /// The same metrics in Prometheus' classic text format (0.0.4), for scrapers and tools
    /// that do not ask for OpenMetrics (`promtool check metrics`, older Prometheus, curl): a
    /// counter's HELP and TYPE name its `_total` samples, and there is no `# EOF`.
    pub fn encode_classic(&self) -> String {
        classic_text(&self.encode())
    }
}

/// Whether a scraper's `Accept` asks for OpenMetrics, as Prometheus itself does.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| accept.contains("application/openmetrics-text"))
}

fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines.peek().is_some_and(|next| *next == format!("# TYPE {name} counter"));
            let name = if counter { format!("{name}_total") } else { name.to_owned() };
            out.push_str(&format!("# HELP {name} {help}\n"));
            if counter {
                lines.next();
                out.push_str(&format!("# TYPE {name} counter\n"));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_classic`]'s output.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub service: String,
    pub class: StatusClass,
}

/// An HTTP status reduced to its class, so a label has at most five values.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl StatusClass {
    pub fn of(status: u16) -> Self {
        match status {
            0..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
        }
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// Latency buckets from 0.5 ms to 30 s: a loopback proxy hop and a slow upstream both land
/// in a bucket of their own.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0].into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exposed_with_typed_labels() {
        let metrics = Metrics::new();
        let requests = Family::<ResponseLabels, Counter>::default();
        metrics.register(|r| r.register("requests", "Requests answered", requests.clone()));
        requests.get_or_create(&ResponseLabels { service: "api".into(), class: StatusClass::of(503) }).inc();
        let text = metrics.encode();
        assert!(text.contains(r#"surge_requests_total{service="api",class="5xx"} 1"#), "{text}");
        let classic = metrics.encode_classic();
        assert!(classic.contains("# HELP surge_requests_total Requests answered"), "{classic}");
        assert!(classic.contains("# TYPE surge_requests_total counter"), "{classic}");
        assert!(classic.contains(r#"surge_requests_total{service="api",class="5xx"} 1"#), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
    }

    #[test]
    fn prometheus_asks_for_openmetrics_and_others_get_the_classic_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
