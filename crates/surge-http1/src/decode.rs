//! Message bodies off the wire, as a pure state machine over a connection's read buffer: a
//! known length, chunked (RFC 9112 §7.1), or (responses only) everything until the connection
//! closes. Chunk extensions and trailer fields are checked and skipped, within limits, as
//! strictly as hyper's decoder: no whitespace inside a chunk size, none but spaces and tabs
//! after it, no bare LF anywhere in the framing, no size that overflows.

use bytes::{Buf, Bytes, BytesMut};

/// The most bytes of chunk extensions one body may carry (hyper's limit): they mean nothing
/// to a proxy, so a flood of them is only a way to make it work.
pub const MAX_EXTENSION_BYTES: u64 = 16 * 1024;
/// The most bytes of trailer fields a chunked body may end with (hyper's limit).
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The most trailer fields (as many as header fields in a head).
pub const MAX_TRAILER_FIELDS: usize = crate::MAX_HEADERS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length {
        remaining: u64,
    },
    Chunked(Chunked),
    /// A response without Content-Length or chunked framing ends when the connection does.
    UntilClose {
        closed: bool,
    },
}

/// Where a chunked body is, and what it has spent of its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    extension_bytes: u64,
    trailer_bytes: usize,
    trailer_fields: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the size's hex digits; `digits` so far.
    Size {
        size: u64,
        digits: u32,
    },
    /// Spaces or tabs after the size: only more of them, `;` or CR may follow.
    SizeWhitespace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a line of the trailer section.
    TrailerLine,
    TrailerField,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the body; read more.
    NeedMore,
    Done,
}

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("malformed body: {0}")]
pub struct DecodeError(pub &'static str);

impl Decoder {
    pub fn length(length: u64) -> Self {
        Decoder::Length { remaining: length }
    }

    pub fn chunked() -> Self {
        Decoder::Chunked(Chunked {
            state: State::Size { size: 0, digits: 0 },
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
        })
    }

    pub fn until_close() -> Self {
        Decoder::UntilClose { closed: false }
    }

    pub fn is_done(&self) -> bool {
        matches!(
            self,
            Decoder::Length { remaining: 0 }
                | Decoder::Chunked(Chunked { state: State::Done, .. })
                | Decoder::UntilClose { closed: true }
        )
    }

    /// The connection closed: the end of a body delimited by the close, else an error.
    pub fn closed(&mut self) -> Result<(), DecodeError> {
        match self {
            Decoder::UntilClose { closed } => {
                *closed = true;
                Ok(())
            }
            _ if self.is_done() => Ok(()),
            _ => Err(DecodeError("the connection closed before the end of the body")),
        }
    }

    /// The body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length { remaining } => Some(*remaining),
            _ if self.is_done() => Some(0),
            Decoder::Chunked(_) | Decoder::UntilClose { .. } => None,
        }
    }

    /// Takes the next piece of body data out of `buf`, without copying it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        Ok(match self.next(buf)? {
            Some(0) => Decoded::Done,
            Some(take) => Decoded::Data(buf.split_to(take).freeze()),
            None => Decoded::NeedMore,
        })
    }

    /// Drops the next piece of body data from `buf`, for a reader that wants only to know
    /// where the body ends: `Ok(true)` once it has.
    pub fn skip(&mut self, buf: &mut BytesMut) -> Result<bool, DecodeError> {
        loop {
            match self.next(buf)? {
                Some(0) => return Ok(true),
                Some(take) => buf.advance(take),
                None => return Ok(false),
            }
        }
    }

    /// Steps over framing in `buf` up to the next data: `Some(n)` when the first `n` bytes of
    /// `buf` are body data (already counted), `Some(0)` at the end, `None` for more bytes.
    fn next(&mut self, buf: &mut BytesMut) -> Result<Option<usize>, DecodeError> {
        if self.is_done() {
            return Ok(Some(0));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let remaining = match self {
            Decoder::UntilClose { .. } => return Ok(Some(buf.len())),
            Decoder::Length { remaining } => remaining,
            Decoder::Chunked(chunked) => loop {
                if let State::Data { remaining } = &mut chunked.state {
                    break remaining;
                }
                if chunked.state == State::Done {
                    return Ok(Some(0));
                }
                let Some(&byte) = buf.first() else { return Ok(None) };
                buf.advance(1);
                chunked.step(byte)?;
            },
        };
        if buf.is_empty() {
            return Ok(None);
        }
        let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buf.len());
        *remaining -= take as u64;
        if let Decoder::Chunked(chunked) = self {
            if chunked.state == (State::Data { remaining: 0 }) {
                chunked.state = State::DataCr;
            }
        }
        Ok(Some(take))
    }
}

