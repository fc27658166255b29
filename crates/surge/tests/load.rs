//! `surge load` end to end, against a real test-backend process.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Echo, SURGE};

/// Runs `surge load ARGS --json FILE` and returns the parsed report.
fn load(dir: &Path, args: &[&str]) -> serde_json::Value {
    let json = dir.join("report.json");
    let output = surge_load(args, &["--json", &json.display().to_string()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&std::fs::read_to_string(&json).expect("report written")).expect("JSON report")
}

fn surge_load(args: &[&str], more: &[&str]) -> Output {
    Command::new(SURGE).arg("load").args(args).args(more).output().expect("run surge load")
}

fn f64_at(report: &serde_json::Value, pointer: &str) -> f64 {
    report.pointer(pointer).and_then(|v| v.as_f64()).unwrap_or_else(|| panic!("no {pointer} in {report}"))
}

#[test]
fn a_constant_rate_is_achieved_within_three_percent() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let report = load(dir.path(), &[&echo.url("/"), "--rate", "300/s", "--duration", "5s"]);
    assert_eq!(report["sent"], 1500);
    assert_eq!(report["errors"], 0);
    assert_eq!(f64_at(&report, "/intended_rate"), 300.0);
    let achieved = f64_at(&report, "/achieved_rate");
    assert!((291.0..=309.0).contains(&achieved), "achieved {achieved}/s");
    assert_eq!(report["kinds"][0]["outcomes"]["200"], 1500);
}

#[test]
fn a_delay_shows_in_the_percentiles() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let report = load(dir.path(), &[&echo.url("/?delay=50ms"), "--rate", "100/s", "--duration", "2s"]);
    for figure in ["/latency_ms/p50", "/latency_ms/p99", "/service_time_ms/p50"] {
        assert!(f64_at(&report, figure) >= 50.0, "{figure}: {report}");
    }
}

#[test]
fn a_stall_shows_in_p99_without_coordinated_omission() {
    // The test backend runs on one thread: a request that busy-works for a second stalls every
    // other request behind it. A closed-loop tool would record one slow sample per connection;
    // an open loop keeps releasing requests on schedule and counts their wait.
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("report.json");
    let mut run = Command::new(SURGE)
        .args(["load", &echo.url("/"), "--rate", "200/s", "--duration", "4s", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run surge load");
    std::thread::sleep(Duration::from_secs(1));
    let mut stall = std::net::TcpStream::connect(("127.0.0.1", echo.port)).expect("connect");
    std::io::Write::write_all(&mut stall, b"GET /?cpu=1s HTTP/1.1\r\nhost: echo\r\n\r\n").expect("send");
    assert!(run.wait().expect("wait").success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    assert_eq!(report["sent"], 800);
    let (p50, p99, max) = (
        f64_at(&report, "/latency_ms/p50"),
        f64_at(&report, "/latency_ms/p99"),
        f64_at(&report, "/latency_ms/max"),
    );
    assert!(p99 >= 500.0 && max >= 900.0, "the stall must show: p50 {p50} p99 {p99} max {max}");
    assert!(p50 < p99 / 10.0, "most requests were unaffected: p50 {p50} p99 {p99}");
}

#[test]
fn a_step_scenario_reports_both_rates() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let scenario = dir.path().join("step.toml");
    std::fs::write(
        &scenario,
        format!(
            "target = \"{}\"\nconnections = 16\n\n[shape]\nkind = \"step\"\nsteps = [{{ rate = 100, for = \"2s\" }}, {{ rate = \"400/s\", for = \"2s\" }}]\n\n[[requests]]\nname = \"user\"\npath = \"/users/{{id}}\"\n",
            echo.url("")
        ),
    )
    .expect("write scenario");
    let report = load(dir.path(), &["-s", &scenario.display().to_string()]);
    let timeline = report["timeline"].as_array().expect("timeline");
    let second = |i: usize, field: &str| timeline[i][field].as_f64().unwrap_or(0.0);
    for (seconds, rate) in [([0, 1], 100.0), ([2, 3], 400.0)] {
        for s in seconds {
            assert_eq!(second(s, "intended"), rate, "second {s}: {timeline:?}");
        }
        let answered = (second(seconds[0], "answered") + second(seconds[1], "answered")) / 2.0;
        assert!(
            (answered - rate).abs() <= rate * 0.1,
            "seconds {seconds:?} answered {answered}/s, not {rate}/s"
        );
    }
    assert_eq!(report["sent"], 1000);
    assert_eq!(report["kinds"][0]["name"], "user");
}

#[test]
fn a_trace_replay_sends_the_trace_request_count() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/traces/azure-llm-2023-code.csv");
    let text = std::fs::read_to_string(&trace).expect("the trace in data/traces");
    let rows = text.lines().filter(|line| line.starts_with("2023-")).count();
    let scenario = dir.path().join("trace.toml");
    std::fs::write(
        &scenario,
        format!(
            "target = \"{}\"\n[shape]\nkind = \"trace\"\nfile = \"{}\"\nspeedup = 600\n",
            echo.url("/"),
            trace.display()
        ),
    )
    .expect("write scenario");
    let report = load(dir.path(), &["-s", &scenario.display().to_string()]);
    assert_eq!(report["sent"].as_u64(), Some(rows as u64));
    assert_eq!(report["answered"].as_u64(), Some(rows as u64));
}

#[test]
fn a_closed_loop_is_bounded_by_its_think_time() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let report = load(
        dir.path(),
        &[&echo.url("/"), "--closed", "--connections", "4", "--think", "100ms", "--duration", "1s"],
    );
    let sent = report["sent"].as_u64().expect("sent");
    // Each connection sends at most once per think time: 4 × 10 in a second, plus the first.
    assert!((4..=44).contains(&sent), "sent {sent}");
    assert_eq!(report["mode"], "closed");
    assert!(report["intended_rate"].is_null());
}

