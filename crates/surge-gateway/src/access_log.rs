//! The access log: a line per request, once its response has been sent (or the client left),
//! as JSON or as nginx's `combined` with Surge's own fields after it.
//!
//! Requests never wait for the disk: a finished request hands its entry to a bounded channel
//! and goes on; a thread of its own formats and writes the lines, flushing whenever it has
//! caught up. A disk or a pipe that stalls fills the channel, and entries past it are dropped
//! and counted (`surge_access_log_lines_total{outcome="dropped"}`), never waited for.

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Version};
use surge_config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use surge_metrics::{Counter, Family, Metrics};

/// Entries waiting for the writer at most.
const BACKLOG: usize = 8192;

/// One request as the log tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub started: SystemTime,
    pub client: IpAddr,
    pub method: Method,
    /// Path and query as the client sent them.
    pub target: String,
    pub host: Option<String>,
    pub version: Version,
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// From the request's head to the response's last byte (or the client leaving).
    pub duration: Duration,
    /// Whether the whole response was sent.
    pub completed: bool,
    pub instance: Option<String>,
    /// Tries at instances, when the request had any.
    pub tries: Option<u32>,
    /// The response's `Cache-Status`, on cached routes.
    pub cache: Option<String>,
    pub request_id: String,
    pub trace_id: String,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
}

impl Entry {
    /// What an entry is left as once it has been handed to the writer.
    pub(crate) fn placeholder() -> Entry {
        Entry {
            started: SystemTime::UNIX_EPOCH,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            method: Method::GET,
            target: String::new(),
            host: None,
            version: Version::HTTP_11,
            status: 0,
            bytes: 0,
            duration: Duration::ZERO,
            completed: false,
            instance: None,
            tries: None,
            cache: None,
            request_id: String::new(),
            trace_id: String::new(),
            user_agent: None,
            referer: None,
        }
    }
}

enum Message {
    Line(Box<Entry>),
    /// Tell the sender once everything before has been written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The writer's mailbox, shared by every gateway a run builds.
#[derive(Clone)]
pub struct AccessLog {
    lines: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl AccessLog {
    /// Opens the log (appending to a file) and starts its writer; the error names the key.
    pub fn open(config: &AccessLogConfig, metrics: &Metrics) -> Result<AccessLog, String> {
        let output = Output::open(&config.target)?;
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        metrics.register(|registry| {
            registry.register(
                "access_log_lines",
                "Access log lines written, dropped (the writer was behind) or failed (a write error)",
                outcomes.clone(),
            )
        });
        let count = |outcome| outcomes.get_or_create(&OutcomeLabels { outcome }).clone();
        let (lines, inbox) = sync_channel(BACKLOG);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            output,
            target: config.target.clone(),
            format: config.format,
            reopen: Arc::clone(&reopen),
            written: count("written"),
            failed: count("failed"),
        };
        std::thread::Builder::new()
            .name("surge-access-log".into())
            .spawn(move || writer.run(inbox))
            .map_err(|err| format!("gateway.access_log: cannot start its writer: {err}"))?;
        Ok(AccessLog { lines, reopen, dropped: count("dropped") })
    }

    /// Hands an entry to the writer; drops it if the writer is that far behind.
    pub fn record(&self, entry: Entry) {
        if self.lines.try_send(Message::Line(Box::new(entry))).is_err() {
            self.dropped.inc();
        }
    }

    /// The file is opened again before the next line (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Waits up to `limit` for the lines handed over so far to be written.
    pub fn flush(&self, limit: Duration) {
        let (done, written) = std::sync::mpsc::channel();
        if send_within(&self.lines, Message::Flush(done), limit) {
            let _ = written.recv_timeout(limit);
        }
    }
}

/// `SyncSender` has no send with a time limit: try, and wait a little between tries.
fn send_within(sender: &SyncSender<Message>, mut message: Message, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match sender.try_send(message) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                message = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TrySendError::Full(_)) => return false,
        }
    }
}

enum Output {
    Stdout,
    File(File),
}

impl Output {
    fn open(target: &AccessLogTarget) -> Result<Output, String> {
        match target {
            AccessLogTarget::Stdout => Ok(Output::Stdout),
            AccessLogTarget::File(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Output::File)
                .map_err(|err| format!("gateway.access_log: cannot open {}: {err}", path.display())),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes)?;
                stdout.flush()
            }
            Output::File(file) => file.write_all(bytes),
        }
    }
}

struct Writer {
    output: Output,
    target: AccessLogTarget,
    format: AccessLogFormat,
    reopen: Arc<AtomicBool>,
    written: Counter,
    failed: Counter,
}