impl Chunked {
    /// One byte of chunked framing outside chunk data.
    fn step(&mut self, byte: u8) -> Result<(), DecodeError> {
        use State::*;
        let error = |what| Err(DecodeError(what));
        self.state = match (self.state, byte) {
            (Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
                let digit = u64::from((byte as char).to_digit(16).unwrap_or_default());
                let Some(size) = size.checked_mul(16).and_then(|s| s.checked_add(digit)) else {
                    return error("chunk size too large");
                };
                Size { size, digits: digits + 1 }
            }
            (Size { digits: 0, .. }, _) => return error("chunk size missing"),
            (Size { size, .. } | SizeWhitespace { size }, b' ' | b'\t') => SizeWhitespace { size },
            (Size { size, .. } | SizeWhitespace { size }, b';') => Extension { size },
            (Size { size, .. } | SizeWhitespace { size } | Extension { size }, b'\r') => SizeLf { size },
            (Size { .. }, _) => return error("invalid chunk size"),
            (SizeWhitespace { .. }, _) => return error("invalid character after the chunk size"),
            (Extension { .. }, b'\n') => return error("bare LF in a chunk extension"),
            (Extension { .. }, _) if byte.is_ascii_control() && byte != b'\t' => {
                return error("control character in a chunk extension")
            }
            (Extension { size }, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes > MAX_EXTENSION_BYTES {
                    return error("chunk extensions too large");
                }
                Extension { size }
            }
            (SizeLf { size: 0 }, b'\n') => TrailerLine,
            (SizeLf { size }, b'\n') => Data { remaining: size },
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size { size: 0, digits: 0 },
            (TrailerLine, b'\r') => EndLf,
            (TrailerLine | TrailerField, _) if self.trailer_bytes >= MAX_TRAILER_BYTES => {
                return error("trailer fields too large")
            }
            (TrailerLine, _) if self.trailer_fields >= MAX_TRAILER_FIELDS => {
                return error("too many trailer fields")
            }
            (TrailerLine | TrailerField, b'\n') => return error("bare LF in a trailer field"),
            (TrailerLine, _) => {
                self.trailer_fields += 1;
                self.trailer_bytes += 1;
                TrailerField
            }
            (TrailerField, b'\r') => TrailerLf,
            (TrailerField, _) => {
                self.trailer_bytes += 1;
                TrailerField
            }
            (TrailerLf, b'\n') => TrailerLine,
            (EndLf, b'\n') => Done,
            (SizeLf { .. } | DataCr | DataLf | TrailerLf | EndLf, _) => return error("expected CRLF"),
            (Data { .. } | Done, _) => self.state,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes, collecting the body.
    fn decode_all(mut decoder: Decoder, wire: &[u8], step: usize) -> Result<Vec<u8>, DecodeError> {
        let (mut body, mut buf) = (Vec::new(), BytesMut::new());
        let mut pieces = wire.chunks(step);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Done => return Ok(body),
                Decoded::NeedMore => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => return Err(DecodeError("ended early")),
                },
            }
        }
    }

    /// Like `decode_all`, through `skip`: how many bytes of `wire` the body took.
    fn skip_all(mut decoder: Decoder, wire: &[u8], step: usize) -> Result<usize, DecodeError> {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            fed += piece.len();
            if decoder.skip(&mut buf)? {
                return Ok(fed - buf.len());
            }
        }
        Err(DecodeError("ended early"))
    }

    #[test]
    fn valid_chunked_bodies_decode_whatever_the_read_boundaries() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"q;uoted\";b\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5 \t ;ext\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5  \r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"B\r\nhello world\r\n0\r\n\r\n", b"hello world"),
            (b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
            (b"0000000000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 1\r\nX-Two: 2\r\n\r\n", b"abcde"),
            (b"3\r\n\r\n\n\r\n0\r\n\r\n", b"\r\n\n"),
        ];
        for (wire, body) in cases {
            for step in [1, 2, 7, wire.len()] {
                let got = decode_all(Decoder::chunked(), wire, step);
                assert_eq!(
                    got.as_deref(),
                    Ok(*body),
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(wire)
                );
                assert_eq!(skip_all(Decoder::chunked(), wire, step), Ok(wire.len()));
            }
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"x\r\n", "chunk size missing"),
            (b"\r\n", "chunk size missing"),
            (b";ext\r\n", "chunk size missing"),
            (b" 5\r\nhello\r\n", "chunk size missing"),
            (b"-5\r\n", "chunk size missing"),
            (b"5x\r\n", "invalid chunk size"),
            (b"5 5\r\nhello\r\n", "invalid character after the chunk size"),
            (b"5 x\r\nhello\r\n", "invalid character after the chunk size"),
            (b"5\nhello", "invalid chunk size"),
            (b"5\r\rhello", "expected CRLF"),
            (b"3\r\nabcX", "expected CRLF"),
            (b"3\r\nabc\rX", "expected CRLF"),
            (b"3\r\nabc\n0\r\n\r\n", "expected CRLF"),
            (b"10000000000000000\r\n", "chunk size too large"),
            (b"1;a\nb", "bare LF in a chunk extension"),
            (b"1;a\x00b\r\n", "control character in a chunk extension"),
            (b"0\r\nX-A: 1\n\r\n", "bare LF in a trailer field"),
            (b"0\r\n\n", "bare LF in a trailer field"),
            (b"0\r\nX-A: 1\r\r", "expected CRLF"),
            (b"0\r\n\rX", "expected CRLF"),
        ];
        for (wire, reason) in cases {
            let got = decode_all(Decoder::chunked(), wire, 1);
            assert_eq!(got, Err(DecodeError(reason)), "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_EXTENSION_BYTES as usize));
        assert_eq!(decode_all(Decoder::chunked(), extension.as_bytes(), 4096).as_deref(), Ok(&b"a"[..]));
        // The limit is for the whole body, not per chunk.
        let half = "e".repeat(MAX_EXTENSION_BYTES as usize / 2);
        let spread = format!("1;{half}\r\na\r\n1;{half}\r\nb\r\n1;e\r\nc\r\n0\r\n\r\n");
        assert_eq!(
            decode_all(Decoder::chunked(), spread.as_bytes(), 4096),
            Err(DecodeError("chunk extensions too large"))
        );
        let huge_trailer = [&b"0\r\nX: "[..], &[b'a'; MAX_TRAILER_BYTES]].concat();
        assert_eq!(
            decode_all(Decoder::chunked(), &huge_trailer, 4096),
            Err(DecodeError("trailer fields too large"))
        );
        let many: String = (0..=MAX_TRAILER_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many_trailers = format!("0\r\n{many}\r\n");
        assert_eq!(
            decode_all(Decoder::chunked(), many_trailers.as_bytes(), 4096),
            Err(DecodeError("too many trailer fields"))
        );
    }

    #[test]
    fn bytes_after_the_body_stay_in_the_buffer() {
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nGET /"[..]);
        let mut decoder = Decoder::chunked();
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abc"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Done));
        assert_eq!(&buf[..], b"GET /");
        let mut buf = BytesMut::from(&b"abcdefGET"[..]);
        let mut decoder = Decoder::length(6);
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abcdef"))));
        assert!(decoder.is_done());
        assert_eq!(decoder.remaining(), Some(0));
        assert_eq!(&buf[..], b"GET");
        let mut decoder = Decoder::length(6);
        let mut buf = BytesMut::from(&b"abcdefGET"[..]);
        assert_eq!(decoder.skip(&mut buf), Ok(true));
        assert_eq!(&buf[..], b"GET");
    }

    #[test]
    fn a_body_until_close_ends_only_with_the_connection() {
        let mut decoder = Decoder::until_close();
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abc"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
        assert_eq!(decoder.remaining(), None);
        assert_eq!(decoder.closed(), Ok(()));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Done));
        assert!(Decoder::length(3).closed().is_err() && Decoder::chunked().closed().is_err());
        assert_eq!(Decoder::length(0).closed(), Ok(()));
    }
}
