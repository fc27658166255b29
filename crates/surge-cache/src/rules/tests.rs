//! The rules as tables: each row a request and a response, and what a shared cache does.

use super::*;

type Fields<'a> = Vec<(&'a str, &'a str)>;
/// What, method, request fields, status, response fields, policy, stored for (seconds).
type StoreRow<'a> = (&'a str, Method, Fields<'a>, u16, Fields<'a>, &'a Policy, Result<u64, NotStored>);
/// What, response fields, policy, request fields, seconds since stored, use.
type UseRow<'a> = (&'a str, Fields<'a>, &'a Policy, Fields<'a>, u64, Use);
/// What, request fields, answered 304.
type ConditionRow<'a> = (&'a str, Fields<'a>, bool);

fn fields(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
    }
    headers
}

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn what_is_stored_and_for_how_long() {
    let default = Policy::default();
    let with_default = Policy { default_ttl: Some(MINUTE), ..Policy::default() };
    let cookies = Policy { store_set_cookie: true, ..Policy::default() };
    let date = "Tue, 01 Dec 2026 12:00:00 GMT";
    // (what, method, request fields, status, response fields, policy, stored for)
    let rows: Vec<StoreRow> = vec![
        ("max-age", Method::GET, vec![], 200, vec![("cache-control", "max-age=60")], &default, Ok(60)),
        (
            "s-maxage wins over max-age",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60, s-maxage=10")],
            &default,
            Ok(10),
        ),
        (
            "Expires minus Date",
            Method::GET,
            vec![],
            200,
            vec![("date", date), ("expires", "Tue, 01 Dec 2026 12:05:00 GMT")],
            &default,
            Ok(300),
        ),
        (
            "max-age wins over Expires",
            Method::GET,
            vec![],
            200,
            vec![
                ("cache-control", "max-age=5"),
                ("date", date),
                ("expires", "Tue, 01 Dec 2026 12:05:00 GMT"),
            ],
            &default,
            Ok(5),
        ),
        (
            "an Expires that does not parse is expired",
            Method::GET,
            vec![],
            200,
            vec![("expires", "0")],
            &default,
            Ok(0),
        ),
        (
            "no freshness, no default: not kept",
            Method::GET,
            vec![],
            200,
            vec![],
            &default,
            Err(NotStored::NoFreshness),
        ),
        ("no freshness: the route's default", Method::GET, vec![], 200, vec![], &with_default, Ok(60)),
        (
            "the default is for heuristically cacheable statuses",
            Method::GET,
            vec![],
            500,
            vec![],
            &with_default,
            Err(NotStored::NoFreshness),
        ),
        (
            "explicit freshness on any status",
            Method::GET,
            vec![],
            500,
            vec![("cache-control", "max-age=3")],
            &default,
            Ok(3),
        ),
        ("404 takes the default", Method::GET, vec![], 404, vec![], &with_default, Ok(60)),
        (
            "POST is not kept",
            Method::POST,
            vec![],
            200,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::Method),
        ),
        (
            "HEAD is answered from GET's entry, not kept",
            Method::HEAD,
            vec![],
            200,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::Method),
        ),
        (
            "a 304 is not kept",
            Method::GET,
            vec![],
            304,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::Status),
        ),
        (
            "partial content is not kept",
            Method::GET,
            vec![],
            206,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::Status),
        ),
        (
            "no-store in the response",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60, no-store")],
            &default,
            Err(NotStored::NoStore),
        ),
        (
            "no-store in the request",
            Method::GET,
            vec![("cache-control", "no-store")],
            200,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::NoStore),
        ),
        (
            "private",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "private, max-age=60")],
            &default,
            Err(NotStored::Private),
        ),
        (
            "Authorization without a shared-cache directive",
            Method::GET,
            vec![("authorization", "Bearer x")],
            200,
            vec![("cache-control", "max-age=60")],
            &default,
            Err(NotStored::Authorization),
        ),
        (
            "Authorization with public",
            Method::GET,
            vec![("authorization", "Bearer x")],
            200,
            vec![("cache-control", "public, max-age=60")],
            &default,
            Ok(60),
        ),
        (
            "Authorization with s-maxage",
            Method::GET,
            vec![("authorization", "Bearer x")],
            200,
            vec![("cache-control", "s-maxage=30")],
            &default,
            Ok(30),
        ),
        (
            "Authorization with must-revalidate",
            Method::GET,
            vec![("authorization", "Bearer x")],
            200,
            vec![("cache-control", "must-revalidate, max-age=9")],
            &default,
            Ok(9),
        ),
        (
            "Set-Cookie is not kept",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60"), ("set-cookie", "id=1")],
            &default,
            Err(NotStored::SetCookie),
        ),
        (
            "Set-Cookie kept when the route says so",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60"), ("set-cookie", "id=1")],
            &cookies,
            Ok(60),
        ),
        (
            "Vary: * is not kept",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60"), ("vary", "*")],
            &default,
            Err(NotStored::VaryStar),
        ),
        (
            "no-cache is kept, to be revalidated",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "no-cache")],
            &default,
            Ok(0),
        ),
        (
            "a max-age that is not a number is stale",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=soon")],
            &default,
            Ok(0),
        ),
        (
            "repeated max-age: the shortest",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60"), ("cache-control", "max-age=20")],
            &default,
            Ok(20),
        ),
        (
            "unknown directives are ignored",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=60, x-whatever=\"a,b\", , ;")],
            &default,
            Ok(60),
        ),
        (
            "a quoted max-age",
            Method::GET,
            vec![],
            200,
            vec![("cache-control", "max-age=\"15\"")],
            &default,
            Ok(15),
        ),
    ];
    for (what, method, request, status, response, policy, expected) in rows {
        let status = StatusCode::from_u16(status).expect("status");
        let got = storable(&method, &fields(&request), status, &fields(&response), policy)
            .map(|s| s.lifetime.as_secs());
        assert_eq!(got, expected, "{what}");
    }
}

