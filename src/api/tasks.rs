//! `/v1/tasks`: declare, read and list tasks, request a task's credentials, delegate a
//! sub-task, and end a task tree (complete by its owner, revoke by an operator).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{Caller, JsonBody};
use super::{
    ApiResult, AppState, Ev, RevokeBody, audit_scope, cursor, outcome_response, page_json,
    page_limit, parse_id, presented_proof, state_param, to_json, views, with_dpop_nonce,
};
use crate::lease::{Lease, TaskQuery};
use crate::revocation::TreeRevocation;
use crate::task::{
    CredentialRequest, RawCredentialRequest, RawTaskRequest, Task, TaskId, TaskRequest, TaskState,
};

/// A task tree that ended: the task, its new state, and what ending it revoked.
fn ended_json(id: &TaskId, state: TaskState, out: &TreeRevocation) -> Value {
    json!({
        "task_id": id,
        "state": state.as_str(),
        "revoked": out.leases.len(),
        "revoked_leases": out.leases,
        "tasks": out.tasks,
    })
}

fn task_json(t: &Task, leases: Option<&[Lease]>) -> Value {
    to_json(&views::TaskView::new(t, leases))
}

pub(super) async fn declare_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(raw): JsonBody<RawTaskRequest>,
) -> ApiResult {
    let req = TaskRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
    let task = st
        .broker
        .declare_task(&caller, req, &audit_scope(&ev))
        .await?;
    Ok((StatusCode::CREATED, Json(task_json(&task, None))).into_response())
}

pub(super) async fn get_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let (task, leases) = st.broker.task_view(&caller, &id, &audit_scope(&ev)).await?;
    Ok(Json(task_json(&task, Some(&leases))).into_response())
}

pub(super) async fn request_credential(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    JsonBody(raw): JsonBody<RawCredentialRequest>,
) -> Response {
    let result = async {
        let id: TaskId = parse_id(&id, "task")?;
        let mut req = CredentialRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
        let proof = presented_proof(&headers, "POST", uri.path());
        if let Some((verified, once)) = st.broker.prove(proof)? {
            req.dpop_jkt = Some(verified.jkt);
            req.dpop_once = Some(once);
        }
        let outcome = st
            .broker
            .request_credential(&caller, &id, req, &audit_scope(&ev))
            .await?;
        Ok::<_, ApiError>(outcome_response(outcome))
    }
    .await;
    with_dpop_nonce(&st, result.unwrap_or_else(IntoResponse::into_response))
}

pub(super) async fn delegate_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(raw): JsonBody<crate::task::RawDelegateRequest>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let req =
        crate::task::DelegateRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
    let child = st
        .broker
        .delegate_task(&caller, &id, req, &audit_scope(&ev))
        .await?;
    Ok((StatusCode::CREATED, Json(task_json(&child, None))).into_response())
}

pub(super) async fn complete_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let out = st
        .broker
        .complete_task(&caller, &id, &audit_scope(&ev))
        .await?;
    Ok(Json(ended_json(&id, TaskState::Completed, &out)).into_response())
}

pub(super) async fn revoke_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let out = st
        .broker
        .revoke_task(&caller, &id, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(ended_json(&id, TaskState::Revoked, &out)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskParams {
    principal: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list_tasks(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<TaskParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let q = TaskQuery {
        principal: p.principal,
        state: state_param(p.state.as_deref(), "task")?,
        after: cursor(p.after.as_deref(), "task")?,
        limit: page_limit(&st, p.limit)?,
        now: None,
    };
    let page = st.broker.tasks(&caller, q, &audit_scope(&ev)).await?;
    Ok(Json(page_json(&page, |t| task_json(t, None))).into_response())
}
