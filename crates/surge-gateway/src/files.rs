//! Static content: `[static.NAME]` folders served as files by tower-http's `ServeDir`
//! (`Last-Modified`, `If-Modified-Since`, `Range`), with what it lacks added here: a weak `ETag`
//! from the file's size and time and the 304 it earns, precompressed `.br`/`.gz` siblings,
//! `Cache-Control` per file name pattern (`immutable` for fingerprinted names), an optional
//! index file, and the refusals: other methods, NUL bytes, `..`, and symbolic links that lead
//! out of the root. Folders are never listed.
//!
//! The file (or sibling) is opened here and where it really is checked on the open descriptor;
//! `ServeDir` then reads that very file through `/proc/self/fd`. So a link swapped in between
//! the check and the read cannot lead it out of the root.

use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, VARY,
};
use http::{Method, Request, Response, StatusCode};
use surge_cache::rules;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::body::GatewayBody;
use crate::server::ClientBody;
use crate::GatewayError;

/// What fingerprinted names are answered with: they never change, a new build has new names.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Where the process's open files can be opened again, each by its descriptor's number.
const OPEN_FILES: &str = "/proc/self/fd";

pub(crate) struct StaticSite {
    /// The root as the kernel resolves it, to tell a link that leads out of it.
    root: PathBuf,
    serve: ServeDir,
    index: Option<String>,
    cache_control: Vec<(String, HeaderValue)>,
    fingerprinted: bool,
}

impl StaticSite {
    pub(crate) fn new(config: &surge_config::StaticConfig) -> StaticSite {
        let root = std::fs::canonicalize(&config.root).unwrap_or_else(|_| config.root.clone());
        let serve = ServeDir::new(OPEN_FILES).append_index_html_on_directories(false);
        let cache_control = config
            .cache_control
            .iter()
            .filter_map(|(pattern, value)| Some((pattern.clone(), HeaderValue::from_str(value).ok()?)))
            .collect();
        StaticSite {
            root,
            serve,
            index: config.index.clone(),
            cache_control,
            fingerprinted: config.fingerprinted,
        }
    }

    /// The `Cache-Control` of a file: the first pattern matching its name (or its path, for
    /// a pattern with a `/`), else `immutable` for a fingerprinted name.
    fn cache_control(&self, relative: &str) -> Option<HeaderValue> {
        let name = relative.rsplit('/').next().unwrap_or(relative);
        let found = self.cache_control.iter().find(|(pattern, _)| {
            let subject = if pattern.contains('/') { relative } else { name };
            glob_matches(pattern, subject)
        });
        match found {
            Some((_, value)) => Some(value.clone()),
            None if self.fingerprinted && is_fingerprinted(name) => Some(HeaderValue::from_static(IMMUTABLE)),
            None => None,
        }
    }
}