fn stored(response: &[(&str, &str)], policy: &Policy) -> Storable {
    storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &fields(response), policy).expect("storable")
}

#[test]
fn what_is_served_fresh_stale_or_after_asking_again() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let graceful = Policy { grace: Duration::from_secs(30), ..Policy::default() };
    let obeying = Policy { obey_request_no_cache: true, ..Policy::default() };
    let plain = Policy::default();
    // (what, response fields, policy, request fields, seconds since stored, use)
    let rows: Vec<UseRow> = vec![
        ("fresh", vec![("cache-control", "max-age=60")], &plain, vec![], 59, Use::Fresh),
        ("stale at its lifetime", vec![("cache-control", "max-age=60")], &plain, vec![], 60, Use::Revalidate),
        (
            "Age counts toward staleness",
            vec![("cache-control", "max-age=60"), ("age", "50")],
            &plain,
            vec![],
            10,
            Use::Revalidate,
        ),
        (
            "request max-age shorter than the age",
            vec![("cache-control", "max-age=60")],
            &obeying,
            vec![("cache-control", "max-age=10")],
            20,
            Use::Revalidate,
        ),
        (
            "request min-fresh not left",
            vec![("cache-control", "max-age=60")],
            &plain,
            vec![("cache-control", "min-fresh=30")],
            40,
            Use::Revalidate,
        ),
        (
            "request no-cache, obeyed",
            vec![("cache-control", "max-age=60")],
            &obeying,
            vec![("cache-control", "no-cache")],
            1,
            Use::Revalidate,
        ),
        (
            "a hard reload does not bypass the cache by default",
            vec![("cache-control", "max-age=60")],
            &plain,
            vec![("cache-control", "no-cache, max-age=0")],
            1,
            Use::Fresh,
        ),
        (
            "s-maxage with stale-while-revalidate",
            vec![("cache-control", "s-maxage=1, stale-while-revalidate=59")],
            &plain,
            vec![],
            30,
            Use::StaleWhileRevalidate,
        ),
        (
            "an Age past any lifetime",
            vec![("cache-control", "max-age=60"), ("age", "18446744073709551615")],
            &plain,
            vec![],
            1,
            Use::Revalidate,
        ),
        (
            "response no-cache",
            vec![("cache-control", "no-cache, max-age=60")],
            &plain,
            vec![],
            1,
            Use::Revalidate,
        ),
        (
            "request max-stale accepts it",
            vec![("cache-control", "max-age=60")],
            &plain,
            vec![("cache-control", "max-stale=30")],
            80,
            Use::Stale,
        ),
        (
            "max-stale without a value: any",
            vec![("cache-control", "max-age=60")],
            &plain,
            vec![("cache-control", "max-stale")],
            10_000,
            Use::Stale,
        ),
        (
            "must-revalidate refuses max-stale",
            vec![("cache-control", "max-age=60, must-revalidate")],
            &plain,
            vec![("cache-control", "max-stale")],
            80,
            Use::Revalidate,
        ),
        (
            "s-maxage refuses staleness too",
            vec![("cache-control", "s-maxage=60")],
            &plain,
            vec![("cache-control", "max-stale")],
            80,
            Use::Revalidate,
        ),
        (
            "stale-while-revalidate",
            vec![("cache-control", "max-age=60, stale-while-revalidate=30")],
            &plain,
            vec![],
            80,
            Use::StaleWhileRevalidate,
        ),
        (
            "past stale-while-revalidate",
            vec![("cache-control", "max-age=60, stale-while-revalidate=30")],
            &plain,
            vec![],
            95,
            Use::Revalidate,
        ),
        (
            "the route's grace",
            vec![("cache-control", "max-age=60")],
            &graceful,
            vec![],
            80,
            Use::StaleWhileRevalidate,
        ),
        (
            "the response's own window wins over the grace",
            vec![("cache-control", "max-age=60, stale-while-revalidate=5")],
            &graceful,
            vec![],
            80,
            Use::Revalidate,
        ),
    ];
    for (what, response, policy, request, elapsed, expected) in rows {
        let entry = stored(&response, policy);
        let got = usable(&entry, at, &fields(&request), policy, at + Duration::from_secs(elapsed));
        assert_eq!(got, expected, "{what}");
    }
}

