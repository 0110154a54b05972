//! The web pages the node serves: a demo site with the visitor widget at `/`, the widget script at
//! `/widget.js`, and the agent console at `/agent`. Assets are embedded in the binary; no build step.
//! User text is always rendered with `textContent` in these scripts, and CSP forbids inline scripts.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Pages: scripts only from this origin, styles may be inline (the widget styles its Shadow DOM).
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    body: &'static str,
    content_type: &'static str,
    page: bool,
}

const DEMO_HTML: Asset =
    Asset { body: include_str!("../web/demo.html"), content_type: "text/html; charset=utf-8", page: true };
const DEMO_CSS: Asset =
    Asset { body: include_str!("../web/demo.css"), content_type: "text/css; charset=utf-8", page: false };
const WIDGET_JS: Asset =
    Asset { body: include_str!("../web/widget.js"), content_type: "text/javascript; charset=utf-8", page: false };
const AGENT_HTML: Asset =
    Asset { body: include_str!("../web/agent.html"), content_type: "text/html; charset=utf-8", page: true };
const AGENT_JS: Asset =
    Asset { body: include_str!("../web/agent.js"), content_type: "text/javascript; charset=utf-8", page: false };
const AGENT_CSS: Asset =
    Asset { body: include_str!("../web/agent.css"), content_type: "text/css; charset=utf-8", page: false };

fn serve(asset: &Asset) -> Response {
    let mut resp = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        asset.body,
    )
        .into_response();
    let h = resp.headers_mut();
    if asset.page {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    } else {
        // The widget script is loaded by customer sites on other origins.
        h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    }
    resp
}

/// Routes for the embedded web assets.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route("/", get(|| async { serve(&DEMO_HTML) }))
        .route("/demo.css", get(|| async { serve(&DEMO_CSS) }))
        .route("/widget.js", get(|| async { serve(&WIDGET_JS) }))
        .route("/agent", get(|| async { serve(&AGENT_HTML) }))
        .route("/agent.js", get(|| async { serve(&AGENT_JS) }))
        .route("/agent.css", get(|| async { serve(&AGENT_CSS) }))
}
