//! 200 MB up and down through the gateway: bodies stream, memory stays flat.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use common::Surge;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};

const SIZE: u64 = 200 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// `remaining` bytes in 64 KiB chunks, of unknown length to the receiver (chunked encoding).
struct Upload {
    remaining: u64,
    chunk: Bytes,
}

impl Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let take = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= take as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }
}

/// The largest resident set the process has had, in bytes (VmHWM).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_megabytes_each_way_with_flat_memory() {
    let surge = Surge::start(
        "[services.web]\ncommand = \"{echo}\"\nroutes = [{ prefix = \"/\", max_body = \"1GiB\" }]\n",
    )
    .await;
    let before = peak_rss(surge.pid());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Upload>();

    let upload = Upload { remaining: SIZE, chunk: Bytes::from(vec![b'u'; CHUNK]) };
    let request = Request::post(surge.url("/upload")).body(upload).expect("request");
    let response = client.request(request).await.expect("upload answer");
    assert_eq!(response.status(), StatusCode::OK);
    let echo: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.expect("body").to_bytes())
            .expect("JSON");
    assert_eq!(echo["body_bytes"], SIZE);

    let request = Request::get(surge.url(&format!("/download?bytes={SIZE}")))
        .body(Upload { remaining: 0, chunk: Bytes::new() })
        .expect("request");
    let mut body = client.request(request).await.expect("download answer").into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.expect("frame").data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);

    let after = peak_rss(surge.pid());
    eprintln!("gateway peak RSS {} MiB before, {} MiB after 2 × 200 MiB", before >> 20, after >> 20);
    assert!(after - before < 32 << 20, "memory grew by {} MiB", (after - before) >> 20);
}
