//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer in front of the gateway
//! opens each connection with a header naming the client it carries, so the gateway sees the
//! client's address instead of the balancer's. Read with `peek`, so that not a byte past the
//! header leaves the socket before the HTTP (or TLS) server takes it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// The largest version 2 header accepted: addresses and a few TLVs.
const V2_MAX: usize = 16 + 512;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Header {
    /// A whole header of `length` bytes; `source` is the client, or `None` when the balancer
    /// speaks for itself (`LOCAL`, `UNKNOWN`: a health check).
    Parsed {
        length: usize,
        source: Option<SocketAddr>,
    },
    Incomplete,
    Invalid(&'static str),
}

/// Parses the header at the start of `bytes`.
pub(super) fn parse(bytes: &[u8]) -> Header {
    if bytes.len() < 6 {
        return if b"PROXY ".starts_with(bytes) || V2_SIGNATURE.starts_with(bytes) {
            Header::Incomplete
        } else {
            Header::Invalid("no PROXY protocol header")
        };
    }
    if bytes.starts_with(b"PROXY ") {
        return parse_v1(bytes);
    }
    let signature = &bytes[..bytes.len().min(V2_SIGNATURE.len())];
    if !V2_SIGNATURE.starts_with(signature) {
        return Header::Invalid("no PROXY protocol header");
    }
    parse_v2(bytes)
}

fn parse_v1(bytes: &[u8]) -> Header {
    let Some(end) = bytes.windows(2).take(V1_MAX - 1).position(|pair| pair == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Header::Invalid("PROXY v1 header too long")
        } else {
            Header::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&bytes[..end]) else {
        return Header::Invalid("PROXY v1 header not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let length = end + 2;
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Parsed { length, source: None },
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _, port, _] => {
            let ip = match (*family, source.parse::<IpAddr>()) {
                ("TCP4", Ok(ip @ IpAddr::V4(_))) | ("TCP6", Ok(ip @ IpAddr::V6(_))) => ip,
                _ => return Header::Invalid("PROXY v1 source address does not match its family"),
            };
            match port.parse::<u16>() {
                Ok(port) => Header::Parsed { length, source: Some(SocketAddr::new(ip, port)) },
                Err(_) => Header::Invalid("PROXY v1 source port"),
            }
        }
        _ => Header::Invalid("malformed PROXY v1 header"),
    }
}

fn parse_v2(bytes: &[u8]) -> Header {
    if bytes.len() < 16 {
        return Header::Incomplete;
    }
    let (version_command, family) = (bytes[12], bytes[13]);
    let length = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if version_command >> 4 != 2 {
        return Header::Invalid("PROXY v2 header of another version");
    }
    if length > V2_MAX {
        return Header::Invalid("PROXY v2 header too long");
    }
    if bytes.len() < length {
        return Header::Incomplete;
    }
    let address = &bytes[16..length];
    let source = match (version_command & 0x0f, family) {
        (0, _) => None, // LOCAL: the balancer's own connection
        (1, 0x11) if address.len() >= 12 => {
            let ip = Ipv4Addr::new(address[0], address[1], address[2], address[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([address[8], address[9]])))
        }
        (1, 0x21) if address.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&address[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([address[32], address[33]]),
            ))
        }
        (1, 0x00) => None, // UNSPEC
        (1, _) => return Header::Invalid("PROXY v2 address family not TCP over IPv4 or IPv6"),
        _ => return Header::Invalid("PROXY v2 command"),
    };
    Header::Parsed { length, source }
}

/// Reads the header off `stream` within `timeout`: the client's address, or why not.
pub(super) async fn read(stream: &TcpStream, timeout: Duration) -> Result<Option<SocketAddr>, String> {
    let reading = async {
        let mut buf = [0u8; V2_MAX];
        loop {
            let seen = stream.peek(&mut buf).await.map_err(|err| err.to_string())?;
            if seen == 0 {
                return Err("closed before its PROXY header".to_owned());
            }
            match parse(&buf[..seen]) {
                Header::Parsed { length, source } => {
                    // Exactly the header's bytes: what follows is the client's.
                    let mut header = vec![0u8; length];
                    let mut taken = 0;
                    while taken < length {
                        stream.readable().await.map_err(|err| err.to_string())?;
                        match stream.try_read(&mut header[taken..]) {
                            Ok(0) => return Err("closed inside its PROXY header".to_owned()),
                            Ok(n) => taken += n,
                            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(err) => return Err(err.to_string()),
                        }
                    }
                    return Ok(source);
                }
                Header::Invalid(why) => return Err(why.to_owned()),
                // More to come: wait for it rather than spin on the same bytes.
                Header::Incomplete => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(timeout, reading).await.map_err(|_| "no PROXY header in time".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, address: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x20 | command, family]);
        header.extend_from_slice(&u16::try_from(address.len()).expect("short").to_be_bytes());
        header.extend_from_slice(address);
        header
    }

    #[test]
    fn version_1_headers() {
        let addr = |text: &str| Some(text.parse::<SocketAddr>().expect("address"));
        let cases = [
            (
                "PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET",
                Header::Parsed { length: 41, source: addr("203.0.113.7:5555") },
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n",
                Header::Parsed { length: 45, source: addr("[2001:db8::1]:4000") },
            ),
            ("PROXY UNKNOWN\r\n", Header::Parsed { length: 15, source: None }),
            ("PROXY TCP4 203.0.113.7 10.0.0.1 5555", Header::Incomplete),
            ("PROX", Header::Incomplete),
            (
                "PROXY TCP4 2001:db8::1 10.0.0.1 5555 80\r\n",
                Header::Invalid("PROXY v1 source address does not match its family"),
            ),
            ("PROXY TCP4 203.0.113.7 10.0.0.1 99999 80\r\n", Header::Invalid("PROXY v1 source port")),
            ("PROXY TCP4 a b\r\n", Header::Invalid("malformed PROXY v1 header")),
            ("GET / HTTP/1.1\r\n", Header::Invalid("no PROXY protocol header")),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text.as_bytes()), expected, "{text:?}");
        }
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert_eq!(parse(long.as_bytes()), Header::Invalid("PROXY v1 header too long"));
    }

    #[test]
    fn version_2_headers() {
        let tcp4 = [203, 0, 113, 7, 10, 0, 0, 1, 0x15, 0xb3, 0, 80];
        let header = v2(1, 0x11, &tcp4);
        let mut with_request = header.clone();
        with_request.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let source = Some("203.0.113.7:5555".parse().expect("address"));
        assert_eq!(parse(&with_request), Header::Parsed { length: 28, source });
        assert_eq!(parse(&header[..20]), Header::Incomplete);
        assert_eq!(parse(&v2(0, 0x00, &[])), Header::Parsed { length: 16, source: None }, "LOCAL");
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216])),
            Header::Invalid("PROXY v2 address family not TCP over IPv4 or IPv6")
        );
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&443u16.to_be_bytes());
        let source = Some("[::1]:443".parse().expect("address"));
        assert_eq!(parse(&v2(1, 0x21, &six)), Header::Parsed { length: 52, source });
    }
}
