//! SPIFFE ID parsing per the SPIFFE-ID specification (§2): `spiffe://<trust-domain><path>`.
//! Trust domain: lowercase letters, digits, `.`, `-`, `_`. Path: `/`-separated segments of
//! letters, digits, `.`, `-`, `_`; no empty, `.` or `..` segment, no trailing slash.
//! No port, user info, query or fragment. At most 2048 bytes.

use std::fmt;

const SCHEME: &str = "spiffe://";
const MAX_LEN: usize = 2048;
/// SPIFFE-ID §2.3: the trust domain is a URI host, at most 255 bytes (RFC 3986).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error("SPIFFE ID trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID trust domain has a forbidden character {0:?} (allowed: a-z 0-9 . - _)")]
    BadTrustDomainChar(char),
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error("SPIFFE ID path has a forbidden character {0:?} (allowed: a-z A-Z 0-9 . - _)")]
    BadPathChar(char),
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
}

/// A syntactically valid SPIFFE ID. Holding one proves nothing about who presented it:
/// only `identity` turns one into a `VerifiedCaller`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    raw: String,
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if let Some(c) = td.chars().find(|c| !is_td_char(*c)) {
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(if path == "/" || path.ends_with("//") {
                    SpiffeIdError::EmptySegment
                } else {
                    SpiffeIdError::TrailingSlash
                });
            }
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeIdError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeIdError::DotSegment);
                }
                if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
                    return Err(SpiffeIdError::BadPathChar(c));
                }
            }
        }
        Ok(Self {
            raw: input.to_string(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.raw[SCHEME.len()..self.td_end]
    }

    /// The path, `""` for a trust-domain ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.raw[self.td_end..]
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

fn is_td_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.raw)
    }
}

/// A validated trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        let id = SpiffeId::parse(&format!("{SCHEME}{name}"))?;
        if !id.path().is_empty() {
            return Err(SpiffeIdError::BadTrustDomainChar('/'));
        }
        Ok(Self(name.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fuzz finding (issue #18, target `spiffe_id_differential`): a trust domain longer
    /// than 255 bytes was accepted; SPIFFE-ID §2.3 caps it (the URI host limit).
    #[test]
    fn a_trust_domain_longer_than_255_bytes_is_refused() {
        let at_limit = format!("spiffe://{}/w", "a".repeat(255));
        assert!(SpiffeId::parse(&at_limit).is_ok());
        let over = format!("spiffe://{}/w", "a".repeat(256));
        assert_eq!(
            SpiffeId::parse(&over),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        let found = "spiffe://exampl.oe".to_string()
            + &"i".repeat(120)
            + ".ompl.oe.pi"
            + &"7".repeat(130)
            + ".d_c.zorgrg";
        assert_eq!(
            SpiffeId::parse(&found),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        assert_eq!(
            TrustDomain::parse(&"b".repeat(256)),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
    }

    #[test]
    fn valid_ids_split_into_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://dev.mayfly.local/agent/demo").expect("valid");
        assert_eq!(id.trust_domain(), "dev.mayfly.local");
        assert_eq!(id.path(), "/agent/demo");
        let td = SpiffeId::parse("spiffe://example.org").expect("valid");
        assert_eq!(td.path(), "");
    }

    #[test]
    fn each_grammar_rule_has_its_own_error() {
        use SpiffeIdError::*;
        let cases = [
            ("", Empty),
            ("https://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:///a", EmptyTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://example.org:8443/a", BadTrustDomainChar(':')),
            ("spiffe://user@example.org/a", BadTrustDomainChar('@')),
            ("spiffe://example.org//a", EmptySegment),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/./b", DotSegment),
            ("spiffe://example.org/a?x=1", BadPathChar('?')),
            ("spiffe://example.org/a#frag", BadPathChar('#')),
            ("spiffe://example.org/a%20b", BadPathChar('%')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want.clone()), "input {input:?}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_accepted_ids_round_trip(s in "spiffe://[a-z.:/A-Z%_-]{0,40}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
            }
        }
    }
}
