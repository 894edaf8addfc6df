//! The OpenAPI 3.1 description of the HTTP API, generated from the code: request bodies
//! are the types the handlers deserialise, responses the views they serialise. Served at
//! `/openapi.json`, printed by `mayfly openapi`, checked in as `docs/openapi.json`; a
//! test fails when the three differ or when a documented route is not routed.
//!
//! The functions below are documentation anchors, one per route (the handlers stay
//! plain axum functions).

#![allow(
    dead_code,
    reason = "the functions exist only to carry #[utoipa::path]"
)]

use utoipa::OpenApi;

use super::views::*;
use super::{ApprovalBody, BulkBody, IntrospectForm, RevokeBody, SignalBody, TokenForm};
use crate::task::{RawCredentialRequest, RawDelegateRequest, RawGrant, RawTaskRequest};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mayfly",
        description = "Just-in-time, task-scoped credential broker. Agents authenticate with mTLS (X.509-SVID); errors are application/problem+json with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    paths(
        declare_task, list_tasks, get_task, request_credential, delegate_task, complete_task,
        revoke_task, list_leases, get_lease, revoke_lease, bulk_revoke, signal, list_approvals, decide_approval,
        collect_approval, introspect, token, jwks, discovery, authorization_server_metadata,
        healthz, readyz, metrics
    ),
    components(schemas(
        RawTaskRequest, RawGrant, RawCredentialRequest, RawDelegateRequest, RevokeBody, BulkBody,
        SignalBody, ApprovalBody, IntrospectForm, TokenForm, TaskView, GrantView, LeaseView, TaskPage,
        LeasePage, CredentialView, ApprovalView, ApprovalList, RevocationView, IntrospectionView, SignalResult,
        FiredRule, Problem
    )),
    tags(
        (name = "agent", description = "Agents, authenticated by their X.509-SVID"),
        (name = "operator", description = "Operator identities from config only; agents get 403 not_operator"),
        (name = "resource-server", description = "Verifying Mayfly access tokens"),
        (name = "ci", description = "RFC 8693 token exchange with an OIDC workload token or JWT-SVID"),
        (name = "ops", description = "Health and metrics; no client certificate needed")
    )
)]
pub struct ApiDoc;

/// The spec as JSON.
pub fn spec() -> serde_json::Value {
    let mut spec = serde_json::to_value(ApiDoc::openapi()).unwrap_or(serde_json::Value::Null);
    document_refusals(&mut spec);
    spec
}

const TASK_ID: &str = "^tsk_[0-9a-f]{32}$";
const LEASE_ID: &str = "^lse_[0-9a-f]{32}$";
const APPROVAL_ID: &str = "^apr_[0-9a-f]{32}$";

/// What every `/v1` operation can answer besides its own results, and the exact shape of
/// ids and list filters, applied to the generated spec in one place (issue #18: the
/// schema-driven API fuzzer holds every response to the spec):
/// - errors are `application/problem+json` (`/v1/token`: RFC 6749 §5.2 JSON);
/// - 400 (malformed id, query, body or form), 401 (identity refused; not `/v1/token`),
///   403, 404 (routes with an `{id}`), 413 and 415 (routes with a body), 429 and 503 are
///   possible on every `/v1` route (codes: docs/api-errors.md);
/// - path ids, `task`/`after` filters, `provider` and `state` carry their formats, and
///   `limit` its range (the maximum is `limits.max_page`, default 500).
fn document_refusals(spec: &mut serde_json::Value) {
    use serde_json::Value;
    link_results(spec);
    let Some(paths) = spec.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let Some(ops) = ops.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            let has_body = op.get("requestBody").is_some();
            document_params(path, op);
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            problem_media_type(responses);
            add_refusals(path, has_body, responses);
        }
    }
}

