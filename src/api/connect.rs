//! `POST /v1/{project_id}/cloud-phone/phones/batch-connection` (the SDK's
//! `BatchShowPhoneConnectInfos`): where a client connects to each running
//! phone, and a ticket for one session that the phone checks with its own
//! key ([`cph_agent::connect`]).

use axum::extract::{Extension, State};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Json;
use super::validate;
use super::{ApiError, ApiResult, Caller, Reply, Shared};

#[derive(Deserialize)]
pub struct ConnectionBody {
    phone_ids: Option<Vec<String>>,
    client_type: Option<String>,
}

/// The clients a connection can be asked for (the reference's spelling;
/// compared without case, as its English edition writes `iOS`).
const CLIENT_TYPES: [&str; 5] = ["ANDROID", "WINDOWS", "H5_MOBILE", "H5_PC", "IOS"];

/// For each phone (at most 10), where to connect and a ticket for one
/// session; a phone that cannot be connected to is an entry of `errors`.
pub async fn connection(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ConnectionBody>,
) -> ApiResult {
    let ids = b.phone_ids.unwrap_or_default();
    if ids.is_empty() {
        return Err(ApiError::PhoneIdsEmpty.into());
    }
    if ids.len() > 10 {
        return Err(ApiError::TooManyPhoneIds.into());
    }
    let client = b
        .client_type
        .as_deref()
        .and_then(|t| CLIENT_TYPES.iter().find(|c| c.eq_ignore_ascii_case(t)))
        .ok_or(ApiError::Field("client_type"))?;
    let timestamp = crate::store::now_secs().to_string();
    let mut infos = Vec::new();
    let mut errors = Vec::new();
    for id in ids {
        match connect_info(&st, &c.project_id, &id, client, &timestamp) {
            Ok(info) => infos.push(json!({"phone_id": id, "access_info": info})),
            Err(ApiError::Internal(e)) => return Err(ApiError::Internal(e).into()),
            Err(e) => errors.push(json!({
                "phone_id": id,
                "error_code": e.status_and_code().1,
                "error_msg": e.message(),
            })),
        }
    }
    Ok(Reply::ok(json!({"connect_infos": infos, "errors": errors})))
}

/// One running phone's `access_info`: the first of its server's ports
/// reachable from the internet, else the first of them, else its VNC port
/// (on the host's private address), with a new session's ticket.
fn connect_info(
    st: &Shared,
    project_id: &str,
    phone_id: &str,
    client: &str,
    timestamp: &str,
) -> Result<Value, ApiError> {
    if !validate::is_id(phone_id) {
        return Err(ApiError::InvalidPhoneId(phone_id.to_string()));
    }
    let p = st
        .store
        .phone(project_id, phone_id)?
        .ok_or_else(|| ApiError::PhoneNotFound(phone_id.to_string()))?;
    if p.status != crate::events::PHONE_RUNNING {
        return Err(ApiError::PhoneNotRunning(phone_id.to_string()));
    }
    let infos: Vec<cph_agent::protocol::AccessInfo> =
        serde_json::from_str(&p.access_infos).unwrap_or_default();
    let user = || infos.iter().filter(|a| a.kind != "adb" && a.kind != "vnc");
    let port = user()
        .find(|a| a.internet_accessible)
        .or_else(|| user().next())
        .or_else(|| infos.iter().find(|a| a.kind == "vnc"))
        .ok_or_else(|| ApiError::NoAccessPort(phone_id.to_string()))?;
    let server = st.store.server(project_id, &p.server_id)?;
    let (server_ip, public_ip) = server
        .map(|s| (s.server_ip, s.public_ip.unwrap_or_default()))
        .unwrap_or_default();
    let session_id = crate::store::new_id();
    let key = cph_agent::connect::phone_key(&st.node_token, phone_id);
    let ticket = cph_agent::connect::ticket(&key, phone_id, &session_id, timestamp, client);
    Ok(json!({
        "access_ip": if port.internet_accessible { public_ip } else { String::new() },
        "intranet_ip": server_ip,
        "access_ipv6": "",
        "access_port": port.access_port,
        "session_id": session_id,
        "timestamp": timestamp,
        "ticket": ticket,
    }))
}
