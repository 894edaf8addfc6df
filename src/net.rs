//! Small HTTP-client helpers shared by everything that fetches from the network (key
//! and bundle endpoints, credential providers).

/// An error and its causes on one line (a TLS refusal is nested several levels deep).
/// Causes already quoted in the text before them are not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // hyper, rustls and tonic errors often repeat their cause in their own text.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// An http(s) URL Mayfly may fetch from: https, or http to a loopback host only when
/// explicitly allowed (tests, `mayfly dev`). The message names the URL.
pub fn url_allowed(url: &str, allow_http: bool) -> Result<(), String> {
    if url.starts_with("https://") && url.len() > "https://".len() {
        return Ok(());
    }
    if allow_http && let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        if matches!(host, "127.0.0.1" | "localhost" | "[") || rest.starts_with("[::1]") {
            return Ok(());
        }
        return Err(format!("{url:?}: http:// only to a loopback host"));
    }
    Err(format!("{url:?} must be an https:// URL"))
}

#[derive(Debug)]
pub enum LimitedRead {
    /// The body (or its announced length) exceeds the limit; nothing more was read.
    TooLarge,
    Http(reqwest::Error),
}

/// Reads at most `limit` bytes of `resp`'s body: a hostile server cannot make Mayfly
/// buffer more, with or without a `Content-Length`.
pub async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, LimitedRead> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(LimitedRead::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(LimitedRead::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(LimitedRead::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
