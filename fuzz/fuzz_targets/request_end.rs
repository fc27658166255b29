//! Where a request ends, by Surge's parser and by a plain reading of RFC 9112 on httparse's
//! primitives: whenever both accept a request, they must agree on its last byte. A proxy and a
//! server that disagree there are how requests get smuggled. (Surge may refuse what the plain
//! reading accepts: it is stricter on purpose.)
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use surge_http1::head::parse_request;

/// Surge: the head, then its body's framing.
fn surge(data: &[u8]) -> Option<usize> {
    let mut buf = BytesMut::from(data);
    let head = parse_request(&mut buf).ok()??;
    let head_length = data.len() - buf.len();
    let before = buf.len();
    let mut decoder = head.framing.decoder();
    match decoder.skip(&mut buf) {
        Ok(true) => Some(head_length + before - buf.len()),
        _ => None,
    }
}

/// The plain reading: one Content-Length of digits, or `Transfer-Encoding: chunked`, not both.
fn reference(data: &[u8]) -> Option<usize> {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(head_length) = request.parse(data).ok()? else { return None };
    let (mut length, mut coding) = (None, None);
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            let digits = std::str::from_utf8(field.value).ok()?.trim();
            if length.is_some() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            length = Some(digits.parse::<u64>().ok()?);
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if coding.is_some() {
                return None;
            }
            coding = Some(field.value);
        }
    }
    let body = &data[head_length..];
    match (length, coding) {
        (Some(_), Some(_)) => None,
        (None, Some(coding)) if coding.trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            chunked_end(body).map(|end| head_length + end)
        }
        (None, Some(_)) => None,
        (Some(length), None) => {
            let length = usize::try_from(length).ok()?;
            (body.len() >= length).then_some(head_length + length)
        }
        (None, None) => Some(head_length),
    }
}

fn chunked_end(body: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let httparse::Status::Complete((used, size)) = httparse::parse_chunk_size(&body[at..]).ok()? else {
            return None;
        };
        at += used;
        if size == 0 {
            // Trailer lines until an empty one.
            loop {
                let line = body[at..].windows(2).position(|pair| pair == b"\r\n")?;
                at += line + 2;
                if line == 0 {
                    return Some(at);
                }
            }
        }
        at = at.checked_add(usize::try_from(size).ok()?)?;
        if body.get(at..at.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

fuzz_target!(|data: &[u8]| {
    if let (Some(surge), Some(reference)) = (surge(data), reference(data)) {
        assert_eq!(surge, reference, "Surge and the plain reading disagree on where the request ends");
    }
});
