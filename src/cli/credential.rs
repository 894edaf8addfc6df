//! What the client helpers do with a minted credential: check it has the shape the
//! provider promises (ARCHITECTURE.md, "Credential shapes"), and turn it into the
//! environment of `mayfly exec`'s child. Values stay in [`Secret`] until they are handed
//! to the child; only variable names and lease ids are ever printed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::secret::Secret;
use crate::task::ProviderKind;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("the broker answered with a {got:?} credential, expected {want}")]
    Provider { want: ProviderKind, got: String },
    #[error("the {provider} credential lacks {field} (or it is empty)")]
    Missing {
        provider: ProviderKind,
        field: &'static str,
    },
    #[error("the aws credential's Version is not 1")]
    Version,
    #[error("the aws credential's Expiration is not an RFC 3339 time")]
    Expiration,
    #[error("the vault credential has neither `token` nor `data`")]
    Vault,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error(
        "{first} and {second} would both set {name}; map one with `env` or `env_prefix` in a [[credential]] entry of the task file"
    )]
    Collision {
        name: String,
        first: String,
        second: String,
    },
    #[error(
        "the target of {0} gives no variable name; name it with `env` in a [[credential]] entry"
    )]
    NoName(String),
    #[error("--env-prefix {0:?} must be letters, digits and '_', not starting with a digit")]
    Prefix(String),
}

/// The AWS `credential_process` document, exactly the five fields the SDKs read.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AwsCredential {
    pub version: u8,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: String,
}

impl std::fmt::Debug for AwsCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredential")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// A credential whose shape was checked.
#[derive(Debug)]
pub enum Minted {
    Jwt {
        access_token: Secret<String>,
    },
    /// `AwsCredential`'s `Debug` shows only the expiration.
    Aws(AwsCredential),
    VaultToken {
        token: Secret<String>,
    },
    /// A dynamic secret: its `data`, as JSON.
    VaultSecret {
        data: Secret<String>,
    },
}

fn field<'a>(
    v: &'a Value,
    provider: ProviderKind,
    name: &'static str,
) -> Result<&'a str, ShapeError> {
    match v[name].as_str() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ShapeError::Missing {
            provider,
            field: name,
        }),
    }
}

/// The `credential` of a credential view, which must come from `want`.
fn credential_of(view: &Value, want: ProviderKind) -> Result<&Value, ShapeError> {
    let got = view["provider"].as_str().unwrap_or_default();
    if got != want.as_str() {
        return Err(ShapeError::Provider {
            want,
            got: got.into(),
        });
    }
    Ok(&view["credential"])
}

impl AwsCredential {
    /// Reads the credential of an aws credential view.
    pub fn from_view(view: &Value) -> Result<Self, ShapeError> {
        Self::from_credential(credential_of(view, ProviderKind::Aws)?)
    }

    /// Checks all five fields: a credential missing one must not reach an SDK.
    pub fn from_credential(c: &Value) -> Result<Self, ShapeError> {
        let aws = ProviderKind::Aws;
        if c.get("Version").is_none() {
            return Err(ShapeError::Missing {
                provider: aws,
                field: "Version",
            });
        }
        if c["Version"].as_u64() != Some(1) {
            return Err(ShapeError::Version);
        }
        let expiration = field(c, aws, "Expiration")?;
        time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339)
            .map_err(|_| ShapeError::Expiration)?;
        Ok(Self {
            version: 1,
            access_key_id: field(c, aws, "AccessKeyId")?.into(),
            secret_access_key: field(c, aws, "SecretAccessKey")?.into(),
            session_token: field(c, aws, "SessionToken")?.into(),
            expiration: expiration.into(),
        })
    }
}