impl Writer {
    fn run(mut self, inbox: Receiver<Message>) {
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut lines = 0;
        while let Ok(first) = inbox.recv() {
            let mut flushes = Vec::new();
            let mut next = Some(first);
            // Everything already waiting goes out in one write.
            while let Some(message) = next.take().or_else(|| inbox.try_recv().ok()) {
                match message {
                    Message::Line(entry) => {
                        match self.format {
                            AccessLogFormat::Json => json_line(&entry, &mut batch),
                            AccessLogFormat::Combined => combined_line(&entry, &mut batch),
                        }
                        lines += 1;
                    }
                    Message::Flush(done) => flushes.push(done),
                }
                if batch.len() >= 64 * 1024 {
                    break;
                }
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                match Output::open(&self.target) {
                    Ok(output) => self.output = output,
                    Err(why) => tracing::warn!("{why}; the access log goes on where it was"),
                }
            }
            match self.output.write_all(&batch) {
                Ok(()) => {
                    self.written.inc_by(lines);
                }
                Err(err) => {
                    self.failed.inc_by(lines);
                    tracing::warn!("access log lines lost: {err}");
                }
            }
            batch.clear();
            lines = 0;
            for done in flushes {
                let _ = done.send(());
            }
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn json_line(entry: &Entry, out: &mut Vec<u8>) {
    let line = serde_json::json!({
        "time": rfc3339(entry.started),
        "client": entry.client.to_string(),
        "method": entry.method.as_str(),
        "path": entry.target,
        "host": entry.host,
        "protocol": format!("{:?}", entry.version),
        "status": entry.status,
        "bytes": entry.bytes,
        "duration_ms": (entry.duration.as_secs_f64() * 1e6).round() / 1e3,
        "completed": entry.completed,
        "instance": entry.instance,
        "tries": entry.tries,
        "cache": entry.cache,
        "request_id": entry.request_id,
        "trace_id": entry.trace_id,
        "user_agent": entry.user_agent,
        "referer": entry.referer,
    });
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// nginx's `combined`, then `key=value` fields; quoted values have `"` and `\` escaped and
/// control characters written as `\xHH`, as nginx does.
fn combined_line(entry: &Entry, out: &mut Vec<u8>) {
    let time = nginx_time(entry.started);
    let quoted = |text: Option<&str>| match text {
        Some(text) => escape(text),
        None => "-".to_owned(),
    };
    let request = format!("{} {} {:?}", entry.method, entry.target, entry.version);
    let line = format!(
        "{} - - [{time}] \"{}\" {} {} \"{}\" \"{}\" rt={:.3} instance={} tries={} cache=\"{}\" request_id={} trace_id={}{}\n",
        entry.client,
        escape(&request),
        entry.status,
        entry.bytes,
        quoted(entry.referer.as_deref()),
        quoted(entry.user_agent.as_deref()),
        entry.duration.as_secs_f64(),
        entry.instance.as_deref().unwrap_or("-"),
        entry.tries.map_or_else(|| "-".to_owned(), |tries| tries.to_string()),
        quoted(entry.cache.as_deref()),
        escape(&entry.request_id),
        entry.trace_id,
        if entry.completed { "" } else { " incomplete" },
    );
    out.extend_from_slice(line.as_bytes());
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'"' | b'\\' => {
                escaped.push('\\');
                escaped.push(char::from(byte));
            }
            0x20..=0x7e => escaped.push(char::from(byte)),
            other => escaped.push_str(&format!("\\x{other:02X}")),
        }
    }
    escaped
}

/// `06/Dec/2026:05:13:56 +0000`, nginx's `$time_local` in UTC.
fn nginx_time(time: SystemTime) -> String {
    let text = rfc3339(time); // 2026-12-06T05:13:56.123Z
    let month = match &text[5..7] {
        "01" => "Jan",
        "02" => "Feb",
        "03" => "Mar",
        "04" => "Apr",
        "05" => "May",
        "06" => "Jun",
        "07" => "Jul",
        "08" => "Aug",
        "09" => "Sep",
        "10" => "Oct",
        "11" => "Nov",
        _ => "Dec",
    };
    format!("{}/{month}/{}:{} +0000", &text[8..10], &text[0..4], &text[11..19])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_535_224_371),
            client: "203.0.113.9".parse().expect("ip"),
            method: Method::GET,
            target: "/api/users?id=7".into(),
            host: Some("shop.example".into()),
            version: Version::HTTP_11,
            status: 200,
            bytes: 512,
            duration: Duration::from_micros(3_250),
            completed: true,
            instance: Some("api-2".into()),
            tries: Some(2),
            cache: Some("surge; fwd=miss; stored".into()),
            request_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            user_agent: Some("curl/8.\"5\"".into()),
            referer: None,
        }
    }

    #[test]
    fn json_lines_hold_every_field() {
        let mut out = Vec::new();
        json_line(&entry(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
        assert_eq!(line["time"], "2026-12-06T05:33:44.371Z");
        assert_eq!(line["client"], "203.0.113.9");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/api/users?id=7");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes"], 512);
        assert_eq!(line["duration_ms"], 3.25);
        assert_eq!(line["instance"], "api-2");
        assert_eq!(line["tries"], 2);
        assert_eq!(line["cache"], "surge; fwd=miss; stored");
        assert_eq!(line["request_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["protocol"], "HTTP/1.1");
        assert_eq!(line["referer"], serde_json::Value::Null);
    }

    #[test]
    fn combined_lines_are_nginx_combined_then_our_fields() {
        let mut out = Vec::new();
        let mut odd = entry();
        odd.target = "/a\"b\u{1}".into();
        odd.completed = false;
        combined_line(&odd, &mut out);
        let line = String::from_utf8(out).expect("text");
        assert_eq!(
            line,
            "203.0.113.9 - - [06/Dec/2026:05:33:44 +0000] \"GET /a\\\"b\\x01 HTTP/1.1\" 200 512 \"-\" \
             \"curl/8.\\\"5\\\"\" rt=0.003 instance=api-2 tries=2 cache=\"surge; fwd=miss; stored\" \
             request_id=4bf92f3577b34da6a3ce929d0e0e4736 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 incomplete\n"
        );
    }

    #[test]
    fn a_writer_that_is_behind_drops_and_counts_rather_than_waits() {
        let (lines, inbox) = sync_channel(2);
        let log = AccessLog { lines, reopen: Arc::default(), dropped: Counter::default() };
        for _ in 0..5 {
            log.record(entry());
        }
        assert_eq!(log.dropped.get(), 3, "two fit, nobody reads");
        drop(inbox);
        log.record(entry());
        assert_eq!(log.dropped.get(), 4, "nor does a gone writer block");
    }
}
