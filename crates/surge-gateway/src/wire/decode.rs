//! HTTP/1.1 bodies off the wire, as a pure state machine over a connection's read buffer: a
//! known length, chunked (RFC 9112 §7.1) with extensions and trailers skipped, or (responses
//! only) everything until the connection closes.

use bytes::{Buf, Bytes, BytesMut};

/// The most bytes of trailer fields a chunked body may end with.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    Length {
        remaining: u64,
    },
    Chunked(Chunked),
    /// A response without Content-Length or chunked framing ends when the connection does.
    UntilClose {
        closed: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    Size { size: u64, digits: u32 },
    Extension { size: u64 },
    SizeLf { size: u64 },
    Data { remaining: u64 },
    DataCr,
    DataLf,
    TrailerStart { seen: usize },
    Trailer { seen: usize },
    TrailerLf { seen: usize, empty: bool },
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the body; read more.
    NeedMore,
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body: {0}")]
pub(crate) struct DecodeError(&'static str);

impl Decoder {
    pub fn length(length: u64) -> Self {
        Decoder::Length { remaining: length }
    }

    pub fn chunked() -> Self {
        Decoder::Chunked(Chunked::Size { size: 0, digits: 0 })
    }

    pub fn until_close() -> Self {
        Decoder::UntilClose { closed: false }
    }

    pub fn is_done(&self) -> bool {
        matches!(
            self,
            Decoder::Length { remaining: 0 }
                | Decoder::Chunked(Chunked::Done)
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
            Decoder::Chunked(Chunked::Done) | Decoder::UntilClose { closed: true } => Some(0),
            Decoder::Chunked(_) | Decoder::UntilClose { .. } => None,
        }
    }

    /// Takes the next piece of body data out of `buf`, without copying it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        loop {
            let (remaining, next) = match self {
                Decoder::Length { remaining: 0 }
                | Decoder::Chunked(Chunked::Done)
                | Decoder::UntilClose { closed: true } => return Ok(Decoded::Done),
                Decoder::UntilClose { .. } if buf.is_empty() => return Ok(Decoded::NeedMore),
                Decoder::UntilClose { .. } => return Ok(Decoded::Data(buf.split().freeze())),
                Decoder::Length { remaining } => (remaining, None),
                Decoder::Chunked(Chunked::Data { remaining }) => (remaining, Some(Chunked::DataCr)),
                Decoder::Chunked(state) => {
                    let Some(&byte) = buf.first() else { return Ok(Decoded::NeedMore) };
                    buf.advance(1);
                    *state = step(*state, byte)?;
                    continue;
                }
            };
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buf.len());
            *remaining -= take as u64;
            if let (0, Some(next)) = (*remaining, next) {
                *self = Decoder::Chunked(next);
            }
            return Ok(Decoded::Data(buf.split_to(take).freeze()));
        }
    }
}

/// One byte of chunked framing outside chunk data.
fn step(state: Chunked, byte: u8) -> Result<Chunked, DecodeError> {
    use Chunked::*;
    Ok(match (state, byte) {
        (Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
            if digits == 16 {
                return Err(DecodeError("chunk size too large"));
            }
            let digit = (byte as char).to_digit(16).unwrap_or_default();
            Size { size: size * 16 + u64::from(digit), digits: digits + 1 }
        }
        (Size { digits: 0, .. }, _) => return Err(DecodeError("chunk size missing")),
        (Size { size, .. }, b';' | b' ' | b'\t') => Extension { size },
        (Size { size, .. } | Extension { size }, b'\r') => SizeLf { size },
        (Size { .. }, _) => return Err(DecodeError("invalid chunk size")),
        (Extension { .. }, b'\n') => return Err(DecodeError("bare LF in chunk extension")),
        (Extension { size }, _) => Extension { size },
        (SizeLf { size: 0 }, b'\n') => TrailerStart { seen: 0 },
        (SizeLf { size }, b'\n') => Data { remaining: size },
        (DataCr, b'\r') => DataLf,
        (DataLf, b'\n') => Size { size: 0, digits: 0 },
        (TrailerStart { seen }, b'\r') => TrailerLf { seen, empty: true },
        (TrailerStart { seen } | Trailer { seen }, _) if seen >= MAX_TRAILER_BYTES => {
            return Err(DecodeError("trailer fields too large"))
        }
        (TrailerStart { seen }, _) => Trailer { seen: seen + 1 },
        (Trailer { seen }, b'\r') => TrailerLf { seen, empty: false },
        (Trailer { seen }, _) => Trailer { seen: seen + 1 },
        (TrailerLf { empty: true, .. }, b'\n') => Done,
        (TrailerLf { seen, empty: false }, b'\n') => TrailerStart { seen },
        (SizeLf { .. } | DataCr | DataLf | TrailerLf { .. }, _) => return Err(DecodeError("expected CRLF")),
        (Data { .. } | Done, _) => state,
    })
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

    #[test]
    fn a_chunked_body_decodes_whatever_the_read_boundaries() {
        let wire = b"5;ext=1\r\nhello\r\nB\r\n, chunked w\r\n4 \r\norld\r\n0\r\nX-Sum: 1\r\n\r\n";
        for step in [1, 2, 7, wire.len()] {
            let body = decode_all(Decoder::chunked(), wire, step).expect("valid");
            assert_eq!(body, b"hello, chunked world", "pieces of {step}");
        }
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
        assert_eq!(&buf[..], b"GET");
    }

    #[test]
    fn a_body_until_close_ends_only_with_the_connection() {
        let mut decoder = Decoder::until_close();
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abc"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
        assert_eq!(decoder.closed(), Ok(()));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::Done));
        assert!(Decoder::length(3).closed().is_err() && Decoder::chunked().closed().is_err());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [&b"x\r\n"[..], b"\r\n", b"3\nabc", b"3\r\nabcX", b"11111111111111111\r\n", b"1;a\nb"] {
            assert!(decode_all(Decoder::chunked(), wire, 1).is_err(), "{wire:?}");
        }
        let huge_trailer = [&b"0\r\n"[..], &[b'a'; MAX_TRAILER_BYTES + 1]].concat();
        assert_eq!(
            decode_all(Decoder::chunked(), &huge_trailer, 4096),
            Err(DecodeError("trailer fields too large"))
        );
    }
}
