//! IAM-compatible endpoints: `POST /v3/auth/tokens` issues a 24-hour token
//! (returned in `X-Subject-Token`) for a password user scoped to a project;
//! `GET /v3/projects` lists the caller's project.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::extract::Json;
use super::{ApiError, Failure, Reply, Shared};
use crate::store::{now_secs, utc_string};

/// Token validity.
pub const TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Deserialize)]
pub struct TokenRequest {
    auth: AuthBody,
}
#[derive(Deserialize)]
struct AuthBody {
    identity: Identity,
    #[serde(default)]
    scope: Option<serde_json::Value>,
}
#[derive(Deserialize)]
struct Identity {
    #[serde(default)]
    password: Option<PasswordBody>,
}
#[derive(Deserialize)]
struct PasswordBody {
    user: UserBody,
}
#[derive(Deserialize)]
struct UserBody {
    name: String,
    password: String,
}

pub async fn issue_token(State(st): State<Shared>, Json(body): Json<TokenRequest>) -> Response {
    // The password check is a PBKDF2 of 100,000 rounds: run on the blocking
    // pool, so a burst of logins does not hold the workers other requests
    // are served on.
    match tokio::task::spawn_blocking(move || issue(&st, body)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Failure(e).into_response(),
        Err(e) => Failure(ApiError::Internal(format!("token issue: {e}"))).into_response(),
    }
}

fn issue(st: &Shared, body: TokenRequest) -> Result<Response, ApiError> {
    let pw =
        body.auth.identity.password.ok_or_else(|| {
            ApiError::Unauthorized("only password identities are supported".into())
        })?;
    let project_id = st
        .store
        .check_user(&pw.user.name, &pw.user.password)?
        .ok_or_else(|| ApiError::Unauthorized("the username or password is wrong".into()))?;
    if let Some(scope) = &body.auth.scope {
        let want = scope
            .pointer("/project/id")
            .or_else(|| scope.pointer("/project/name"))
            .and_then(|v| v.as_str());
        if let Some(w) = want {
            let p = st.store.project(w)?;
            if p.map(|p| p.project_id) != Some(project_id.clone()) {
                return Err(ApiError::Forbidden);
            }
        }
    }
    let token = format!("{}{}", crate::store::new_id(), crate::store::new_id());
    let expires = now_secs() + TOKEN_TTL_SECS;
    st.store
        .put_token(&token, &pw.user.name, &project_id, expires)?;
    let project = st.store.project(&project_id)?;
    let mut resp = Reply(
        StatusCode::CREATED,
        json!({"token": {
            "expires_at": utc_string(expires),
            "issued_at": utc_string(now_secs()),
            "methods": ["password"],
            "project": {"id": project_id, "name": project.map(|p| p.name).unwrap_or_default()},
            "user": {"name": pw.user.name},
        }}),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&token) {
        resp.headers_mut().insert("x-subject-token", v);
    }
    Ok(resp)
}

pub async fn projects(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let tok = headers.get("x-auth-token").and_then(|v| v.to_str().ok());
    let project_id = match tok.map(|t| st.store.token_project(t)) {
        Some(Ok(Some(p))) => p,
        Some(Err(e)) => return Failure(e.into()).into_response(),
        _ => {
            return Failure(ApiError::Unauthorized(
                "a valid x-auth-token is required".into(),
            ))
            .into_response()
        }
    };
    match st.store.project(&project_id) {
        Ok(Some(p)) => {
            Reply::ok(json!({"projects": [{"id": p.project_id, "name": p.name, "enabled": true}]}))
                .into_response()
        }
        Ok(None) => Reply::ok(json!({"projects": []})).into_response(),
        Err(e) => Failure(e.into()).into_response(),
    }
}
