//! A minimal WebSocket echo (RFC 6455): the handshake, then every text or binary message sent
//! back, pings answered, close returned. Enough to test that the gateway passes upgrades
//! through; not a general WebSocket server.

use base64::Engine;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::EchoBody;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a client's key.
pub fn accept_key(key: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{key}{GUID}")).digest().bytes();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// The client's key, if this is a WebSocket upgrade request.
pub fn upgrade_key(headers: &HeaderMap) -> Option<String> {
    let wants = headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get("sec-websocket-key").and_then(|v| v.to_str().ok())?;
    wants.then(|| key.to_owned())
}

/// The 101 answer that accepts the upgrade.
pub fn switching(key: &str) -> Response<EchoBody> {
    let mut response = Response::new(EchoBody::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key(key)) {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}

/// Echoes frames until the client closes or the connection ends.
pub async fn echo(upgraded: Upgraded) -> std::io::Result<()> {
    let mut io = TokioIo::new(upgraded);
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let length = match head[1] & 0x7f {
            126 => u64::from(io.read_u16().await?),
            127 => io.read_u64().await?,
            n => u64::from(n),
        };
        if length > 16 * 1024 * 1024 {
            return Ok(()); // larger than this echo is for
        }
        let mut mask = [0u8; 4];
        if masked {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; length as usize];
        io.read_exact(&mut payload).await?;
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        let reply_opcode = match opcode {
            0x9 => 0xA, // ping → pong
            0x1 | 0x2 | 0x8 => opcode,
            _ => continue,
        };
        let mut frame = vec![0x80 | reply_opcode];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&payload);
        io.write_all(&frame).await?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_of_the_rfc_example() {
        assert_eq!(super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
