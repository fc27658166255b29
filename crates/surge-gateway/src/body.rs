//! The response body the gateway sends: an instance's body streamed through, or a small one
//! of the gateway's own. It holds the request's in-flight guards, so an instance counts a
//! request as in flight until the last byte has left, not just until the headers did.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use surge_metrics::Gauge;
use surge_pool::InFlight;

pin_project_lite::pin_project! {
    pub struct GatewayBody {
        #[pin]
        inner: Inner,
        instance: Option<InFlight>,
        gauge: Option<GaugeGuard>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner {
        Upstream { #[pin] body: Incoming },
        Full { bytes: Option<Bytes> },
    }
}

impl GatewayBody {
    pub fn full(bytes: Bytes) -> Self {
        GatewayBody { inner: Inner::Full { bytes: Some(bytes) }, instance: None, gauge: None }
    }

    pub(crate) fn upstream(body: Incoming, instance: InFlight) -> Self {
        GatewayBody { inner: Inner::Upstream { body }, instance: Some(instance), gauge: None }
    }

    /// Keeps the gauge incremented until the body is done.
    pub(crate) fn hold(&mut self, guard: GaugeGuard) {
        self.gauge = Some(guard);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().inner.project() {
            InnerProj::Upstream { body } => body.poll_frame(cx),
            InnerProj::Full { bytes } => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Full { bytes } => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Full { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
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

pin_project_lite::pin_project! {
    /// A request body on its way to an instance: kept whole when small (so a failed try can be
    /// sent again), streamed otherwise.
    #[project = RequestBodyProj]
    pub enum RequestBody {
        Kept { bytes: Option<Bytes> },
        Streaming { #[pin] body: Incoming },
    }
}

/// The body of one request across its tries.
pub(crate) enum Replay {
    Kept(Bytes),
    Streaming(Option<Incoming>),
}

impl RequestBody {
    /// Keeps bodies of known size up to the replay limit; streams the rest.
    pub(crate) async fn prepare(body: Incoming) -> Result<Replay, hyper::Error> {
        use http_body_util::BodyExt;
        if body.is_end_stream() {
            return Ok(Replay::Kept(Bytes::new()));
        }
        match body.size_hint().exact() {
            Some(len) if len <= crate::proxy::replayable_limit() => {
                Ok(Replay::Kept(body.collect().await?.to_bytes()))
            }
            _ => Ok(Replay::Streaming(Some(body))),
        }
    }
}

impl Replay {
    /// The body for the next try; a streamed body can be sent only once.
    pub(crate) fn for_try(&mut self) -> Option<RequestBody> {
        match self {
            Replay::Kept(bytes) => Some(RequestBody::Kept { bytes: Some(bytes.clone()) }),
            Replay::Streaming(body) => body.take().map(|body| RequestBody::Streaming { body }),
        }
    }

    pub(crate) fn replayable(&self) -> bool {
        matches!(self, Replay::Kept(_))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            RequestBodyProj::Streaming { body } => body.poll_frame(cx),
            RequestBodyProj::Kept { bytes } => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming { body } => body.is_end_stream(),
            RequestBody::Kept { bytes } => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming { body } => body.size_hint(),
            RequestBody::Kept { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
