//! A request path as routing must see it: one spelling per resource, so that `/z/../api/x`,
//! `/%61pi/x` and `//api/x` cannot slip past a route's rate limit as paths that merely look
//! unlike `/api/x`. The normalised path is also what is forwarded, so the instance serves what
//! was routed.

use std::borrow::Cow;

/// `path` with unreserved percent-escapes decoded (RFC 3986 §2.3: `%61` is `a`, `%2E` is `.`),
/// the hex of other escapes upper-cased, runs of `/` merged, and `.` and `..` segments removed
/// (§5.2.4; `..` at the root stays at the root). Most paths need none of it and are returned
/// as they are, unallocated; so is a target that is not a path (`*`).
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || is_normal(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path.as_bytes());
    let mut segments: Vec<&[u8]> = Vec::new();
    let trailing_slash = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut normal = Vec::with_capacity(decoded.len() + 1);
    for segment in &segments {
        normal.push(b'/');
        normal.extend_from_slice(segment);
    }
    if normal.is_empty() || (trailing_slash && !segments.is_empty()) {
        normal.push(b'/');
    }
    // Only ASCII went in and only whole escapes were decoded to ASCII, so this never fails.
    Cow::Owned(String::from_utf8(normal).unwrap_or_else(|_| path.to_owned()))
}

/// No escape, no empty segment, no dot segment: nothing to do.
fn is_normal(path: &[u8]) -> bool {
    let mut previous = b'/';
    for (i, &byte) in path.iter().enumerate().skip(1) {
        match byte {
            b'%' => return false,
            b'/' if previous == b'/' => return false,
            b'.' if previous == b'/' => {
                let rest = &path[i..];
                if rest == b"." || rest == b".." || rest.starts_with(b"./") || rest.starts_with(b"../") {
                    return false;
                }
            }
            _ => {}
        }
        previous = byte;
    }
    true
}

/// Decodes `%XX` where XX is an unreserved character; upper-cases the hex of the others.
fn decode_unreserved(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let byte = path[i];
        let escape = (byte == b'%').then(|| path.get(i + 1..i + 3)).flatten();
        match escape.and_then(|hex| Some((hex, u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?)))
        {
            Some((_, decoded)) if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) => {
                out.push(decoded);
                i += 3;
            }
            Some((hex, _)) => {
                out.push(b'%');
                out.extend(hex.iter().map(u8::to_ascii_uppercase));
                i += 3;
            }
            None => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_routing() {
        let cases = [
            ("/api/x", "/api/x"),
            ("/", "/"),
            ("/api/x/", "/api/x/"),
            ("/z/../api/x", "/api/x"),
            ("/api/./x", "/api/x"),
            ("/%61pi/x", "/api/x"),
            ("/%2e%2E/api/x", "/api/x"),
            ("//api//x", "/api/x"),
            ("/../../api", "/api"),
            ("/api/..", "/"),
            ("/api/x/.", "/api/x/"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/a%zz", "/a%zz"),
            ("/a%4", "/a%4"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/.b/..c", "/a/.b/..c"),
            ("/%7Euser", "/~user"),
            ("*", "*"),
        ];
        for (path, normal) in cases {
            assert_eq!(normalize(path), normal, "{path}");
        }
    }

    #[test]
    fn a_normal_path_is_not_copied() {
        assert!(matches!(normalize("/api/users/42"), Cow::Borrowed(_)));
        assert!(matches!(normalize("/.well-known/acme"), Cow::Borrowed(_)));
    }
}