#[test]
fn the_report_text_and_plot() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().expect("dir");
    let plot = dir.path().join("run.svg");
    let output = surge_load(
        &[&echo.url("/"), "--rate", "50/s", "--duration", "2s"],
        &["--plot", &plot.display().to_string()],
    );
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in ["50.0/s intended", "latency   p50", "p99.9", "KIND", "200: 100"] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("requests/s") && svg.contains("p99"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    // Not a terminal: progress comes as plain lines on stderr (none in a 2 s run).
    assert!(!String::from_utf8_lossy(&output.stderr).contains('\u{1b}'));
}

#[test]
fn bad_input_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("dir");
    let unreachable = surge_load(&["http://127.0.0.1:1/", "--rate", "10/s"], &[]);
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(stderr.starts_with("error: cannot connect to http://127.0.0.1:1/"), "{stderr}");

    let scenario = dir.path().join("bad.toml");
    std::fs::write(&scenario, "target = \"http://127.0.0.1:1\"\nconections = 4\n").expect("write");
    let malformed = surge_load(&["-s", &scenario.display().to_string()], &[]);
    assert!(!malformed.status.success());
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(stderr.contains("bad.toml:2:1: `conections`: unknown field"), "{stderr}");

    let csv = dir.path().join("no-times.csv");
    std::fs::write(&csv, "name,size\nalpha,1\nbeta,2\n").expect("write");
    std::fs::write(
        &scenario,
        "target = \"http://127.0.0.1:1\"\nshape = { kind = \"trace\", file = \"no-times.csv\" }\n",
    )
    .expect("write");
    let no_timestamps = surge_load(&["-s", &scenario.display().to_string()], &[]);
    assert!(!no_timestamps.status.success());
    let stderr = String::from_utf8_lossy(&no_timestamps.stderr);
    assert!(stderr.contains("no-times.csv: line 2: \"alpha\" is not a timestamp"), "{stderr}");
}
