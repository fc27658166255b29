//! The log's records and their framing. Every change to a queue that must survive a restart is
//! one record appended to the log: a message published (whole, payload included), acked,
//! retried later, moved to the dead letters, or redriven out of them. Leases are not written:
//! after a restart every message not acked is ready again (delivery is at least once).
//!
//! On disk a record is `length (u32 LE) | CRC-32 of the body (u32 LE) | body`, the body a kind
//! byte and its fields, little-endian. A torn write leaves a short or mismatching record at
//! the tail, which recovery detects and drops; it is never read as a message.

use bytes::{BufMut, Bytes};

/// Length and checksum before each body.
pub(crate) const FRAME: usize = 8;
/// The largest payload a message may have (`max_payload` is at most this).
pub const MAX_PAYLOAD: u64 = 64 * 1024 * 1024;
/// The largest body the log accepts: the largest payload and its fields (two texts of at most
/// 64 KiB, and the numbers).
pub(crate) const MAX_BODY: usize = MAX_PAYLOAD as usize + 256 * 1024;

const PUBLISH: u8 = 1;
const ACK: u8 = 2;
const RETRY: u8 = 3;
const DEAD: u8 = 4;
const REDRIVE: u8 = 5;
/// A publish that carries the W3C trace context of the request that made it.
const PUBLISH_TRACED: u8 = 6;
/// A worker's answer to a job (only in a queue's answers log, never in its message log).
const ANSWER: u8 = 7;

/// A message as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub enqueued_at: u64,
    /// Not delivered before this (ms since the epoch): a delay, or a retry's backoff.
    pub ready_at: u64,
    /// Failed deliveries so far.
    pub attempts: u32,
    pub content_type: Option<String>,
    pub idempotency_key: Option<String>,
    /// The `traceparent` of the request that published it.
    pub traceparent: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Publish(Stored),
    Ack {
        id: u64,
    },
    Retry {
        id: u64,
        attempts: u32,
        ready_at: u64,
        error: String,
    },
    Dead {
        id: u64,
        attempts: u32,
        error: String,
    },
    Redrive {
        id: u64,
    },
    /// A worker's answer to the job of message `id`, kept until `expires_at` (ms since the
    /// epoch); `fields` are the answer's header fields, in order.
    Answer {
        id: u64,
        expires_at: u64,
        status: u16,
        fields: Vec<(String, Bytes)>,
        body: Bytes,
    },
}

impl Record {
    /// Appends the framed record to `out`; returns where in `out` the payload starts (for a
    /// publish), so the index can point at it.
    pub fn encode(&self, out: &mut Vec<u8>) -> Option<usize> {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME]);
        let mut payload_at = None;
        match self {
            Record::Publish(stored) => {
                // Untraced messages keep the first layout, which every version reads.
                out.put_u8(if stored.traceparent.is_some() { PUBLISH_TRACED } else { PUBLISH });
                out.put_u64_le(stored.id);
                out.put_u64_le(stored.enqueued_at);
                out.put_u64_le(stored.ready_at);
                out.put_u32_le(stored.attempts);
                put_text(out, stored.content_type.as_deref().unwrap_or(""));
                put_text(out, stored.idempotency_key.as_deref().unwrap_or(""));
                if let Some(traceparent) = &stored.traceparent {
                    put_text(out, traceparent);
                }
                out.put_u32_le(u32::try_from(stored.payload.len()).unwrap_or(u32::MAX));
                payload_at = Some(out.len());
                out.extend_from_slice(&stored.payload);
            }
            Record::Ack { id } => {
                out.put_u8(ACK);
                out.put_u64_le(*id);
            }
            Record::Retry { id, attempts, ready_at, error } => {
                out.put_u8(RETRY);
                out.put_u64_le(*id);
                out.put_u32_le(*attempts);
                out.put_u64_le(*ready_at);
                put_text(out, error);
            }
            Record::Dead { id, attempts, error } => {
                out.put_u8(DEAD);
                out.put_u64_le(*id);
                out.put_u32_le(*attempts);
                put_text(out, error);
            }
            Record::Redrive { id } => {
                out.put_u8(REDRIVE);
                out.put_u64_le(*id);
            }
            Record::Answer { id, expires_at, status, fields, body } => {
                out.put_u8(ANSWER);
                out.put_u64_le(*id);
                out.put_u64_le(*expires_at);
                out.put_u16_le(*status);
                // Fields past what a u16 counts are left out; a job's answer never has so many.
                let fields = &fields[..fields.len().min(u16::MAX as usize)];
                out.put_u16_le(fields.len() as u16);
                for (name, value) in fields {
                    put_text(out, name);
                    let value = &value[..value.len().min(u16::MAX as usize)];
                    out.put_u16_le(value.len() as u16);
                    out.extend_from_slice(value);
                }
                out.put_u32_le(u32::try_from(body.len()).unwrap_or(u32::MAX));
                out.extend_from_slice(body);
            }
        }
        let body = &out[start + FRAME..];
        let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let crc = crc32fast::hash(body);
        out[start..start + 4].copy_from_slice(&length.to_le_bytes());
        out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
        payload_at.map(|at| at - start)
    }
}