/// The formats of path ids and list filters, and the range of `limit`.
fn document_params(path: &str, op: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let id_pattern = if path.starts_with("/v1/tasks/") {
        TASK_ID
    } else if path.starts_with("/v1/leases/") {
        LEASE_ID
    } else {
        APPROVAL_ID
    };
    for param in op
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let name = param["name"].as_str().unwrap_or_default().to_string();
        let schema = &mut param["schema"];
        match name.as_str() {
            "id" => schema["pattern"] = json!(id_pattern),
            "task" => schema["pattern"] = json!(TASK_ID),
            "after" if path == "/v1/tasks" => schema["pattern"] = json!(TASK_ID),
            "after" => schema["pattern"] = json!(LEASE_ID),
            "provider" => schema["enum"] = json!(["jwt", "vault", "aws"]),
            "state" if path == "/v1/tasks" => {
                schema["enum"] = json!(["active", "completed", "revoked", "expired"]);
            }
            "state" => {
                schema["enum"] = json!([
                    "pending",
                    "active",
                    "revoking",
                    "revoked",
                    "expired",
                    "irrevocable"
                ]);
            }
            "limit" => {
                schema["minimum"] = json!(1);
                schema["maximum"] = json!(500);
            }
            _ => {}
        }
    }
}

/// A `Problem` body is served as `application/problem+json`, not `application/json`.
fn problem_media_type(responses: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    for r in responses.values_mut() {
        let Some(content) = r.get_mut("content").and_then(Value::as_object_mut) else {
            continue;
        };
        let is_problem = content
            .get("application/json")
            .and_then(|c| c.pointer("/schema/$ref"))
            .and_then(Value::as_str)
            .is_some_and(|s| s.ends_with("/Problem"));
        if is_problem && let Some(c) = content.remove("application/json") {
            content.insert("application/problem+json".into(), c);
        }
    }
}

/// The refusals every `/v1` operation can answer (RFC 6749 §5.2 bodies on `/v1/token`).
fn add_refusals(
    path: &str,
    has_body: bool,
    responses: &mut serde_json::Map<String, serde_json::Value>,
) {
    use serde_json::json;
    let token = path == "/v1/token";
    let mut add = |status: &str, description: &str| {
        let entry = if token {
            json!({"description": description,
                   "content": {"application/json": {"schema": {
                       "type": "object", "required": ["error"],
                       "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}}}}}})
        } else {
            json!({"description": description,
                   "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
        };
        match responses.get_mut(status) {
            None => {
                responses.insert(status.into(), entry);
            }
            // A documented status without a body (the token route's 400).
            Some(existing) if existing.get("content").is_none() => {
                existing["content"] = entry["content"].clone();
            }
            Some(_) => {}
        }
    };
    add("400", "Malformed id, query, body or form (invalid_*)");
    if !token {
        add(
            "401",
            "Identity refused (client_certificate_required, svid_*, token_*)",
        );
        add(
            "403",
            "Not allowed (not_operator, not_task_owner, policy_denied, ...)",
        );
    }
    if path.contains("{id}") {
        add("404", "No such task, lease or approval");
    }
    if has_body {
        add("413", "body_too_large");
        add("415", "unsupported_media_type");
    }
    add("429", "rate_limited (Retry-After)");
    add(
        "503",
        "overloaded, store_unavailable, audit_unavailable (Retry-After)",
    );
}

#[utoipa::path(post, path = "/v1/tasks", tag = "agent", request_body = RawTaskRequest,
    responses((status = 201, body = TaskView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, description = "policy_denied", body = Problem)))]
fn declare_task() {}

#[utoipa::path(get, path = "/v1/tasks", tag = "operator",
    params(("principal" = Option<String>, Query), ("state" = Option<String>, Query), ("after" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, body = TaskPage), (status = 403, body = Problem)))]
fn list_tasks() {}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "agent", params(("id" = String, Path)),
    responses((status = 200, description = "The task and its leases (owner or operator)", body = TaskView), (status = 403, body = Problem), (status = 404, body = Problem)))]
fn get_task() {}

#[utoipa::path(post, path = "/v1/tasks/{id}/credentials", tag = "agent",
    params(("id" = String, Path),
        ("DPoP" = Option<String>, Header, description = "RFC 9449 proof (htm POST, htu = issuer + this path, ath when an Authorization bearer token is sent): the jwt credential is bound to its key (cnf.jkt, token_type DPoP)")),
    request_body = RawCredentialRequest,
    responses((status = 201, body = CredentialView), (status = 202, description = "Held for operator approval", body = ApprovalView),
        (status = 400, description = "request shape, invalid_target (RFC 8707 resource), binding_required, dpop_proof_* and use_dpop_nonce (with a DPoP-Nonce header)", body = Problem), (status = 403, description = "out_of_scope, not_task_owner, policy_denied, anomaly_denied", body = Problem),
        (status = 409, description = "task_not_active, task_expired", body = Problem), (status = 503, description = "store_unavailable, audit_unavailable", body = Problem)))]
