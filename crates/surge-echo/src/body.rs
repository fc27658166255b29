//! Response bodies: a small buffer, or N bytes streamed in 64 KiB chunks without allocating.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];

pub enum EchoBody {
    Full(Option<Bytes>),
    Repeat { remaining: u64 },
}

impl EchoBody {
    pub fn full(bytes: Bytes) -> Self {
        EchoBody::Full(Some(bytes))
    }

    pub fn repeat(len: u64) -> Self {
        EchoBody::Repeat { remaining: len }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match self.get_mut() {
            EchoBody::Full(bytes) => bytes.take().filter(|b| !b.is_empty()),
            EchoBody::Repeat { remaining } if *remaining == 0 => None,
            EchoBody::Repeat { remaining } => {
                let len = usize::try_from(*remaining).map_or(CHUNK_LEN, |r| r.min(CHUNK_LEN));
                *remaining -= len as u64;
                Some(Bytes::from_static(&CHUNK[..len]))
            }
        };
        Poll::Ready(frame.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EchoBody::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            EchoBody::Repeat { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EchoBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            EchoBody::Repeat { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}
