//! Who may use the admin API. It can scale services, so:
//! - a bearer token is required for every request that changes state (surge makes one for the
//!   run when none is configured), and for every request when the API listens off loopback
//!   (where surge refuses to run without a configured one); `/metrics` can be left open for a
//!   scraper (`admin.metrics_public`);
//! - on loopback, `Host` must name loopback, so a web page that rebinds its own DNS name to
//!   127.0.0.1 cannot read the API from a browser on the machine;
//! - a request that changes state must say `Content-Type: application/json` and carry no
//!   foreign `Origin`: a cross-site page can send neither without a CORS preflight, which the
//!   API never grants. A publish to a queue keeps its payload's own type when it carries the
//!   token, which such a page cannot send either.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, Method, StatusCode};

#[derive(Debug, Clone)]
pub struct Access {
    token: Option<String>,
    /// Off loopback every endpoint needs the token.
    everything_needs_token: bool,
    metrics_public: bool,
    loopback: bool,
}

/// Why a request is refused, with the status it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the admin API on loopback answers only to Host localhost, 127.0.0.1 or [::1]")]
    ForeignHost,
    #[error("this needs the admin token: send `Authorization: Bearer <token>` (from admin.token_file, SURGE_ADMIN_TOKEN, or the .surge/admin.token that surge up writes beside surge.toml)")]
    MissingToken,
    #[error("the admin token is wrong")]
    WrongToken,
    #[error("a request that changes state must be `Content-Type: application/json`")]
    NotJson,
    #[error("requests from web pages of other origins are refused")]
    CrossOrigin,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::ForeignHost | Refusal::CrossOrigin => StatusCode::FORBIDDEN,
            Refusal::MissingToken | Refusal::WrongToken => StatusCode::UNAUTHORIZED,
            Refusal::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

impl Access {
    /// The rules for an API on `listen`; `Err` when it would listen off loopback unprotected.
    pub fn new(listen: SocketAddr, token: Option<String>, metrics_public: bool) -> Result<Access, String> {
        let loopback = listen.ip().is_loopback();
        if !loopback && token.is_none() {
            return Err(format!(
                "the admin API would listen on {listen}, off loopback, with no token: anyone who reaches it \
                 could scale services. Set admin.token_file (or SURGE_ADMIN_TOKEN), or listen on 127.0.0.1"
            ));
        }
        Ok(Access { token, everything_needs_token: !loopback, metrics_public, loopback })
    }

    /// Whether a request may go on.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.loopback
            && !headers.get(header::HOST).and_then(|h| h.to_str().ok()).is_some_and(names_loopback)
        {
            return Err(Refusal::ForeignHost);
        }
        let changes = !matches!(*method, Method::GET | Method::HEAD);
        // A worker settling its own lease: the lease's token (random, given to that worker
        // alone) is what authorises it, and no cross-site page can send the field.
        let lease =
            *method == Method::POST && is_lease_path(path) && headers.contains_key("x-surge-lease-token");
        if let Some(token) = self.token.as_ref().filter(|_| !lease) {
            // The dashboard's own files hold no data; what they fetch needs the token.
            let open = (self.metrics_public && path == "/metrics") || crate::dashboard::is_asset(path);
            if changes || (self.everything_needs_token && !open) {
                let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                match sent.and_then(|v| v.strip_prefix("Bearer ")) {
                    None => return Err(Refusal::MissingToken),
                    Some(sent) if !same(sent.trim().as_bytes(), token.as_bytes()) => {
                        return Err(Refusal::WrongToken)
                    }
                    Some(_) => {}
                }
            }
        }
        // A publish carries the payload's own type; with a token (which a cross-site page
        // cannot send) nothing else is needed.
        let publish = path.starts_with("/queues/")
            && (path.ends_with("/messages") || path.ends_with("/messages:batch"));
        if changes && !lease && !(publish && self.token.is_some()) {
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(Refusal::NotJson);
            }
        }
        if changes {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let origin = origin.to_str().unwrap_or_default();
                let host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
                // The dashboard's own page, wherever the API listens, or a page on loopback.
                let own = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                let same_origin =
                    host.is_some_and(|host| own.is_some_and(|own| host.eq_ignore_ascii_case(own)));
                if !same_origin && !host.is_some_and(names_loopback) {
                    return Err(Refusal::CrossOrigin);
                }
            }
        }
        Ok(())
    }
}

/// `/queues/NAME/leases/ID`, or that with `/ack` or `/fail`: nothing else.
fn is_lease_path(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["", "queues", name, "leases", id] => !name.is_empty() && !id.is_empty(),
        ["", "queues", name, "leases", id, "ack" | "fail"] => !name.is_empty() && !id.is_empty(),
        _ => false,
    }
}

/// `localhost`, `127.0.0.1` or `[::1]`, with or without a port.
fn names_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]"
}

