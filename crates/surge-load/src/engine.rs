//! Running a plan: a dispatcher that releases requests at their intended times (open loop) or
//! clients that send, wait and think (closed loop), over persistent HTTP/1.1 connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1::{self, Progress, ResponseReader};
use crate::mix::{Mix, RequestKind};
use crate::stats::{Collector, LiveView, Outcome, Report, RunMeta, Sample};
use surge_shape::Shape;

/// Where requests go: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    /// As the user wrote it, for reports.
    pub url: String,
    /// `host:port`, to connect to.
    pub authority: String,
    pub host_header: HeaderValue,
}

impl Target {
    /// Parses an `http://` URL; returns the target and the URL's path and query.
    pub fn parse(url: &str) -> Result<(Target, String), String> {
        let uri: http::Uri =
            url.parse().map_err(|err| format!("{url:?} is not a URL like http://host:port/path ({err})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(format!("{url}: only http:// targets are supported, not {other}://")),
            None => return Err(format!("{url:?} is not a URL like http://host:port/path")),
        }
        let host = uri.host().ok_or_else(|| format!("{url}: the URL has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let host_header = HeaderValue::from_str(uri.authority().map_or(host, |a| a.as_str()))
            .map_err(|err| format!("{url}: {err}"))?;
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
        Ok((Target { url: url.to_owned(), authority, host_header }, path))
    }
}

#[derive(Debug, Clone)]
pub enum Mode {
    /// Requests arrive on the shape's schedule, whether or not earlier ones have returned.
    Open(Shape),
    /// Each connection sends, waits for the answer, then thinks before the next.
    Closed { think: Duration },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub mix: Mix,
    pub mode: Mode,
    pub duration: Duration,
    pub connections: usize,
    pub timeout: Duration,
    pub seed: u64,
}

/// A run in progress, shared with whoever shows progress.
pub struct Run {
    collector: Mutex<Collector>,
    sent: AtomicU64,
    pub start: Instant,
}

impl Run {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn live(&self) -> LiveView {
        self.lock().live(Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collector> {
        self.collector.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

const HALF_TICK: Duration = Duration::from_micros(500);

struct Job {
    kind: usize,
    request: Bytes,
    intended: Instant,
}

/// Makes the bytes of each request: once per kind for fixed paths, per request for templates.
struct RequestMaker {
    fixed: Vec<Option<Bytes>>,
    path: String,
    encoded: Vec<u8>,
}

impl RequestMaker {
    fn new(plan: &Plan) -> Self {
        let mut encoded = Vec::new();
        let fixed = plan
            .mix
            .kinds()
            .iter()
            .map(|kind| {
                let path = kind.path.fixed()?;
                encode(plan, kind, path, &mut encoded);
                Some(Bytes::copy_from_slice(&encoded))
            })
            .collect();
        RequestMaker { fixed, path: String::new(), encoded }
    }

    /// A kind chosen from the mix, and its request.
    fn next(&mut self, plan: &Plan, rng: &mut fastrand::Rng) -> (usize, Bytes) {
        let index = plan.mix.choose(rng);
        if let Some(request) = &self.fixed[index] {
            return (index, request.clone());
        }
        let kind = &plan.mix.kinds()[index];
        kind.path.render(rng, &mut self.path);
        encode(plan, kind, &self.path, &mut self.encoded);
        (index, Bytes::copy_from_slice(&self.encoded))
    }
}

fn encode(plan: &Plan, kind: &RequestKind, path: &str, out: &mut Vec<u8>) {
    http1::encode_request(&kind.method, path, &plan.target.host_header, &kind.headers, &kind.body, out);
}

/// Checks that the target accepts connections, so a wrong address is one clear error.
pub async fn preflight(target: &Target) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target.authority)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("cannot connect to {}: {err}", target.url)),
        Err(_) => Err(format!("cannot connect to {}: no answer within 5 s", target.url)),
    }
}

/// Starts a run; `watch` is called with the run once it has started (for progress), and the
/// report comes back when every request has finished.
pub async fn run(plan: Plan, watch: impl FnOnce(Arc<Run>)) -> Report {
    let start = Instant::now();
    let names: Vec<String> = plan.mix.kinds().iter().map(|k| k.name.clone()).collect();
    let run = Arc::new(Run {
        collector: Mutex::new(Collector::new(start, names.len())),
        sent: AtomicU64::new(0),
        start,
    });
    watch(Arc::clone(&run));
    let plan = Arc::new(plan);

    let (scheduled, dispatch_lag) = match &plan.mode {
        Mode::Open(shape) => {
            let (jobs, queue) = async_channel::unbounded::<Job>();
            let workers: Vec<_> = (0..plan.connections)
                .map(|_| tokio::spawn(open_worker(Arc::clone(&plan), Arc::clone(&run), queue.clone())))
                .collect();
            drop(queue);
            let dispatched = dispatch(&plan, shape, &run, jobs).await;
            for worker in workers {
                let _ = worker.await;
            }
            dispatched
        }
        Mode::Closed { think } => {
            let deadline = start + plan.duration;
            let workers: Vec<_> = (0..plan.connections)
                .map(|index| {
                    let (plan, run) = (Arc::clone(&plan), Arc::clone(&run));
                    tokio::spawn(closed_worker(plan, run, *think, deadline, index as u64))
                })
                .collect();
            for worker in workers {
                let _ = worker.await;
            }
            (0, Duration::ZERO)
        }
    };

    let meta = RunMeta {
        target: plan.target.url.clone(),
        open_loop: matches!(plan.mode, Mode::Open(_)),
        connections: plan.connections,
        planned: plan.duration,
        scheduled,
        sent: run.sent(),
        dispatch_lag,
    };
    match Arc::try_unwrap(run) {
        Ok(run) => run.collector.into_inner().unwrap_or_else(|p| p.into_inner()).finish(meta, &names),
        // The progress watcher still holds the run: take the collector's contents instead.
        Err(run) => {
            let collector = std::mem::replace(&mut *run.lock(), Collector::new(start, names.len()));
            collector.finish(meta, &names)
        }
    }
}

/// Releases each request at its intended time. Never waits for answers: that is the point of
/// an open loop. Returns how many arrivals the schedule held and the worst lateness.
async fn dispatch(
    plan: &Plan,
    shape: &Shape,
    run: &Run,
    jobs: async_channel::Sender<Job>,
) -> (u64, Duration) {
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut requests = RequestMaker::new(plan);
    let mut worst_lag = Duration::ZERO;
    let mut scheduled = 0;
    for offset in shape.schedule(plan.duration) {
        let intended = run.start + offset;
        // Tokio's timer ticks every millisecond and rounds a deadline up to the next tick;
        // aiming half a tick early centres the release on the intended time.
        let wake = intended.checked_sub(HALF_TICK).unwrap_or(intended);
        if wake > Instant::now() {
            tokio::time::sleep_until(wake.into()).await;
        }
        worst_lag = worst_lag.max(Instant::now().saturating_duration_since(intended));
        scheduled += 1;
        let (kind, request) = requests.next(plan, &mut rng);
        if jobs.send(Job { kind, request, intended }).await.is_err() {
            break;
        }
    }
    // Tokio's timer ticks every millisecond: lateness below that is the clock, not overload.
    (scheduled, worst_lag.saturating_sub(Duration::from_millis(2)))
}

async fn open_worker(plan: Arc<Plan>, run: Arc<Run>, queue: async_channel::Receiver<Job>) {
    let mut connection = Connection::default();
    while let Ok(job) = queue.recv().await {
        let sent = Instant::now();
        run.sent.fetch_add(1, Ordering::Relaxed);
        let outcome = connection.send(&plan, job.kind, &job.request).await;
        let sample = Sample { kind: job.kind, intended: job.intended, sent, done: Instant::now(), outcome };
        run.lock().record(sample);
    }
}

async fn closed_worker(plan: Arc<Plan>, run: Arc<Run>, think: Duration, deadline: Instant, index: u64) {
    let mut rng = fastrand::Rng::with_seed(plan.seed.wrapping_add(index));
    let mut requests = RequestMaker::new(&plan);
    let mut connection = Connection::default();
    while Instant::now() < deadline {
        let (kind, request) = requests.next(&plan, &mut rng);
        let sent = Instant::now();
        run.sent.fetch_add(1, Ordering::Relaxed);
        let outcome = connection.send(&plan, kind, &request).await;
        run.lock().record(Sample { kind, intended: sent, sent, done: Instant::now(), outcome });
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
    }
}

/// One keep-alive connection, reopened when the server closes it.
#[derive(Default)]
struct Connection {
    stream: Option<TcpStream>,
    buffer: BytesMut,
}

impl Connection {
    async fn send(&mut self, plan: &Plan, kind: usize, request: &[u8]) -> Outcome {
        let head = plan.mix.kinds()[kind].method == http::Method::HEAD;
        match tokio::time::timeout(plan.timeout, self.exchange(&plan.target, request, head)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The connection may still carry the late answer: never reuse it.
                self.stream = None;
                Outcome::Timeout
            }
        }
    }

    /// Writes the request and reads the response; keeps the connection only if it can serve
    /// another request.
    async fn exchange(&mut self, target: &Target, request: &[u8], head: bool) -> Outcome {
        let mut stream = match self.stream.take().filter(open_while_idle) {
            Some(stream) => stream,
            None => match TcpStream::connect(&target.authority).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(_) => return Outcome::ConnectError,
            },
        };
        if stream.write_all(request).await.is_err() {
            return Outcome::ConnectionError;
        }
        let mut response = ResponseReader::new(head);
        self.buffer.clear();
        loop {
            match response.feed(&mut self.buffer) {
                Ok(Progress::NeedMore) => {}
                Ok(Progress::Done { status, keep_alive }) => {
                    if keep_alive {
                        self.stream = Some(stream);
                    }
                    return Outcome::Status(status);
                }
                Err(_) => return Outcome::MalformedResponse,
            }
            self.buffer.reserve(READ_SIZE);
            match stream.read_buf(&mut self.buffer).await {
                Ok(0) => {
                    return match response.closed() {
                        Ok(Progress::Done { status, .. }) => Outcome::Status(status),
                        _ => Outcome::ConnectionError,
                    }
                }
                Ok(_) => {}
                Err(_) => return Outcome::ConnectionError,
            }
        }
    }
}

const READ_SIZE: usize = 16 * 1024;

/// An idle keep-alive connection is usable if the server has neither closed it nor sent
/// anything unasked.
fn open_while_idle(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed_with_clear_errors() {
        let (target, path) = Target::parse("http://127.0.0.1:8080/api/x?y=1").expect("valid");
        assert_eq!((target.authority.as_str(), path.as_str()), ("127.0.0.1:8080", "/api/x?y=1"));
        assert_eq!(target.host_header, "127.0.0.1:8080");
        let (target, path) = Target::parse("http://localhost").expect("valid");
        assert_eq!((target.authority.as_str(), path.as_str()), ("localhost:80", "/"));
        assert!(Target::parse("https://x").expect_err("rejected").contains("only http://"));
        assert!(Target::parse("localhost:80/x").expect_err("rejected").contains("http://"));
    }
}
