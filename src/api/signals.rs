//! Operator controls over many leases at once: bulk revocation (`/v1/revoke`) and
//! external anomaly signals (`/v1/signals`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::{Caller, JsonBody};
use super::{ApiResult, AppState, Ev, audit_scope, parse_id};
use crate::task::ProviderKind;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    pub(crate) principal: Option<String>,
    pub(crate) provider: Option<String>,
    pub(crate) target_prefix: Option<String>,
    pub(crate) reason: String,
}

pub(super) async fn bulk_revoke(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<BulkBody>,
) -> ApiResult {
    use crate::broker::{BrokerError, BulkSelector};
    let sel = match (body.principal, body.provider, body.target_prefix) {
        (Some(p), None, None) if !p.is_empty() => BulkSelector::Principal(p),
        (None, Some(p), None) => {
            BulkSelector::Provider(p.parse::<ProviderKind>().map_err(BrokerError::from)?)
        }
        (None, None, Some(t)) if !t.is_empty() => BulkSelector::TargetPrefix(t),
        _ => return Err(BrokerError::Selector.into()),
    };
    let out = st
        .broker
        .bulk_revoke(&caller, sel, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(json!({
        "revoked": out.leases.len(),
        "revoked_leases": out.leases,
        "tasks": out.tasks,
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignalBody {
    pub(crate) task_id: Option<String>,
    pub(crate) principal: Option<String>,
    pub(crate) kind: String,
    pub(crate) severity: String,
    #[serde(default)]
    pub(crate) detail: String,
}

pub(super) async fn signal(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<SignalBody>,
) -> ApiResult {
    use crate::broker::BrokerError;
    let task = body
        .task_id
        .as_deref()
        .map(|t| parse_id(t, "task"))
        .transpose()?;
    let principal = body
        .principal
        .as_deref()
        .map(crate::identity::Principal::parse)
        .transpose()
        .map_err(|_| BrokerError::SignalTarget)?;
    let bad_kind = body.kind.is_empty()
        || body.kind.len() > 64
        || !body.kind.bytes().all(|b| b.is_ascii_graphic());
    if bad_kind || body.detail.len() > 1024 {
        return Err(BrokerError::SignalTarget.into());
    }
    let severity = body
        .severity
        .parse()
        .map_err(|e: String| ApiError::Query(e))?;
    let sig = crate::broker::ExternalSignal {
        task,
        principal,
        kind: body.kind,
        severity,
        detail: body.detail,
    };
    let fired = st.broker.signal(&caller, sig, &audit_scope(&ev)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": true,
            "fired": fired.iter().map(|v| json!({
                "rule": v.rule,
                "action": v.action.as_str(),
                "enforced": v.mode == crate::anomaly::Mode::Enforce,
            })).collect::<Vec<_>>(),
        })),
    )
        .into_response())
}
