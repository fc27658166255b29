//! An HTTP/2 response a client stops reading. hyper polls a stream's body only while the
//! client's flow-control window has room, so a client that grants none, and answers pings,
//! would hold the body (and with it the instance's slot and the connection to the instance)
//! for as long as its connection lives. Each response body is watched instead: once it has
//! handed hyper a piece and is not asked for the next within `gateway.send_timeout`, it is
//! dropped, which frees what it held, and the stream fails when hyper polls it again. Waiting
//! on the instance is not the client's doing and is not bounded here. hyper asks for the next
//! piece once the last has gone through the client's window, so pieces are handed over at most
//! 16 KiB at a time: a client that reads slowly, but reads, is not taken for one that stopped.
//! The HTTP/1.1 path bounds the same wait in its writer.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::wire::BoxError;

/// The most handed to hyper at once: an HTTP/2 frame's default size.
const PIECE: usize = 16 * 1024;

pub(crate) struct Watched<B> {
    shared: Arc<Mutex<Shared<B>>>,
    limit: Duration,
    /// Ended with the body, rather than left to notice at its next wake-up.
    watcher: Option<tokio::task::AbortHandle>,
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

struct Shared<B> {
    /// `None` once given up on.
    body: Option<B>,
    /// What is left of a piece larger than [`PIECE`].
    rest: Bytes,
    /// When the last piece was handed over, while the next has not been asked for.
    handed_at: Option<Instant>,
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B> Watched<B>
where
    B: Body + Unpin + Send + 'static,
{
    /// Watches `body` (on the runtime it is called on) for a client that stops reading.
    pub(crate) fn new(body: B, limit: Duration) -> Self {
        let done = body.is_end_stream();
        let shared = Arc::new(Mutex::new(Shared { body: Some(body), rest: Bytes::new(), handed_at: None }));
        let watcher = (!done).then(|| {
            tokio::spawn(watch(Arc::downgrade(&shared), limit, Instant::now() + limit)).abort_handle()
        });
        Watched { shared, limit, watcher }
    }
}

/// Wakes every `limit` (or when the piece handed over last comes of age) until the body is
/// gone, and drops it once the client has let a piece wait for `limit`.
async fn watch<B>(shared: Weak<Mutex<Shared<B>>>, limit: Duration, first: Instant) {
    let mut wake = first;
    loop {
        tokio::time::sleep_until(wake).await;
        let Some(shared) = shared.upgrade() else { return };
        let mut shared = lock(&shared);
        let now = Instant::now();
        match shared.handed_at {
            Some(at) if now >= at + limit => {
                tracing::debug!(
                    "HTTP/2 response: the client read nothing for {limit:?} (gateway.send_timeout)"
                );
                let body = shared.body.take();
                // Dropped outside the lock: it gives back the instance's slot and connection.
                drop(shared);
                drop(body);
                return;
            }
            Some(at) => wake = at + limit,
            None => wake = now + limit,
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let limit = self.limit;
        let mut guard = lock(&self.shared);
        // The guard's fields, borrowed apart.
        let shared = &mut *guard;
        shared.handed_at = None;
        let Some(body) = shared.body.as_mut() else {
            let cut = format!("the client read nothing for {limit:?} (gateway.send_timeout)");
            return Poll::Ready(Some(Err(cut.into())));
        };
        let trailers = if shared.rest.is_empty() {
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        shared.rest = data;
                        None
                    }
                    Err(trailers) => Some(trailers),
                },
                other => return other.map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            }
        } else {
            None
        };
        let frame = trailers.unwrap_or_else(|| {
            let size = shared.rest.len().min(PIECE);
            Frame::data(shared.rest.split_to(size))
        });
        shared.handed_at = Some(Instant::now());
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        // A body given up on is not ended: the next poll reports why.
        let shared = lock(&self.shared);
        shared.rest.is_empty() && shared.body.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        let mut hint = shared.body.as_ref().map_or_else(SizeHint::default, Body::size_hint);
        let rest = shared.rest.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(hint.lower().saturating_add(rest));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Two pieces, then nothing until the instance sends more; counts itself alive.
    struct Upstream {
        pieces: Vec<Bytes>,
        _alive: Arc<()>,
    }

    impl Body for Upstream {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.pieces.pop() {
                Some(piece) => Poll::Ready(Some(Ok(Frame::data(piece)))),
                None => Poll::Pending,
            }
        }
    }

    fn upstream() -> (Upstream, Arc<()>) {
        let alive = Arc::new(());
        let pieces = vec![Bytes::from_static(b"two"), Bytes::from_static(b"one")];
        (Upstream { pieces, _alive: Arc::clone(&alive) }, alive)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_asking_loses_the_body_after_the_limit() {
        let (body, alive) = upstream();
        let mut watched = Watched::new(body, Duration::from_secs(60));
        let first = watched.frame().await.expect("a piece").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"one")));
        // The client grants no window: hyper asks for nothing more.
        tokio::time::advance(Duration::from_secs(59)).await;
        settle().await;
        assert_eq!(Arc::strong_count(&alive), 2, "held just before the limit");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(Arc::strong_count(&alive), 1, "dropped at the limit: the instance's slot is free");
        let cut = watched.frame().await.expect("an answer").expect_err("the stream fails");
        assert!(cut.to_string().contains("gateway.send_timeout"), "{cut}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_piece_is_handed_over_16_kib_at_a_time() {
        let alive = Arc::new(());
        let large = Bytes::from(vec![b'x'; 40 * 1024]);
        let body = Upstream { pieces: vec![large], _alive: Arc::clone(&alive) };
        let mut watched = Watched::new(body, Duration::from_secs(60));
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let piece = watched.frame().await.expect("a piece").expect("data");
            sizes.push(piece.into_data().map(|data| data.len()).unwrap_or(0));
            // Each piece takes the client 59 s: slow, but it reads.
            tokio::time::advance(Duration::from_secs(59)).await;
            settle().await;
        }
        assert_eq!(sizes, [16 * 1024, 16 * 1024, 8 * 1024]);
        assert_eq!(Arc::strong_count(&alive), 2, "a client that reads is never cut off");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_on_the_instance_is_not_the_clients_doing() {
        let (body, alive) = upstream();
        let mut watched = Watched::new(body, Duration::from_secs(60));
        let _ = watched.frame().await;
        let _ = watched.frame().await;
        // Asked for a third piece the instance has not sent: pending, however long.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut watched).poll_frame(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(600)).await;
        settle().await;
        assert_eq!(Arc::strong_count(&alive), 2, "still held");
        drop(watched);
        settle().await;
        assert_eq!(Arc::strong_count(&alive), 1);
    }
}
