//! The browser tracker `qanat.js` and a demo page that uses it, served by the collector.

use axum::http::header;
use axum::response::IntoResponse;

/// Page view on load (once the page is really rendered, not prerendered), a click beacon for
/// every click inside an element carrying `data-spm`, `navigator.sendBeacon` when available.
pub const SCRIPT: &str = include_str!("../assets/qanat.js");
/// A page with SPM-coded links; `?autoclick=1` clicks one after load (used by the browser test).
pub const DEMO: &str = include_str!("../assets/demo.html");

pub async fn script() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        SCRIPT,
    )
}

pub async fn demo() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DEMO,
    )
}