/// Equal bytes, compared in time that does not depend on where they first differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), v.parse().expect("value"))).collect()
    }

    const LOCAL: &str = "127.0.0.1:9900";
    const JSON: (&str, &str) = ("content-type", "application/json");

    fn access(listen: &str, token: Option<&str>, metrics_public: bool) -> Access {
        Access::new(listen.parse().expect("address"), token.map(str::to_owned), metrics_public)
            .expect("allowed")
    }

    #[test]
    fn off_loopback_a_token_is_required() {
        assert!(Access::new("0.0.0.0:9900".parse().expect("address"), None, false).is_err());
        let open = access("0.0.0.0:9900", Some("s3cret"), true);
        let host = ("host", "10.0.0.5:9900");
        assert_eq!(open.check(&Method::GET, "/status", &headers(&[host])), Err(Refusal::MissingToken));
        assert_eq!(open.check(&Method::GET, "/metrics", &headers(&[host])), Ok(()));
        let bearer = ("authorization", "Bearer s3cret");
        assert_eq!(open.check(&Method::GET, "/status", &headers(&[host, bearer])), Ok(()));
        let wrong = ("authorization", "Bearer s3cres");
        assert_eq!(open.check(&Method::GET, "/status", &headers(&[host, wrong])), Err(Refusal::WrongToken));
        let closed = access("0.0.0.0:9900", Some("s3cret"), false);
        assert_eq!(closed.check(&Method::GET, "/metrics", &headers(&[host])), Err(Refusal::MissingToken));
    }

    #[test]
    fn the_dashboard_page_loads_anywhere_and_acts_from_its_own_origin() {
        let guarded = access("0.0.0.0:9900", Some("s3cret"), false);
        let host = ("host", "10.0.0.5:9900");
        for asset in ["/", "/dashboard.js", "/dashboard.css"] {
            assert_eq!(guarded.check(&Method::GET, asset, &headers(&[host])), Ok(()), "{asset}");
        }
        for data in ["/overview", "/events", "/history", "/services/web/instances/web-1/log"] {
            let refused = guarded.check(&Method::GET, data, &headers(&[host]));
            assert_eq!(refused, Err(Refusal::MissingToken), "{data}");
        }
        let bearer = ("authorization", "Bearer s3cret");
        let drain = "/services/web/instances/web-1/drain";
        let own = ("origin", "http://10.0.0.5:9900");
        assert_eq!(guarded.check(&Method::POST, drain, &headers(&[host, JSON, bearer, own])), Ok(()));
        let other = ("origin", "http://10.0.0.6:9900");
        let refused = guarded.check(&Method::POST, drain, &headers(&[host, JSON, bearer, other]));
        assert_eq!(refused, Err(Refusal::CrossOrigin));
    }

    #[test]
    fn on_loopback_reads_are_open_and_changes_need_the_token() {
        let guarded = access(LOCAL, Some("s3cret"), false);
        let host = ("host", "127.0.0.1:9900");
        assert_eq!(guarded.check(&Method::GET, "/status", &headers(&[host])), Ok(()));
        let scale = "/services/web/scale";
        assert_eq!(guarded.check(&Method::POST, scale, &headers(&[host, JSON])), Err(Refusal::MissingToken));
        let bearer = ("authorization", "Bearer s3cret");
        assert_eq!(guarded.check(&Method::POST, scale, &headers(&[host, JSON, bearer])), Ok(()));
    }

    #[test]
    fn publishes_keep_their_type_and_leases_are_settled_by_their_own_token() {
        let guarded = access(LOCAL, Some("s3cret"), false);
        let (host, bearer) = (("host", "127.0.0.1:9900"), ("authorization", "Bearer s3cret"));
        let text = ("content-type", "text/plain");
        let publish = "/queues/jobs/messages";
        assert_eq!(guarded.check(&Method::POST, publish, &headers(&[host, text, bearer])), Ok(()));
        assert_eq!(
            guarded.check(&Method::POST, publish, &headers(&[host, text])),
            Err(Refusal::MissingToken)
        );
        let ack = "/queues/jobs/leases/00000000000000ff/ack";
        let lease = ("x-surge-lease-token", "1f");
        assert_eq!(guarded.check(&Method::POST, ack, &headers(&[host, lease])), Ok(()));
        assert_eq!(guarded.check(&Method::POST, ack, &headers(&[host])), Err(Refusal::MissingToken));
        let foreign = ("origin", "https://evil.example");
        assert_eq!(
            guarded.check(&Method::POST, ack, &headers(&[host, lease, foreign])),
            Err(Refusal::CrossOrigin)
        );
        // Only the lease calls: a queue named `leases` gets no way around the token.
        for other in ["/queues/leases/messages", "/queues/leases/dead/purge", "/queues/jobs/leases/ff/purge"]
        {
            let refused = guarded.check(&Method::POST, other, &headers(&[host, lease, text]));
            assert_eq!(refused, Err(Refusal::MissingToken), "{other}");
        }
    }

    #[test]
    fn browsers_cannot_reach_it_by_rebinding_or_cross_site_posts() {
        let open = access(LOCAL, None, false);
        for host in ["localhost:9900", "127.0.0.1", "[::1]:9900", "LOCALHOST"] {
            assert_eq!(open.check(&Method::GET, "/status", &headers(&[("host", host)])), Ok(()), "{host}");
        }
        for host in ["evil.example:9900", "127.0.0.1.evil.example", "localhost.evil.example"] {
            let refused = open.check(&Method::GET, "/status", &headers(&[("host", host)]));
            assert_eq!(refused, Err(Refusal::ForeignHost), "{host}");
        }
        assert_eq!(open.check(&Method::GET, "/status", &HeaderMap::new()), Err(Refusal::ForeignHost));
        let host = ("host", "localhost:9900");
        let scale = "/services/web/scale";
        let form = ("content-type", "text/plain");
        assert_eq!(open.check(&Method::POST, scale, &headers(&[host, form])), Err(Refusal::NotJson));
        assert_eq!(open.check(&Method::POST, scale, &headers(&[host])), Err(Refusal::NotJson));
        let foreign = ("origin", "https://evil.example");
        assert_eq!(
            open.check(&Method::POST, scale, &headers(&[host, JSON, foreign])),
            Err(Refusal::CrossOrigin)
        );
        let local = ("origin", "http://localhost:9900");
        assert_eq!(open.check(&Method::POST, scale, &headers(&[host, JSON, local])), Ok(()));
        assert_eq!(open.check(&Method::POST, scale, &headers(&[host, JSON])), Ok(()));
    }
}
