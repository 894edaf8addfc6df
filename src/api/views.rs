//! Response bodies, typed: what handlers serialise and what the OpenAPI spec describes.

use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::broker::Approval;
use crate::lease::Lease;
use crate::task::{Grant, Task};

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantView {
    /// `jwt`, `vault` or `aws`.
    pub provider: String,
    pub target: String,
    pub actions: Vec<String>,
    /// Resource patterns; `*` only as the last character.
    pub resources: Vec<String>,
}

impl From<&Grant> for GrantView {
    fn from(g: &Grant) -> Self {
        Self {
            provider: g.provider.to_string(),
            target: g.target.clone(),
            actions: g.actions.iter().cloned().collect(),
            resources: g.resources.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseView {
    pub lease_id: String,
    pub task_id: String,
    pub principal: String,
    pub provider: String,
    pub target: String,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
    /// pending | active | revoking | revoked | expired | irrevocable
    pub state: String,
    pub issued_at: String,
    pub expires_at: String,
    pub updated_at: String,
    pub reason: Option<String>,
    /// For credentials that cannot be revoked one by one: when they stop working.
    pub dies_at: Option<String>,
    pub credential_fingerprint: Option<String>,
    pub revocation_attempts: u32,
}

impl From<&Lease> for LeaseView {
    fn from(l: &Lease) -> Self {
        Self {
            lease_id: l.id.to_string(),
            task_id: l.task_id.to_string(),
            principal: l.principal.to_string(),
            provider: l.provider.to_string(),
            target: l.target.clone(),
            actions: l.actions.iter().cloned().collect(),
            resources: l.resources.iter().cloned().collect(),
            state: l.state.as_str().into(),
            issued_at: crate::api_time(l.issued_at),
            expires_at: crate::api_time(l.expires_at),
            updated_at: crate::api_time(l.updated_at),
            reason: l.reason.clone(),
            dies_at: l.dies_at.map(crate::api_time),
            credential_fingerprint: l.fingerprint.clone(),
            revocation_attempts: l.attempts,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    pub task_id: String,
    pub owner: String,
    pub purpose: String,
    pub scope: Vec<GrantView>,
    /// active | completed | revoked | expired
    pub state: String,
    pub created_at: String,
    pub expires_at: String,
    /// The delegating task, for sub-tasks.
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    /// Present on `GET /v1/tasks/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<LeaseView>>,
}

impl TaskView {
    pub fn new(t: &Task, leases: Option<&[Lease]>) -> Self {
        Self {
            task_id: t.id.to_string(),
            owner: t.owner.to_string(),
            purpose: t.purpose.clone(),
            scope: t.scope.grants().iter().map(GrantView::from).collect(),
            state: t.state_at(time::OffsetDateTime::now_utc()).as_str().into(),
            created_at: crate::api_time(t.created_at),
            expires_at: crate::api_time(t.expires_at),
            parent: t.parent.as_ref().map(ToString::to_string),
            labels: t.labels.clone(),
            ended_at: t.ended_at.map(crate::api_time),
            end_reason: t.end_reason.clone(),
            leases: leases.map(|ls| ls.iter().map(LeaseView::from).collect()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeasePage {
    pub items: Vec<LeaseView>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TaskPage {
    pub items: Vec<TaskView>,
    pub next: Option<String>,
}

/// A minted credential with its lease.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialView {
    pub lease_id: String,
    pub task_id: String,
    pub provider: String,
    pub target: String,
    pub expires_at: String,
    /// Provider-shaped: jwt → {access_token, token_type:"Bearer"};
    /// aws → {Version, AccessKeyId, SecretAccessKey, SessionToken, Expiration};
    /// vault → {token, accessor, policies} or {data, vault_lease_id}.
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalView {
    pub approval_id: String,
    /// pending | approved | rejected | collected | expired
    pub status: String,
    pub task_id: String,
    pub requester: String,
    pub provider: String,
    pub target: String,
    /// Pending: decided by then. Approved: collected by then.
    pub expires_at: String,
    pub created_at: String,
    /// The operator who approved or rejected it.
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalList {
    pub items: Vec<ApprovalView>,
}

impl From<&Approval> for ApprovalView {
    fn from(a: &Approval) -> Self {
        Self {
            approval_id: a.id.clone(),
            status: a.status_at(time::OffsetDateTime::now_utc()).to_string(),
            task_id: a.task_id.to_string(),
            requester: a.requester.to_string(),
            provider: a.request.provider.to_string(),
            target: a.request.target.clone(),
            expires_at: crate::api_time(a.expires_at),
            created_at: crate::api_time(a.created_at),
            decided_by: a.decided_by.clone(),
            reason: a.reason.clone(),
        }
    }
}

/// What a completion or revocation ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevocationView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Number of leases revoked.
    pub revoked: usize,
    pub revoked_leases: Vec<String>,
    /// Tasks ended (the task and its sub-tasks).
    pub tasks: Vec<String>,
}

/// RFC 7662 introspection response.
#[derive(Debug, Serialize, ToSchema, Default)]
pub struct IntrospectionView {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// A string, or an array when the token was minted for several RFC 8707 resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub aud: Option<crate::provider::jwt::Audience>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// RFC 7800 confirmation of a sender-constrained token: `{"x5t#S256": …}` (RFC 8705)
    /// or `{"jkt": …}` (RFC 9449). Absent for a bearer token.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub cnf: Option<crate::provider::jwt::Confirmation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// RFC 8693 §4.1 actor chain of a delegated token: `act.sub` is the current holder,
    /// earlier holders nested deeper; `sub` is then the root of the delegation.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub act: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FiredRule {
    pub rule: String,
    pub action: String,
    pub enforced: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignalResult {
    pub accepted: bool,
    pub fired: Vec<FiredRule>,
}

/// RFC 9457 problem document; `code` is stable (see docs/api-errors.md).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: String,
    pub detail: String,
}
