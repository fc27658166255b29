//! What the server adds to the shared HTTP/1.1 framing (`surge_http1`): recognising the
//! HTTP/2 preface, and the cached `Date` value.

use bytes::Bytes;

/// The preface an HTTP/2 client with prior knowledge opens with (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `bytes` could still be, or is, the HTTP/2 preface.
pub(super) fn may_be_h2_preface(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    bytes[..n] == H2_PREFACE[..n]
}

/// The cached `Date` value, rendered at most once a second.
pub(super) fn http_date() -> Bytes {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, Bytes)> = const { RefCell::new((0, Bytes::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(cached_second, value)| {
        if *cached_second != second || value.is_empty() {
            *cached_second = second;
            *value = Bytes::from(httpdate::fmt_http_date(now));
        }
        value.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_h2_preface_is_recognised_from_its_first_bytes() {
        assert!(may_be_h2_preface(b"PRI * HT"));
        assert!(may_be_h2_preface(H2_PREFACE));
        assert!(!may_be_h2_preface(b"GET / HTTP/1.1\r\n"));
    }
}
