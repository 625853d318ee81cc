//! Authentication of CPH API calls: `X-Auth-Token` tokens issued by
//! `POST /v3/auth/tokens`, or AK/SK requests signed `SDK-HMAC-SHA256`.
//! The caller's project must be the one in the path; otherwise 403.

use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Caller, Failure, Shared, BODY_LIMIT};
use crate::auth::signing::{self, SignedRequest};

/// The project id segment of a `/v1/{project_id}/...` path.
fn path_project(path: &str) -> Option<&str> {
    let mut it = path.trim_start_matches('/').split('/');
    it.next()?;
    it.next()
}

/// Resolves the caller of a request, or the reason it is refused.
fn caller(state: &Shared, req: &Request) -> Result<Caller, ApiError> {
    let headers = req.headers();
    if let Some(tok) = headers.get("x-auth-token") {
        let tok = tok
            .to_str()
            .map_err(|_| ApiError::Unauthorized("the token is not valid text".into()))?;
        let project_id = state
            .store
            .token_project(tok)?
            .ok_or_else(|| ApiError::Unauthorized("the token is invalid or expired".into()))?;
        return Ok(Caller { project_id });
    }
    if let Some(auth) = headers.get("authorization") {
        let auth = auth.to_str().map_err(|_| {
            ApiError::Unauthorized("the authorization header is not valid text".into())
        })?;
        if auth.starts_with(signing::ALGORITHM) {
            // Signed requests are verified with their body in `authenticate`.
            return Err(ApiError::Unauthorized(
                "the signed request lost its body".into(),
            ));
        }
    }
    Err(ApiError::Unauthorized(
        "incorrect identity authentication information".into(),
    ))
}

/// AK/SK: looks the access key up and checks the `SDK-HMAC-SHA256`
/// signature over the raw request (path, query, signed headers, body).
fn aksk_caller(state: &Shared, req: &Request, body: &[u8]) -> Result<Caller, ApiError> {
    let headers = req
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let signed = SignedRequest {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers,
        body,
    };
    let mut project = None;
    let mut lookup_err = None;
    let verified = signing::verify(
        &signed,
        |ak| match state.store.credential(ak) {
            Ok(Some((sk, project_id))) => {
                project = Some(project_id);
                Some(sk)
            }
            Ok(None) => None,
            Err(e) => {
                lookup_err = Some(e);
                None
            }
        },
        SystemTime::now(),
    );
    if let Some(e) = lookup_err {
        return Err(e.into());
    }
    match (verified, project) {
        (Ok(_), Some(project_id)) => Ok(Caller { project_id }),
        (Err(e), _) => Err(ApiError::Unauthorized(e.to_string())),
        (Ok(_), None) => Err(ApiError::Unauthorized("the access key is unknown".into())),
    }
}

/// Middleware: authenticates and scopes the call to the path's project.
pub async fn authenticate(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let signed = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(signing::ALGORITHM))
        && req.headers().get("x-auth-token").is_none();
    let (c, mut req) = if signed {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => return Failure(ApiError::BodyTooLarge).into_response(),
        };
        let req = Request::from_parts(parts, Body::from(bytes.clone()));
        (aksk_caller(&state, &req, &bytes), req)
    } else {
        (caller(&state, &req), req)
    };
    let c = match c {
        Ok(c) => c,
        Err(e) => return Failure(e).into_response(),
    };
    if path_project(req.uri().path()) != Some(c.project_id.as_str()) {
        return Failure(ApiError::Forbidden).into_response();
    }
    req.extensions_mut().insert(c);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn project_is_the_second_segment() {
        assert_eq!(
            super::path_project("/v1/abc/cloud-phone/phones"),
            Some("abc")
        );
        assert_eq!(
            super::path_project("/v2.1/p/cloud-phone/servers"),
            Some("p")
        );
    }
}
