//! `surge sim` end to end: the comparison table, the baselines' known behaviour, JSON, plot.

mod common;

use std::process::Command;

use common::SURGE;

#[test]
fn the_step_scenario_compares_every_policy_and_hpa_needs_several_cycles() {
    let dir = tempfile::tempdir().expect("dir");
    let (json, plot) = (dir.path().join("sim.json"), dir.path().join("sim.svg"));
    let output = Command::new(SURGE)
        .args(["sim", "--scenario", "step", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("run surge sim");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    for policy in ["surge", "knative-kpa", "hpa-cpu", "keda-queue", "aws-target-tracking"] {
        assert!(
            table.lines().any(|l| l.starts_with("step") && l.contains(policy)),
            "no {policy} row:\n{table}"
        );
    }
    assert!(table.contains("TIME TO SLO") && table.contains("VS ORACLE"), "{table}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    let rows = report["rows"].as_array().expect("rows");
    let time_to_slo = |policy: &str| {
        rows.iter()
            .find(|r| r["policy"] == policy)
            .and_then(|r| r["time_to_slo_s"].as_u64())
            .unwrap_or_else(|| panic!("{policy} has no time to SLO: {rows:?}"))
    };
    // A 10x step on CPU: the HPA sees at most 100% per pod, so it grows by at most 1/0.7
    // per 15 s sync and needs several syncs; KEDA waits for its 30 s poll.
    assert!(time_to_slo("hpa-cpu") >= 60, "hpa: {}", time_to_slo("hpa-cpu"));
    assert!(time_to_slo("keda-queue") >= 30, "keda: {}", time_to_slo("keda-queue"));
    // Surge answers the step within start-up time plus a few seconds, ahead of every baseline.
    let surge = time_to_slo("surge");
    for baseline in ["knative-kpa", "hpa-cpu", "keda-queue", "aws-target-tracking"] {
        assert!(surge < time_to_slo(baseline), "surge {surge} s, {baseline} {} s", time_to_slo(baseline));
    }
    assert!(std::fs::read_to_string(&plot).expect("plot").contains("step: instances"));
}

#[test]
fn the_simulation_is_deterministic_for_a_seed() {
    let run = || {
        Command::new(SURGE)
            .args(["sim", "--scenario", "spike", "--seed", "9"])
            .output()
            .expect("run surge sim")
            .stdout
    };
    assert_eq!(run(), run());
}

#[test]
fn a_trace_is_replayed_and_bad_input_is_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    let trace = dir.path().join("burst.csv");
    let mut csv = String::from("t\n");
    for i in 0..600 {
        // One arrival a second, then a burst of 40 a second for 20 seconds.
        let per_second = if (200..220).contains(&i) { 40 } else { 1 };
        for k in 0..per_second {
            csv.push_str(&format!("{}\n", f64::from(i) + f64::from(k) / f64::from(per_second)));
        }
    }
    std::fs::write(&trace, csv).expect("write");
    let output = Command::new(SURGE)
        .args(["sim", "--trace"])
        .arg(&trace)
        .args(["--scale", "4"])
        .output()
        .expect("run");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.starts_with("burst ")).count() == 5);

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "when\nyesterday\n").expect("write");
    let output = Command::new(SURGE).args(["sim", "--trace"]).arg(&bad).output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.csv: line 2: \"yesterday\" is not a timestamp"), "{stderr}");
}
