//! `surge-echo`, the test backend used by the tests, the benchmarks and the demo.
//!
//! It listens on `$PORT` and answers every request with a JSON echo of the method, path,
//! query and headers, or with knobs in the query string:
//! `?delay=50ms` waits, `?cpu=5ms` busy-works, `?status=503` sets the status, `?bytes=N`
//! streams an N-byte body, `?header=NAME:VALUE` (percent-encoded, repeatable) adds a response
//! field, `?fail_once=FILE` answers a bare 500 unless FILE exists (and makes it); a request
//! whose `If-None-Match` matches the `ETag` so added is answered 304.
//! With `SURGE_ECHO_REQUEST_LOG=FILE`, every request but health checks appends
//! `METHOD TARGET INSTANCE` to FILE, so tests can count what reached the instances.
//! `/healthz` answers 200. Every response carries
//! `x-surge-instance: $SURGE_INSTANCE`. SIGTERM stops it gracefully.
//!
//! Two variables model a real service's limits: `SURGE_ECHO_CONCURRENCY=N` serves at most N
//! requests at once (others wait their turn, as behind a worker pool), and
//! `SURGE_ECHO_STARTUP=2s` waits before listening, like a slow start. A WebSocket upgrade is
//! accepted and every message echoed back.
//!
//! Two more misbehave on purpose, for chaos tests: `SURGE_ECHO_IDLE_TIMEOUT=50ms` closes
//! keep-alive connections idle that long (racing a client that reuses them), and
//! `SURGE_ECHO_FAULTY=web-2[:MODE]` makes the instance of that name misbehave on everything but
//! its health check: `503` (the default) answers 503, `hang` never answers, `reset` closes the
//! connection without answering, `malformed` answers bytes that are not HTTP; `unhealthy`
//! serves normally but fails its health checks one second after it starts; `slow` takes 50 ms
//! longer over every request.
//!
//! As a queue's worker it takes `POST /job`: the message's body may hold the same knobs
//! (`status=500&delay=2s`) to answer as told, or `fail_while=FILE` to fail while FILE exists,
//! or `settle=later` to answer 202 at once and settle the lease itself (renew, then ack, after
//! the delay) through `x-surge-lease-url`. With `SURGE_ECHO_JOURNAL=FILE`, each message it
//! answers appends `MESSAGE-ID ATTEMPT STATUS INSTANCE TRACEPARENT` to that file, so tests can
//! count every delivery and see the trace it belongs to.

mod body;
mod knobs;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use body::EchoBody;
use knobs::Knobs;

pub const INSTANCE_HEADER: &str = "x-surge-instance";

/// Runs the backend until SIGTERM or SIGINT. Returns an error message for a bad environment.
pub fn run() -> Result<(), String> {
    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse().map_err(|_| format!("PORT must be a port number, not {port:?}"))?,
        Err(_) => 8000,
    };
    let instance = std::env::var("SURGE_INSTANCE").unwrap_or_else(|_| "echo".to_owned());
    let limit =
        match std::env::var("SURGE_ECHO_CONCURRENCY") {
            Ok(limit) => {
                Some(limit.parse::<usize>().ok().filter(|&l| l > 0).ok_or_else(|| {
                    format!("SURGE_ECHO_CONCURRENCY must be a positive number, not {limit:?}")
                })?)
            }
            Err(_) => None,
        };
    let startup = match std::env::var("SURGE_ECHO_STARTUP") {
        Ok(startup) => Some(
            humantime::parse_duration(&startup)
                .map_err(|err| format!("SURGE_ECHO_STARTUP must be a duration such as 2s: {err}"))?,
        ),
        Err(_) => None,
    };
    // One thread, like one worker process: instances scale out as processes, not threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the runtime: {err}"))?;
    let idle_timeout = match std::env::var("SURGE_ECHO_IDLE_TIMEOUT") {
        Ok(idle) => Some(
            humantime::parse_duration(&idle)
                .map_err(|err| format!("SURGE_ECHO_IDLE_TIMEOUT must be a duration such as 50ms: {err}"))?,
        ),
        Err(_) => None,
    };
    let faulty = match std::env::var("SURGE_ECHO_FAULTY") {
        Ok(value) => {
            let (name, mode) = value.split_once(':').unwrap_or((value.as_str(), "503"));
            let mode = match mode {
                "503" => Fault::Unavailable,
                "hang" => Fault::Hang,
                "reset" => Fault::Reset,
                "malformed" => Fault::Malformed,
                "unhealthy" => Fault::Unhealthy,
                "slow" => Fault::Slow,
                other => {
                    return Err(format!(
                        "SURGE_ECHO_FAULTY mode {other:?} is not 503, hang, reset or malformed"
                    ))
                }
            };
            (name == instance).then_some(mode)
        }
        Err(_) => None,
    };
    let journal = std::env::var_os("SURGE_ECHO_JOURNAL").map(std::path::PathBuf::from);
    let request_log = std::env::var_os("SURGE_ECHO_REQUEST_LOG").map(std::path::PathBuf::from);
    let echo = Echo {
        journal: journal.map(Arc::from),
        request_log: request_log.map(Arc::from),
        instance: instance.into(),
        limit: limit.map(|l| Arc::new(Semaphore::new(l))),
        idle_timeout,
        faulty,
        started: Instant::now(),
    };
    runtime.block_on(async move {
        if let Some(startup) = startup {
            tokio::time::sleep(startup).await;
        }
        serve(SocketAddr::from(([127, 0, 0, 1], port)), echo).await
    })
}

