//! `/v1/approvals`: operators list and decide the credential requests held for
//! approval; the requester collects the outcome.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::extract::{Caller, JsonBody};
use super::{
    ApiResult, AppState, Ev, audit_scope, outcome_response, page_limit, state_param, to_json, views,
};

pub(super) fn approval_json(a: &crate::broker::Approval) -> Value {
    to_json(&views::ApprovalView::from(a))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalBody {
    pub(crate) decision: String,
    pub(crate) reason: String,
}

pub(super) async fn decide_approval(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ApprovalBody>,
) -> ApiResult {
    let decision = crate::broker::ApprovalDecision::parse(&body.decision)?;
    let a = st
        .broker
        .decide_approval(&caller, &id, decision, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(approval_json(&a)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApprovalParams {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/approvals?state=pending` (operators): the approvals every replica shares.
pub(super) async fn list_approvals(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<ApprovalParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let state = state_param::<crate::approval::ApprovalState>(p.state.as_deref(), "approval")?;
    let limit = page_limit(&st, p.limit)?;
    let items = st
        .broker
        .approvals(&caller, state, limit, &audit_scope(&ev))
        .await?;
    let views: Vec<views::ApprovalView> = items.iter().map(views::ApprovalView::from).collect();
    Ok(Json(to_json(&views::ApprovalList { items: views })).into_response())
}

pub(super) async fn collect_approval(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let outcome = st
        .broker
        .collect_approval(&caller, &id, &audit_scope(&ev))
        .await?;
    Ok(outcome_response(outcome))
}
