//! The control-plane side of the agent protocol: registration, heartbeats
//! and job status reports, authenticated by the shared node token.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use cph_agent::protocol::{Accepted, Heartbeat, Inventory, JobStatus, PhoneRunState, Registered};

use super::extract::Json;
use super::{ApiError, Failure, Shared};

/// The API phone status of an agent-reported state.
pub fn phone_status(s: PhoneRunState) -> i32 {
    match s {
        PhoneRunState::Creating => 1,
        PhoneRunState::Running => 2,
        PhoneRunState::Resetting => 3,
        PhoneRunState::Restarting => 4,
        PhoneRunState::Deleting => 7,
        PhoneRunState::Stopped => 8,
        PhoneRunState::Exited => -7,
        PhoneRunState::Failed => -8,
        PhoneRunState::ResetFailed => -5,
        PhoneRunState::RestartFailed => -6,
    }
}

/// The node token as a bearer token, compared in constant time.
pub(crate) fn check_token(st: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok());
    if cph_agent::daemon::http::authorized(presented, &st.node_token) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("the node token is wrong".into()))
    }
}

fn apply_phones(
    st: &Shared,
    node_id: &str,
    phones: &[cph_agent::protocol::PhoneState],
) -> Result<(), ApiError> {
    for p in phones {
        st.store
            .apply_phone_state(node_id, p, phone_status(p.state))?;
    }
    st.store.refresh_server_status(node_id)?;
    // Phones of a server the fleet does not place here: the host releases
    // it before it is for sale.
    let servers: std::collections::BTreeSet<&str> =
        phones.iter().map(|p| p.server_id.as_str()).collect();
    let here = st.store.node(node_id)?.and_then(|n| n.server_id);
    for server_id in servers {
        if here.as_deref() == Some(server_id) {
            continue;
        }
        let job = format!("{server_id}:release:{}", crate::store::new_id());
        if st.store.release_orphan(node_id, server_id, &job)? {
            tracing::warn!(
                node_id,
                server_id,
                "host holds phones of a server not placed on it: released before it is for sale"
            );
            st.dispatcher.kick();
        }
    }
    Ok(())
}

/// Records the encoding servers' states an agent reports.
fn apply_encoders(
    st: &Shared,
    node_id: &str,
    encoders: &[cph_agent::protocol::EncoderState],
) -> Result<(), ApiError> {
    for e in encoders {
        st.store.set_encoder(node_id, e)?;
    }
    Ok(())
}

/// Applies job reports from an agent.
pub fn apply_jobs(st: &Shared, jobs: &[JobStatus]) -> Result<(), ApiError> {
    for j in jobs {
        crate::dispatch::apply_status(&st.store, j)?;
    }
    Ok(())
}

pub async fn register(
    State(st): State<Shared>,
    headers: HeaderMap,
    Json(inv): Json<Inventory>,
) -> Response {
    let r = (|| -> Result<Registered, ApiError> {
        check_token(&st, &headers)?;
        st.store.upsert_node(&inv)?;
        apply_phones(&st, &inv.node_id, &inv.phones)?;
        apply_encoders(&st, &inv.node_id, &inv.encoders)?;
        tracing::info!(node_id = %inv.node_id, server_model = %inv.server_model, "agent registered");
        Ok(Registered {
            node_id: inv.node_id.clone(),
            heartbeat_secs: st.heartbeat_secs,
        })
    })();
    st.dispatcher.kick();
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => Failure(e).into_response(),
    }
}

pub async fn heartbeat(
    State(st): State<Shared>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Response {
    let r = (|| -> Result<Accepted, ApiError> {
        check_token(&st, &headers)?;
        if !st.store.touch_node(&hb.node_id)? {
            return Ok(Accepted { accepted: false });
        }
        apply_phones(&st, &hb.node_id, &hb.phones)?;
        apply_encoders(&st, &hb.node_id, &hb.encoders)?;
        if let Some(apps) = &hb.share_apps {
            st.store.set_share_apps(&hb.node_id, apps)?;
        }
        if let Some(pools) = &hb.pools {
            st.store.set_node_pools(&hb.node_id, pools)?;
        }
        apply_jobs(&st, &hb.jobs)?;
        Ok(Accepted { accepted: true })
    })();
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => Failure(e).into_response(),
    }
}

pub async fn job_reports(
    State(st): State<Shared>,
    headers: HeaderMap,
    Json(jobs): Json<Vec<JobStatus>>,
) -> Response {
    let r = check_token(&st, &headers).and_then(|_| apply_jobs(&st, &jobs));
    match r {
        Ok(()) => axum::Json(Accepted { accepted: true }).into_response(),
        Err(e) => Failure(e).into_response(),
    }
}
