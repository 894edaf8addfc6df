//! `POST /v1/introspect` (RFC 7662): whether a Mayfly access token is active, and its
//! claims.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;

use super::extract::{Caller, FormBody};
use super::{ApiResult, AppState, Ev, audit_scope, views};
use crate::broker::Introspection;

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct IntrospectForm {
    pub(crate) token: String,
    #[allow(
        dead_code,
        reason = "RFC 7662 allows the hint; Mayfly has one token type"
    )]
    pub(crate) token_type_hint: Option<String>,
}

/// RFC 7662. The caller must hold a valid SVID (resource servers authenticate too).
pub(super) async fn introspect(
    State(st): State<AppState>,
    ev: Ev,
    Caller(_caller): Caller,
    FormBody(form): FormBody<IntrospectForm>,
) -> ApiResult {
    let answer = st.broker.introspect(&form.token, &audit_scope(&ev)).await?;
    let body = match answer {
        Introspection::Inactive => views::IntrospectionView::default(),
        Introspection::Active { claims } => views::IntrospectionView {
            active: true,
            // RFC 9449 §6.2: a DPoP-bound token introspects as token_type DPoP.
            token_type: Some(
                match claims.cnf {
                    Some(crate::provider::jwt::Confirmation::Jkt(_)) => "DPoP",
                    _ => "Bearer",
                }
                .into(),
            ),
            scope: Some(claims.scope),
            sub: Some(claims.sub),
            aud: Some(claims.aud),
            iss: Some(claims.iss),
            cnf: claims.cnf,
            exp: Some(claims.exp),
            iat: Some(claims.iat),
            nbf: Some(claims.nbf),
            jti: Some(claims.jti),
            task_id: Some(claims.task_id),
            act: claims.act,
        },
    };
    Ok(Json(body).into_response())
}