/// What every request needs: the instance's name, and its concurrency limit if it has one.
#[derive(Clone)]
struct Echo {
    /// Where worker deliveries are written down.
    journal: Option<Arc<std::path::Path>>,
    /// Where every request is written down.
    request_log: Option<Arc<std::path::Path>>,
    instance: Arc<str>,
    limit: Option<Arc<Semaphore>>,
    idle_timeout: Option<Duration>,
    faulty: Option<Fault>,
    started: Instant,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Unavailable,
    Hang,
    Reset,
    Malformed,
    Unhealthy,
    Slow,
}

async fn serve(addr: SocketAddr, echo: Echo) -> Result<(), String> {
    let instance = Arc::clone(&echo.instance);
    let listener = TcpListener::bind(addr).await.map_err(|err| format!("cannot listen on {addr}: {err}"))?;
    eprintln!("surge-echo {instance} listening on {addr}");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| format!("cannot handle SIGTERM: {err}"))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if echo.faulty == Some(Fault::Malformed) {
                    tokio::spawn(answer_malformed(stream));
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let idle_timeout = echo.idle_timeout;
                let echo = echo.clone();
                let service = hyper::service::service_fn(move |req| handle(req, echo.clone()));
                let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Some(idle) = idle_timeout {
                    // Waiting for the next request's head counts as idle: close then.
                    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(idle);
                }
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    eprintln!("surge-echo {instance} stopping");
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

/// Answers health checks properly and everything else with bytes that are not HTTP.
async fn answer_malformed(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 1024];
    let Ok(read) = stream.read(&mut head).await else { return };
    let reply: &[u8] = if head[..read].starts_with(b"GET /healthz ") {
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
    } else {
        b"HTTP/1.1 2OO NOT A STATUS\r\n\x00\x01garbage\r\n\r\n"
    };
    let _ = stream.write_all(reply).await;
}

async fn handle(mut request: Request<Incoming>, echo: Echo) -> Result<Response<EchoBody>, std::io::Error> {
    if let Some(key) = websocket::upgrade_key(request.headers()) {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let _ = websocket::echo(upgraded).await;
            }
        });
        let mut response = websocket::switching(&key);
        if let Ok(value) = HeaderValue::from_str(&echo.instance) {
            response.headers_mut().insert(INSTANCE_HEADER, value);
        }
        return Ok(response);
    }
    let healthz = request.uri().path() == "/healthz";
    if let (Some(log), false) = (&echo.request_log, healthz) {
        let target = request.uri().path_and_query().map_or("/", |target| target.as_str());
        let line = format!("{} {target} {}\n", request.method(), echo.instance);
        if let Err(err) = write_journal(log, &line) {
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot write the request log: {err}\n"),
            ));
        }
    }
    match echo.faulty {
        Some(Fault::Hang) if !healthz => std::future::pending::<()>().await,
        // Failing the service makes hyper close the connection without an answer.
        Some(Fault::Reset) if !healthz => return Err(std::io::Error::other("reset on purpose")),
        Some(Fault::Slow) if !healthz => tokio::time::sleep(Duration::from_millis(50)).await,
        _ => {}
    }
    // Health checks bypass the limit: a busy service is still alive.
    let _permit = match &echo.limit {
        Some(limit) if request.uri().path() != "/healthz" => limit.acquire().await.ok(),
        _ => None,
    };
    let sick = echo.faulty == Some(Fault::Unhealthy) && echo.started.elapsed() > Duration::from_secs(1);
    let mut response = if (echo.faulty == Some(Fault::Unavailable) && !healthz) || (sick && healthz) {
        text(StatusCode::SERVICE_UNAVAILABLE, "faulty on purpose\n")
    } else if request.method() == http::Method::POST && request.uri().path() == "/job" {
        work(request, &echo).await
    } else {
        respond(request).await
    };
    if let Ok(value) = HeaderValue::from_str(&echo.instance) {
        response.headers_mut().insert(INSTANCE_HEADER, value);
    }
    Ok(response)
}