#[test]
fn stale_if_error_serves_within_its_window_and_never_past_must_revalidate() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let later = |seconds| at + Duration::from_secs(seconds);
    let entry = stored(&[("cache-control", "max-age=60, stale-if-error=120")], &Policy::default());
    assert!(usable_on_error(&entry, at, later(170)));
    assert!(!usable_on_error(&entry, at, later(190)));
    let graced = stored(&[("cache-control", "max-age=60")], &Policy { grace: MINUTE, ..Policy::default() });
    assert!(usable_on_error(&graced, at, later(100)));
    let strict =
        stored(&[("cache-control", "max-age=60, must-revalidate, stale-if-error=120")], &Policy::default());
    assert!(!usable_on_error(&strict, at, later(70)));
}

#[test]
fn variants_follow_vary_with_values_normalised() {
    let response = fields(&[("vary", "Accept-Encoding, accept-language"), ("vary", "Accept-Encoding")]);
    let vary = vary_fields(&response).expect("no star");
    assert_eq!(
        vary.iter().map(HeaderName::as_str).collect::<Vec<_>>(),
        ["accept-encoding", "accept-language"]
    );
    let one = variant(&fields(&[("accept-encoding", "gzip, br"), ("accept-language", "en")]), &vary);
    let same = variant(&fields(&[("Accept-Encoding", "gzip,br"), ("accept-language", "en")]), &vary);
    let other = variant(&fields(&[("accept-encoding", "gzip")]), &vary);
    let other_case = variant(&fields(&[("accept-encoding", "gzip, br"), ("accept-language", "EN")]), &vary);
    assert_eq!(one, same, "blanks and field-name case do not make a variant");
    assert_ne!(one, other);
    assert_ne!(one, other_case, "values keep their case");
    let raw = |bytes: &[u8]| {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", http::HeaderValue::from_bytes(bytes).expect("obs-text is allowed"));
        variant(&headers, &[HeaderName::from_static("cookie")])
    };
    assert_ne!(raw(b"name=Jos\xc3\xa9"), raw(b"name=Jos\xc3\xa8"), "bytes beyond ASCII count");
    assert_ne!(raw(b"name=Jos\xc3\xa9"), raw(b""), "a value beyond ASCII is not no value");
    assert_ne!(raw(b"a%C3"), raw(b"a\xc3"), "an escape is not the byte");
    assert_eq!(vary_fields(&fields(&[("vary", "accept, *")])), None);
}

#[test]
fn keys_hold_host_path_query_and_the_route_fields() {
    assert_eq!(
        key("https", "shop.example:8443", "/items", None, false, &[]),
        key("https", "shop.example", "/items", None, false, &[]),
        "routing ignores the port, so does the key"
    );
    assert_eq!(key("http", "[::1]:8080", "/", None, false, &[]), "http://[::1]/");
    let a = key("https", "Shop.example", "/items", Some("b=1&a=2"), true, &[]);
    assert_eq!(a, key("https", "shop.example", "/items", Some("a=2&b=1"), true, &[]));
    assert_ne!(
        key("https", "shop.example", "/items", Some("b=1&a=2"), false, &[]),
        key("https", "shop.example", "/items", Some("a=2&b=1"), false, &[])
    );
    assert_ne!(a, key("https", "shop.example", "/items", None, true, &[]));
    assert_ne!(
        a,
        key("http", "shop.example", "/items", Some("a=2&b=1"), true, &[]),
        "the scheme is in the key"
    );
    let tenant = |t: &str| {
        key(
            "https",
            "shop.example",
            "/items",
            None,
            true,
            &[(HeaderName::from_static("x-tenant"), t.to_owned())],
        )
    };
    assert_ne!(tenant("a"), tenant("b"));
}

