//! HTTP plumbing shared by the providers that talk to an upstream over HTTP: one client
//! per upstream (timeout, optional private CA, no redirects) and bounded body reads.

use std::path::Path;
use std::time::Duration;

use super::ProviderError;

/// Builds the client for one upstream. A redirect never moves Mayfly's credentials to
/// another host: redirects are not followed.
pub(crate) fn client(timeout: Duration, ca_file: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate", ca.display()));
        }
        b = b.tls_certs_only(certs);
    }
    b.build().map_err(|e| e.to_string())
}

/// A transport failure (connect, timeout, reset): the upstream is unreachable.
pub(crate) fn unreachable(what: &str, e: &reqwest::Error) -> ProviderError {
    // reqwest errors carry the URL, never a header or body: safe to log.
    ProviderError::Unavailable(format!("{what}: {}", error_chain(e)))
}

/// An error and its sources on one line, trimmed for a client-facing reason.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    reason(&crate::net::error_chain(e))
}

/// Reads at most `max` bytes of body; a larger body is an upstream fault, not parsed.
pub(crate) async fn read_capped(
    what: &str,
    resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ProviderError> {
    crate::net::read_limited(resp, max)
        .await
        .map_err(|e| match e {
            crate::net::LimitedRead::TooLarge => {
                ProviderError::Unavailable(format!("{what}: response exceeds {max} bytes"))
            }
            crate::net::LimitedRead::Http(e) => unreachable(what, &e),
        })
}

/// Trims an upstream's error text for a client-facing reason.
pub(crate) fn reason(s: &str) -> String {
    const MAX: usize = 300;
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