fn request_credential() {}

#[utoipa::path(post, path = "/v1/tasks/{id}/delegate", tag = "agent", params(("id" = String, Path)), request_body = RawDelegateRequest,
    responses((status = 201, body = TaskView), (status = 403, description = "delegation_wider, delegation_too_deep, policy_denied", body = Problem)))]
fn delegate_task() {}

#[utoipa::path(post, path = "/v1/tasks/{id}/complete", tag = "agent", params(("id" = String, Path)),
    responses((status = 200, body = RevocationView), (status = 403, body = Problem), (status = 404, body = Problem)))]
fn complete_task() {}

#[utoipa::path(post, path = "/v1/tasks/{id}/revoke", tag = "operator", params(("id" = String, Path)), request_body = RevokeBody,
    responses((status = 200, body = RevocationView), (status = 403, body = Problem)))]
fn revoke_task() {}

#[utoipa::path(get, path = "/v1/leases", tag = "operator",
    params(("task" = Option<String>, Query), ("principal" = Option<String>, Query), ("provider" = Option<String>, Query), ("state" = Option<String>, Query), ("after" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, body = LeasePage), (status = 400, body = Problem), (status = 403, body = Problem)))]
fn list_leases() {}

#[utoipa::path(get, path = "/v1/leases/{id}", tag = "operator", params(("id" = String, Path)),
    responses((status = 200, body = LeaseView), (status = 404, body = Problem)))]
fn get_lease() {}

#[utoipa::path(post, path = "/v1/leases/{id}/revoke", tag = "operator", params(("id" = String, Path)), request_body = RevokeBody,
    responses((status = 200, body = LeaseView), (status = 404, body = Problem)))]
fn revoke_lease() {}

#[utoipa::path(post, path = "/v1/revoke", tag = "operator", request_body = BulkBody,
    responses((status = 200, body = RevocationView), (status = 400, description = "invalid_selector", body = Problem)))]
fn bulk_revoke() {}

#[utoipa::path(post, path = "/v1/signals", tag = "operator", request_body = SignalBody,
    responses((status = 202, body = SignalResult), (status = 400, body = Problem)))]
fn signal() {}

#[utoipa::path(post, path = "/v1/approvals/{id}", tag = "operator", params(("id" = String, Path)), request_body = ApprovalBody,
    responses((status = 200, body = ApprovalView), (status = 409, description = "approval_closed", body = Problem), (status = 410, body = Problem)))]
fn decide_approval() {}

#[utoipa::path(get, path = "/v1/approvals", tag = "operator",
    params(("state" = Option<String>, Query, description = "pending | approved | rejected | collected; a live state lists only those not past their time"), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "Approvals shared by every replica, oldest first", body = ApprovalList), (status = 400, description = "invalid_query", body = Problem), (status = 403, description = "not_operator", body = Problem)))]
fn list_approvals() {}

#[utoipa::path(get, path = "/v1/approvals/{id}", tag = "agent", params(("id" = String, Path)),
    responses((status = 201, description = "Approved: the credential, once", body = CredentialView), (status = 202, description = "Still pending", body = ApprovalView),
        (status = 403, description = "approval_rejected", body = Problem), (status = 409, description = "approval_closed", body = Problem), (status = 410, description = "approval_expired", body = Problem)))]
fn collect_approval() {}