#[test]
fn conditional_requests_are_answered_not_modified_by_the_validators() {
    let response = fields(&[("etag", "\"v1\""), ("last-modified", "Tue, 01 Dec 2026 12:00:00 GMT")]);
    let rows: Vec<ConditionRow> = vec![
        ("the same tag", vec![("if-none-match", "\"v1\"")], true),
        ("one of the tags", vec![("if-none-match", "\"v0\", \"v1\"")], true),
        ("a weak tag compares weakly", vec![("if-none-match", "W/\"v1\"")], true),
        ("star", vec![("if-none-match", "*")], true),
        ("another tag", vec![("if-none-match", "\"v2\"")], false),
        (
            "If-None-Match wins over If-Modified-Since",
            vec![("if-none-match", "\"v2\""), ("if-modified-since", "Wed, 02 Dec 2026 12:00:00 GMT")],
            false,
        ),
        ("modified before the date", vec![("if-modified-since", "Wed, 02 Dec 2026 12:00:00 GMT")], true),
        ("modified after the date", vec![("if-modified-since", "Mon, 30 Nov 2026 12:00:00 GMT")], false),
        ("a date that does not parse", vec![("if-modified-since", "yesterday")], false),
        ("no condition", vec![], false),
    ];
    for (what, request, expected) in rows {
        assert_eq!(not_modified(&fields(&request), &response), expected, "{what}");
    }
}

