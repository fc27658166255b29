//! The shape of every answer the gateway makes itself: a short JSON body saying why, and a
//! header that tells it from an instance's own answer.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// Set on responses the gateway generates, so they can be told from an instance's own.
pub const ERROR_HEADER: &str = "x-surge-error";

/// `{"error": code, "status": status, "message": message}` with its headers.
pub(crate) fn problem(status: StatusCode, code: &'static str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": code, "status": status.as_u16(), "message": message });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
    response
}