impl Minted {
    /// Reads the `credential` of a credential view (`POST /v1/tasks/{id}/credentials`)
    /// that must come from `want`.
    pub fn from_view(view: &Value, want: ProviderKind) -> Result<Self, ShapeError> {
        let c = credential_of(view, want)?;
        match want {
            ProviderKind::Jwt => {
                let token = field(c, want, "access_token")?;
                if !field(c, want, "token_type")?.eq_ignore_ascii_case("bearer") {
                    return Err(ShapeError::Missing {
                        provider: want,
                        field: "token_type",
                    });
                }
                Ok(Self::Jwt {
                    access_token: Secret::new(token.into()),
                })
            }
            ProviderKind::Aws => Ok(Self::Aws(AwsCredential::from_credential(c)?)),
            ProviderKind::Vault => {
                if let Ok(token) = field(c, want, "token") {
                    Ok(Self::VaultToken {
                        token: Secret::new(token.into()),
                    })
                } else if c["data"].is_null() {
                    Err(ShapeError::Vault)
                } else {
                    Ok(Self::VaultSecret {
                        data: Secret::new(c["data"].to_string()),
                    })
                }
            }
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Minted::Jwt { .. } => Kind::Jwt,
            Minted::Aws(_) => Kind::Aws,
            Minted::VaultToken { .. } => Kind::VaultToken,
            Minted::VaultSecret { .. } => Kind::VaultSecret,
        }
    }

    fn value(&self, slot: Slot) -> &str {
        match (self, slot) {
            (Minted::Jwt { access_token: s }, _)
            | (Minted::VaultToken { token: s }, _)
            | (Minted::VaultSecret { data: s }, _) => s.expose(),
            (Minted::Aws(a), Slot::AccessKeyId) => &a.access_key_id,
            (Minted::Aws(a), Slot::SecretAccessKey) => &a.secret_access_key,
            (Minted::Aws(a), Slot::SessionToken) => &a.session_token,
            (Minted::Aws(a), Slot::Expiration | Slot::Whole) => &a.expiration,
        }
    }
}

/// How a credential reaches the environment, as the task file's `[[credential]]` entry
/// says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// The provider's default names.
    Default,
    /// One variable of this name (jwt, vault); not for aws, which sets four.
    Env(String),
    /// The default names with this prefix (`DEPLOY_AWS_ACCESS_KEY_ID`).
    Prefix(String),
}

/// What a credential is, as far as its variables go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Jwt,
    Aws,
    VaultToken,
    VaultSecret,
}

/// Which part of a credential a variable holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Whole,
    AccessKeyId,
    SecretAccessKey,
    SessionToken,
    Expiration,
}

/// One credential to place: where it came from (for messages), what it is, its target
/// and how the task file maps it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub label: &'a str,
    pub kind: Kind,
    pub target: &'a str,
    pub naming: &'a Naming,
}

/// A variable for the child. `from` names the credential (and lease) it came from.
#[derive(Debug)]
pub struct EnvVar {
    pub name: String,
    pub value: Secret<String>,
    pub from: String,
}

/// Can `s` begin (or be) an environment variable name: ASCII letters, digits and `_`,
/// not starting with a digit.
pub fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A target as a variable-name suffix: the URL scheme dropped, upper case, every run of
/// other characters one `_` (`https://api.example.com` → `API_EXAMPLE_COM`).
pub fn target_suffix(target: &str) -> String {
    let rest = match target.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b)) =>
        {
            rest
        }
        _ => target,
    };
    let mut out = String::new();
    for c in rest.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_uppercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// The variables of one entry. `sole_jwt`: this is the only jwt credential and it is not
/// mapped, so it also gets the short `{prefix}TOKEN`.
fn names(prefix: &str, e: &Entry, sole_jwt: bool) -> Result<Vec<(String, Slot)>, EnvError> {
    let suffix = || {
        let s = target_suffix(e.target);
        if s.is_empty() {
            Err(EnvError::NoName(e.label.to_string()))
        } else {
            Ok(s)
        }
    };
    let defaults: Vec<(String, Slot)> = match e.kind {
        Kind::Jwt => {
            let mut v = Vec::new();
            if sole_jwt {
                v.push((format!("{prefix}TOKEN"), Slot::Whole));
            }
            v.push((format!("{prefix}TOKEN_{}", suffix()?), Slot::Whole));
            v
        }
        Kind::Aws => vec![
            ("AWS_ACCESS_KEY_ID".into(), Slot::AccessKeyId),
            ("AWS_SECRET_ACCESS_KEY".into(), Slot::SecretAccessKey),
            ("AWS_SESSION_TOKEN".into(), Slot::SessionToken),
            ("AWS_CREDENTIAL_EXPIRATION".into(), Slot::Expiration),
        ],
        Kind::VaultToken => vec![("VAULT_TOKEN".into(), Slot::Whole)],
        Kind::VaultSecret => vec![(format!("{prefix}VAULT_{}", suffix()?), Slot::Whole)],
    };
    Ok(match e.naming {
        Naming::Default => defaults,
        Naming::Env(name) => vec![(name.clone(), Slot::Whole)],
        Naming::Prefix(p) => defaults
            .into_iter()
            .map(|(n, slot)| (format!("{p}{n}"), slot))
            .collect(),
    })
}

