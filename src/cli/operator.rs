//! Operator commands: `mayfly lease …`, `mayfly task …`, `mayfly revoke …`, talking to a
//! running broker over mTLS with an operator certificate. Tables for people, `--json`
//! (one JSON document on stdout) for scripts.

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::Write;

use super::client::{self, CliError, Client};

/// Operator connection flags (default: the dev operator SVID) and the output format.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    // Before `server`, whose help heading would otherwise also cover it.
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub server: client::Conn<client::Operator>,
}

#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// List leases (all pages).
    Ls {
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one lease.
    Show { id: String },
    /// Revoke one lease.
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TaskCmd {
    /// List tasks (all pages).
    Ls {
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a task and its leases.
    Show { id: String },
    /// Complete a task (as its owner: pass the agent's --cert/--key).
    Complete { id: String },
    /// Revoke a task and every sub-task (operators).
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApprovalCmd {
    /// List approvals (default: the pending ones).
    Ls {
        /// pending | approved | rejected | collected
        #[arg(long, default_value = "pending")]
        state: String,
    },
    /// Approve a held request; the requester collects it once.
    Approve {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Reject a held request.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

/// Exactly one of --principal, --provider, --target-prefix (the broker checks it too).
#[derive(Args, Debug)]
pub struct BulkArgs {
    /// Every task and lease of this principal.
    #[arg(long)]
    pub principal: Option<String>,
    /// Every lease of this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Every lease whose target starts with this prefix.
    #[arg(long)]
    pub target_prefix: Option<String>,
    #[arg(long)]
    pub reason: String,
}

fn opt(query: &mut Vec<(&'static str, String)>, key: &'static str, v: &Option<String>) {
    if let Some(v) = v {
        query.push((key, v.clone()));
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn lease_table(items: &[Value]) {
    println!(
        "{:<36}  {:<11}  {:<8}  {:<36}  {:<25}  TARGET",
        "LEASE", "STATE", "PROVIDER", "TASK", "EXPIRES"
    );
    for l in items {
        println!(
            "{:<36}  {:<11}  {:<8}  {:<36}  {:<25}  {}",
            s(l, "lease_id"),
            s(l, "state"),
            s(l, "provider"),
            s(l, "task_id"),
            s(l, "expires_at"),
            s(l, "target")
        );
    }
}

fn task_table(items: &[Value]) {
    println!(
        "{:<36}  {:<10}  {:<25}  {:<40}  PURPOSE",
        "TASK", "STATE", "EXPIRES", "OWNER"
    );
    for t in items {
        println!(
            "{:<36}  {:<10}  {:<25}  {:<40}  {}",
            s(t, "task_id"),
            s(t, "state"),
            s(t, "expires_at"),
            s(t, "owner"),
            s(t, "purpose")
        );
    }
}

fn approval_table(items: &[Value]) {
    println!(
        "{:<36}  {:<9}  {:<25}  {:<40}  {:<8}  TARGET",
        "APPROVAL", "STATUS", "EXPIRES", "REQUESTER", "PROVIDER"
    );
    for a in items {
        println!(
            "{:<36}  {:<9}  {:<25}  {:<40}  {:<8}  {}",
            s(a, "approval_id"),
            s(a, "status"),
            s(a, "expires_at"),
            s(a, "requester"),
            s(a, "provider"),
            s(a, "target")
        );
    }
}

fn emit(json_out: bool, v: &Value, table: impl FnOnce(&Value)) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

pub async fn lease(conn: Conn, cmd: LeaseCmd) -> Result<(), CliError> {
    let c = Client::new(&conn.server)?;
    match cmd {
        LeaseCmd::Ls {
            task,
            principal,
            provider,
            state,
        } => {
            let mut q = Vec::new();
            opt(&mut q, "task", &task);
            opt(&mut q, "principal", &principal);
            opt(&mut q, "provider", &provider);
            opt(&mut q, "state", &state);
            let items = c.all("/v1/leases", q).await?;
            emit(conn.json, &json!({"items": items}), |v| {
                lease_table(v["items"].as_array().map_or(&[], Vec::as_slice))
            });
        }
        LeaseCmd::Show { id } => {
            let l = c.get(&format!("/v1/leases/{id}"), &[]).await?;
            emit(conn.json, &l, |l| lease_table(std::slice::from_ref(l)));
        }
        LeaseCmd::Revoke { id, reason } => {
            let l = c
                .post(
                    &format!("/v1/leases/{id}/revoke"),
                    json!({"reason": reason}),
                )
                .await?;
            emit(conn.json, &l, |l| {
                println!("{} {}", s(l, "lease_id"), s(l, "state"))
            });
        }
    }
    Ok(())
}

pub async fn task(conn: Conn, cmd: TaskCmd) -> Result<(), CliError> {
    let c = Client::new(&conn.server)?;
    match cmd {
        TaskCmd::Ls { principal, state } => {
            let mut q = Vec::new();
            opt(&mut q, "principal", &principal);
            opt(&mut q, "state", &state);
            let items = c.all("/v1/tasks", q).await?;
            emit(conn.json, &json!({"items": items}), |v| {
                task_table(v["items"].as_array().map_or(&[], Vec::as_slice))
            });
        }
        TaskCmd::Show { id } => {
            let t = c.get(&format!("/v1/tasks/{id}"), &[]).await?;
            emit(conn.json, &t, |t| {
                task_table(std::slice::from_ref(t));
                println!();
                lease_table(t["leases"].as_array().map_or(&[], Vec::as_slice));
            });
        }
        TaskCmd::Complete { id } => {
            let r = c
                .post(&format!("/v1/tasks/{id}/complete"), json!({}))
                .await?;
            emit(conn.json, &r, |r| {
                println!("{id} completed; {} leases revoked", s(r, "revoked"))
            });
        }
        TaskCmd::Revoke { id, reason } => {
            let r = c
                .post(&format!("/v1/tasks/{id}/revoke"), json!({"reason": reason}))
                .await?;
            emit(conn.json, &r, |r| {
                println!(
                    "{id} revoked with {} task(s); {} leases revoked",
                    r["tasks"].as_array().map_or(0, Vec::len),
                    s(r, "revoked")
                )
            });
        }
    }
    Ok(())
}

pub async fn approval(conn: Conn, cmd: ApprovalCmd) -> Result<(), CliError> {
    let c = Client::new(&conn.server)?;
    let decide = |id: String, decision: &'static str, reason: String| {
        let c = &c;
        async move {
            c.post(
                &format!("/v1/approvals/{id}"),
                json!({"decision": decision, "reason": reason}),
            )
            .await
        }
    };
    let v = match cmd {
        ApprovalCmd::Ls { state } => c.get("/v1/approvals", &[("state", state)]).await?,
        ApprovalCmd::Approve { id, reason } => decide(id, "approve", reason).await?,
        ApprovalCmd::Deny { id, reason } => decide(id, "reject", reason).await?,
    };
    emit(conn.json, &v, |v| match v["items"].as_array() {
        Some(items) => approval_table(items),
        None => approval_table(std::slice::from_ref(v)),
    });
    Ok(())
}

/// Revokes lease by lease with progress on stderr, then (for a principal) ends its tasks
/// server-side so nothing minted in between survives.
pub async fn bulk(conn: Conn, args: BulkArgs) -> Result<(), CliError> {
    let chosen = [
        args.principal.is_some(),
        args.provider.is_some(),
        args.target_prefix.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return Err(CliError::Usage(
            "give exactly one of --principal, --provider, --target-prefix",
        ));
    }
    let c = Client::new(&conn.server)?;
    let matching = matching_leases(&c, &args).await?;
    let (revoked, failed) = revoke_each(&c, &matching, &args.reason, conn.json).await;
    let body = json!({
        "principal": args.principal, "provider": args.provider, "target_prefix": args.target_prefix, "reason": args.reason,
    });
    let sweep = c.post("/v1/revoke", body).await?;
    let swept: Vec<Value> = sweep["revoked_leases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let out = json!({
        "revoked": revoked.len() + swept.len(),
        "revoked_leases": revoked,
        "swept_leases": swept,
        "tasks": sweep["tasks"],
        "failed": failed,
    });
    emit(conn.json, &out, |o| {
        println!(
            "{} leases revoked, {} tasks ended, {} failures",
            s(o, "revoked"),
            o["tasks"].as_array().map_or(0, Vec::len),
            o["failed"].as_array().map_or(0, Vec::len)
        )
    });
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Api {
            status: 0,
            code: "partial".into(),
            detail: format!("{} revocations failed", failed.len()),
        })
    }
}

/// The leases a bulk revocation covers: live ones of the principal or provider, or under
/// the target prefix.
async fn matching_leases(c: &Client, args: &BulkArgs) -> Result<Vec<Value>, CliError> {
    let mut q = Vec::new();
    opt(&mut q, "principal", &args.principal);
    opt(&mut q, "provider", &args.provider);
    Ok(c.all("/v1/leases", q)
        .await?
        .into_iter()
        .filter(|l| matches!(l["state"].as_str(), Some("active" | "pending" | "revoking")))
        .filter(|l| {
            args.target_prefix
                .as_deref()
                .is_none_or(|p| l["target"].as_str().is_some_and(|t| t.starts_with(p)))
        })
        .collect())
}

/// Revokes each lease, with progress on stderr unless the output is JSON: the ids
/// revoked and the failures.
async fn revoke_each(
    c: &Client,
    matching: &[Value],
    reason: &str,
    json_out: bool,
) -> (Vec<String>, Vec<Value>) {
    let total = matching.len();
    let mut revoked = Vec::new();
    let mut failed = Vec::new();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for (i, l) in matching.iter().enumerate() {
        let id = s(l, "lease_id");
        match c
            .post(
                &format!("/v1/leases/{id}/revoke"),
                json!({"reason": reason}),
            )
            .await
        {
            Ok(_) => revoked.push(id.clone()),
            Err(e) => failed.push(json!({"lease_id": id, "error": e.to_string()})),
        }
        if !json_out {
            // One line rewritten in place at a terminal; one line per lease in a file or
            // pipe, where a carriage return would run them together.
            if tty {
                eprint!("\rrevoking [{}/{total}] {id}", i + 1);
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("revoking [{}/{total}] {id}", i + 1);
            }
        }
    }
    if !json_out && tty && total > 0 {
        eprintln!();
    }
    (revoked, failed)
}
