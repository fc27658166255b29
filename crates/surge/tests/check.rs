//! `surge check` names the file, the line and the key of every problem.

mod common;

use std::process::Command;

use common::{ECHO, SURGE};

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("surge.toml");
    std::fs::write(&path, config.replace("{echo}", ECHO)).expect("write");
    let output = Command::new(SURGE).args(["check", "-c"]).arg(&path).output().expect("run surge check");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "surge.toml");
    (output.status.success(), stdout, stderr)
}

/// The configuration is rejected, and the message says `surge.toml:LINE:` and names `key`.
fn assert_rejected(config: &str, line: usize, key: &str, words: &str) {
    let (ok, _, stderr) = check(config);
    assert!(!ok, "accepted:\n{config}");
    assert!(stderr.contains(&format!("surge.toml:{line}:")), "no line {line} in:\n{stderr}");
    assert!(stderr.contains(&format!("`{key}`")), "no key {key} in:\n{stderr}");
    assert!(stderr.contains(words), "no `{words}` in:\n{stderr}");
}

const SERVICE: &str = "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n";

#[test]
fn a_valid_configuration_is_summarised() {
    let (ok, stdout, stderr) =
        check(&format!("[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{SERVICE}"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("is valid: 1 service"), "{stdout}");
    assert!(stdout.contains("web: / (least_conn), instances 1..1 starting at 1"), "{stdout}");
}

#[test]
fn unknown_key() {
    assert_rejected(
        &format!("{SERVICE}replicas = 3\n"),
        4,
        "services.web.replicas",
        "unknown field `replicas`",
    );
}

#[test]
fn bad_duration() {
    assert_rejected(
        &format!("{SERVICE}health = {{ timeout = \"fast\" }}\n"),
        4,
        "services.web.health.timeout",
        "invalid duration",
    );
}

#[test]
fn min_greater_than_max() {
    assert_rejected(
        &format!("{SERVICE}instances = {{ min = 4, max = 2 }}\n"),
        4,
        "services.web.instances",
        "min (4) is greater than max (2)",
    );
}

#[test]
fn duplicate_route() {
    let config = format!("{SERVICE}\n[services.api]\ncommand = \"{{echo}}\"\nroutes = [\"/api\", \"/\"]\n");
    assert_rejected(&config, 7, "services.api.routes[1]", "duplicate route");
}

#[test]
fn overlapping_route() {
    let config = "[services.a]\ncommand = \"{echo}\"\nroutes = [\"/api\"]\n[services.b]\ncommand = \"{echo}\"\nroutes = [\"/api/\"]\n";
    assert_rejected(config, 6, "services.b.routes[0]", "overlapping route");
}

#[test]
fn missing_command() {
    assert_rejected("[services.web]\nroutes = [\"/\"]\n", 1, "services.web", "missing `command`");
}

#[test]
fn command_not_found() {
    assert_rejected(
        "[services.web]\ncommand = \"./bin/nothing-here\"\nroutes = [\"/\"]\n",
        2,
        "services.web.command",
        "no executable file",
    );
}

#[test]
fn port_already_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let config =
        format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{SERVICE}");
    assert_rejected(&config, 2, "gateway.listen", "cannot listen on");
}

#[test]
fn every_error_is_reported_at_once() {
    let config = "[services.a]\nroutes = [\"/\"]\n[services.b]\ncommand = \"{echo}\"\nroutes = [\"/\"]\ninstances = { min = 2, max = 1 }\n";
    let (ok, _, stderr) = check(config);
    assert!(!ok);
    for expected in ["surge.toml:1:", "surge.toml:5:", "surge.toml:6:", "3 configuration errors"] {
        assert!(stderr.contains(expected), "no `{expected}` in:\n{stderr}");
    }
}

#[test]
fn an_unreadable_file_is_one_clear_line() {
    let output = Command::new(SURGE).args(["check", "-c", "/nonexistent/surge.toml"]).output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/surge.toml: cannot read the configuration file"), "{stderr}");
}

