//! `/v1/leases` (operators): read, list and revoke leases.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::extract::{Caller, JsonBody};
use super::{
    ApiResult, AppState, Ev, RevokeBody, audit_scope, cursor, page_json, page_limit, parse_id,
    state_param, to_json, views,
};
use crate::lease::{Lease, LeaseQuery, LeaseState};
use crate::task::{LeaseId, ProviderKind};

fn lease_json(l: &Lease) -> Value {
    to_json(&views::LeaseView::from(l))
}

pub(super) async fn revoke_lease(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> ApiResult {
    let id: LeaseId = parse_id(&id, "lease")?;
    let lease = st
        .broker
        .revoke_lease(&caller, &id, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(lease_json(&lease)).into_response())
}

pub(super) async fn get_lease(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: LeaseId = parse_id(&id, "lease")?;
    let lease = st.broker.lease(&caller, &id, &audit_scope(&ev)).await?;
    Ok(Json(lease_json(&lease)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LeaseParams {
    task: Option<String>,
    principal: Option<String>,
    provider: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list_leases(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<LeaseParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let q = LeaseQuery {
        task: cursor(p.task.as_deref(), "task")?,
        principal: p.principal,
        provider: p
            .provider
            .as_deref()
            .map(|s| {
                s.parse::<ProviderKind>()
                    .map_err(|e| ApiError::Query(e.to_string()))
            })
            .transpose()?,
        state: state_param::<LeaseState>(p.state.as_deref(), "lease")?,
        after: cursor(p.after.as_deref(), "lease")?,
        limit: page_limit(&st, p.limit)?,
    };
    let page = st.broker.leases(&caller, q, &audit_scope(&ev)).await?;
    Ok(Json(page_json(&page, lease_json)).into_response())
}