async fn respond(request: Request<Incoming>) -> Response<EchoBody> {
    if request.uri().path() == "/healthz" {
        return text(StatusCode::OK, "ok\n");
    }
    let knobs = match Knobs::parse(request.uri().query().unwrap_or("")) {
        Ok(knobs) => knobs,
        Err(message) => return text(StatusCode::BAD_REQUEST, &format!("{message}\n")),
    };
    let (parts, body) = request.into_parts();
    let body_bytes = count_body(body).await;
    if let Some(delay) = knobs.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(cpu) = knobs.cpu {
        busy_work(cpu);
    }
    if let Some(marker) = &knobs.fail_once {
        if std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "failing once\n");
        }
    }
    let mut response = shaped(&parts, &knobs, body_bytes);
    // A knob's field replaces the echo's own (Content-Type, say); repeated, it is appended.
    for (name, _) in &knobs.headers {
        response.headers_mut().remove(name.as_str());
    }
    for (name, value) in &knobs.headers {
        match (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("header={name}:{value} is not a valid field\n"),
                )
            }
        }
    }
    let etag = response.headers().get(http::header::ETAG);
    let wanted = parts.headers.get(http::header::IF_NONE_MATCH);
    if etag.is_some() && etag == wanted {
        let mut not_modified = Response::new(EchoBody::full(Bytes::new()));
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [http::header::ETAG, http::header::CACHE_CONTROL] {
            for value in response.headers().get_all(&name) {
                not_modified.headers_mut().append(name.clone(), value.clone());
            }
        }
        return not_modified;
    }
    response
}

/// The response the knobs ask for, before its added fields.
fn shaped(parts: &http::request::Parts, knobs: &Knobs, body_bytes: u64) -> Response<EchoBody> {
    let status = knobs.status.unwrap_or(StatusCode::OK);
    if let Some(bytes) = knobs.bytes {
        let mut response = Response::new(EchoBody::repeat(bytes));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        return response;
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into()))
        .collect();
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "version": format!("{:?}", parts.version),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(EchoBody::full(Bytes::from(echo.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// One message from a queue: its body's knobs say how to answer; the journal hears of it.
async fn work(request: Request<Incoming>, echo: &Echo) -> Response<EchoBody> {
    let field =
        |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let (id, attempt) = (field("x-surge-message-id"), field("x-surge-attempt"));
    let (lease_url, lease_token) = (field("x-surge-lease-url"), field("x-surge-lease-token"));
    let traceparent = field("traceparent");
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "the body broke off\n"),
    };
    let text_body = std::str::from_utf8(&body).unwrap_or("");
    let knobs = Knobs::parse(text_body).unwrap_or_default();
    if let Some(delay) = knobs.delay {
        tokio::time::sleep(delay).await;
    }
    // `fail_while=PATH`: a message that fails for as long as the file is there.
    let failing = text_body
        .split('&')
        .filter_map(|pair| pair.strip_prefix("fail_while="))
        .any(|path| std::path::Path::new(path).exists());
    let status =
        if failing { StatusCode::INTERNAL_SERVER_ERROR } else { knobs.status.unwrap_or(StatusCode::OK) };
    if text_body.split('&').any(|pair| pair == "settle=later") {
        let (journal, instance) = (echo.journal.clone(), Arc::clone(&echo.instance));
        tokio::spawn(async move {
            if let Some(delay) = knobs.delay {
                tokio::time::sleep(delay).await;
            }
            let renewed = post(&lease_url, &lease_token).await;
            let acked = post(&format!("{lease_url}/ack"), &lease_token).await;
            if let Some(journal) = journal {
                let _ =
                    write_journal(&journal, &format!("{id} {attempt} {acked} {instance} renew={renewed}\n"));
            }
        });
        return text(StatusCode::ACCEPTED, "taken; settled later\n");
    }
    if let Some(journal) = &echo.journal {
        let line = format!("{id} {attempt} {} {} {traceparent}\n", status.as_u16(), echo.instance);
        if let Err(err) = write_journal(journal, &line) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot write the journal: {err}\n"));
        }
    }
    text(status, "worked\n")
}

/// One short write to a file opened for appending lands whole, whoever else appends.
fn write_journal(journal: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new().create(true).append(true).open(journal)?.write_all(line.as_bytes())
}

/// POSTs to the worker's lease URL with its token; the status answered, or 0.
async fn post(url: &str, token: &str) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let Ok(request) =
        Request::post(url).header("x-surge-lease-token", token).body(http_body_util::Empty::new())
    else {
        return 0;
    };
    match client.request(request).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// Reads the request body to its end without keeping it, so uploads of any size stream.
async fn count_body(mut body: Incoming) -> u64 {
    let mut total = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
        }
    }
    total
}

/// Spins the CPU like a request that computes, rather than one that waits.
fn busy_work(duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn text(status: StatusCode, text: &str) -> Response<EchoBody> {
    let mut response = Response::new(EchoBody::full(Bytes::copy_from_slice(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
