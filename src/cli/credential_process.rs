//! `mayfly credential-process`: the AWS SDKs' `credential_process` helper. It prints
//! exactly the `credential_process` JSON document on stdout and nothing else; every
//! message and error goes to stderr, and any failure exits 1 (the SDK then reports it).
//!
//! With `--task-id` (or `$MAYFLY_TASK_ID`, which `mayfly exec` sets) it requests an aws
//! credential under a task that already exists; the task's owner ends it. With
//! `--task FILE` it declares a fresh task first and leaves it to end at its TTL, because
//! the credential it printed must stay valid: see docs/cli.md for why there is no
//! "complete the previous task" mode.

use clap::Args;
use serde_json::Value;
use std::path::PathBuf;

use crate::task::{ProviderKind, RawCredentialRequest, TaskId};

use super::agent;
use super::client::{Agent, CliError, Client, Conn};
use super::credential::{AwsCredential, Naming};
use super::taskfile::{CredentialSpec, TaskFile};

/// The variable `mayfly exec` sets for its child (with the default --env-prefix).
const TASK_ID_VAR: &str = "MAYFLY_TASK_ID";

#[derive(Args, Debug)]
pub struct CredentialProcessArgs {
    /// Request the credential under this task (one of yours). Default: $MAYFLY_TASK_ID.
    #[arg(long, value_name = "ID", conflicts_with = "task")]
    pub task_id: Option<String>,
    /// Declare a task from this file, then request the credential under it. The task
    /// ends at its TTL.
    #[arg(long, value_name = "FILE")]
    pub task: Option<PathBuf>,
    /// The aws target (role). With --task, defaults to the file's only aws grant.
    #[arg(long, value_name = "T")]
    pub target: Option<String>,
    /// Lifetime of the credential (`15m`); default: the broker's.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Narrow the grant's actions (comma-separated); default: all of them.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub actions: Option<Vec<String>>,
    /// Narrow the grant's resources (comma-separated); default: all of them.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub resources: Option<Vec<String>>,
    // Last: its help heading covers the flags after it.
    #[command(flatten)]
    pub conn: Conn<Agent>,
}

fn spec(args: &CredentialProcessArgs, target: String) -> Result<CredentialSpec, CliError> {
    CredentialSpec::new(
        RawCredentialRequest {
            provider: ProviderKind::Aws.to_string(),
            target,
            actions: args.actions.clone(),
            resources: args.resources.clone(),
            ttl: args.ttl.clone().map(Value::String),
            resource: None,
        },
        Naming::Default,
    )
    .map_err(|e| CliError::Flag {
        flag: "--target/--ttl/--actions/--resources",
        reason: e.to_string(),
    })
}

pub async fn run(args: CredentialProcessArgs) -> Result<(), CliError> {
    let client = Client::new(&args.conn)?;
    let aws = match &args.task {
        Some(path) => {
            let file = TaskFile::load(path)?;
            let target = match &args.target {
                Some(t) => t.clone(),
                None => file.only_target(ProviderKind::Aws)?,
            };
            let spec = spec(&args, target)?;
            // Everything is checked before the task is declared.
            file.check_within(&spec).map_err(|reason| CliError::Flag {
                flag: "--target/--ttl/--actions/--resources",
                reason: format!("{reason} (in {})", path.display()),
            })?;
            let task = agent::declare(&client, &file).await?;
            match fetch(&client, &task, &spec).await {
                Ok(aws) => aws,
                Err(e) => {
                    // Nothing was handed out: end the task rather than leave it to its TTL.
                    if let Err(c) = agent::complete(&client, &task).await {
                        eprintln!("mayfly: could not complete task {task}: {c}");
                    }
                    return Err(e);
                }
            }
        }
        None => {
            let id = match &args.task_id {
                Some(id) => id.clone(),
                None => std::env::var(TASK_ID_VAR).map_err(|_| {
                    CliError::Usage("give --task-id ID (or set MAYFLY_TASK_ID) or --task FILE")
                })?,
            };
            let task: TaskId = id.parse().map_err(|_| CliError::Flag {
                flag: "--task-id",
                reason: format!("{id:?} is not a task id (tsk_…)"),
            })?;
            let target = args
                .target
                .clone()
                .ok_or(CliError::Usage("--target is required with --task-id"))?;
            let spec = spec(&args, target)?;
            fetch(&client, &task, &spec).await?
        }
    };
    let doc = serde_json::to_string(&aws)
        .map_err(|e| CliError::Unexpected(format!("cannot encode the credential: {e}")))?;
    println!("{doc}");
    Ok(())
}

async fn fetch(
    client: &Client,
    task: &TaskId,
    spec: &CredentialSpec,
) -> Result<AwsCredential, CliError> {
    let view = agent::request(client, task, spec).await?;
    Ok(AwsCredential::from_view(&view)?)
}
