//! `[static.NAME]` folders served by the real binary: validators, ranges, precompressed
//! siblings, Cache-Control by pattern, and every way out of the root refused.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::Surge;
use hyper::{Method, StatusCode};

const SITE: &str = r#"
[services.api]
command = "{echo}"
routes = ["/api"]

[static.assets]
root = "public"
routes = ["/assets"]
index = "index.html"
cache_control = [{ match = "*.html", value = "no-cache" }]
"#;

fn write_site(dir: &Path) {
    let public = dir.join("public");
    std::fs::create_dir_all(public.join("sub")).expect("folders");
    std::fs::write(public.join("app.css"), "body { color: teal }\n").expect("css");
    std::fs::write(public.join("app.css.br"), "brotli bytes").expect("br sibling");
    std::fs::write(public.join("app.css.gz"), "gzip bytes").expect("gz sibling");
    std::fs::write(public.join("app.3f2a9c1b.js"), "console.log(1)\n").expect("js");
    std::fs::write(public.join("index.html"), "<h1>shop</h1>\n").expect("index");
    std::fs::write(public.join("sub").join("notes.txt"), "notes\n").expect("notes");
    std::fs::write(dir.join("secret.txt"), "not for you\n").expect("secret");
    std::os::unix::fs::symlink(dir.join("secret.txt"), public.join("leak.txt")).expect("symlink out");
    std::os::unix::fs::symlink(public.join("app.css"), public.join("alias.css")).expect("symlink in");
    std::fs::write(public.join("page.js"), "let page = 1;\n").expect("js");
    std::os::unix::fs::symlink(dir.join("secret.txt"), public.join("page.js.br")).expect("a sibling out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_validators_ranges_and_precompressed_siblings() {
    let surge = Surge::start_with("", SITE, write_site).await;

    let css = surge.get("/assets/app.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.body, "body { color: teal }\n");
    assert_eq!(css.headers["content-type"], "text/css");
    assert!(css.headers.contains_key("last-modified"));
    let etag = css.headers["etag"].to_str().expect("ascii").to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");
    assert!(!css.headers.contains_key("cache-control"), "no pattern matches a plain name");

    let again =
        surge.request(Method::GET, "/assets/app.css", &[("if-none-match", &etag)], Bytes::new()).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    assert_eq!(again.headers["etag"], etag.as_str());

    assert_eq!(css.headers["vary"], "accept-encoding");
    // A failing If-None-Match is not overruled by If-Modified-Since.
    let modified = css.headers["last-modified"].to_str().expect("ascii").to_owned();
    let both = [("if-none-match", "W/\"other\""), ("if-modified-since", modified.as_str())];
    let changed = surge.request(Method::GET, "/assets/app.css", &both, Bytes::new()).await;
    assert_eq!(changed.status, StatusCode::OK);
    let range = surge.request(Method::GET, "/assets/app.css", &[("range", "bytes=0-3")], Bytes::new()).await;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.body, "body");

    let brotli =
        surge.request(Method::GET, "/assets/app.css", &[("accept-encoding", "br")], Bytes::new()).await;
    assert_eq!(brotli.status, StatusCode::OK);
    assert_eq!(brotli.headers["content-encoding"], "br");
    assert_eq!(brotli.body, "brotli bytes");
    assert_eq!(brotli.headers["content-type"], "text/css", "the type of the file, not of its sibling");
    let preferred = [("accept-encoding", "br;q=0.5, gzip")];
    let gzip = surge.request(Method::GET, "/assets/app.css", &preferred, Bytes::new()).await;
    assert_eq!(
        (gzip.headers["content-encoding"].to_str().ok(), &gzip.body[..]),
        (Some("gzip"), &b"gzip bytes"[..])
    );

    let fingerprinted = surge.get("/assets/app.3f2a9c1b.js").await;
    assert_eq!(fingerprinted.headers["cache-control"], "public, max-age=31536000, immutable");
    let index = surge.get("/assets/").await;
    assert_eq!(index.body, "<h1>shop</h1>\n");
    assert_eq!(index.headers["cache-control"], "no-cache", "the *.html pattern");
    let head = surge.request(Method::HEAD, "/assets/app.css", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(surge.get("/assets/alias.css").await.body, css.body, "a link inside the root is followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outside_the_root_is_served_and_folders_are_not_listed() {
    let surge = Surge::start_with("", SITE, write_site).await;
    for path in [
        "/assets/leak.txt",
        "/assets/%2e%2e/secret.txt",
        "/assets/..%2fsecret.txt",
        "/assets/sub%2f..%2f..%2fsecret.txt",
        "/assets/app.css%00.txt",
        "/assets/sub/",
        "/assets/missing.css",
    ] {
        let answer = surge.get(path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}: {}", String::from_utf8_lossy(&answer.body));
        assert!(!String::from_utf8_lossy(&answer.body).contains("not for you"), "{path}");
    }
    // A precompressed sibling that leads out of the root is not sent: the file itself is.
    let sibling =
        surge.request(Method::GET, "/assets/page.js", &[("accept-encoding", "br")], Bytes::new()).await;
    assert_eq!(sibling.status, StatusCode::OK);
    assert_eq!(sibling.body, "let page = 1;\n");
    assert!(!sibling.headers.contains_key("content-encoding"));
    let post = surge.request(Method::POST, "/assets/app.css", &[], Bytes::from_static(b"x")).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    assert_eq!(surge.get("/assets/sub/notes.txt").await.body, "notes\n");
}

#[test]
fn a_static_folder_that_does_not_exist_is_an_error_naming_its_key() {
    let dir = tempfile::tempdir().expect("dir");
    let config = common::write_config(dir.path(), "[services.api]\ncommand = \"{echo}\"\nroutes = [\"/api\"]\n\n[static.assets]\nroot = \"nowhere\"\nroutes = [\"/assets\"]\n");
    let output = std::process::Command::new(common::SURGE)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("surge check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("static.assets.root") && stderr.contains("is not a folder"), "{stderr}");
}
