//! The header fields that frame a message and decide its connection's fate, read in one pass
//! over a parsed head: Content-Length, Transfer-Encoding, Connection, Expect, Upgrade, and
//! how many Host fields a request has and where the last one is.

use crate::FramingError;

/// What a head's fields say about framing and the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields {
    /// The Content-Length, when present: every value (and every element of a list) must be
    /// the same number.
    pub content_length: Option<u64>,
    pub transfer_encoding: Option<Codings>,
    pub connection: Connection,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// An Upgrade field is present.
    pub upgrade: bool,
    /// How many Host fields there are (a request must have exactly one, RFC 9112 §3.2).
    pub hosts: u8,
    /// The index of the last Host field in the slice `scan` read.
    pub host_index: Option<usize>,
}

/// The transfer codings a message lists, in order, across all its Transfer-Encoding fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Codings {
    /// How many codings are listed.
    pub count: usize,
    /// How many of them are `chunked`.
    pub chunked: usize,
    /// The last one is `chunked`.
    pub chunked_last: bool,
}

impl Codings {
    /// Exactly one coding, `chunked`: the only transfer coding a proxy needs to understand.
    pub fn is_chunked_only(&self) -> bool {
        self.count == 1 && self.chunked == 1
    }
}

/// The Connection field's tokens that matter to a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connection {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// A token other than these three, in any Connection field (a field name or not): the
    /// Connection fields must then be kept, so that whoever strips hop-by-hop fields removes
    /// the fields they name.
    pub other_tokens: bool,
}

impl Connection {
    /// The Connection fields say keep-alive or close and name no field (an `upgrade` token
    /// aside, for the caller to weigh): they speak of this hop alone, and what they say is
    /// read, so a parser may leave them out of the headers.
    pub fn only_this_hop(&self) -> bool {
        (self.keep_alive || self.close) && !self.other_tokens
    }
}

impl Fields {
    /// Reads the fields of a head as httparse returns them: every name a token, no value with
    /// a control byte but tab (`matches_lowercase` relies on it). Only Content-Length can be
    /// wrong here (not a number, or numbers that differ); what the codings mean is for the
    /// caller to judge, since requests and responses are framed by different rules.
    pub fn scan(fields: &[httparse::Header<'_>]) -> Result<Self, FramingError> {
        let mut facts = Fields::default();
        for (index, field) in fields.iter().enumerate() {
            let name = field.name.as_bytes();
            // The length picks the one name a field could be, so most fields cost one compare.
            let wanted: &[u8] = match name.len() {
                14 => b"content-length",
                17 => b"transfer-encoding",
                10 => b"connection",
                6 => b"expect",
                7 => b"upgrade",
                4 => b"host",
                _ => continue,
            };
            if !matches_lowercase(name, wanted) {
                continue;
            }
            match wanted {
                b"content-length" => {
                    if list(field.value).next().is_none() {
                        return Err(FramingError::InvalidContentLength);
                    }
                    for part in list(field.value) {
                        let length = parse_length(part)?;
                        if facts.content_length.is_some_and(|seen| seen != length) {
                            return Err(FramingError::ConflictingContentLength);
                        }
                        facts.content_length = Some(length);
                    }
                }
                b"transfer-encoding" => {
                    let codings = facts.transfer_encoding.get_or_insert_with(Codings::default);
                    for coding in list(field.value) {
                        // A coding may carry parameters (`gzip;q=1`): its name is what counts.
                        let name = coding.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                        let chunked = matches_lowercase(name, b"chunked");
                        codings.count += 1;
                        codings.chunked += usize::from(chunked);
                        codings.chunked_last = chunked;
                    }
                }
                b"connection" => {
                    for token in list(field.value) {
                        if matches_lowercase(token, b"close") {
                            facts.connection.close = true;
                        } else if matches_lowercase(token, b"keep-alive") {
                            facts.connection.keep_alive = true;
                        } else if matches_lowercase(token, b"upgrade") {
                            facts.connection.upgrade = true;
                        } else {
                            facts.connection.other_tokens = true;
                        }
                    }
                }
                b"expect" => {
                    facts.expect_continue |= matches_lowercase(field.value.trim_ascii(), b"100-continue");
                }
                b"host" => {
                    facts.hosts = facts.hosts.saturating_add(1);
                    facts.host_index = Some(index);
                }
                _ => facts.upgrade = true,
            }
        }
        Ok(facts)
    }
}

/// `text` is `lowercase` (lower-case letters, digits and '-') in any case. Setting bit 0x20 turns
/// only these bytes into such a character: the letter in either case, the digit or '-' itself,
/// and control bytes (0x0D to '-', 0x10-0x19 to the digits), which httparse accepts in no name
/// or value. So the compare is exact for what it parsed, at half the cost of a case fold.
fn matches_lowercase(text: &[u8], lowercase: &[u8]) -> bool {
    debug_assert!(lowercase.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    text.len() == lowercase.len()
        && text.iter().zip(lowercase).all(|(&byte, &wanted)| (byte | 0x20) == wanted)
}

/// The non-empty elements of a comma-separated list, trimmed (RFC 9110 §5.6.1).
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|part| !part.is_empty())
}