/// Checks the variable names of `entries` without values: `mayfly exec` runs it on the
/// kinds known from the task file before declaring anything.
pub fn check_names(prefix: &str, entries: &[Entry]) -> Result<(), EnvError> {
    plan(prefix, entries).map(|_| ())
}

/// Every variable name, per entry, after checking that no two entries set the same one
/// and that none takes `{prefix}TASK_ID`.
fn plan(prefix: &str, entries: &[Entry]) -> Result<Vec<Vec<(String, Slot)>>, EnvError> {
    if !(prefix.is_empty() || valid_env_name(prefix)) {
        return Err(EnvError::Prefix(prefix.to_string()));
    }
    let unmapped_jwts = entries
        .iter()
        .filter(|e| e.kind == Kind::Jwt)
        .map(|e| *e.naming == Naming::Default)
        .collect::<Vec<_>>();
    let sole_jwt = unmapped_jwts == [true];
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    taken.insert(format!("{prefix}TASK_ID"), "the task id".into());
    let mut all = Vec::with_capacity(entries.len());
    for e in entries {
        let these = names(prefix, e, sole_jwt && e.kind == Kind::Jwt)?;
        for (name, _) in &these {
            if let Some(first) = taken.insert(name.clone(), e.label.to_string()) {
                return Err(EnvError::Collision {
                    name: name.clone(),
                    first,
                    second: e.label.to_string(),
                });
            }
        }
        all.push(these);
    }
    Ok(all)
}

