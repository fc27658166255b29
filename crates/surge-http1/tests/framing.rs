//! Properties of the framing, over generated messages: whatever the body, its chunking, its
//! extensions and trailers, and however the connection splits the bytes, the decoder gives the
//! body back and stops exactly at its end; a head with a Content-Length is framed by it.

use bytes::BytesMut;
use proptest::prelude::*;
use surge_http1::head::parse_request;
use surge_http1::{Decoded, Decoder, RequestFraming};

/// A chunked encoding of `body` cut at `cuts`, each chunk with an extension or not, then
/// `trailers`.
fn encode(body: &[u8], cuts: &[usize], extensions: &[bool], trailers: &[(String, String)]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    ends.push(body.len());
    ends.sort_unstable();
    for (i, end) in ends.into_iter().enumerate() {
        if end <= start {
            continue;
        }
        wire.extend_from_slice(format!("{:x}", end - start).as_bytes());
        if extensions.get(i).copied().unwrap_or(false) {
            wire.extend_from_slice(b";name=\"va;lue\"");
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&body[start..end]);
        wire.extend_from_slice(b"\r\n");
        start = end;
    }
    wire.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

/// The body, and how many bytes of `wire` were left after its end.
fn decode(wire: &[u8], step: usize) -> (Vec<u8>, usize) {
    let mut decoder = Decoder::chunked();
    let (mut buf, mut body) = (BytesMut::new(), Vec::new());
    let mut pieces = wire.chunks(step);
    loop {
        match decoder.decode(&mut buf).expect("valid framing") {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::Done => return (body, buf.len() + pieces.map(<[u8]>::len).sum::<usize>()),
            Decoded::NeedMore => buf.extend_from_slice(pieces.next().expect("the body ends")),
        }
    }
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9-]{0,15}"
}

proptest! {
    #[test]
    fn a_chunked_body_comes_back_whole_and_ends_where_it_ends(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        extensions in proptest::collection::vec(any::<bool>(), 0..9),
        trailers in proptest::collection::vec((token(), "[ -~]{0,20}"), 0..4),
        step in 1usize..64,
        after in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut wire = encode(&body, &cuts, &extensions, &trailers);
        let encoded = wire.len();
        wire.extend_from_slice(&after);
        let (decoded, left) = decode(&wire, step);
        prop_assert_eq!(decoded, body);
        prop_assert_eq!(left, wire.len() - encoded);
    }

    #[test]
    fn a_head_with_a_length_is_framed_by_it(
        method in "[A-Z]{1,8}",
        path in "/[a-z0-9/._~-]{0,40}",
        fields in proptest::collection::vec((token(), "[!-~][ -~]{0,30}[!-~]"), 0..12),
        length in 0u64..100_000,
        after in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: example.test\r\n");
        let framing_fields = ["host", "content-length", "transfer-encoding", "connection", "expect", "upgrade"];
        for (name, value) in &fields {
            if !framing_fields.contains(&name.to_ascii_lowercase().as_str()) {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
        let mut buf = BytesMut::from(head.as_bytes());
        buf.extend_from_slice(&after);
        let parsed = parse_request(&mut buf).expect("valid").expect("complete");
        let framing = if length == 0 { RequestFraming::Empty } else { RequestFraming::Length(length) };
        prop_assert_eq!(parsed.framing, framing);
        prop_assert_eq!(&buf[..], &after[..], "the head, and nothing more, was taken");
        prop_assert_eq!(parsed.request.method().as_str(), method.as_str());
    }
}