#[test]
fn tls_problems_name_the_key_and_the_file() {
    assert_rejected(
        &format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nlisten_tls = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"missing.pem\", key = \"missing.key\" }}\n{SERVICE}"
        ),
        4,
        "gateway.tls[0].cert",
        "missing.pem: cannot read it",
    );
    assert_rejected(
        &format!("[gateway]\nlisten_tls = \"127.0.0.1:0\"\n{SERVICE}"),
        2,
        "gateway.listen_tls",
        "HTTPS needs a certificate",
    );
    assert_rejected(
        &format!("[gateway]\n[[gateway.tls]]\ncert = \"a.pem\"\nkey = \"a.key\"\n{SERVICE}"),
        3,
        "gateway.tls",
        "need `gateway.listen_tls`",
    );
}

#[test]
fn upstream_tls_problems_name_the_key_and_the_file() {
    let upstream = |lines: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n\
             [services.api]\nupstreams = [\"127.0.0.1:8443\"]\nroutes = [\"/\"]\n{lines}"
        )
    };
    assert_rejected(
        &upstream("tls = { ca = \"ca.pem\" }\n"),
        8,
        "services.api.tls",
        "applies only with `protocol = \"https\"`",
    );
    assert_rejected(
        &upstream("protocol = \"https\"\ntls = { ca = \"missing-ca.pem\" }\n"),
        9,
        "services.api.tls.ca",
        "missing-ca.pem: cannot read it",
    );
    assert_rejected(
        &upstream("protocol = \"https\"\ntls = { server_name = \"not a name\" }\n"),
        9,
        "services.api.tls.server_name",
        "neither a DNS name nor an IP address",
    );
    assert_rejected(
        &upstream("protocol = \"https\"\ntls = { cert = \"client.pem\" }\n"),
        9,
        "services.api.tls",
        "needs both `cert` and `key`",
    );
    let (ok, stdout, stderr) = check(&upstream("protocol = \"https\"\n"));
    assert!(ok, "the system's roots are used:\n{stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn an_unknown_user_is_named() {
    assert_rejected(
        "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\nuser = \"no-such-user-here\"\n",
        4,
        "services.web.user",
        "no user named `no-such-user-here` in /etc/passwd",
    );
}

#[test]
fn schedule_problems_name_the_key() {
    let with = |schedule: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n{SERVICE}\
             [queues.jobs]\n[schedules.nightly]\n{schedule}"
        )
    };
    assert_rejected(
        &with("cron = \"61 * * * *\"\nqueue = \"jobs\"\n"),
        10,
        "schedules.nightly.cron",
        "not a cron expression",
    );
    assert_rejected(
        &with("cron = \"0 3 * * *\"\nqueue = \"nope\"\n"),
        11,
        "schedules.nightly.queue",
        "no queue is named \"nope\"",
    );
}

#[test]
fn queue_backend_problems_name_the_key() {
    let with = |queue: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n{SERVICE}\
             [queues.jobs]\n{queue}"
        )
    };
    assert_rejected(&with("backend = \"kafka\"\n"), 9, "queues.jobs.backend", "the choices are");
    assert_rejected(&with("backend = \"amqp\"\n"), 8, "queues.jobs.url", "needs the broker's URL");
    assert_rejected(&with("url = \"amqp://rabbit\"\n"), 9, "queues.jobs.url", "only an amqp queue");
    assert_rejected(
        &with("backend = \"amqp\"\nurl = \"http://rabbit\"\n"),
        10,
        "queues.jobs.url",
        "not an amqp:// or amqps:// URL",
    );
    assert_rejected(
        &with("backend = \"amqp\"\nurl = \"amqp://rabbit\"\nmax_size = \"1MiB\"\n"),
        8,
        "queues.jobs.max_size",
        "cannot bound its bytes",
    );
    assert_rejected(
        &with("backend = \"amqp\"\nurl = \"amqp://rabbit\"\nbroker_queue = \"a b\"\n"),
        11,
        "queues.jobs.broker_queue",
        "1 to 160 letters",
    );
    let (ok, stdout, stderr) = check(&with("backend = \"amqp\"\nurl = \"amqp://guest:secret@rabbit/%2f\"\n"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kept by RabbitMQ at amqp://guest@rabbit/%2f as jobs"), "{stdout}");
    assert!(!stdout.contains("secret"), "{stdout}");
}
