//! Shared pieces of the fuzz targets: an independent SPIFFE ID grammar (for the
//! differential target) and input framing.

/// An independent reading of the SPIFFE ID grammar (SPIFFE-ID.md §2, §2.1, §2.2, §2.3),
/// written from the specification as a byte-level state machine, sharing no code with
/// `mayfly::identity::SpiffeId`:
///
/// - scheme `spiffe` (lowercase), then `://`;
/// - trust domain: 1..=255 bytes of `a-z 0-9 . - _` (the URI host; no userinfo, no port,
///   so no `@` or `:`);
/// - path: empty, or `/`-separated segments of `a-z A-Z 0-9 . - _`, each non-empty and
///   neither `.` nor `..`, no trailing `/` (no percent-encoding, no query, no fragment);
/// - at most 2048 bytes in all.
///
/// Returns `(trust_domain, path)` when valid.
pub fn spec_parse(input: &[u8]) -> Option<(String, String)> {
    const PREFIX: &[u8] = b"spiffe://";
    if input.len() > 2048 || !input.starts_with(PREFIX) {
        return None;
    }
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        TrustDomain,
        SegmentStart,
        Segment,
    }
    let rest = &input[PREFIX.len()..];
    let mut state = State::TrustDomain;
    let mut td_len = 0usize;
    let mut seg_start = 0usize;
    for (i, &b) in rest.iter().enumerate() {
        match state {
            State::TrustDomain => match b {
                b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => td_len += 1,
                b'/' if td_len > 0 => {
                    state = State::SegmentStart;
                    seg_start = i + 1;
                }
                _ => return None,
            },
            State::SegmentStart | State::Segment => match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {
                    state = State::Segment;
                }
                b'/' if state == State::Segment => {
                    let seg = &rest[seg_start..i];
                    if seg == b"." || seg == b".." {
                        return None;
                    }
                    state = State::SegmentStart;
                    seg_start = i + 1;
                }
                _ => return None,
            },
        }
    }
    match state {
        State::TrustDomain if td_len == 0 => return None,
        State::SegmentStart => return None, // empty last segment or trailing '/'
        State::Segment => {
            let seg = &rest[seg_start..];
            if seg == b"." || seg == b".." {
                return None;
            }
        }
        State::TrustDomain => {}
    }
    if td_len > 255 {
        return None;
    }
    let td = String::from_utf8(rest[..td_len].to_vec()).ok()?;
    let path = String::from_utf8(rest[td_len..].to_vec()).ok()?;
    Some((td, path))
}

/// Splits `data` into frames, each prefixed by its length (2 bytes, big-endian); a short
/// tail is the last frame. At most `max` frames.
pub fn frames(mut data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < max {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let body = &data[2..];
        let take = n.min(body.len());
        out.push(&body[..take]);
        data = &body[take..];
    }
    out
}

/// The inverse of [`frames`] (for writing seeds).
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        let n = u16::try_from(p.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&p[..usize::from(n)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_grammar_reads_the_spec_examples() {
        for ok in [
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "spiffe://example.org",
            "spiffe://a_b.c-d/x.y/.z/..w",
        ] {
            assert!(spec_parse(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "spiffe://",
            "spiffe:///path",
            "SPIFFE://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/",
            "spiffe://example.org/./a",
            "spiffe://example.org/a/..",
            "spiffe://example.org:443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a?q",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a%20b",
            "https://example.org/a",
        ] {
            assert!(spec_parse(bad.as_bytes()).is_none(), "{bad}");
        }
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert!(spec_parse(long_td.as_bytes()).is_none());
        let max_td = format!("spiffe://{}/a", "a".repeat(255));
        assert!(spec_parse(max_td.as_bytes()).is_some());
    }

    #[test]
    fn frames_round_trip() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"de"];
        assert_eq!(frames(&frame(&parts), 8), parts.to_vec());
    }
}
