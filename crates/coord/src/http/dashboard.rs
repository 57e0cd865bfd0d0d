//! `GET /`: the dashboard, one self-contained HTML page (inline CSS and
//! vanilla JS, no external asset) compiled into the binary.
//!
//! The page holds no data, so it is served without authentication; it reads
//! everything from the JSON API (`/api/...`, and the event stream) with the
//! bearer token its user signs in with, and the API checks that token's role
//! as it would any caller's. Its script and style run under a
//! content-security policy that allows only this response's nonce and
//! same-origin requests: even text the page got wrong could not load or
//! run anything else.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page, with [`NONCE_MARK`] where each response's nonce goes.
const PAGE: &str = include_str!("dashboard.html");
/// Replaced in [`PAGE`] by the response's CSP nonce (on its `<script>` and
/// `<style>` elements).
const NONCE_MARK: &str = "__CSP_NONCE__";

/// The dashboard's routes, merged into the API router.
pub fn routes() -> Router<super::HttpApi> {
    Router::new().route("/", get(index))
}

/// `GET /` (and `HEAD /`).
pub async fn index() -> Response {
    // A fresh nonce per response (122 random bits): a script injected into
    // the page could not guess it. `no-store` keeps the page, and so the
    // nonce, out of every cache.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    page(&nonce)
}

fn page(nonce: &str) -> Response {
    let body = PAGE.replace(NONCE_MARK, nonce);
    let csp = policy(nonce);
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        // The nonce is hex: always a valid header value.
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    (headers, body).into_response()
}

/// Nothing but this response's own script and style, requests to this
/// origin, and `data:` images (the page's empty favicon).
fn policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `<script` and `<style` of the page carries the nonce mark: an
    /// element without it would be blocked by the policy in the browser.
    #[test]
    fn every_script_and_style_carries_the_nonce() {
        for tag in ["<script", "<style"] {
            let opened = PAGE.matches(tag).count();
            let marked = PAGE.matches(&format!("{tag} nonce=\"{NONCE_MARK}\">")).count();
            assert!(opened > 0, "the page has no {tag}");
            assert_eq!(opened, marked, "every {tag} element needs nonce=\"{NONCE_MARK}\"");
        }
    }

    /// Self-contained: no script, style sheet, font or image from elsewhere,
    /// and no way for data to become markup.
    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for banned in [
            "src=\"http",
            "href=\"http",
            "@import",
            "url(http",
            "<script src",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!PAGE.contains(banned), "the dashboard must not contain `{banned}`");
        }
    }

    #[tokio::test]
    async fn served_with_its_policy_and_no_store() {
        let r = page("abc123");
        let h = |name: header::HeaderName| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(h(header::CONTENT_TYPE).as_deref(), Some("text/html; charset=utf-8"));
        assert_eq!(h(header::CACHE_CONTROL).as_deref(), Some("no-store"));
        let csp = h(header::CONTENT_SECURITY_POLICY).expect("a CSP header");
        assert!(csp.contains("script-src 'nonce-abc123'") && csp.contains("default-src 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.expect("the body");
        let body = String::from_utf8(body.to_vec()).expect("UTF-8");
        assert!(!body.contains(NONCE_MARK) && body.contains("<script nonce=\"abc123\">"));
    }
}
