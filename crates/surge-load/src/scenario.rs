//! Settings for a run, from a scenario file (TOML), the command line, or both: a flag given
//! on the command line wins over the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use surge_config::{ConfigErrors, HumanDuration, Site};
use toml::Spanned;

use crate::engine::{Mode, Plan, Target};
use crate::mix::{Mix, RequestKind, Template};
use surge_shape::Shape;

const DEFAULT_DURATION: Duration = Duration::from_secs(10);
const DEFAULT_CONNECTIONS: usize = 64;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDS: u64 = 1000;

/// Everything that shapes a run; `None` means "not said", so defaults and overrides compose.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    pub target: Option<String>,
    pub rate: Option<f64>,
    pub shape: Option<Shape>,
    pub closed: bool,
    pub think: Option<Duration>,
    pub duration: Option<Duration>,
    pub connections: Option<usize>,
    pub timeout: Option<Duration>,
    pub seed: Option<u64>,
    /// From a scenario; when empty, every request is `method` on the target URL's path.
    pub requests: Vec<RequestKind>,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Bytes>,
}

impl Settings {
    /// Lays `overrides` (the command line) over `self` (a scenario).
    pub fn overridden_by(mut self, overrides: Settings) -> Settings {
        if overrides.rate.is_some() {
            self.shape = None;
        }
        Settings {
            target: overrides.target.or(self.target),
            rate: overrides.rate.or(self.rate),
            shape: overrides.shape.or(self.shape),
            closed: overrides.closed || self.closed,
            think: overrides.think.or(self.think),
            duration: overrides.duration.or(self.duration),
            connections: overrides.connections.or(self.connections),
            timeout: overrides.timeout.or(self.timeout),
            seed: overrides.seed.or(self.seed),
            requests: if overrides.requests.is_empty() { self.requests } else { overrides.requests },
            method: overrides.method.or(self.method),
            headers: [self.headers, overrides.headers].concat(),
            body: overrides.body.or(self.body),
        }
    }

    /// The plan to run, or what is missing.
    pub fn into_plan(self) -> Result<Plan, String> {
        let url = self.target.ok_or(
            "no target: give a URL (surge load http://127.0.0.1:8080/) or `target` in the scenario file",
        )?;
        let (target, url_path) = Target::parse(&url)?;
        let requests = if self.requests.is_empty() {
            vec![RequestKind {
                name: url_path.clone(),
                weight: 1,
                method: self.method.unwrap_or(Method::GET),
                path: Template::parse(&url_path, DEFAULT_IDS)?,
                headers: self.headers,
                body: self.body.unwrap_or_default(),
            }]
        } else {
            self.requests
        };
        let mode = if self.closed {
            Mode::Closed { think: self.think.unwrap_or_default() }
        } else {
            let shape = match (self.rate, self.shape) {
                (Some(rate), _) => Shape::Constant { rate },
                (None, Some(shape)) => shape,
                (None, None) => {
                    return Err("no rate: give --rate (such as --rate 500/s), a [shape] in a scenario file, \
                                or --closed for a closed loop"
                        .to_owned())
                }
            };
            Mode::Open(shape)
        };
        let natural = match &mode {
            Mode::Open(shape) => shape.natural_duration(),
            Mode::Closed { .. } => None,
        };
        let connections = self.connections.unwrap_or(DEFAULT_CONNECTIONS);
        if connections == 0 {
            return Err("--connections must be at least 1".to_owned());
        }
        Ok(Plan {
            target,
            mix: Mix::new(requests),
            mode,
            duration: self.duration.or(natural).unwrap_or(DEFAULT_DURATION),
            connections,
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
            seed: self.seed.unwrap_or(1),
        })
    }
}

/// A rate: `500`, `"500/s"` or `"30/m"`, in requests per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, per) = match text.split_once('/') {
        Some((number, unit)) => (number, unit.trim()),
        None => (text, "s"),
    };
    let seconds = match per {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        _ => return Err(format!("{text:?}: a rate is written like 500/s or 30/m")),
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(n / seconds),
        _ => Err(format!("{text:?}: a rate is written like 500/s or 30/m")),
    }
}

