//! Any bytes as a request head: never a panic, and a head that parses is unambiguous.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use surge_http1::head::parse_request;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = parse_request(&mut buf) {
        assert!(buf.len() < data.len(), "a head was consumed");
        let headers = head.request.headers();
        assert!(headers.get_all("host").iter().count() <= 1, "one Host at most");
        let framed_twice = headers.contains_key("content-length") && headers.contains_key("transfer-encoding");
        assert!(!framed_twice, "never both Content-Length and Transfer-Encoding");
        assert!(head.request.method().as_str().bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_'));
    }
});
