//! Shutdown's word to a listener's open connections, and the wait until they have all closed.
//!
//! tokio's `watch` does the same, but a connection waiting on it keeps a `changed()` future of
//! 120 bytes, and every idle keep-alive connection waits on it. Here a connection keeps only
//! its [`Watch`] (32 bytes) and polls it beside its socket: its task's waker is registered
//! once, in a slab the [`Signal`] wakes from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use slab::Slab;
use tokio::sync::Notify;

/// The listener's side: starts the drain and waits for the watches to be dropped. Dropped, it
/// starts the drain, so that no connection outlives its listener's serve unasked.
pub(crate) struct Signal {
    shared: Arc<Shared>,
}

/// A connection's side: whether the drain has begun, and a wake-up when it does.
pub(crate) struct Watch {
    shared: Arc<Shared>,
    /// This watch's entry in `Shared::wakers`, there from its creation to its drop.
    key: usize,
    /// The waker last registered, so that a poll from the same task takes no lock.
    registered: Option<Waker>,
}

struct Shared {
    draining: AtomicBool,
    /// One entry per live watch: the waker of the task that last polled it.
    wakers: Mutex<Slab<Option<Waker>>>,
    /// Told when the last watch is dropped; `drained` enables its wait before it checks.
    all_dropped: Notify,
}

impl Shared {
    /// The lock is held only for slab operations, which cannot leave the slab inconsistent, so
    /// a poisoned lock guards nothing broken.
    fn wakers(&self) -> MutexGuard<'_, Slab<Option<Waker>>> {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(self: &Arc<Self>) -> Watch {
        let key = self.wakers().insert(None);
        Watch { shared: Arc::clone(self), key, registered: None }
    }
}

impl Signal {
    pub(crate) fn new() -> (Signal, Watch) {
        let shared = Arc::new(Shared {
            draining: AtomicBool::new(false),
            wakers: Mutex::new(Slab::new()),
            all_dropped: Notify::new(),
        });
        let watch = shared.watch();
        (Signal { shared }, watch)
    }

    /// Tells every watch, now and later, that the drain has begun.
    pub(crate) fn drain(&self) {
        if self.shared.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        // Woken after the lock is released: the woken connections drop their watches, which
        // takes it again. Their wakers are not needed again, the flag being set.
        let wakers: Vec<Waker> =
            self.shared.wakers().iter_mut().filter_map(|(_, waker)| waker.take()).collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Resolves once every watch has been dropped.
    pub(crate) async fn drained(&self) {
        loop {
            // Enabled before the check, so that a last drop in between is not missed.
            let notified = self.shared.all_dropped.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.wakers().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        self.drain();
    }
}

impl Watch {
    pub(crate) fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Ready once the drain has begun; until then the task polling is woken when it does.
    pub(crate) fn poll_draining(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_draining() {
            return Poll::Ready(());
        }
        if !self.registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            // The waker it replaces is dropped after the lock is released.
            let replaced =
                self.shared.wakers().get_mut(self.key).and_then(|entry| entry.replace(waker.clone()));
            drop(replaced);
            self.registered = Some(waker);
            // A drain that began before the registration may have missed it; one that began
            // after sees it, since both take the lock.
            if self.is_draining() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    pub(crate) async fn draining(&mut self) {
        std::future::poll_fn(|cx| self.poll_draining(cx)).await;
    }
}

impl Clone for Watch {
    fn clone(&self) -> Watch {
        self.shared.watch()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let (removed, last) = {
            let mut wakers = self.shared.wakers();
            (wakers.try_remove(self.key), wakers.is_empty())
        };
        debug_assert!(removed.is_some(), "a watch's entry lives as long as the watch");
        if last {
            self.shared.all_dropped.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Under paused time a wait that is never woken runs into this bound instead of hanging.
    const NEVER: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_waiting_watch_is_woken_by_the_drain_and_stays_draining() {
        let (signal, mut watch) = Signal::new();
        let mut late = watch.clone();
        let waiting = tokio::spawn(async move { tokio::time::timeout(NEVER, watch.draining()).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the watch waits until the drain begins");
        assert!(signal.shared.wakers().iter().any(|(_, waker)| waker.is_some()), "its waker is registered");
        signal.drain();
        assert!(waiting.await.expect("the waiting task").is_ok(), "the drain wakes it");
        // A watch first polled after the drain began is ready at once.
        assert!(late.poll_draining(&mut Context::from_waker(Waker::noop())).is_ready());
        assert!(late.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn drained_resolves_once_every_watch_is_dropped() {
        let (signal, watch) = Signal::new();
        let other = watch.clone();
        let signal = Arc::new(signal);
        let drained = tokio::spawn({
            let signal = Arc::clone(&signal);
            async move { tokio::time::timeout(NEVER, signal.drained()).await }
        });
        drop(watch);
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "one watch is still held");
        drop(other);
        assert!(drained.await.expect("the waiting task").is_ok(), "the last drop ends the wait");
    }

    #[test]
    fn dropping_the_signal_starts_the_drain() {
        let (signal, mut watch) = Signal::new();
        drop(signal);
        assert!(watch.is_draining());
        assert!(watch.poll_draining(&mut Context::from_waker(Waker::noop())).is_ready());
    }

    #[test]
    fn a_watch_takes_a_pointer_a_key_and_a_waker() {
        assert_eq!(std::mem::size_of::<Watch>(), 4 * std::mem::size_of::<usize>());
    }
}
