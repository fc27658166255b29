//! Static content: `[static.NAME]` folders served as files by tower-http's `ServeDir`
//! (`Last-Modified`, `Range`, precompressed `.br`/`.gz` siblings), with what it lacks added
//! here: a weak `ETag` from the file's size and time and the 304 it earns, `Cache-Control` per
//! file name pattern (`immutable` for fingerprinted names), an optional index file, and the
//! refusals: other methods, NUL bytes, `..`, and symbolic links that lead out of the root.
//! Folders are never listed.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, ALLOW, CACHE_CONTROL, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, VARY,
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
        let serve = ServeDir::new(&root)
            .precompressed_br()
            .precompressed_gzip()
            .append_index_html_on_directories(false);
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
        // ServeDir opens a `.br` or `.gz` sibling itself, following links: one that leads out
        // of the root means this file is sent as it is.
        if !siblings_inside(&resolved, &site.root).await {
            parts.headers.remove(ACCEPT_ENCODING);
        }
        let served_path = resolved.strip_prefix(&site.root).map(Path::to_path_buf).unwrap_or_default();
        let target = format!("/{}", encode_path(&served_path));
        match target.parse() {
            Ok(uri) => parts.uri = uri,
            Err(_) => return not_found(&target),
        }
        let Ok(response) = site.serve.clone().oneshot(Request::from_parts(parts, ())).await;
        response.map(GatewayBody::streaming)
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

/// Whether the precompressed siblings of `file` that exist stay inside `root`.
async fn siblings_inside(file: &Path, root: &Path) -> bool {
    for extension in ["br", "gz"] {
        let mut sibling = file.as_os_str().to_owned();
        sibling.push(".");
        sibling.push(extension);
        let sibling = PathBuf::from(sibling);
        if tokio::fs::symlink_metadata(&sibling).await.is_ok() && inside(root, &sibling).await.is_none() {
            return false;
        }
    }
    true
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

/// Every byte but unreserved ones and `/` is escaped in a request target made from a path.
const PATH_ESCAPED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// A path as a request target again.
fn encode_path(path: &Path) -> String {
    percent_encoding::utf8_percent_encode(&path.to_string_lossy(), PATH_ESCAPED).to_string()
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
