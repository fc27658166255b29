//! HTTP/2 attacks on loopback, by raw frames: rapid reset (CVE-2023-44487) and a CONTINUATION
//! flood (CVE-2024-27316). The attacker's connection is ended, other clients are served
//! meanwhile, and the gateway's memory stays bounded.

mod common;

use std::time::Duration;

use common::Surge;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `GET /` for `localhost` in HPACK: static-table :method, :scheme, :path, and :authority as a
/// literal without indexing.
fn get_root() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend_from_slice(b"localhost");
    block
}

/// The gateway's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

/// Reads frames until the server sends GOAWAY or closes: which of the two, or neither within
/// the guard time.
async fn until_goaway(reader: &mut (impl AsyncRead + Unpin)) -> &'static str {
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return "closed",
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            while pending.len() >= 9 {
                let length =
                    usize::from(pending[0]) << 16 | usize::from(pending[1]) << 8 | usize::from(pending[2]);
                if pending.len() < 9 + length {
                    break;
                }
                if pending[3] == GOAWAY {
                    return "goaway";
                }
                pending.drain(..9 + length);
            }
        }
    })
    .await;
    outcome.unwrap_or("neither")
}

/// Another client's plain requests while an attack runs: how many were answered 200.
async fn served_meanwhile(surge: &Surge, requests: usize) -> usize {
    let mut served = 0;
    for _ in 0..requests {
        if surge.get("/").await.status == StatusCode::OK {
            served += 1;
        }
    }
    served
}

/// What an attack on its own connection did: how many of another client's requests were
/// answered 200 while it ran, how the attacker's connection ended, and how much the gateway's
/// memory grew.
struct Aftermath {
    served: usize,
    ended: &'static str,
    grown: u64,
}

/// Opens an HTTP/2 connection (preface and SETTINGS, then `opening`) and sends `frames` until
/// the gateway stops taking them (it may close halfway: that is the point), while another
/// client sends 20 requests.
async fn attack(
    surge: &Surge,
    opening: Vec<u8>,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> Aftermath {
    let before = rss(surge.pid());
    let mut attacker = TcpStream::connect(surge.gateway).await.expect("connect");
    attacker.write_all(PREFACE).await.expect("preface");
    attacker.write_all(&frame(SETTINGS, 0, 0, &[])).await.expect("settings");
    attacker.write_all(&opening).await.expect("opening frames");
    let (mut reader, mut writer) = attacker.into_split();
    let sending = tokio::spawn(async move {
        for frames in frames {
            if writer.write_all(&frames).await.is_err() {
                return;
            }
        }
    });
    let served = served_meanwhile(surge, 20).await;
    let ended = until_goaway(&mut reader).await;
    let _ = sending.await;
    Aftermath { served, ended, grown: rss(surge.pid()).saturating_sub(before) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_attackers_connection_and_others_are_served() {
    let surge = Surge::start(WEB).await;
    let block = get_root();
    let mut burst = Vec::new();
    for stream in (1..40_000u32).step_by(2) {
        burst.extend_from_slice(&frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
        burst.extend_from_slice(&frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    let Aftermath { served, ended, grown } = attack(&surge, Vec::new(), std::iter::once(burst)).await;
    assert_eq!(served, 20, "another client was refused during the attack");
    assert_eq!(ended, "goaway", "the attacker's connection was not ended with GOAWAY");
    assert!(grown < 64 << 20, "memory grew by {} MiB", grown >> 20);
    assert_eq!(surge.get("/").await.status, StatusCode::OK, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_and_others_are_served() {
    let surge = Surge::start(WEB).await;
    let headers = frame(HEADERS, END_STREAM, 1, &get_root());
    // Header fields that never end: literal fields, 16 KiB a frame, 64 MiB in all if let be.
    let mut payload = Vec::new();
    while payload.len() < 16 * 1024 - 32 {
        payload.push(0x00); // literal without indexing, new name
        payload.push(7);
        payload.extend_from_slice(b"x-flood");
        payload.push(20);
        payload.extend_from_slice(&[b'v'; 20]);
    }
    let continuation = frame(CONTINUATION, 0, 1, &payload);
    let Aftermath { served, ended, grown } =
        attack(&surge, headers, std::iter::repeat_n(continuation, 4096)).await;
    assert_eq!(served, 20, "another client was refused during the flood");
    assert_eq!(ended, "goaway", "the flooding connection was not ended with GOAWAY");
    assert!(grown < 64 << 20, "memory grew by {} MiB", grown >> 20);
}