/// Text fields are at most 64 KiB; longer ones are cut (at a character boundary).
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(u16::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16_le(end as u16);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// What reading a record at some offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A whole record, `length` bytes long framing included; for a publish, where its payload
    /// starts relative to the record.
    Record { record: Record, length: usize, payload_at: Option<usize> },
    /// The bytes end before the record does: a write cut short, or the end of the log.
    Short,
    /// The record is there but damaged: bad length, bad checksum, or fields that do not parse.
    Damaged(&'static str),
}

/// Whether a whole record starts `bytes`: its fields are checked before its checksum is
/// summed, since a scan for the next record after damage asks this at every offset and the
/// fields rule out most garbage cheaply.
pub fn starts_whole(bytes: &[u8]) -> bool {
    let Some(frame) = bytes.get(..FRAME) else { return false };
    let length = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    if length == 0 || length > MAX_BODY {
        return false;
    }
    let Some(body) = bytes.get(FRAME..FRAME + length) else { return false };
    parse(body, false).is_some() && crc32fast::hash(body) == crc
}

/// Reads the record at the start of `bytes`.
pub fn read(bytes: &[u8]) -> Read {
    read_with(bytes, true)
}

/// As [`read`], leaving a publish's payload out (it stays where `payload_at` says): recovery
/// needs only where each message is.
pub fn read_without_payload(bytes: &[u8]) -> Read {
    read_with(bytes, false)
}

fn read_with(bytes: &[u8], with_payload: bool) -> Read {
    if bytes.len() < FRAME {
        return Read::Short;
    }
    let length = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if length == 0 || length > MAX_BODY {
        return Read::Damaged("impossible record length");
    }
    let Some(body) = bytes.get(FRAME..FRAME + length) else { return Read::Short };
    if crc32fast::hash(body) != crc {
        return Read::Damaged("checksum mismatch");
    }
    match parse(body, with_payload) {
        Some((record, payload_at)) => {
            Read::Record { record, length: FRAME + length, payload_at: payload_at.map(|at| at + FRAME) }
        }
        None => Read::Damaged("fields do not parse"),
    }
}

fn parse(body: &[u8], with_payload: bool) -> Option<(Record, Option<usize>)> {
    let mut fields = Fields { bytes: body, at: 0 };
    let record = match fields.u8()? {
        kind @ (PUBLISH | PUBLISH_TRACED) => {
            let id = fields.u64()?;
            let enqueued_at = fields.u64()?;
            let ready_at = fields.u64()?;
            let attempts = fields.u32()?;
            let content_type = Some(fields.text()?).filter(|t| !t.is_empty());
            let idempotency_key = Some(fields.text()?).filter(|k| !k.is_empty());
            let traceparent = if kind == PUBLISH_TRACED { Some(fields.text()?) } else { None };
            let length = fields.u32()? as usize;
            let payload_at = fields.at;
            let payload = fields.take(length)?;
            let payload = if with_payload { Bytes::copy_from_slice(payload) } else { Bytes::new() };
            let stored = Stored {
                id,
                enqueued_at,
                ready_at,
                attempts,
                content_type,
                idempotency_key,
                traceparent,
                payload,
            };
            return fields.done().then_some((Record::Publish(stored), Some(payload_at)));
        }
        ACK => Record::Ack { id: fields.u64()? },
        RETRY => Record::Retry {
            id: fields.u64()?,
            attempts: fields.u32()?,
            ready_at: fields.u64()?,
            error: fields.text()?,
        },
        DEAD => Record::Dead { id: fields.u64()?, attempts: fields.u32()?, error: fields.text()? },
        REDRIVE => Record::Redrive { id: fields.u64()? },
        // Read whole whatever was asked: answers are read back only when their log is opened.
        ANSWER => {
            let id = fields.u64()?;
            let expires_at = fields.u64()?;
            let status = fields.u16()?;
            let count = fields.u16()?;
            let mut answer_fields = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let name = fields.text()?;
                let length = usize::from(fields.u16()?);
                answer_fields.push((name, Bytes::copy_from_slice(fields.take(length)?)));
            }
            let length = fields.u32()? as usize;
            let body = Bytes::copy_from_slice(fields.take(length)?);
            Record::Answer { id, expires_at, status, fields: answer_fields, body }
        }
        _ => return None,
    };
    fields.done().then_some((record, None))
}

struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(taken)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn text(&mut self) -> Option<String> {
        let length = self.u16()? as usize;
        String::from_utf8(self.take(length)?.to_vec()).ok()
    }
    fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> Record {
        Record::Publish(stored())
    }

    fn stored() -> Stored {
        Stored {
            id: 7,
            enqueued_at: 1_700_000_000_000,
            ready_at: 1_700_000_030_000,
            attempts: 2,
            content_type: Some("application/json".into()),
            idempotency_key: Some("order-42".into()),
            traceparent: None,
            payload: Bytes::from_static(b"{\"total\":12}"),
        }
    }

    fn traced() -> Record {
        let traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        Record::Publish(Stored { id: 8, traceparent, ..stored() })
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let records = [
            publish(),
            traced(),
            Record::Ack { id: 7 },
            Record::Retry { id: 7, attempts: 3, ready_at: 99, error: "answered 500".into() },
            Record::Dead { id: 7, attempts: 5, error: "timed out after 30s".into() },
            Record::Redrive { id: 7 },
            Record::Answer {
                id: 7,
                expires_at: 1_700_000_060_000,
                status: 201,
                fields: vec![
                    ("content-type".into(), Bytes::from_static(b"text/plain")),
                    ("x-bin".into(), Bytes::from_static(b"\xff")),
                ],
                body: Bytes::from_static(b"made"),
            },
        ];
        let mut log = Vec::new();
        for record in &records {
            record.encode(&mut log);
        }
        let mut at = 0;
        for expected in &records {
            let Read::Record { record, length, payload_at } = read(&log[at..]) else {
                panic!("no record at {at}")
            };
            assert_eq!(&record, expected);
            if let (Record::Publish(stored), Some(payload_at)) = (&record, payload_at) {
                assert_eq!(
                    &log[at + payload_at..at + payload_at + stored.payload.len()],
                    &stored.payload[..]
                );
            }
            at += length;
        }
        assert_eq!(at, log.len());
        assert_eq!(read(&log[at..]), Read::Short);
    }

    #[test]
    fn a_cut_record_is_short_and_a_changed_byte_is_damage() {
        let mut log = Vec::new();
        publish().encode(&mut log);
        for cut in 0..log.len() {
            assert_eq!(read(&log[..cut]), Read::Short, "cut at {cut}");
        }
        for flip in FRAME..log.len() {
            let mut damaged = log.clone();
            damaged[flip] ^= 0x40;
            assert_eq!(read(&damaged), Read::Damaged("checksum mismatch"), "byte {flip}");
        }
        assert_eq!(read(&[0u8; 16]), Read::Damaged("impossible record length"));
    }
}
