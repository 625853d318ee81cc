//! Jobs: `GET .../jobs/{job_id}` and `GET .../jobs?request_id=|request_ids=`,
//! plus the helper every batch endpoint uses to persist one job per target
//! before answering, with per-target errors in `jobs[]`.

use axum::extract::{Extension, Path, State};
use cph_agent::protocol::{JobKind, JobRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, Query};
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::store::{new_id, now_string, Job, Phone};

/// Most request ids in one listing.
pub const MAX_REQUEST_IDS: usize = 20;

fn opt(s: &Option<String>) -> Value {
    s.as_ref()
        .map(|v| Value::String(v.clone()))
        .unwrap_or(Value::Null)
}

fn job_json(j: &Job, with_targets: bool) -> Value {
    let mut v = json!({
        "job_id": j.job_id,
        "begin_time": j.begin_time,
        "end_time": opt(&j.end_time),
        "status": j.status,
        "error_code": opt(&j.error_code),
        "error_msg": opt(&j.error_msg),
        "execute_msg": opt(&j.execute_msg),
    });
    if with_targets {
        if let Some(p) = &j.phone_id {
            v["phone_id"] = json!(p);
        }
        v["server_id"] = json!(j.server_id);
        v["node_id"] = json!(j.server_id);
    }
    v
}

pub async fn detail(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, job_id)): Path<(String, String)>,
) -> ApiResult {
    let j = st
        .store
        .job(&c.project_id, &job_id)?
        .ok_or(ApiError::JobNotFound(job_id))?;
    // The request the job belongs to (what the job list takes), as the
    // reference's detail shows it.
    let mut v = job_json(&j, false);
    v["request_id"] = json!(j.request_id);
    Ok(Reply::ok(v))
}

#[derive(Deserialize)]
pub struct ListQuery {
    request_id: Option<String>,
    request_ids: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

pub async fn list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let ids: Vec<String> = match (&q.request_ids, &q.request_id) {
        (Some(ids), _) if !ids.is_empty() => ids
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        (_, Some(id)) if !id.is_empty() => vec![id.clone()],
        _ => return Err(ApiError::RequestIdEmpty.into()),
    };
    if ids.is_empty() {
        return Err(ApiError::RequestIdEmpty.into());
    }
    if ids.len() > MAX_REQUEST_IDS {
        return Err(ApiError::TooManyRequestIds.into());
    }
    if let Some(bad) = ids.iter().find(|id| !super::validate::is_id(id)) {
        return Err(ApiError::RequestIdInvalid(bad.clone()).into());
    }
    let jobs = st
        .store
        .jobs_by_requests(&c.project_id, &ids, offset, limit)?;
    if jobs.is_empty() && offset == 0 {
        return Err(ApiError::RequestJobsNotFound.into());
    }
    Ok(Reply::ok(json!({
        "jobs": jobs.iter().map(|j| job_json(j, true)).collect::<Vec<_>>()
    })))
}

/// One target of a batch: a phone job, a server job, or an error answered
/// in place.
#[allow(clippy::large_enum_variant)] // short-lived, one per target of a request
pub enum Target {
    Phone(Phone, JobKind),
    Server {
        server_id: String,
        node_id: String,
        kind: JobKind,
    },
    Error {
        key: &'static str,
        id: String,
        err: ApiError,
    },
}

/// Persists one job per valid target under one request id, wakes the
/// dispatcher and renders `jobs[]`.
pub fn submit(st: &Shared, project_id: &str, targets: Vec<Target>) -> Result<Value, ApiError> {
    let request_id = new_id();
    let now = now_string();
    let mut rows = Vec::new();
    let mut out = Vec::new();
    // Each named server's node and whether it is being deleted (a server
    // being deleted takes no more jobs).
    let mut servers = std::collections::HashMap::new();
    let mut server_of = |server_id: &str| -> Result<(String, bool), ApiError> {
        if let Some(s) = servers.get(server_id) {
            return Ok(Clone::clone(s));
        }
        let s = st.store.server(project_id, server_id)?;
        let v = s.map(|s| (s.node_id, s.deleting)).unwrap_or_default();
        servers.insert(server_id.to_string(), v.clone());
        Ok(v)
    };
    let refused = |key: &str, id: &str, err: ApiError| {
        let (_, code) = err.status_and_code();
        json!({key: id, "error_code": code, "error_msg": err.message()})
    };
    for t in targets {
        match t {
            Target::Error { key, id, err } => out.push(refused(key, &id, err)),
            Target::Phone(p, kind) => {
                let (node_id, deleting) = server_of(&p.server_id)?;
                if deleting {
                    let err = ApiError::ServerDeleting(p.server_id.clone());
                    out.push(refused("phone_id", &p.phone_id, err));
                    continue;
                }
                let job_id = new_id();
                let req = JobRequest {
                    job_id: job_id.clone(),
                    request_id: request_id.clone(),
                    server_id: p.server_id.clone(),
                    phone_id: Some(p.phone_id.clone()),
                    kind,
                };
                rows.push(job_row(&req, project_id, &node_id, &now)?);
                out.push(json!({"phone_id": p.phone_id, "job_id": job_id}));
            }
            Target::Server {
                server_id,
                node_id,
                kind,
            } => {
                if server_of(&server_id)?.1 {
                    let err = ApiError::ServerDeleting(server_id.clone());
                    out.push(refused("server_id", &server_id, err));
                    continue;
                }
                let job_id = new_id();
                let req = JobRequest {
                    job_id: job_id.clone(),
                    request_id: request_id.clone(),
                    server_id: server_id.clone(),
                    phone_id: None,
                    kind,
                };
                rows.push(job_row(&req, project_id, &node_id, &now)?);
                out.push(json!({"server_id": server_id, "job_id": job_id}));
            }
        }
    }
    let failed = st.store.insert_jobs(&rows)?;
    for job_id in &failed {
        tracing::info!(%job_id, "job's server moved or is being deleted as it was made, failed");
    }
    // As if its agent had failed it: an image it was to make reads failed
    // rather than creating for ever.
    crate::dispatch::after_failures(&st.store, &failed);
    st.dispatcher.kick();
    Ok(json!({"request_id": request_id, "jobs": out}))
}

pub(crate) fn job_row(
    req: &JobRequest,
    project_id: &str,
    node_id: &str,
    now: &str,
) -> Result<Job, ApiError> {
    Job::running(req, project_id, node_id, now).map_err(|e| ApiError::Internal(e.to_string()))
}