/// Answers a request for a file under `site`, `prefix` (the route's) taken off its path.
pub(crate) async fn serve(
    site: Arc<StaticSite>,
    request: Request<ClientBody>,
    prefix: &str,
) -> Response<GatewayBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = GatewayError::MethodNotAllowed.into_response();
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let Some(relative) = relative_path(request.uri().path(), prefix) else {
        return not_found(request.uri().path());
    };
    let Some((mut resolved, mut metadata)) = inside(&site.root, &site.root.join(&relative)).await else {
        return not_found(request.uri().path());
    };
    let mut relative = relative;
    if metadata.is_dir() {
        let Some(index) = &site.index else { return not_found(request.uri().path()) };
        match inside(&site.root, &resolved.join(index)).await {
            Some((found, found_metadata)) if found_metadata.is_file() => {
                (resolved, metadata) = (found, found_metadata)
            }
            _ => return not_found(request.uri().path()),
        }
        relative = format!("{}/{index}", relative.trim_end_matches('/')).trim_start_matches('/').to_owned();
    }
    let etag = weak_etag(&metadata);
    let cache_control = site.cache_control(&relative);
    let matches = request
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|wanted| etag.as_ref().is_some_and(|etag| rules::etag_listed(wanted, etag)));
    let mut response = if matches {
        let mut response = Response::new(GatewayBody::full(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let (mut parts, _) = request.into_parts();
        // If-None-Match failed above; If-Modified-Since does not count beside it (RFC 9110
        // §13.1.3), so a file rolled back to an older time is not a 304.
        if parts.headers.contains_key(IF_NONE_MATCH) {
            parts.headers.remove(IF_MODIFIED_SINCE);
        }
        let Some((file, coding)) = open_preferred(&site.root, &resolved, &parts.headers).await else {
            return not_found(parts.uri.path());
        };
        match format!("/{}", file.as_raw_fd()).parse() {
            Ok(uri) => parts.uri = uri,
            Err(_) => return not_found(parts.uri.path()),
        }
        let Ok(response) = site.serve.clone().oneshot(Request::from_parts(parts, ())).await;
        // ServeDir has its own descriptor by now.
        drop(file);
        let mut response = response.map(GatewayBody::streaming);
        let headers = response.headers_mut();
        let kind = mime_guess::from_path(&resolved).first_raw().unwrap_or("application/octet-stream");
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
        if let Some(coding) = coding {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
        }
        response
    };
    let headers = response.headers_mut();
    if let Some(etag) = etag.and_then(|etag| HeaderValue::from_str(&etag).ok()) {
        headers.insert(ETAG, etag);
    }
    if let Some(value) = cache_control {
        headers.insert(CACHE_CONTROL, value);
    }
    // The body may be a precompressed sibling, chosen by Accept-Encoding.
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    response
}

/// The file to send for `file`: its precompressed sibling in the coding the client prefers
/// among those it accepts and that exist, else the file itself; each opened only if it is
/// under `root` (a sibling that leads out is passed over).
async fn open_preferred(
    root: &Path,
    file: &Path,
    request: &http::HeaderMap,
) -> Option<(tokio::fs::File, Option<rules::Coding>)> {
    for coding in rules::codings_by_preference(request) {
        let mut sibling = file.as_os_str().to_owned();
        sibling.push(match coding {
            rules::Coding::Brotli => ".br",
            rules::Coding::Gzip => ".gz",
        });
        if let Some(opened) = open_inside(root, Path::new(&sibling)).await {
            return Some((opened, Some(coding)));
        }
    }
    Some((open_inside(root, file).await?, None))
}

/// `path` opened, if what was opened is a regular file under `root`. The check is on the
/// descriptor (where the kernel says the open file is), not on the path, so no link swapped in
/// meanwhile gets past it; and the open does not wait on a FIFO planted there.
async fn open_inside(root: &Path, path: &Path) -> Option<tokio::fs::File> {
    let mut options = tokio::fs::OpenOptions::new();
    options.read(true).custom_flags(libc::O_NONBLOCK);
    let file = options.open(path).await.ok()?;
    let opened = tokio::fs::read_link(format!("{OPEN_FILES}/{}", file.as_raw_fd())).await.ok()?;
    let regular = file.metadata().await.ok()?.is_file();
    (regular && opened.starts_with(root)).then_some(file)
}

/// What `path` resolves to, links followed, and its metadata, if it exists under `root`: a
/// link may point anywhere.
async fn inside(root: &Path, path: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let resolved = tokio::fs::canonicalize(path).await.ok()?;
    if !resolved.starts_with(root) {
        return None;
    }
    let metadata = tokio::fs::metadata(&resolved).await.ok()?;
    Some((resolved, metadata))
}

fn not_found(path: &str) -> Response<GatewayBody> {
    GatewayError::NoFile { path: path.to_owned() }.into_response()
}

/// The file path a request path names under its route, decoded; `None` for anything that
/// could leave the root or is not a plain path: `..`, NUL bytes, backslashes, bad escapes.
fn relative_path(path: &str, prefix: &str) -> Option<String> {
    let rest = if prefix == "/" { path } else { path.strip_prefix(prefix)? };
    let decoded = percent_decode(rest)?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return None;
    }
    let relative = decoded.trim_start_matches('/');
    let plain = Path::new(relative).components().all(|part| matches!(part, Component::Normal(_)));
    plain.then(|| relative.to_owned())
}

/// `%XX` decoded; `None` for an escape that is not two hex digits, or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let well_formed = text
        .split('%')
        .skip(1)
        .all(|rest| rest.len() >= 2 && rest.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit));
    well_formed.then_some(())?;
    percent_encoding::percent_decode_str(text).decode_utf8().ok().map(|decoded| decoded.into_owned())
}