#[utoipa::path(post, path = "/v1/introspect", tag = "resource-server", request_body(content = IntrospectForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = IntrospectionView)))]
fn introspect() {}

#[utoipa::path(post, path = "/v1/token", tag = "ci",
    params(("DPoP" = Option<String>, Header, description = "RFC 9449 proof (htm POST, htu = issuer + /v1/token): the token is bound to its key (cnf.jkt) and token_type is DPoP")),
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "RFC 8693 response: {access_token, issued_token_type, token_type (Bearer or DPoP), expires_in, scope}"),
        (status = 400, description = "RFC 6749 §5.2: invalid_request, invalid_grant, invalid_target (RFC 8707), invalid_scope, unsupported_grant_type, unauthorized_client, invalid_dpop_proof and use_dpop_nonce (RFC 9449)")))]
fn token() {}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "resource-server", responses((status = 200, description = "JWK set of the token signing keys")))]
fn jwks() {}

#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "resource-server", responses((status = 200, description = "Issuer metadata (RFC 8414)")))]
fn discovery() {}

#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = "resource-server", responses((status = 200, description = "RFC 8414 authorization server metadata: issuer, token and introspection endpoints, jwks_uri, grant types, dpop_signing_alg_values_supported, tls_client_certificate_bound_access_tokens")))]
fn authorization_server_metadata() {}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Process up")))]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "Store and providers reachable"), (status = 503, description = "Not ready")))]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format")))]
fn metrics() {}

/// OpenAPI links from what an operation creates to the operations that use it, so that
/// clients (and the schema-driven fuzzer's stateful phase) can follow a task from
/// declaration to credentials, delegation and completion.
fn link_results(spec: &mut serde_json::Value) {
    use serde_json::json;
    let on_task = |from: &str| {
        json!({
            "GetTask": {"operationId": "get_task", "parameters": {"id": format!("$response.body#/{from}")}},
            "RequestCredential": {"operationId": "request_credential", "parameters": {"id": format!("$response.body#/{from}")}},
            "DelegateTask": {"operationId": "delegate_task", "parameters": {"id": format!("$response.body#/{from}")}},
            "CompleteTask": {"operationId": "complete_task", "parameters": {"id": format!("$response.body#/{from}")}},
            "RevokeTask": {"operationId": "revoke_task", "parameters": {"id": format!("$response.body#/{from}")}}
        })
    };
    let links = [
        ("/v1/tasks", "post", "201", on_task("task_id")),
        ("/v1/tasks/{id}/delegate", "post", "201", on_task("task_id")),
        (
            "/v1/tasks/{id}/credentials",
            "post",
            "201",
            json!({
                "GetLease": {"operationId": "get_lease", "parameters": {"id": "$response.body#/lease_id"}},
                "RevokeLease": {"operationId": "revoke_lease", "parameters": {"id": "$response.body#/lease_id"}}
            }),
        ),
        (
            "/v1/tasks/{id}/credentials",
            "post",
            "202",
            json!({
                "CollectApproval": {"operationId": "collect_approval", "parameters": {"id": "$response.body#/approval_id"}},
                "DecideApproval": {"operationId": "decide_approval", "parameters": {"id": "$response.body#/approval_id"}}
            }),
        ),
    ];
    // A declaration the dev policy allows, so that following the links reaches minting.
    let examples = [
        (
            "/v1/tasks",
            json!({"purpose": "schema example", "ttl": "10m",
                   "scope": [{"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:read"]}]}),
        ),
        (
            "/v1/tasks/{id}/credentials",
            json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "5m"}),
        ),
    ];
    for (path, example) in examples {
        if let Some(body) = spec.pointer_mut(&format!(
            "/paths/{}/post/requestBody/content/application~1json",
            path.replace('/', "~1")
        )) {
            body["example"] = example;
        }
    }
    for (path, method, status, l) in links {
        if let Some(r) = spec.pointer_mut(&format!(
            "/paths/{}/{method}/responses/{status}",
            path.replace('/', "~1")
        )) {
            r["links"] = l;
        }
    }
}
