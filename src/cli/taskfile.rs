//! The task file of `mayfly exec` and `mayfly credential-process --task` (format in
//! `docs/cli.md`): the task to declare and the credentials to fetch under it.
//!
//! It is validated completely, with the broker's own rules (`crate::task`), before
//! anything is sent: an invalid file never declares a task. Errors name the file and the
//! key (`scope[1].resources`, `credential[0].env`).

use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::task::{
    CredentialRequest, Grant, MAX_GRANTS, ProviderKind, RawCredentialRequest, RawGrant,
    RawTaskRequest, ScopeError, TaskRequest,
};

use super::credential::{Naming, valid_env_name};

#[derive(Debug, thiserror::Error)]
pub enum TaskFileError {
    #[error("cannot read task file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown or missing key, or a mistyped value; toml's message names
    /// the key and the line.
    #[error("task file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("task file {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskFile {
    purpose: String,
    /// A duration string ("15m") or seconds.
    ttl: Value,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    scope: Vec<RawGrant>,
    /// Absent: one credential per grant. Present (even empty): exactly these.
    #[serde(default, rename = "credential")]
    credentials: Option<Vec<RawCredentialEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentialEntry {
    provider: String,
    target: String,
    actions: Option<Vec<String>>,
    resources: Option<Vec<String>>,
    ttl: Option<Value>,
    env: Option<String>,
    env_prefix: Option<String>,
}

/// One credential to request under a task, validated.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    pub request: CredentialRequest,
    pub naming: Naming,
    /// The `POST /v1/tasks/{id}/credentials` body, as the user wrote it (durations keep
    /// their unit).
    pub body: Value,
}

impl CredentialSpec {
    pub fn new(raw: RawCredentialRequest, naming: Naming) -> Result<Self, ScopeError> {
        let mut body = json!({"provider": raw.provider, "target": raw.target});
        if let Some(a) = &raw.actions {
            body["actions"] = json!(a);
        }
        if let Some(r) = &raw.resources {
            body["resources"] = json!(r);
        }
        if let Some(t) = &raw.ttl {
            body["ttl"] = t.clone();
        }
        Ok(Self {
            request: CredentialRequest::try_from(raw)?,
            naming,
            body,
        })
    }

    /// `provider:target`, as grants are named.
    pub fn key(&self) -> String {
        format!("{}:{}", self.request.provider, self.request.target)
    }
}

/// A validated task file.
#[derive(Debug, Clone)]
pub struct TaskFile {
    pub path: PathBuf,
    pub task: TaskRequest,
    /// The `POST /v1/tasks` body.
    pub declaration: Value,
    pub credentials: Vec<CredentialSpec>,
}

/// The key a grant-level [`ScopeError`] is about.
fn grant_field(e: &ScopeError) -> &'static str {
    match e {
        ScopeError::UnknownProvider(_) => "provider",
        ScopeError::Target => "target",
        ScopeError::ItemCount { field } | ScopeError::Item { field, .. } => field,
        ScopeError::Wildcard(_) => "resources",
        ScopeError::Duration(_) => "ttl",
        _ => "",
    }
}

/// The key a task-level [`ScopeError`] is about.
fn task_field(e: &ScopeError) -> &'static str {
    match e {
        ScopeError::Purpose => "purpose",
        ScopeError::Labels => "labels",
        ScopeError::Duration(_) => "ttl",
        _ => "scope",
    }
}

/// The message already starts with the key's last part (`ttl: duration …`): the error
/// names the key once (`…: credential[0].ttl: duration …`, not `ttl: ttl: …`).
fn without_key_prefix(key: &str, reason: String) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    match reason.strip_prefix(last).and_then(|r| r.strip_prefix(": ")) {
        Some(rest) => rest.to_string(),
        None => reason,
    }
}

fn join(base: String, field: &str) -> String {
    if field.is_empty() {
        base
    } else {
        format!("{base}.{field}")
    }
}