/// `W/"SIZE-MTIME"`, both in hex: changes when the file does, the same on every node serving
/// one copy.
fn weak_etag(metadata: &std::fs::Metadata) -> Option<String> {
    let modified = metadata.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("W/\"{:x}-{:x}\"", metadata.len(), modified.as_nanos()))
}

/// `*` matches any run of characters; everything else itself.
fn glob_matches(pattern: &str, subject: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == subject;
    }
    if !subject.starts_with(first) || subject.len() < first.len() + last.len() || !subject.ends_with(last) {
        return false;
    }
    let mut rest = &subject[first.len()..subject.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// A name with a content hash in it, as bundlers write them: `app.3f2a9c1b.js`,
/// `index-BxK3fG2a.js`: a piece of 8 or more letters and digits, with a digit, after a `.` or
/// `-` and before the extension.
fn is_fingerprinted(name: &str) -> bool {
    let Some((stem, _extension)) = name.rsplit_once('.') else { return false };
    let mut pieces = stem.split(['.', '-']);
    pieces.next();
    pieces.any(|piece| {
        piece.len() >= 8
            && piece.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && piece.bytes().any(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_that_could_leave_the_root_are_refused() {
        assert_eq!(relative_path("/assets/app.js", "/assets").as_deref(), Some("app.js"));
        assert_eq!(relative_path("/assets/a%20b.css", "/assets").as_deref(), Some("a b.css"));
        assert_eq!(relative_path("/a/b.txt", "/").as_deref(), Some("a/b.txt"));
        assert_eq!(relative_path("/assets", "/assets").as_deref(), Some(""));
        for refused in [
            "/assets/../etc/passwd",
            "/assets/%2e%2e/x",
            "/assets/a%00b",
            "/assets/a%5c..%5cb",
            "/assets/%zz",
        ] {
            assert_eq!(relative_path(refused, "/assets"), None, "{refused}");
        }
        assert_eq!(relative_path("/other/x", "/assets"), None);
    }

    #[tokio::test]
    async fn only_regular_files_that_are_really_under_the_root_are_opened() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("public");
        std::fs::create_dir(&root).expect("root");
        let root = std::fs::canonicalize(&root).expect("canonical root");
        std::fs::write(root.join("app.css"), "body {}").expect("file");
        std::fs::write(dir.path().join("secret.txt"), "not for you").expect("secret");
        std::os::unix::fs::symlink(root.join("app.css"), root.join("alias.css")).expect("link in");
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("leak.txt")).expect("link out");
        let made = std::process::Command::new("mkfifo").arg(root.join("pipe")).status().expect("mkfifo");
        assert!(made.success(), "mkfifo");
        assert!(open_inside(&root, &root.join("app.css")).await.is_some());
        assert!(open_inside(&root, &root.join("alias.css")).await.is_some(), "a link that stays inside");
        assert!(open_inside(&root, &root.join("leak.txt")).await.is_none(), "a link out");
        assert!(open_inside(&root, &root).await.is_none(), "a folder");
        assert!(
            open_inside(&root, &root.join("pipe")).await.is_none(),
            "a FIFO, without waiting for a writer"
        );
        assert!(open_inside(&root, &root.join("missing")).await.is_none());
    }

    #[test]
    fn fingerprinted_names_are_told_apart() {
        for name in ["app.3f2a9c1b.js", "index-BxK3fG2a.js", "logo.0123456789abcdef.png"] {
            assert!(is_fingerprinted(name), "{name}");
        }
        for name in ["app.js", "index.html", "favicon.ico", "jquery-3.7.1.min.js", "readme-abcdefgh.txt"] {
            assert!(!is_fingerprinted(name), "{name}");
        }
    }

    #[test]
    fn globs_match_names() {
        assert!(glob_matches("*.css", "site.css"));
        assert!(!glob_matches("*.css", "site.css.map"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("img/*.png", "img/a.png"));
        assert!(glob_matches("a*b*c", "aXbYc"));
        assert!(!glob_matches("a*b*c", "ac"));
        assert!(glob_matches("index.html", "index.html"));
    }
}
