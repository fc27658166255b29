//! Which service a request is for: longest path prefix, host-specific routes first.

use surge_config::Route;

/// Routes, each with what the gateway needs once it matches (`T`).
#[derive(Debug)]
pub struct Router<T> {
    entries: Vec<(Route, T)>,
}

impl<T> Router<T> {
    pub fn new(routes: impl IntoIterator<Item = (Route, T)>) -> Self {
        Router { entries: routes.into_iter().collect() }
    }

    /// What the best route for `host` (as sent, port and case allowed) and `path` leads to.
    ///
    /// As in nginx, a route for the request's host wins over any route for all hosts; among
    /// those, the longest prefix wins. Prefixes match whole path segments: `/api` matches
    /// `/api` and `/api/users`, not `/apix`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let host = host.map(strip_port);
        self.entries
            .iter()
            .filter(|(route, _)| match &route.host {
                None => true,
                Some(wanted) => host.is_some_and(|h| h.eq_ignore_ascii_case(wanted)),
            })
            .filter(|(route, _)| prefix_matches(&route.prefix, path))
            .max_by_key(|(route, _)| (route.host.is_some(), route.prefix.len()))
            .map(|(_, target)| target)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/" || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: "[::1]:8080".
        return host.split_once(']').map_or(host, |(addr, _)| &host[..addr.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, host: Option<&str>) -> Route {
        Route {
            prefix: prefix.into(),
            host: host.map(Into::into),
            retry: false,
            rate_limit: None,
            max_body: None,
            async_queue: None,
            cache: None,
        }
    }

    /// The target, copied out.
    trait Service {
        fn service(self) -> Option<usize>;
    }
    impl Service for Option<&usize> {
        fn service(self) -> Option<usize> {
            self.copied()
        }
    }

    fn router() -> Router<usize> {
        Router::new([
            (route("/", None), 0),
            (route("/api", None), 1),
            (route("/api/v2", None), 2),
            (route("/", Some("shop.example")), 3),
            (route("/static", Some("shop.example")), 4),
        ])
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let router = router();
        assert_eq!(router.route(None, "/").service(), Some(0));
        assert_eq!(router.route(None, "/api").service(), Some(1));
        assert_eq!(router.route(None, "/api/users").service(), Some(1));
        assert_eq!(router.route(None, "/apix").service(), Some(0));
        assert_eq!(router.route(None, "/api/v2/orders").service(), Some(2));
        assert_eq!(router.route(None, "/api/v20").service(), Some(1));
    }

    #[test]
    fn host_routes_win_and_ignore_port_and_case() {
        let router = router();
        assert_eq!(router.route(Some("Shop.Example:8080"), "/api/users").service(), Some(3));
        assert_eq!(router.route(Some("shop.example"), "/static/app.js").service(), Some(4));
        assert_eq!(router.route(Some("other.example"), "/api").service(), Some(1));
        assert_eq!(router.route(Some("[::1]:80"), "/api").service(), Some(1));
    }

    #[test]
    fn no_match_without_a_catch_all() {
        let router = Router::new([(route("/api", None), 0)]);
        assert_eq!(router.route(None, "/").service(), None);
        assert_eq!(router.route(None, "/other").service(), None);
    }

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