impl TaskFile {
    pub fn load(path: &Path) -> Result<Self, TaskFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TaskFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, TaskFileError> {
        let invalid = |key: String, reason: String| TaskFileError::Invalid {
            path: path.to_path_buf(),
            reason: without_key_prefix(&key, reason),
            key,
        };
        let raw: RawTaskFile = toml::from_str(text).map_err(|e| TaskFileError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Grant by grant first, so an error says which one.
        for (i, g) in raw.scope.iter().enumerate() {
            Grant::try_from(g.clone()).map_err(|e| {
                invalid(join(format!("scope[{i}]"), grant_field(&e)), e.to_string())
            })?;
        }
        let declaration_ttl = raw.ttl.clone();
        let task = TaskRequest::try_from(RawTaskRequest {
            purpose: raw.purpose,
            scope: raw.scope,
            ttl: raw.ttl,
            labels: raw.labels,
        })
        .map_err(|e| invalid(task_field(&e).into(), e.to_string()))?;
        let declaration = json!({
            "purpose": task.purpose,
            "scope": task.scope.grants(),
            "ttl": declaration_ttl,
            "labels": task.labels,
        });
        let credentials = match raw.credentials {
            None => task
                .scope
                .grants()
                .iter()
                .map(full_grant)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("scope".into(), e.to_string()))?,
            Some(entries) => {
                if entries.len() > MAX_GRANTS {
                    return Err(invalid(
                        "credential".into(),
                        format!("at most {MAX_GRANTS} entries"),
                    ));
                }
                entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        credential_entry(c, &task).map_err(|(field, reason)| {
                            invalid(join(format!("credential[{i}]"), field), reason)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            task,
            declaration,
            credentials,
        })
    }

    /// Checks that `spec` fits a grant of the file's scope and its TTL fits the task's.
    pub fn check_within(&self, spec: &CredentialSpec) -> Result<(), String> {
        within(spec, &self.task)
    }

    /// The target of the file's only grant for `provider`.
    pub fn only_target(&self, provider: ProviderKind) -> Result<String, TaskFileError> {
        let mut of = self
            .task
            .scope
            .grants()
            .iter()
            .filter(|g| g.provider == provider);
        match (of.next(), of.next()) {
            (Some(g), None) => Ok(g.target.clone()),
            _ => Err(TaskFileError::Invalid {
                path: self.path.clone(),
                key: "scope".into(),
                reason: format!("has no single {provider} grant; say which with --target"),
            }),
        }
    }
}

/// The default: the whole grant, in the provider's default variable names.
fn full_grant(g: &Grant) -> Result<CredentialSpec, ScopeError> {
    CredentialSpec::new(
        RawCredentialRequest {
            provider: g.provider.to_string(),
            target: g.target.clone(),
            actions: None,
            resources: None,
            ttl: None,
            resource: None,
        },
        Naming::Default,
    )
}

fn within(spec: &CredentialSpec, task: &TaskRequest) -> Result<(), String> {
    let r = &spec.request;
    let held = task
        .scope
        .grant_for(r.provider, &r.target)
        .ok_or_else(|| format!("no [[scope]] grant for {}", spec.key()))?;
    if !held.covers(&r.resolve(held)) {
        return Err(format!(
            "asks for more actions or resources than the [[scope]] grant for {}",
            spec.key()
        ));
    }
    if r.ttl.is_some_and(|t| t > task.ttl) {
        return Err("ttl is longer than the task's ttl".into());
    }
    Ok(())
}

/// Validates one `[[credential]]` entry; errors are (key under the entry, reason).
fn credential_entry(
    c: RawCredentialEntry,
    task: &TaskRequest,
) -> Result<CredentialSpec, (&'static str, String)> {
    let naming = match (c.env, c.env_prefix) {
        (Some(_), Some(_)) => return Err(("", "give env or env_prefix, not both".into())),
        (Some(name), None) => {
            if !valid_env_name(&name) {
                return Err((
                    "env",
                    format!("{name:?} is not a variable name (letters, digits, '_')"),
                ));
            }
            if c.provider == "aws" {
                return Err((
                    "env",
                    "an aws credential sets four variables; use env_prefix".into(),
                ));
            }
            Naming::Env(name)
        }
        (None, Some(prefix)) => {
            if !valid_env_name(&prefix) {
                return Err((
                    "env_prefix",
                    format!("{prefix:?} is not a variable name prefix (letters, digits, '_')"),
                ));
            }
            Naming::Prefix(prefix)
        }
        (None, None) => Naming::Default,
    };
    let spec = CredentialSpec::new(
        RawCredentialRequest {
            provider: c.provider,
            target: c.target,
            actions: c.actions,
            resources: c.resources,
            ttl: c.ttl,
            resource: None,
        },
        naming,
    )
    .map_err(|e| (grant_field(&e), e.to_string()))?;
    within(&spec, task).map_err(|reason| ("", reason))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TaskFile, TaskFileError> {
        TaskFile::parse(Path::new("task.toml"), text)
    }

    fn invalid_key(text: &str) -> String {
        match parse(text) {
            Err(TaskFileError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const BASE: &str = r#"
purpose = "deploy billing"
ttl = "30m"
[labels]
ticket = "OPS-1"
[[scope]]
provider = "jwt"
target = "https://api.example.com"
actions = ["read", "write"]
resources = ["repo/*"]
[[scope]]
provider = "aws"
target = "arn:aws:iam::1:role/deploy"
actions = ["s3:GetObject"]
"#;

    #[test]
    fn a_task_file_without_credentials_fetches_every_grant_whole() {
        let f = parse(BASE).expect("valid");
        assert_eq!(f.task.ttl, std::time::Duration::from_secs(1800));
        assert_eq!(f.declaration["ttl"], "30m");
        assert_eq!(f.declaration["labels"]["ticket"], "OPS-1");
        assert_eq!(f.declaration["scope"][0]["provider"], "jwt");
        assert_eq!(f.declaration["scope"][0]["resources"][0], "repo/*");
        let keys: Vec<_> = f.credentials.iter().map(CredentialSpec::key).collect();
        assert_eq!(
            keys,
            [
                "jwt:https://api.example.com",
                "aws:arn:aws:iam::1:role/deploy"
            ]
        );
        assert_eq!(
            f.credentials[0].body,
            json!({"provider": "jwt", "target": "https://api.example.com"})
        );
        assert!(f.credentials.iter().all(|c| c.naming == Naming::Default));
    }

    #[test]
    fn credential_entries_narrow_and_map_their_variables() {
        let text = format!(
            r#"{BASE}
[[credential]]
provider = "jwt"
target = "https://api.example.com"
actions = ["read"]
resources = ["repo/a"]
ttl = "5m"
env = "GITHUB_TOKEN"
[[credential]]
provider = "aws"
target = "arn:aws:iam::1:role/deploy"
env_prefix = "DEPLOY_"
"#
        );
        let f = parse(&text).expect("valid");
        assert_eq!(f.credentials.len(), 2);
        assert_eq!(f.credentials[0].naming, Naming::Env("GITHUB_TOKEN".into()));
        assert_eq!(
            f.credentials[0].body,
            json!({"provider": "jwt", "target": "https://api.example.com",
                   "actions": ["read"], "resources": ["repo/a"], "ttl": "5m"})
        );
        assert_eq!(f.credentials[1].naming, Naming::Prefix("DEPLOY_".into()));
    }

    #[test]
    fn an_empty_credential_list_fetches_nothing() {
        // Top-level keys go before the first table header.
        let f = parse(&format!("credential = []\n{BASE}")).expect("valid");
        assert!(f.credentials.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        let err = parse(&format!("{BASE}\nretries = 3\n")).expect_err("unknown key");
        match err {
            TaskFileError::Syntax { path, message } => {
                assert_eq!(path, Path::new("task.toml"));
                assert!(message.contains("unknown field `retries`"), "{message}");
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        let err = parse(&BASE.replace("resources = [\"repo/*\"]", "resource = [\"x\"]"))
            .expect_err("unknown grant key");
        assert!(
            err.to_string().contains("unknown field `resource`"),
            "{err}"
        );
        let err = parse(&format!(
            "{BASE}\n[[credential]]\nprovider = \"jwt\"\ntarget = \"https://api.example.com\"\nenvv = \"X\"\n"
        ))
        .expect_err("unknown credential key");
        assert!(err.to_string().contains("unknown field `envv`"), "{err}");
    }

    #[test]
    fn a_bad_ttl_names_its_key_once() {
        let err = parse(&BASE.replace("\"30m\"", "\"forever\"")).expect_err("bad ttl");
        let text = err.to_string();
        assert!(
            matches!(err, TaskFileError::Invalid { ref key, .. } if key == "ttl"),
            "{text}"
        );
        assert!(!text.contains("ttl: ttl:"), "{text}");
        assert!(text.contains(": ttl: duration \"forever\""), "{text}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (BASE.replace("\"30m\"", "\"forever\""), "ttl"),
            (BASE.replace("\"deploy billing\"", "\"\""), "purpose"),
            (
                BASE.replace("\"repo/*\"", "\"re*po\""),
                "scope[0].resources",
            ),
            (
                BASE.replace("provider = \"aws\"", "provider = \"gcp\""),
                "scope[1].provider",
            ),
            (
                BASE.replace("actions = [\"s3:GetObject\"]", "actions = []"),
                "scope[1].actions",
            ),
            // The same grant twice.
            (
                BASE.replace("arn:aws:iam::1:role/deploy", "https://api.example.com")
                    .replace("provider = \"aws\"", "provider = \"jwt\""),
                "scope",
            ),
            (
                BASE.replace("ticket = \"OPS-1\"", "ticket = \"\""),
                "labels",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(invalid_key(&text), key, "{text}");
        }
    }

    #[test]
    fn a_missing_key_is_a_syntax_error_naming_it() {
        let err = parse(&BASE.replace("ttl = \"30m\"\n", "")).expect_err("no ttl");
        assert!(err.to_string().contains("missing field `ttl`"), "{err}");
    }

    #[test]
    fn credential_entries_must_fit_the_scope_and_map_to_valid_names() {
        let jwt = "provider = \"jwt\"\ntarget = \"https://api.example.com\"";
        let aws = "provider = \"aws\"\ntarget = \"arn:aws:iam::1:role/deploy\"";
        let cases = [
            // No such grant; wider than the grant; longer than the task.
            (
                "provider = \"jwt\"\ntarget = \"https://other.example\"".to_string(),
                "credential[0]",
            ),
            (format!("{jwt}\nactions = [\"delete\"]"), "credential[0]"),
            (format!("{jwt}\nttl = \"1h\""), "credential[0]"),
            (format!("{jwt}\nttl = \"soon\""), "credential[0].ttl"),
            (format!("{jwt}\nenv = \"GH-TOKEN\""), "credential[0].env"),
            (
                format!("{jwt}\nenv_prefix = \"1X_\""),
                "credential[0].env_prefix",
            ),
            (
                format!("{jwt}\nenv = \"A\"\nenv_prefix = \"B_\""),
                "credential[0]",
            ),
            // aws sets four variables: a prefix, not a name.
            (format!("{aws}\nenv = \"AWS\""), "credential[0].env"),
        ];
        for (body, key) in cases {
            let text = format!("{BASE}\n[[credential]]\n{body}\n");
            assert_eq!(invalid_key(&text), key, "{body}");
        }
    }

    #[test]
    fn only_target_finds_the_single_grant_of_a_provider() {
        let f = parse(BASE).expect("valid");
        assert_eq!(
            f.only_target(ProviderKind::Aws).expect("one aws grant"),
            "arn:aws:iam::1:role/deploy"
        );
        assert!(matches!(
            f.only_target(ProviderKind::Vault),
            Err(TaskFileError::Invalid { key, .. }) if key == "scope"
        ));
    }
}
