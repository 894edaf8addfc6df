//! The agent side of the API, as the client helpers use it: declare a task, request a
//! credential under it (waiting out an operator approval), complete it.

use serde_json::{Value, json};
use std::time::Duration;

use crate::task::TaskId;

use super::client::{CliError, Client};
use super::taskfile::{CredentialSpec, TaskFile};

/// How often a held request is asked about; the approval's own expiry bounds the wait.
const APPROVAL_POLL: Duration = Duration::from_secs(2);

/// `POST /v1/tasks` with the file's declaration.
pub async fn declare(client: &Client, file: &TaskFile) -> Result<TaskId, CliError> {
    let task = client.post("/v1/tasks", file.declaration.clone()).await?;
    task["task_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| CliError::Unexpected("POST /v1/tasks returned no task_id".into()))
}

/// `POST /v1/tasks/{id}/credentials`. A request held for approval (202) is polled until
/// an operator decides or the approval expires; the credential view is returned.
pub async fn request(
    client: &Client,
    task: &TaskId,
    spec: &CredentialSpec,
) -> Result<Value, CliError> {
    let answer = client
        .post_answer(&format!("/v1/tasks/{task}/credentials"), spec.body.clone())
        .await?;
    if answer.status != 202 {
        return Ok(answer.body);
    }
    let id = answer.body["approval_id"]
        .as_str()
        .ok_or_else(|| CliError::Unexpected("a held request without approval_id".into()))?
        .to_string();
    eprintln!(
        "mayfly: {} is held for operator approval ({id}); waiting",
        spec.key()
    );
    loop {
        tokio::time::sleep(APPROVAL_POLL).await;
        let answer = client.get_answer(&format!("/v1/approvals/{id}")).await?;
        if answer.status != 202 {
            return Ok(answer.body);
        }
    }
}

/// `POST /v1/tasks/{id}/complete`: the number of leases revoked.
pub async fn complete(client: &Client, task: &TaskId) -> Result<u64, CliError> {
    let done = client
        .post(&format!("/v1/tasks/{task}/complete"), json!({}))
        .await?;
    Ok(done["revoked"].as_u64().unwrap_or(0))
}