/// The child's added environment: `{prefix}TASK_ID` and every credential's variables.
pub fn child_env(
    prefix: &str,
    task_id: &str,
    minted: &[(Entry, &Minted)],
) -> Result<Vec<EnvVar>, EnvError> {
    let entries: Vec<Entry> = minted.iter().map(|(e, _)| *e).collect();
    let planned = plan(prefix, &entries)?;
    let mut vars = vec![EnvVar {
        name: format!("{prefix}TASK_ID"),
        value: Secret::new(task_id.to_string()),
        from: "the task id".into(),
    }];
    for ((entry, cred), names) in minted.iter().zip(planned) {
        for (name, slot) in names {
            vars.push(EnvVar {
                name,
                value: Secret::new(cred.value(slot).to_string()),
                from: entry.label.to_string(),
            });
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(provider: &str, credential: Value) -> Value {
        json!({"lease_id": "lse_x", "provider": provider, "target": "t", "credential": credential})
    }

    fn aws_view() -> Value {
        view(
            "aws",
            json!({"Version": 1, "AccessKeyId": "AKIA1", "SecretAccessKey": "sek",
                   "SessionToken": "sess", "Expiration": "2030-01-01T00:00:00Z"}),
        )
    }

    fn jwt(token: &str) -> Minted {
        Minted::from_view(
            &view(
                "jwt",
                json!({"access_token": token, "token_type": "Bearer"}),
            ),
            ProviderKind::Jwt,
        )
        .expect("jwt shape")
    }

    /// The child's variables for `items` (label, credential, target, naming) of task
    /// `tsk_1`, as a map.
    fn env_of(
        prefix: &str,
        items: &[(&str, &Minted, &str, Naming)],
    ) -> Result<BTreeMap<String, String>, EnvError> {
        let placed: Vec<(Entry, &Minted)> = items
            .iter()
            .map(|(label, m, target, naming)| {
                let entry = Entry {
                    label,
                    kind: m.kind(),
                    target,
                    naming,
                };
                (entry, *m)
            })
            .collect();
        let vars = child_env(prefix, "tsk_1", &placed)?;
        Ok(vars
            .iter()
            .map(|v| (v.name.clone(), v.value.expose().clone()))
            .collect())
    }

    fn aws() -> Minted {
        Minted::from_view(&aws_view(), ProviderKind::Aws).expect("aws shape")
    }

    #[test]
    fn aws_maps_to_the_sdk_variables() {
        let m = aws();
        let env = env_of("MAYFLY_", &[("aws:r", &m, "arn:r", Naming::Default)]).expect("env");
        assert_eq!(env["AWS_ACCESS_KEY_ID"], "AKIA1");
        assert_eq!(env["AWS_SECRET_ACCESS_KEY"], "sek");
        assert_eq!(env["AWS_SESSION_TOKEN"], "sess");
        assert_eq!(env["AWS_CREDENTIAL_EXPIRATION"], "2030-01-01T00:00:00Z");
        assert_eq!(env["MAYFLY_TASK_ID"], "tsk_1");
        assert_eq!(env.len(), 5);
    }

    #[test]
    fn two_aws_roles_collide_unless_one_is_prefixed() {
        let m = aws();
        let err = env_of(
            "MAYFLY_",
            &[
                ("aws:a", &m, "arn:a", Naming::Default),
                ("aws:b", &m, "arn:b", Naming::Default),
            ],
        )
        .expect_err("collision");
        assert_eq!(
            err,
            EnvError::Collision {
                name: "AWS_ACCESS_KEY_ID".into(),
                first: "aws:a".into(),
                second: "aws:b".into()
            }
        );
        let env = env_of(
            "MAYFLY_",
            &[
                ("aws:a", &m, "arn:a", Naming::Default),
                ("aws:b", &m, "arn:b", Naming::Prefix("PROD_".into())),
            ],
        )
        .expect("mapped");
        assert!(env.contains_key("AWS_SESSION_TOKEN"));
        assert_eq!(env["PROD_AWS_SESSION_TOKEN"], "sess");
        assert!(env.contains_key("PROD_AWS_CREDENTIAL_EXPIRATION"));
    }

    #[test]
    fn vault_tokens_set_vault_token_and_dynamic_secrets_a_json_variable() {
        let vault = |credential| {
            Minted::from_view(&view("vault", credential), ProviderKind::Vault).expect("shape")
        };
        let token = vault(json!({"token": "hvs.x", "accessor": "acc", "policies": ["p"]}));
        let secret = vault(json!({"data": {"username": "u", "password": "p"},
                                  "vault_lease_id": "database/creds/ro/1"}));
        assert_eq!(token.kind(), Kind::VaultToken);
        assert_eq!(secret.kind(), Kind::VaultSecret);
        let env = env_of(
            "MAYFLY_",
            &[
                ("vault:app", &token, "app", Naming::Default),
                ("vault:db", &secret, "database/creds/ro", Naming::Default),
            ],
        )
        .expect("env");
        assert_eq!(env["VAULT_TOKEN"], "hvs.x");
        let data: Value =
            serde_json::from_str(&env["MAYFLY_VAULT_DATABASE_CREDS_RO"]).expect("json");
        assert_eq!(data, json!({"username": "u", "password": "p"}));
    }

    #[test]
    fn one_jwt_also_sets_the_short_name_and_several_only_their_own() {
        let (a, b) = (jwt("tok-a"), jwt("tok-b"));
        let one = env_of(
            "MAYFLY_",
            &[("jwt:a", &a, "https://api.example.com", Naming::Default)],
        )
        .expect("env");
        assert_eq!(one["MAYFLY_TOKEN"], "tok-a");
        assert_eq!(one["MAYFLY_TOKEN_API_EXAMPLE_COM"], "tok-a");
        let two = env_of(
            "X_",
            &[
                ("jwt:a", &a, "https://a.example", Naming::Default),
                ("jwt:b", &b, "https://b.example:8443/v1", Naming::Default),
            ],
        )
        .expect("env");
        assert!(!two.contains_key("X_TOKEN"));
        assert_eq!(two["X_TOKEN_A_EXAMPLE"], "tok-a");
        assert_eq!(two["X_TOKEN_B_EXAMPLE_8443_V1"], "tok-b");
        assert_eq!(two["X_TASK_ID"], "tsk_1");
    }

    #[test]
    fn a_mapped_jwt_sets_exactly_its_variable() {
        let (a, b) = (jwt("tok-a"), jwt("tok-b"));
        let gh = Naming::Env("GITHUB_TOKEN".into());
        let env = env_of(
            "MAYFLY_",
            &[
                ("jwt:gh", &a, "https://api.github.com", gh),
                ("jwt:b", &b, "https://b.example", Naming::Default),
            ],
        )
        .expect("env");
        assert_eq!(env["GITHUB_TOKEN"], "tok-a");
        assert!(!env.contains_key("MAYFLY_TOKEN_API_GITHUB_COM"));
        // The other one is the only unmapped jwt but not the only jwt: no short name.
        assert!(!env.contains_key("MAYFLY_TOKEN"));
        assert_eq!(env["MAYFLY_TOKEN_B_EXAMPLE"], "tok-b");
    }

    #[test]
    fn targets_that_sanitize_alike_collide_and_names_are_checked() {
        let (a, b) = (jwt("1"), jwt("2"));
        let err = env_of(
            "MAYFLY_",
            &[
                ("jwt:a", &a, "https://a-b.example", Naming::Default),
                ("jwt:b", &b, "https://a.b.example", Naming::Default),
            ],
        )
        .expect_err("same suffix");
        assert!(
            matches!(err, EnvError::Collision { name, .. } if name == "MAYFLY_TOKEN_A_B_EXAMPLE")
        );
        let taken = Naming::Env("MAYFLY_TASK_ID".into());
        let err = env_of("MAYFLY_", &[("jwt:a", &a, "https://a", taken)]).expect_err("reserved");
        assert!(matches!(err, EnvError::Collision { first, .. } if first == "the task id"));
        let err = env_of("MAYFLY_", &[("jwt:x", &a, "https://--", Naming::Default)])
            .expect_err("no name");
        assert_eq!(err, EnvError::NoName("jwt:x".into()));
    }

    #[test]
    fn prefixes_and_names_are_checked() {
        assert_eq!(
            plan("BAD-", &[]).expect_err("bad prefix"),
            EnvError::Prefix("BAD-".into())
        );
        assert!(plan("", &[]).is_ok());
        assert!(valid_env_name("_A1") && !valid_env_name("1A") && !valid_env_name("A B"));
        assert_eq!(
            target_suffix("arn:aws:iam::1:role/x"),
            "ARN_AWS_IAM_1_ROLE_X"
        );
        assert_eq!(target_suffix("database/creds/ro"), "DATABASE_CREDS_RO");
        assert_eq!(target_suffix("https://Api.Example.com/"), "API_EXAMPLE_COM");
    }

    #[test]
    fn an_aws_credential_missing_a_field_is_refused() {
        for missing in [
            "Version",
            "AccessKeyId",
            "SecretAccessKey",
            "SessionToken",
            "Expiration",
        ] {
            let mut v = aws_view();
            v["credential"]
                .as_object_mut()
                .expect("object")
                .remove(missing);
            assert_eq!(
                Minted::from_view(&v, ProviderKind::Aws).expect_err("incomplete"),
                ShapeError::Missing {
                    provider: ProviderKind::Aws,
                    field: missing
                }
            );
        }
        let mut v = aws_view();
        v["credential"]["Version"] = json!(2);
        assert_eq!(
            Minted::from_view(&v, ProviderKind::Aws).expect_err("version"),
            ShapeError::Version
        );
        v["credential"]["Version"] = json!(1);
        v["credential"]["Expiration"] = json!("tomorrow");
        assert_eq!(
            Minted::from_view(&v, ProviderKind::Aws).expect_err("expiration"),
            ShapeError::Expiration
        );
        assert!(matches!(
            Minted::from_view(&aws_view(), ProviderKind::Jwt),
            Err(ShapeError::Provider { .. })
        ));
    }

    #[test]
    fn the_credential_process_document_has_exactly_the_five_fields() {
        let a = AwsCredential::from_credential(&aws_view()["credential"]).expect("aws");
        let doc: Value =
            serde_json::from_str(&serde_json::to_string(&a).expect("json")).expect("parse");
        assert_eq!(doc, aws_view()["credential"]);
        assert!(
            !format!("{a:?}").contains("sek"),
            "Debug never shows the secret"
        );
    }

    #[test]
    fn shapes_without_their_secret_are_refused() {
        assert!(matches!(
            Minted::from_view(
                &view("jwt", json!({"token_type": "Bearer"})),
                ProviderKind::Jwt
            ),
            Err(ShapeError::Missing {
                field: "access_token",
                ..
            })
        ));
        assert_eq!(
            Minted::from_view(
                &view("vault", json!({"accessor": "a"})),
                ProviderKind::Vault
            )
            .expect_err("empty vault"),
            ShapeError::Vault
        );
    }
}