#[derive(Debug, Clone, Copy)]
struct Rate(f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;
        impl Visitor<'_> for RateVisitor {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a rate such as 500 or "500/s""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                if v < 0 {
                    return Err(E::custom("a rate cannot be negative"));
                }
                Ok(Rate(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                Ok(Rate(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Rate, E> {
                parse_rate(&v.to_string()).map(Rate).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                parse_rate(v).map(Rate).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(RateVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    target: Option<String>,
    mode: Option<Spanned<String>>,
    connections: Option<usize>,
    duration: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    think: Option<HumanDuration>,
    seed: Option<u64>,
    shape: Option<Spanned<ShapeFile>>,
    #[serde(default)]
    requests: Vec<Spanned<RequestFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum ShapeFile {
    Constant {
        rate: Rate,
    },
    Step {
        steps: Vec<StepFile>,
    },
    Ramp {
        from: Rate,
        to: Rate,
        over: HumanDuration,
    },
    Sine {
        mean: Rate,
        amplitude: Rate,
        period: HumanDuration,
        #[serde(default)]
        noise: f64,
    },
    Spike {
        base: Rate,
        peak: Rate,
        at: HumanDuration,
        #[serde(rename = "for")]
        length: HumanDuration,
    },
    OnOff {
        rate: Rate,
        on: HumanDuration,
        off: HumanDuration,
    },
    Trace {
        file: String,
        #[serde(default = "one")]
        speedup: f64,
        #[serde(default = "one")]
        scale: f64,
    },
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    rate: Rate,
    #[serde(rename = "for")]
    length: HumanDuration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    name: Option<String>,
    #[serde(default = "weight_one")]
    weight: u32,
    #[serde(default)]
    method: Option<String>,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: String,
    ids: Option<u64>,
}

fn weight_one() -> u32 {
    1
}

/// Reads a scenario file; every problem names the file, line and key.
pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
    let source = surge_config::read_document(path)?;
    let file: ScenarioFile = surge_config::parse_document(&source, path)?;
    let mut errors = Vec::new();
    let site = |span, key: &str| Site::new(&source, path, span, key.to_owned());

    let closed = match &file.mode {
        None => false,
        Some(mode) => match mode.get_ref().as_str() {
            "open" => false,
            "closed" => true,
            other => {
                errors.push(
                    site(mode.span(), "mode")
                        .error(format!(r#""{other}" is not a mode: use "open" or "closed""#)),
                );
                false
            }
        },
    };
    let shape_span = file.shape.as_ref().map_or(0..0, Spanned::span);
    let shape = match file.shape.map(Spanned::into_inner) {
        None => None,
        Some(shape) => match to_shape(shape, path, file.seed.unwrap_or(1)) {
            Ok(shape) => Some(shape),
            Err(message) => {
                errors.push(Site::new(&source, path, shape_span.clone(), "shape".to_owned()).error(message));
                None
            }
        },
    };

    let mut requests = Vec::new();
    for (index, request) in file.requests.into_iter().enumerate() {
        let span = request.span();
        let key = format!("requests[{index}]");
        let request = request.into_inner();
        match to_kind(request) {
            Ok(kind) => requests.push(kind),
            Err(message) => errors.push(site(span, &key).error(message)),
        }
    }
    if !requests.is_empty() && requests.iter().all(|r| r.weight == 0) {
        errors.push(Site::new(&source, path, 0..0, "requests".into()).error("every request has weight 0"));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Settings {
        target: file.target,
        rate: None,
        shape,
        closed,
        think: file.think.map(|d| d.0),
        duration: file.duration.map(|d| d.0),
        connections: file.connections,
        timeout: file.timeout.map(|d| d.0),
        seed: file.seed,
        requests,
        method: None,
        headers: Vec::new(),
        body: None,
    })
}

fn to_shape(shape: ShapeFile, scenario: &Path, seed: u64) -> Result<Shape, String> {
    Ok(match shape {
        ShapeFile::Constant { rate } => Shape::Constant { rate: rate.0 },
        ShapeFile::Step { steps } if steps.is_empty() => {
            return Err("a step shape needs at least one step".into())
        }
        ShapeFile::Step { steps } => {
            Shape::Steps(steps.into_iter().map(|s| (s.rate.0, s.length.0)).collect())
        }
        ShapeFile::Ramp { from, to, over } => Shape::Ramp { from: from.0, to: to.0, over: over.0 },
        ShapeFile::Sine { mean, amplitude, period, noise } => {
            if !(0.0..=1.0).contains(&noise) {
                return Err(format!("noise is a fraction from 0 to 1, not {noise}"));
            }
            Shape::Sine { mean: mean.0, amplitude: amplitude.0, period: period.0, noise, seed }
        }
        ShapeFile::Spike { base, peak, at, length } => {
            Shape::Spike { base: base.0, peak: peak.0, at: at.0, length: length.0 }
        }
        ShapeFile::OnOff { rate, on, off } => Shape::OnOff { rate: rate.0, on: on.0, off: off.0 },
        ShapeFile::Trace { file, speedup, scale } => {
            if !(speedup > 0.0 && scale > 0.0) {
                return Err("a trace's speedup and scale must be greater than zero".into());
            }
            let base = scenario.parent().unwrap_or(Path::new("."));
            let trace_path = base.join(&file);
            let text = std::fs::read_to_string(&trace_path)
                .map_err(|err| format!("cannot read the trace {}: {err}", trace_path.display()))?;
            let arrivals =
                surge_shape::trace::parse(&text).map_err(|err| format!("{}: {err}", trace_path.display()))?;
            Shape::Trace(surge_shape::trace::replay(&arrivals, speedup, scale))
        }
    })
}

fn to_kind(request: RequestFile) -> Result<RequestKind, String> {
    let method = match &request.method {
        None => Method::GET,
        Some(method) => Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{method:?} is not an HTTP method"))?,
    };
    if !request.path.starts_with('/') {
        return Err(format!(r#"the path "{}" must start with "/""#, request.path));
    }
    let path = Template::parse(&request.path, request.ids.unwrap_or(DEFAULT_IDS))?;
    let headers = request
        .headers
        .iter()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let value =
                HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a header value"))?;
            Ok((name, value))
        })
        .collect::<Result<_, String>>()?;
    Ok(RequestKind {
        name: request.name.unwrap_or_else(|| format!("{method} {}", request.path)),
        weight: request.weight,
        method,
        path,
        headers,
        body: Bytes::from(request.body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Result<Settings, ConfigErrors> {
        let dir =
            std::env::temp_dir().join(format!("surge-scenario-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("trace.csv"), "t\n0.0\n0.5\n1.0\n").expect("trace");
        let path = dir.join("scenario.toml");
        std::fs::write(&path, text).expect("write");
        let result = load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500/s"), Ok(500.0));
        assert_eq!(parse_rate("500"), Ok(500.0));
        assert_eq!(parse_rate("30/m"), Ok(0.5));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5/h").is_err());
    }

    #[test]
    fn a_full_scenario() {
        let settings = scenario(
            r#"
target = "http://127.0.0.1:8080"
connections = 8
seed = 3

[shape]
kind = "step"
steps = [{ rate = 100, for = "2s" }, { rate = "1000/s", for = "2s" }]

[[requests]]
name = "read"
weight = 9
path = "/users/{id}"
ids = 50

[[requests]]
method = "post"
path = "/orders"
headers = { content-type = "application/json" }
body = '{"item": 1}'
"#,
        )
        .expect("valid");
        let plan = settings.into_plan().expect("plan");
        assert_eq!(plan.duration, Duration::from_secs(4));
        assert_eq!(plan.connections, 8);
        let kinds = plan.mix.kinds();
        assert_eq!((kinds[0].name.as_str(), kinds[0].weight), ("read", 9));
        assert_eq!((kinds[1].name.as_str(), kinds[1].method.as_str()), ("POST /orders", "POST"));
        assert!(matches!(plan.mode, Mode::Open(Shape::Steps(ref s)) if s.len() == 2));
    }

    #[test]
    fn a_trace_scenario_reads_its_csv_beside_it() {
        let settings = scenario(
            "target = \"http://x:1\"\nshape = { kind = \"trace\", file = \"trace.csv\", speedup = 2 }\n",
        )
        .expect("valid");
        match settings.shape {
            Some(Shape::Trace(arrivals)) => assert_eq!(arrivals.last(), Some(&Duration::from_millis(500))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let errors = scenario("target = \"http://x:1\"\n\n[shape]\nkind = \"constant\"\nrate = \"lots\"\n")
            .expect_err("rejected");
        let shown = errors.to_string();
        // Inside the tagged [shape] table serde reports the table, and the message the value.
        assert!(shown.contains("scenario.toml:3:") && shown.contains("`shape`"), "{shown}");
        assert!(shown.contains(r#""lots": a rate is written like 500/s"#), "{shown}");

        let errors =
            scenario("mode = \"sideways\"\n[[requests]]\npath = \"/{nope}\"\n").expect_err("rejected");
        let shown = errors.to_string();
        assert!(shown.contains(":1:") && shown.contains("`mode`"), "{shown}");
        assert!(
            shown.contains(":2:") && shown.contains("`requests[0]`") && shown.contains("{nope}"),
            "{shown}"
        );

        let errors =
            scenario("shape = { kind = \"trace\", file = \"missing.csv\" }\n").expect_err("rejected");
        assert!(errors.to_string().contains("cannot read the trace"), "{errors}");
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = Settings {
            rate: None,
            shape: Some(Shape::Constant { rate: 5.0 }),
            connections: Some(2),
            ..Settings::default()
        };
        let flags = Settings { rate: Some(50.0), target: Some("http://h:1/x".into()), ..Settings::default() };
        let plan = file.overridden_by(flags).into_plan().expect("plan");
        assert!(matches!(plan.mode, Mode::Open(Shape::Constant { rate }) if rate == 50.0));
        assert_eq!(plan.connections, 2);
        assert!(Settings::default().into_plan().expect_err("rejected").contains("no target"));
        let no_rate = Settings { target: Some("http://h:1".into()), ..Settings::default() };
        assert!(no_rate.into_plan().expect_err("rejected").contains("--rate"));
    }
}
