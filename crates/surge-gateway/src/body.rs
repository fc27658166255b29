//! Bodies in both directions. A request body is kept whole when small, so a failed try can be
//! sent again, and streamed otherwise. The response body the gateway sends is an instance's
//! streamed through, or a small one of the gateway's own; it holds the request's in-flight
//! guards, so an instance counts a request as in flight until the last byte has left, not just
//! until the headers did.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use surge_metrics::Gauge;
use surge_pool::InFlight;

use crate::access_log::{AccessLog, Entry};
use crate::client::Http1Body;
use crate::server::ClientBody;
use crate::wire::BoxError;

/// Bodies up to this size are kept, so that a failed try can be sent again elsewhere.
const REPLAYABLE_LIMIT: u64 = 64 * 1024;

pin_project_lite::pin_project! {
    pub struct GatewayBody {
        #[pin]
        inner: Payload<Source>,
        instance: Option<InFlight>,
        gauge: Option<GaugeGuard>,
        log: Option<Box<Logged>>,
    }
}

impl GatewayBody {
    pub fn full(bytes: Bytes) -> Self {
        GatewayBody { inner: Payload::Kept { bytes: Some(bytes) }, instance: None, gauge: None, log: None }
    }

    pub(crate) fn upstream(body: UpstreamBody, instance: InFlight) -> Self {
        GatewayBody {
            inner: Payload::Streaming { body: http_body_util::Either::Left(body) },
            instance: Some(instance),
            gauge: None,
            log: None,
        }
    }

    /// A body of the gateway's own that streams (a file's).
    pub(crate) fn streaming<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        let body = body.map_err(Into::into).boxed_unsync();
        GatewayBody {
            inner: Payload::Streaming { body: http_body_util::Either::Right(body) },
            instance: None,
            gauge: None,
            log: None,
        }
    }

    /// The instance that answered, for an instance's response.
    pub(crate) fn instance_id(&self) -> Option<&str> {
        self.instance.as_ref().map(|in_flight| in_flight.instance().id.as_str())
    }

    /// Keeps the gauge incremented until the body is done.
    pub(crate) fn hold(&mut self, guard: GaugeGuard) {
        self.gauge = Some(guard);
    }

    /// Writes `entry` to the access log once the body is done, with the bytes it sent.
    pub(crate) fn log(&mut self, mut entry: Entry, log: AccessLog, start: Instant) {
        entry.instance = self.instance_id().map(str::to_owned);
        if entry.instance.is_some() {
            entry.tries = entry.tries.or(Some(1));
        }
        entry.completed = self.inner.is_end_stream();
        self.log = Some(Box::new(Logged { entry, log, start }));
    }
}

/// An access log entry waiting for its response body to end (or be dropped, when the client
/// leaves first).
pub(crate) struct Logged {
    entry: Entry,
    log: AccessLog,
    start: Instant,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let mut entry = std::mem::replace(&mut self.entry, Entry::placeholder());
        entry.duration = self.start.elapsed();
        self.log.record(entry);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(logged) = this.log {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    logged.entry.bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
                    logged.entry.completed = this.inner.is_end_stream();
                }
                Poll::Ready(None) => logged.entry.completed = true,
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts one request in a gauge for as long as it lives.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An instance's response body: read by the gateway's own HTTP/1.1 client, or by hyper's.
pub type UpstreamBody = http_body_util::Either<Http1Body, Incoming>;

/// Where a streamed response body comes from: an instance, or the gateway itself (files).
type Source =
    http_body_util::Either<UpstreamBody, http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>;

pin_project_lite::pin_project! {
    /// A body kept whole (small request bodies, so a failed try can be sent again; the
    /// gateway's own answers) or streamed through: a client's request body, or an instance's
    /// response body.
    #[project = PayloadProj]
    pub enum Payload<B> {
        Kept { bytes: Option<Bytes> },
        Streaming { #[pin] body: B },
    }
}

impl Payload<ClientBody> {
    /// Whether the body should be read whole before the request goes on: a known size within
    /// the replay limit (an empty body is whole already).
    pub(crate) fn worth_keeping(body: &ClientBody) -> bool {
        !body.is_end_stream() && body.size_hint().exact().is_some_and(|len| len <= REPLAYABLE_LIMIT)
    }

    /// The body as it will be sent: empty and kept, or streamed.
    pub(crate) fn passed_on(body: ClientBody) -> Self {
        if body.is_end_stream() {
            Payload::Kept { bytes: None }
        } else {
            Payload::Streaming { body }
        }
    }

    /// A copy for another try; a streamed body can be sent only once.
    pub(crate) fn try_clone(&self) -> Option<Self> {
        match self {
            Payload::Kept { bytes } => Some(Payload::Kept { bytes: bytes.clone() }),
            Payload::Streaming { .. } => None,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Payload<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            PayloadProj::Streaming { body } => body.poll_frame(cx),
            PayloadProj::Kept { bytes } => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Payload::Streaming { body } => body.is_end_stream(),
            Payload::Kept { bytes } => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Payload::Streaming { body } => body.size_hint(),
            Payload::Kept { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