#[test]
fn ranges_are_cut_from_the_stored_body() {
    let response = fields(&[("etag", "\"v1\""), ("last-modified", "Tue, 01 Dec 2026 12:00:00 GMT")]);
    let part = |first, last| ByteRange::Part { first, last };
    // (what, request fields, representation length, what is sent)
    let rows: Vec<(&str, Fields, u64, ByteRange)> = vec![
        ("no range", vec![], 100, ByteRange::Whole),
        ("first to last", vec![("range", "bytes=0-9")], 100, part(0, 9)),
        ("one byte", vec![("range", "bytes=5-5")], 100, part(5, 5)),
        ("last past the end is cut", vec![("range", "bytes=90-1000")], 100, part(90, 99)),
        ("from a byte on", vec![("range", "bytes=40-")], 100, part(40, 99)),
        ("the last bytes", vec![("range", "bytes=-10")], 100, part(90, 99)),
        ("more last bytes than there are", vec![("range", "bytes=-500")], 100, part(0, 99)),
        ("the unit in capitals, spaces around", vec![("range", "Bytes= 1-2 ")], 100, part(1, 2)),
        ("first past the end", vec![("range", "bytes=100-")], 100, ByteRange::Unsatisfiable),
        ("first past the end, with a last", vec![("range", "bytes=200-300")], 100, ByteRange::Unsatisfiable),
        ("no last bytes", vec![("range", "bytes=-0")], 100, ByteRange::Unsatisfiable),
        ("anything of nothing", vec![("range", "bytes=-5")], 0, ByteRange::Unsatisfiable),
        ("last before first is ignored", vec![("range", "bytes=9-1")], 100, ByteRange::Whole),
        ("several ranges are ignored", vec![("range", "bytes=0-1,5-6")], 100, ByteRange::Whole),
        ("another unit is ignored", vec![("range", "items=0-1")], 100, ByteRange::Whole),
        ("a sign is not a digit", vec![("range", "bytes=+1-2")], 100, ByteRange::Whole),
        (
            "a number too large is ignored",
            vec![("range", "bytes=0-99999999999999999999")],
            100,
            ByteRange::Whole,
        ),
        ("no dash", vec![("range", "bytes=5")], 100, ByteRange::Whole),
        ("If-Range with the tag", vec![("range", "bytes=0-1"), ("if-range", "\"v1\"")], 100, part(0, 1)),
        (
            "If-Range with another tag",
            vec![("range", "bytes=0-1"), ("if-range", "\"v2\"")],
            100,
            ByteRange::Whole,
        ),
        (
            "If-Range compares strongly",
            vec![("range", "bytes=0-1"), ("if-range", "W/\"v1\"")],
            100,
            ByteRange::Whole,
        ),
        (
            "If-Range with the date",
            vec![("range", "bytes=0-1"), ("if-range", "Tue, 01 Dec 2026 12:00:00 GMT")],
            100,
            part(0, 1),
        ),
        (
            "If-Range with another date",
            vec![("range", "bytes=0-1"), ("if-range", "Wed, 02 Dec 2026 12:00:00 GMT")],
            100,
            ByteRange::Whole,
        ),
    ];
    for (what, request, length, expected) in rows {
        assert_eq!(byte_range(&fields(&request), &response, length), expected, "{what}");
    }
    let weak = fields(&[("etag", "W/\"v1\"")]);
    let request = fields(&[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")]);
    assert_eq!(byte_range(&request, &weak, 100), ByteRange::Whole, "a weak tag never holds for If-Range");
}

#[test]
fn cache_status_says_what_happened() {
    assert_eq!(cache_status("surge", &Handled::Hit { ttl_left: 42 }), "surge; hit; ttl=42");
    assert_eq!(cache_status("surge", &Handled::Hit { ttl_left: -3 }), "surge; hit; ttl=-3");
    let forwarded = Handled::Forward {
        why: "miss",
        status: 200,
        stored: true,
        collapsed: true,
        ttl_left: None,
        detail: None,
    };
    assert_eq!(cache_status("surge", &forwarded), "surge; fwd=miss; fwd-status=200; stored; collapsed");
    let on_error = Handled::Forward {
        why: "stale",
        status: 503,
        stored: false,
        collapsed: false,
        ttl_left: Some(-5),
        detail: Some("stale-if-error"),
    };
    assert_eq!(
        cache_status("surge", &on_error),
        "surge; fwd=stale; fwd-status=503; ttl=-5; detail=stale-if-error"
    );
}

#[test]
fn the_preferred_coding_follows_accept_encoding() {
    let coding = |value: &str| preferred_coding(&fields(&[("accept-encoding", value)]));
    assert_eq!(coding("gzip, deflate, br"), Some(Coding::Brotli), "brotli on a tie");
    assert_eq!(coding("gzip"), Some(Coding::Gzip));
    assert_eq!(coding("br;q=0.5, gzip;q=0.9"), Some(Coding::Gzip));
    assert_eq!(coding("br;q=0, gzip;q=0"), None);
    assert_eq!(coding("identity"), None);
    assert_eq!(coding("*"), Some(Coding::Brotli));
    assert_eq!(coding("*;q=0, gzip"), Some(Coding::Gzip));
    assert_eq!(preferred_coding(&HeaderMap::new()), None);
    let all = |value: &str| codings_by_preference(&fields(&[("accept-encoding", value)]));
    assert_eq!(all("gzip, br"), [Coding::Brotli, Coding::Gzip]);
    assert_eq!(all("br;q=0.5, gzip"), [Coding::Gzip, Coding::Brotli]);
    assert_eq!(all("gzip, br;q=0"), [Coding::Gzip]);
    let vary = [HeaderName::from_static("accept-encoding")];
    let of = |value: &str| variant(&fields(&[("accept-encoding", value)]), &vary);
    assert_eq!(
        of("gzip, deflate, br"),
        of("br,gzip ,DEFLATE"),
        "one variant per set of codings, however spelt"
    );
    assert_ne!(
        of("gzip, deflate, br, zstd"),
        of("gzip, deflate, br"),
        "a zstd body must not reach a client without it"
    );
    assert_ne!(of("deflate"), of(""), "nor a deflate body a client that takes none");
    assert_eq!(of("gzip;q=0"), of(""), "refused is not accepted");
    assert_eq!(of("x-gzip"), of("gzip"));
}

#[test]
fn only_textual_uncompressed_responses_are_compressed() {
    let with = |pairs: &[(&str, &str)]| fields(pairs);
    assert!(compressible(StatusCode::OK, &with(&[("content-type", "text/html; charset=utf-8")]), 2048));
    assert!(compressible(StatusCode::OK, &with(&[("content-type", "application/problem+json")]), 2048));
    assert!(!compressible(StatusCode::OK, &with(&[("content-type", "image/png")]), 2048));
    assert!(!compressible(StatusCode::OK, &with(&[("content-type", "text/html")]), 100), "too small to gain");
    assert!(!compressible(
        StatusCode::OK,
        &with(&[("content-type", "text/html"), ("content-encoding", "gzip")]),
        2048
    ));
    assert!(!compressible(
        StatusCode::OK,
        &with(&[("content-type", "text/css"), ("cache-control", "public, no-transform")]),
        2048
    ));
    assert!(!compressible(StatusCode::NOT_FOUND, &with(&[("content-type", "text/html")]), 2048));
}

#[test]
fn etags_compare_weakly() {
    assert!(etag_listed("W/\"1-2\"", "W/\"1-2\""));
    assert!(etag_listed("\"x\", W/\"1-2\"", "W/\"1-2\""));
    assert!(etag_listed("*", "W/\"1-2\""));
    assert!(!etag_listed("W/\"1-3\"", "W/\"1-2\""));
}
