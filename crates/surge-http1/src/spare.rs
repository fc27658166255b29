//! Header maps kept for reuse, a few per thread.
//!
//! A map with room for a typical head's dozen fields takes over a kilobyte, more than glibc's
//! per-thread cache serves (1,032 bytes), so a new map per head went to malloc's slow path: twice
//! per proxied request (the request's head and the response's), and twice more to free them.
//! The gateway hands a map back once its head is on the wire; the next head parsed on that
//! thread takes it, cleared.

use std::cell::RefCell;

use http::HeaderMap;

/// How many cleared maps a thread keeps: enough for the heads in flight between a parse and a
/// write on one busy thread, few enough that keeping them costs next to nothing.
const KEPT_PER_THREAD: usize = 64;
/// A map with room for more fields than this is freed, so that a burst of huge heads does not
/// stay resident.
const LARGEST_KEPT: usize = 128;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for at least `capacity` fields: a spare one if this thread has one.
pub fn header_map(capacity: usize) -> HeaderMap {
    let spare = SPARE.try_with(|spare| spare.borrow_mut().pop()).ok().flatten();
    match spare {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Hands `map` back for a later head on this thread; its fields are dropped now.
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > LARGEST_KEPT {
        return;
    }
    map.clear();
    // During the thread's teardown there is nowhere to keep it: it is simply freed.
    let _ = SPARE.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < KEPT_PER_THREAD {
            spare.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare_count() -> usize {
        SPARE.with_borrow(Vec::len)
    }

    #[test]
    fn a_recycled_map_comes_back_empty_with_its_room() {
        let mut map = header_map(12);
        map.insert("x-one", "1".parse().expect("valid"));
        let room = map.capacity();
        let before = spare_count();
        recycle(map);
        assert_eq!(spare_count(), before + 1);
        let again = header_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        assert_eq!(spare_count(), before);
    }

    #[test]
    fn a_spare_map_grows_to_the_room_asked_for() {
        recycle(header_map(4));
        let map = header_map(40);
        assert!(map.capacity() >= 40);
    }

    #[test]
    fn huge_and_empty_maps_are_not_kept_and_the_spares_are_bounded() {
        let before = spare_count();
        recycle(HeaderMap::with_capacity(LARGEST_KEPT * 2));
        recycle(HeaderMap::new());
        assert_eq!(spare_count(), before);
        for _ in 0..KEPT_PER_THREAD + 10 {
            recycle(HeaderMap::with_capacity(8));
        }
        assert_eq!(spare_count(), KEPT_PER_THREAD);
    }
}
