//! The query-string knobs that shape a response.

use std::time::Duration;

use http::StatusCode;

#[derive(Debug, Default, PartialEq)]
pub(crate) struct Knobs {
    pub delay: Option<Duration>,
    pub cpu: Option<Duration>,
    pub status: Option<StatusCode>,
    pub bytes: Option<u64>,
    /// `header=NAME:VALUE` (VALUE percent-decoded), added to the response; repeatable.
    pub headers: Vec<(String, String)>,
    /// `fail_once=FILE`: a bare 500 if FILE does not exist yet (and it is made), so that the
    /// first of several requests fails and the rest do not.
    pub fail_once: Option<std::path::PathBuf>,
}

impl Knobs {
    /// Unknown parameters are ignored (they may be cache-busters); bad values are errors.
    pub fn parse(query: &str) -> Result<Knobs, String> {
        let mut knobs = Knobs::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "delay" => knobs.delay = Some(duration(name, value)?),
                "cpu" => knobs.cpu = Some(duration(name, value)?),
                "status" => {
                    let code = value.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok());
                    knobs.status = Some(code.ok_or_else(|| format!("status={value} is not an HTTP status"))?);
                }
                "bytes" => {
                    knobs.bytes =
                        Some(value.parse().map_err(|_| format!("bytes={value} is not a number of bytes"))?)
                }
                "header" => {
                    let decoded = percent_decode(value);
                    let (field, text) =
                        decoded.split_once(':').ok_or_else(|| format!("header={value} is not NAME:VALUE"))?;
                    knobs.headers.push((field.to_owned(), text.to_owned()));
                }
                "fail_once" => knobs.fail_once = Some(percent_decode(value).into()),
                _ => {}
            }
        }
        Ok(knobs)
    }
}

/// `%XX` decoded (and `+` kept as it is: a knob's value is not a form).
fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned()
}

fn duration(name: &str, value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|err| format!("{name}={value} is not a duration like 50ms: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_knob() {
        let knobs = Knobs::parse(
            "delay=50ms&cpu=2ms&status=503&bytes=100&cachebust=1&header=cache-control:max-age%3D60,%20public",
        )
        .expect("valid");
        assert_eq!(
            knobs,
            Knobs {
                delay: Some(Duration::from_millis(50)),
                cpu: Some(Duration::from_millis(2)),
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                bytes: Some(100),
                headers: vec![("cache-control".into(), "max-age=60, public".into())],
                fail_once: None,
            }
        );
        assert_eq!(Knobs::parse("").expect("empty"), Knobs::default());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Knobs::parse("delay=soon").is_err());
        assert!(Knobs::parse("status=42").is_err());
        assert!(Knobs::parse("bytes=-1").is_err());
        assert!(Knobs::parse("header=no-colon").is_err());
    }
}
