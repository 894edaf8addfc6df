//! `mayfly config check FILE`: the config parses and validates, and every file it names
//! is there and can be read, as the broker would find it (relative paths from the working
//! directory). All problems are listed at once, so a first deployment is fixed in one go.

use std::path::{Path, PathBuf};

use crate::config::{Config, StoreConfig};

/// One file or directory the config refers to, by the key that names it.
struct Reference {
    key: String,
    path: PathBuf,
    kind: Kind,
}

enum Kind {
    /// Read at start or on reload: must exist and be readable.
    File,
    /// A directory the broker lists (policies, key sets): must exist and be listable.
    Dir,
    /// Created by the broker if missing (lease file, audit log): its directory must exist.
    Created,
    /// Created if missing because the config says so (`generate_key`).
    Generated,
}

/// Every `*_file` / `*_dir` key in the TOML, wherever it sits (tables, arrays of tables,
/// inline tables), so keys added later are covered without a list to keep in step.
fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if let toml::Value::String(s) = v {
                    if k.ends_with("_file") || k.ends_with("_dir") {
                        out.push((key, s.clone()));
                    }
                } else {
                    walk(&key, v, out);
                }
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => {}
    }
}

fn references(config: &Config, raw: &toml::Value) -> Vec<Reference> {
    let mut named = Vec::new();
    walk("", raw, &mut named);
    let mut refs: Vec<Reference> = named
        .into_iter()
        .map(|(key, path)| {
            let kind = if key.ends_with("_dir") {
                Kind::Dir
            } else if key == "providers.jwt.signing_key_file" && config.jwt_generate.is_some() {
                Kind::Generated
            } else {
                Kind::File
            };
            Reference {
                key,
                path: PathBuf::from(path),
                kind,
            }
        })
        .collect();
    // Keys with defaults, named or not.
    refs.push(Reference {
        key: "policy.dir".into(),
        path: config.policy_dir.clone(),
        kind: Kind::Dir,
    });
    refs.push(Reference {
        key: "audit.path".into(),
        path: config.audit_path.clone(),
        kind: Kind::Created,
    });
    if let StoreConfig::Embedded { path, .. } = &config.store {
        refs.push(Reference {
            key: "store.path".into(),
            path: path.clone(),
            kind: Kind::Created,
        });
    }
    refs
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `None` when the reference is usable, else why not.
fn problem(r: &Reference) -> Option<String> {
    let shown = r.path.display();
    let why = |what: &str, e: std::io::Error| format!("{}: {what} {shown}: {e}", r.key);
    match r.kind {
        Kind::File => std::fs::read(&r.path).err().map(|e| why("cannot read", e)),
        Kind::Dir => std::fs::read_dir(&r.path)
            .err()
            .map(|e| why("cannot list directory", e)),
        Kind::Created if r.path.exists() => std::fs::OpenOptions::new()
            .read(true)
            .open(&r.path)
            .err()
            .map(|e| why("cannot open", e)),
        Kind::Generated if r.path.exists() => {
            std::fs::read(&r.path).err().map(|e| why("cannot read", e))
        }
        Kind::Created | Kind::Generated => {
            let dir = parent_of(&r.path);
            std::fs::read_dir(dir).err().map(|e| {
                format!(
                    "{}: {shown} does not exist and its directory {} cannot be used: {e}",
                    r.key,
                    dir.display()
                )
            })
        }
    }
}

/// Validates the config at `path`, then opens every file it names and loads the policy
/// set. `Ok` carries the summary line; `Err` every problem found, one per line.
pub fn check(path: &Path) -> Result<String, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: toml::Value = toml::from_str(&text).map_err(|e| e.to_string())?;
    let refs = references(&config, &raw);
    let mut problems: Vec<String> = refs.iter().filter_map(problem).collect();
    if problems.is_empty()
        && let Err(e) = crate::policy::PolicyEngine::load(&config.policy_dir)
    {
        problems.push(format!("policy.dir: {e}"));
    }
    if !problems.is_empty() {
        return Err(problems.join("\n  "));
    }
    Ok(format!(
        "ok: config valid (listen {}, node {}); {} referenced files and directories readable, policies valid",
        config.listen,
        config.node_id,
        refs.len()
    ))
}
