//! A chunked body decodes the same however the connection splits it: the first byte picks the
//! size of the pieces, the rest is the wire.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use surge_http1::{Decoded, Decoder};

/// The body, the error, or `None` if the wire ended first; and how much of the wire was left.
fn decode(wire: &[u8], step: usize) -> (Result<Option<Vec<u8>>, surge_http1::DecodeError>, usize) {
    let mut decoder = Decoder::chunked();
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut pieces = wire.chunks(step.max(1));
    loop {
        match decoder.decode(&mut buf) {
            Err(err) => return (Err(err), 0),
            Ok(Decoded::Data(data)) => body.extend_from_slice(&data),
            Ok(Decoded::Done) => {
                let left = buf.len() + pieces.map(<[u8]>::len).sum::<usize>();
                return (Ok(Some(body)), left);
            }
            Ok(Decoded::NeedMore) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return (Ok(None), 0),
            },
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else { return };
    let whole = decode(wire, wire.len());
    let split = decode(wire, usize::from(step % 16) + 1);
    match (&whole.0, &split.0) {
        (Err(_), Err(_)) => {}
        _ => assert_eq!(whole, split, "the same wire decoded differently in pieces"),
    }
});
