//! Request traces: a CSV whose first column is an arrival timestamp, either seconds
//! (`12.5`) or a date and time (`2023-11-16 18:17:03.9799600`).

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    #[error("line {line}: {value:?} is not a timestamp (expected seconds such as 12.5, or a date and time such as 2023-11-16 18:17:03.98)")]
    BadTimestamp { line: usize, value: String },
    #[error("no timestamps found: the first column of each line must be an arrival time")]
    Empty,
}

/// Arrival offsets from the first arrival, sorted. A first line that is not a timestamp is
/// taken as a header.
pub fn parse(text: &str) -> Result<Vec<Duration>, TraceError> {
    let mut stamps = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value = line.split(',').next().unwrap_or("").trim().trim_matches('"');
        match parse_timestamp(value) {
            Some(stamp) => stamps.push(stamp),
            None if index == 0 => {} // a header
            None => return Err(TraceError::BadTimestamp { line: index + 1, value: value.to_owned() }),
        }
    }
    stamps.sort_by(f64::total_cmp);
    let first = *stamps.first().ok_or(TraceError::Empty)?;
    Ok(stamps.into_iter().map(|s| Duration::from_secs_f64(s - first)).collect())
}

/// Compresses time by `speedup` and scales the rate by `scale`: each arrival stands for
/// `scale` requests on average, emitted at its (compressed) time.
pub fn replay(arrivals: &[Duration], speedup: f64, scale: f64) -> Vec<Duration> {
    let mut out = Vec::with_capacity((arrivals.len() as f64 * scale).ceil() as usize);
    let mut owed = 0.0;
    for at in arrivals {
        owed += scale;
        let at = at.div_f64(speedup);
        while owed >= 1.0 - 1e-9 {
            out.push(at);
            owed -= 1.0;
        }
    }
    out
}

/// Seconds, or seconds since the Unix epoch of a `YYYY-MM-DD HH:MM:SS[.frac]` date and time.
fn parse_timestamp(value: &str) -> Option<f64> {
    if let Ok(seconds) = value.parse::<f64>() {
        return seconds.is_finite().then_some(seconds);
    }
    let value = value.trim_end_matches('Z');
    let (date, time) = value.split_once([' ', 'T'])?;
    let mut date_parts = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date_parts.next()??, date_parts.next()??, date_parts.next()??);
    let mut time_parts = time.splitn(3, ':');
    let hour: i64 = time_parts.next()?.parse().ok()?;
    let minute: i64 = time_parts.next()?.parse().ok()?;
    let second: f64 = time_parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second >= 61.0 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3_600 + minute * 60) as f64 + second)
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_timestamp("12.5"), Some(12.5));
        let a = parse_timestamp("2023-11-16 18:17:03.9799600").expect("date");
        let b = parse_timestamp("2023-11-16T18:17:05.4799600Z").expect("date");
        assert!((b - a - 1.5).abs() < 1e-6);
        assert_eq!(parse_timestamp("2023-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("hello"), None);
    }

    #[test]
    fn header_is_skipped_and_offsets_start_at_zero() {
        let text = "TIMESTAMP,ContextTokens\n2023-11-16 18:17:04.5,1\n2023-11-16 18:17:03.5,2\n";
        assert_eq!(parse(text), Ok(vec![Duration::ZERO, Duration::from_secs(1)]));
    }

    #[test]
    fn bad_lines_and_empty_files_are_named() {
        assert_eq!(parse("t\n1.0\nsoon\n"), Err(TraceError::BadTimestamp { line: 3, value: "soon".into() }));
        assert_eq!(parse("a,b\n"), Err(TraceError::Empty));
    }

    #[test]
    fn replay_compresses_time_and_scales_the_count() {
        let arrivals: Vec<_> = (0..10).map(Duration::from_secs).collect();
        let replayed = replay(&arrivals, 10.0, 1.0);
        assert_eq!(replayed.len(), 10);
        assert_eq!(replayed[9], Duration::from_millis(900));
        assert_eq!(replay(&arrivals, 1.0, 2.0).len(), 20);
        assert_eq!(replay(&arrivals, 1.0, 0.5).len(), 5);
    }

    #[test]
    fn the_azure_trace_in_the_repository_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/traces/azure-llm-2023-code.csv");
        let Ok(text) = std::fs::read_to_string(path) else {
            panic!("the trace is missing at {path}");
        };
        let arrivals = parse(&text).expect("parses");
        let rows = text.lines().filter(|line| line.starts_with("2023-")).count();
        assert!(rows > 8000);
        assert_eq!(arrivals.len(), rows);
        let minutes = arrivals[arrivals.len() - 1].as_secs_f64() / 60.0;
        assert!((50.0..60.0).contains(&minutes), "about 57 minutes: {minutes}");
    }
}
