//! STS and IAM errors mapped to `ProviderError`.

use aws_sdk_sts::error::ProvideErrorMetadata;

use super::MAX_SESSION_POLICY_CHARS;
use crate::provider::ProviderError;

/// The text between `<tag>` and `</tag>` in an XML error body, if any.
pub(super) fn xml_field<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(&body[start..start + len])
}

pub(super) fn sdk_error<E>(
    what: &str,
    e: aws_sdk_sts::error::SdkError<E, aws_sdk_sts::config::http::HttpResponse>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_sts::error::SdkError;
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let raw = se.raw();
            let status = raw.status().as_u16();
            // Some endpoints (emulators, proxies) answer in an error shape the SDK does not
            // parse: fall back to the XML body and the HTTP status.
            let body = raw
                .body()
                .bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let code = err
                .code()
                .or_else(|| xml_field(&body, "Code"))
                .unwrap_or("Unknown")
                .to_string();
            let message = err
                .message()
                .or_else(|| xml_field(&body, "Message"))
                .unwrap_or_default();
            let msg = crate::provider::http::reason(&format!("{what}: {code}: {message}"));
            match code.as_str() {
                "PackedPolicyTooLarge" | "PackedPolicyTooLargeException" => {
                    ProviderError::PolicyTooLarge {
                        what: "packed session policy and tags",
                        len: 0,
                        max: MAX_SESSION_POLICY_CHARS,
                    }
                }
                "AccessDenied"
                | "AccessDeniedException"
                | "UnauthorizedOperation"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "ExpiredTokenException"
                | "RegionDisabledException" => ProviderError::Denied(msg),
                "Throttling"
                | "ThrottlingException"
                | "ServiceUnavailable"
                | "InternalFailure"
                | "ServiceFailure" => ProviderError::Unavailable(msg),
                _ if status == 403 => ProviderError::Denied(msg),
                _ if status >= 500 || status == 429 => ProviderError::Unavailable(msg),
                _ => ProviderError::Rejected(msg),
            }
        }
        other => ProviderError::Unavailable(format!(
            "{what}: {}",
            crate::provider::http::error_chain(&other)
        )),
    }
}
