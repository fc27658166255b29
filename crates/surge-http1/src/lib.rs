//! HTTP/1.1 framing as pure functions, shared by everything in Surge that speaks HTTP/1.1 on
//! its own: the gateway's server and client, and `surge load`. No I/O here: heads are parsed
//! from and written to buffers, bodies decoded from a read buffer.
//!
//! - [`fields`]: one pass over a head's fields for what frames the message (Content-Length,
//!   Transfer-Encoding) and what decides the connection (Connection, Expect, Upgrade).
//! - [`head`]: request and response heads into `http` types, with their body framing.
//! - [`decode`]: the body state machine (length, chunked, until close).
//! - [`encode`]: request and response heads onto the wire.
//!
//! Strictness follows hyper's and nginx's: ambiguous framing is refused, not guessed, because a
//! proxy and the server behind it reading one message two ways is how requests are smuggled.

pub mod decode;
pub mod encode;
pub mod fields;
pub mod head;

pub use decode::{DecodeError, Decoded, Decoder};
pub use encode::{BodyFraming, ChunkSizeLine, Decimal, Exchange};
pub use fields::Fields;
pub use head::{HeadError, RequestFraming, RequestHead, ResponseHead};

/// The most header fields one head may carry (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// A head of this many bytes or more is refused (nginx allows 4 × 8 KiB for requests; hyper
/// about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A message whose framing cannot be trusted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("invalid Content-Length")]
    InvalidContentLength,
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    #[error("head of {} KiB or more", MAX_HEAD_BYTES / 1024)]
    HeadTooLarge,
    #[error("malformed head: {0}")]
    Malformed(String),
}