/// `1*DIGIT`, nothing else: no sign, no spaces inside, no overflow.
pub fn parse_length(digits: &[u8]) -> Result<u64, FramingError> {
    if digits.is_empty() {
        return Err(FramingError::InvalidContentLength);
    }
    digits.iter().try_fold(0u64, |length, &byte| {
        let digit = byte.is_ascii_digit().then(|| u64::from(byte - b'0'));
        digit
            .and_then(|digit| length.checked_mul(10)?.checked_add(digit))
            .ok_or(FramingError::InvalidContentLength)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(fields: &[(&str, &str)]) -> Result<Fields, FramingError> {
        let headers: Vec<httparse::Header<'_>> =
            fields.iter().map(|(name, value)| httparse::Header { name, value: value.as_bytes() }).collect();
        Fields::scan(&headers)
    }

    #[test]
    fn matches_lowercase_is_a_case_fold_for_every_byte_httparse_accepts() {
        // httparse takes tab, 0x20-0x7E and 0x80-0xFF in a value, and fewer in a name. A byte
        // it refuses could be misread (CR as '-'): only its fields come here.
        let accepted = (0u8..=255).filter(|&b| b == b'\t' || b >= 0x20 && b != 0x7f);
        let wanted: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').chain([b'-']).collect();
        for byte in accepted {
            for &lower in &wanted {
                let folded = byte.eq_ignore_ascii_case(&lower);
                assert_eq!(
                    matches_lowercase(&[byte], &[lower]),
                    folded,
                    "{byte:#04x} against {:?}",
                    lower as char
                );
            }
        }
        // Lengths must match; case need not.
        assert!(!matches_lowercase(b"Close", b"closed") && matches_lowercase(b"KEEP-Alive", b"keep-alive"));
    }

    #[test]
    fn content_length_is_digits_and_one_value() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<Option<u64>, FramingError>);
        let cases: &[Case<'_>] = &[
            (&[], Ok(None)),
            (&[("Content-Length", "5")], Ok(Some(5))),
            (&[("content-length", " 5 ")], Ok(Some(5))),
            (&[("Content-Length", "5, 5")], Ok(Some(5))),
            (&[("Content-Length", "5"), ("CONTENT-LENGTH", "5")], Ok(Some(5))),
            (&[("Content-Length", "0")], Ok(Some(0))),
            (&[("Content-Length", "18446744073709551615")], Ok(Some(u64::MAX))),
            (&[("Content-Length", "18446744073709551616")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "+5")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "-1")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "5 5")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "0x5")], Err(FramingError::InvalidContentLength)),
            (&[("Content-Length", "5, 6")], Err(FramingError::ConflictingContentLength)),
            (
                &[("Content-Length", "5"), ("Content-Length", "6")],
                Err(FramingError::ConflictingContentLength),
            ),
        ];
        for (fields, expected) in cases {
            assert_eq!(scan(fields).map(|f| f.content_length), *expected, "{fields:?}");
        }
    }

    #[test]
    fn codings_are_counted_in_order() {
        let codings = |value: &str| scan(&[("Transfer-Encoding", value)]).expect("valid").transfer_encoding;
        let chunked = Codings { count: 1, chunked: 1, chunked_last: true };
        assert_eq!(codings("chunked"), Some(chunked));
        assert_eq!(codings("Chunked"), Some(chunked));
        assert_eq!(codings("gzip, chunked"), Some(Codings { count: 2, chunked: 1, chunked_last: true }));
        assert_eq!(codings("chunked, gzip"), Some(Codings { count: 2, chunked: 1, chunked_last: false }));
        assert_eq!(codings("chunked, chunked"), Some(Codings { count: 2, chunked: 2, chunked_last: true }));
        assert_eq!(codings("chunkedx"), Some(Codings { count: 1, chunked: 0, chunked_last: false }));
        let two_fields = scan(&[("Transfer-Encoding", "gzip"), ("transfer-encoding", "chunked")]);
        assert_eq!(two_fields.expect("valid").transfer_encoding.map(|c| c.is_chunked_only()), Some(false));
        assert!(codings("chunked").is_some_and(|c| c.is_chunked_only()));
    }

    #[test]
    fn connection_tokens_expect_and_upgrade() {
        let fields = scan(&[
            ("Connection", "Keep-Alive, Upgrade, x-private"),
            ("connection", "close"),
            ("Expect", "100-Continue"),
            ("Upgrade", "websocket"),
            ("Host", "a"),
            ("host", "b"),
        ])
        .expect("valid");
        let said = Connection { close: true, keep_alive: true, upgrade: true, other_tokens: true };
        let only_keep_alive = scan(&[("Connection", ", ,keep-alive")]).expect("valid").connection;
        assert!(only_keep_alive.keep_alive && !only_keep_alive.other_tokens);
        let other = |value: &[u8]| {
            let headers = [httparse::Header { name: "connection", value }];
            Fields::scan(&headers).expect("valid").connection.other_tokens
        };
        assert!(other(b"close, \xff") && other(b"a b") && !other(b"Close"));
        assert_eq!(fields.connection, said);
        assert!(fields.expect_continue && fields.upgrade);
        assert_eq!((fields.hosts, fields.host_index), (2, Some(5)));
        assert!(!scan(&[("Expect", "100-continue-later")]).expect("valid").expect_continue);
    }
}
