//! The weighted mix of request kinds a run sends, and the path templates that make each
//! request a little different: `{id}` (1 to `ids`), `{int:LO-HI}`, `{uuid}`.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};

#[derive(Debug, Clone)]
pub struct RequestKind {
    pub name: String,
    pub weight: u32,
    pub method: Method,
    pub path: Template,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Picks kinds in proportion to their weights.
#[derive(Debug, Clone)]
pub struct Mix {
    kinds: Vec<RequestKind>,
    /// Running totals of the weights, for a binary search.
    cumulative: Vec<u64>,
}

impl Mix {
    /// `kinds` must not be empty and have a positive total weight (the scenario checks both).
    pub fn new(kinds: Vec<RequestKind>) -> Self {
        let cumulative = kinds
            .iter()
            .scan(0u64, |total, kind| {
                *total += u64::from(kind.weight);
                Some(*total)
            })
            .collect();
        Mix { kinds, cumulative }
    }

    pub fn kinds(&self) -> &[RequestKind] {
        &self.kinds
    }

    pub fn choose(&self, rng: &mut fastrand::Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let ticket = rng.u64(0..total);
        self.cumulative.partition_point(|&bound| bound <= ticket)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Int { low: u64, high: u64 },
    Uuid,
}

/// A path with placeholders, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// `ids` is the range of `{id}`: 1 to `ids`.
    pub fn parse(text: &str, ids: u64) -> Result<Template, String> {
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "the path {text:?} contains a space or control character; percent-encode it"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("unclosed `{{` in {text:?}"))? + open;
            parts.push(placeholder(&rest[open + 1..close], ids)?);
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The text itself, when there is no placeholder to fill.
    pub fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(text)] => Some(text),
            _ => None,
        }
    }

    pub fn render(&self, rng: &mut fastrand::Rng, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Int { low, high } => {
                    let _ = write!(out, "{}", rng.u64(*low..=*high));
                }
                Part::Uuid => {
                    let (a, b) = (rng.u64(..), rng.u64(..));
                    let _ = write!(
                        out,
                        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                        a >> 32,
                        (a >> 16) & 0xffff,
                        a & 0x0fff,
                        (b >> 48) & 0x3fff | 0x8000,
                        b & 0xffff_ffff_ffff
                    );
                }
            }
        }
    }
}

fn placeholder(name: &str, ids: u64) -> Result<Part, String> {
    let bad = || format!("unknown placeholder {{{name}}}: use {{id}}, {{int:LOW-HIGH}} or {{uuid}}");
    match name {
        "id" => Ok(Part::Int { low: 1, high: ids.max(1) }),
        "uuid" => Ok(Part::Uuid),
        _ => {
            let (low, high) = name.strip_prefix("int:").and_then(|r| r.split_once('-')).ok_or_else(bad)?;
            let (low, high): (u64, u64) = (low.parse().map_err(|_| bad())?, high.parse().map_err(|_| bad())?);
            if low > high {
                return Err(format!("{{{name}}}: the low end is above the high end"));
            }
            Ok(Part::Int { low, high })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(name: &str, weight: u32) -> RequestKind {
        RequestKind {
            name: name.into(),
            weight,
            method: Method::GET,
            path: Template::parse("/", 1).expect("valid"),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    #[test]
    fn weights_set_the_proportions() {
        let mix = Mix::new(vec![kind("a", 1), kind("b", 0), kind("c", 3)]);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut counts = [0; 3];
        for _ in 0..40_000 {
            counts[mix.choose(&mut rng)] += 1;
        }
        assert_eq!(counts[1], 0);
        let share = counts[2] as f64 / 40_000.0;
        assert!((0.73..0.77).contains(&share), "{counts:?}");
    }

    #[test]
    fn templates_fill_their_placeholders() {
        let template = Template::parse("/users/{id}/orders/{int:5-6}?trace={uuid}", 3).expect("valid");
        let mut rng = fastrand::Rng::with_seed(2);
        let mut out = String::new();
        for _ in 0..50 {
            template.render(&mut rng, &mut out);
            let rest = out.strip_prefix("/users/").expect("prefix");
            let (id, rest) = rest.split_once("/orders/").expect("orders");
            assert!((1..=3).contains(&id.parse::<u64>().expect("id")), "{out}");
            let (int, uuid) = rest.split_once("?trace=").expect("trace");
            assert!(int == "5" || int == "6", "{out}");
            assert_eq!(uuid.len(), 36, "{out}");
        }
    }

    #[test]
    fn bad_placeholders_are_explained() {
        assert!(Template::parse("/{name}", 1).expect_err("rejected").contains("unknown placeholder {name}"));
        assert!(Template::parse("/{id", 1).expect_err("rejected").contains("unclosed"));
        assert!(Template::parse("/{int:9-1}", 1).expect_err("rejected").contains("low end"));
        assert!(Template::parse("/a b", 1).expect_err("rejected").contains("percent-encode"));
        assert_eq!(Template::parse("/plain", 1).expect("valid").parts, [Part::Text("/plain".into())]);
    }
}
