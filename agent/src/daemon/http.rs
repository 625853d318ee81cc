//! The agent protocol's HTTP routes (see [`crate::protocol`]) with Bearer
//! node-token authentication compared in constant time.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{Daemon, ServerError, SubmitError};
use crate::protocol::{Accepted, CreateServer, JobBatch, JobKind, JobRequest, AUTHORIZATION};

/// Equality of two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// Whether an `Authorization` header value carries `token`.
pub fn authorized(header: Option<&str>, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let presented = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    constant_time_eq(presented.as_bytes(), token.as_bytes())
}

fn error(status: StatusCode, code: &str, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(json!({"error_code": code, "error_msg": msg.to_string()})),
    )
        .into_response()
}

async fn auth(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !authorized(header, &d.cfg.node_token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "CPS.0001",
            "node token missing or wrong",
        );
    }
    next.run(req).await
}

/// The routes over a daemon.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/inventory", get(inventory))
        .route("/v1/servers", post(create_server))
        .route("/v1/servers/{id}", delete(delete_server))
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/batch", post(submit_batch))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/phones", get(phones))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(Arc::clone(&d), auth))
        .with_state(d)
}

/// The host's and its phones' metrics ([`super::metrics`]).
async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    let d2 = Arc::clone(&d);
    match tokio::task::spawn_blocking(move || super::metrics::render(&d2)).await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "CPS.0003", e),
    }
}

async fn inventory(State(d): State<Arc<Daemon>>) -> Response {
    let d2 = Arc::clone(&d);
    match tokio::task::spawn_blocking(move || d2.inventory()).await {
        Ok(inv) => Json(inv).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "CPS.0003", e),
    }
}

async fn phones(State(d): State<Arc<Daemon>>) -> Response {
    let d2 = Arc::clone(&d);
    match tokio::task::spawn_blocking(move || d2.phones.states()).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "CPS.0003", e),
    }
}

fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::ShuttingDown => error(StatusCode::SERVICE_UNAVAILABLE, "CPS.0042", e),
        SubmitError::Store(ref s) => {
            let status = match s {
                super::jobstore::JobStoreError::InvalidId(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let code = s.code();
            error(status, code, e)
        }
        SubmitError::Task(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "CPS.0003", e),
    }
}

async fn submit(State(d): State<Arc<Daemon>>, Json(req): Json<JobRequest>) -> Response {
    match d.submit(req).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => submit_error(e),
    }
}

async fn submit_batch(State(d): State<Arc<Daemon>>, Json(b): Json<JobBatch>) -> Response {
    match d.submit_batch(b.jobs).await {
        Ok(out) => Json(out).into_response(),
        Err(e) => submit_error(e),
    }
}

async fn job(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> Response {
    // Never waits for a disk write (see `JobStore::get`).
    match d.store.get(&id) {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "CPS.0011",
            format!("job {id} not found"),
        ),
    }
}

async fn create_server(State(d): State<Arc<Daemon>>, Json(server): Json<CreateServer>) -> Response {
    if !d.accepting() {
        return submit_error(SubmitError::ShuttingDown);
    }
    // Each phone's id names its container, network and volume as it is.
    if let Some(bad) = server
        .phones
        .iter()
        .find(|p| !super::phones::valid_phone_id(&p.phone_id))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "CPS.0004",
            format!(
                "phone id {:?} is invalid: 1 to {} ASCII letters, digits or '-'",
                bad.phone_id,
                super::phones::PHONE_ID_MAX
            ),
        );
    }
    match d.create_server(server).await {
        Ok(()) => Json(Accepted { accepted: true }).into_response(),
        Err(ServerError::Record(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.code, e.msg),
        Err(ServerError::Submit(e)) => submit_error(e),
    }
}

async fn delete_server(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> Response {
    let req = JobRequest {
        job_id: format!("{id}:delete"),
        request_id: format!("{id}:delete"),
        server_id: id,
        phone_id: None,
        kind: JobKind::DeleteServer,
    };
    match d.submit(req).await {
        Ok(_) => Json(Accepted { accepted: true }).into_response(),
        Err(e) => submit_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match_exactly() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cretx"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        assert!(!authorized(Some("Bearer "), ""));
        assert!(constant_time_eq(b"", b""));
    }
}
