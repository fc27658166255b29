//! Every request gets an id (`x-request-id`) and a W3C trace context (`traceparent`), so its
//! access log line, the instance's own logs and a queued job it made can be tied together.
//!
//! A client's well-formed `x-request-id` is kept (a load balancer in front may have set it);
//! otherwise the id is the request's trace id. A client's valid `traceparent` keeps its trace id
//! and flags, and gets the gateway's own span as its parent; an invalid or missing one starts a
//! new, sampled trace. The rules are the W3C Trace Context recommendation's, level 1.

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest client request id kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// A new sampled trace, its first span.
    pub fn start() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&nonzero_u64().to_be_bytes());
        trace_id[8..].copy_from_slice(&fastrand::u64(..).to_be_bytes());
        TraceContext { trace_id, parent_id: nonzero_u64().to_be_bytes(), flags: 1 }
    }

    /// The same trace, with a new span of the gateway's as the parent of what follows.
    pub fn child(&self) -> Self {
        TraceContext { parent_id: nonzero_u64().to_be_bytes(), ..*self }
    }

    /// `traceparent` as received: version `00` exactly; a later version by its first four
    /// fields (as the recommendation asks); never an all-zero id or version `ff`.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, byte) in parent_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, parent_id, flags })
    }

    /// As `traceparent` says it, version `00`, in one buffer whose bytes 3..35 are the trace id
    /// in hex.
    fn text(&self) -> Bytes {
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut text[3..35]);
        text[35] = b'-';
        hex_into(&self.parent_id, &mut text[36..52]);
        text[52] = b'-';
        hex_into(&[self.flags], &mut text[53..55]);
        Bytes::copy_from_slice(&text)
    }

    pub fn trace_id_hex(&self) -> String {
        let mut text = [0u8; 32];
        hex_into(&self.trace_id, &mut text);
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// A request's id and trace, as set on it.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub request_id: HeaderValue,
    pub trace: TraceContext,
}

/// Gives the request its id and trace context, in place of what the client sent unless that
/// was well-formed.
pub fn identify(headers: &mut HeaderMap) -> RequestIds {
    let received = headers.get(&TRACEPARENT).and_then(|value| TraceContext::parse(value.as_bytes()));
    let trace = match received {
        Some(context) => context.child(),
        None => {
            // An invalid one's state must not reach the instance beside ours (the invalid
            // one itself, or several, are replaced below).
            headers.remove(&TRACESTATE);
            TraceContext::start()
        }
    };
    let traceparent = trace.text();
    let mut given = headers.get_all(&REQUEST_ID).iter();
    let kept = match (given.next(), given.next()) {
        (Some(one), None) if is_sane_request_id(one.as_bytes()) => Some(one.clone()),
        _ => None,
    };
    let request_id = match kept {
        Some(id) => id,
        None => {
            // The trace id, as the traceparent already spells it: no second buffer.
            let id = HeaderValue::from_maybe_shared(traceparent.slice(3..35))
                .unwrap_or_else(|_| HeaderValue::from_static("-"));
            headers.insert(REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let traceparent =
        HeaderValue::from_maybe_shared(traceparent).unwrap_or_else(|_| HeaderValue::from_static(""));
    headers.insert(TRACEPARENT.clone(), traceparent);
    RequestIds { request_id, trace }
}

/// Short, and of characters that cannot break a log line or a header.
fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id.iter().all(|&b| b.is_ascii_alphanumeric() || b"-_.:+=/".contains(&b))
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(byte >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(byte & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_as_the_recommendation_says() {
        let context = TraceContext::parse(GIVEN.as_bytes()).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.flags, 1);
        assert_eq!(context.text(), GIVEN);
        let refused = [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // 00 has no more fields
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",       // version ff
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",       // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",       // zero parent id
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",       // upper case
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",       // dash misplaced
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",          // short
            "",
        ];
        for value in refused {
            assert_eq!(TraceContext::parse(value.as_bytes()), None, "{value}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(TraceContext::parse(later.as_bytes()).is_some(), "a later version by its first fields");
    }

    #[test]
    fn a_request_keeps_its_trace_and_a_sane_id_and_gets_ours_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(GIVEN));
        headers.insert(&REQUEST_ID, HeaderValue::from_static("lb-7f3a.22"));
        let ids = identify(&mut headers);
        assert_eq!(ids.request_id, "lb-7f3a.22");
        let sent = TraceContext::parse(headers[&TRACEPARENT].as_bytes()).expect("valid");
        assert_eq!(sent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "the same trace");
        assert_ne!(sent.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7], "the gateway's span");

        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        headers.insert("tracestate", HeaderValue::from_static("vendor=1"));
        headers.insert(&REQUEST_ID, HeaderValue::from_static("has space"));
        let ids = identify(&mut headers);
        assert_eq!(ids.request_id.to_str().ok(), Some(ids.trace.trace_id_hex().as_str()), "the trace id");
        assert_eq!(headers.get_all(&TRACEPARENT).iter().count(), 1);
        assert!(!headers.contains_key("tracestate"), "its state went with the bad parent");
        assert_eq!(ids.trace.flags, 1, "a new trace is sampled");

        let mut headers = HeaderMap::new();
        headers.append(&REQUEST_ID, HeaderValue::from_static("a"));
        headers.append(&REQUEST_ID, HeaderValue::from_static("b"));
        let ids = identify(&mut headers);
        assert_eq!(headers.get_all(&REQUEST_ID).iter().count(), 1, "two ids are one of ours");
        assert_eq!(ids.request_id.len(), 32);
    }
}
