//! Bandwidths, keypair change and encoding servers.

use axum::extract::{Extension, Path, State};
use cph_agent::protocol::JobKind;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, Json, PageQuery, Query};
use super::jobs::{submit, Target};
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::store::{Bandwidth, ServerFilter};

pub fn bandwidth_json(b: &Bandwidth) -> Value {
    json!({
        "band_width_name": b.band_width_name,
        "band_width_id": b.band_width_id,
        "band_width_size": b.band_width_size,
        "band_width_share_type": b.band_width_share_type,
        "band_width_charge_mode": b.band_width_charge_mode,
        "create_time": b.create_time,
        "update_time": b.update_time,
    })
}

pub async fn bandwidth_list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let bws = st.store.list_bandwidths(&c.project_id, offset, limit)?;
    Ok(Reply::ok(
        json!({"band_widths": bws.iter().map(bandwidth_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
pub struct BandwidthBody {
    band_width_size: i64,
}

pub async fn bandwidth_update(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, id)): Path<(String, String)>,
    Json(b): Json<BandwidthBody>,
) -> ApiResult {
    let bw = st
        .store
        .bandwidth(&c.project_id, &id)?
        .ok_or_else(|| ApiError::BandWidthNotFound(id.clone()))?;
    if bw.band_width_share_type != 1 {
        return Err(ApiError::OnlySharedBandwidth.into());
    }
    if !bandwidth_step(b.band_width_size, super::servers::BANDWIDTH_MIN) {
        return Err(ApiError::BandWidthSize.into());
    }
    let size = b.band_width_size as u32;
    st.store.set_bandwidth_size(&c.project_id, &id, size)?;
    // The servers sharing it shape to the new rate (a job each; the
    // reference answers with the request id only).
    let targets: Vec<Target> = st
        .store
        .list_servers(&c.project_id, &ServerFilter::default(), 0, u32::MAX)?
        .into_iter()
        .filter(|s| s.band_width_id == id)
        .map(|s| Target::Server {
            server_id: s.server_id,
            node_id: s.node_id,
            kind: JobKind::UpdateBandwidth {
                band_width_size: size,
            },
        })
        .collect();
    if targets.is_empty() {
        return Ok(Reply::ok(json!({})));
    }
    // The request id the jobs are filed under: the one handle the
    // reference's answer gives to follow them.
    let out = submit(&st, &c.project_id, targets)?;
    Ok(Reply::ok(json!({"request_id": out["request_id"]})))
}

/// `PUT .../servers/open-access`: each server with the keypair it gets.
#[derive(Deserialize)]
pub struct KeypairBody {
    servers: Vec<ServerKeypair>,
}

#[derive(Deserialize)]
pub struct ServerKeypair {
    server_id: String,
    keypair_name: String,
}

pub async fn change_keypair(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<KeypairBody>,
) -> ApiResult {
    if b.servers.is_empty() {
        return Err(ApiError::ServerIdsEmpty.into());
    }
    if b.servers
        .iter()
        .any(|s| s.keypair_name.is_empty() || s.keypair_name.len() > 64)
    {
        return Err(ApiError::KeypairEmpty.into());
    }
    let mut t = Vec::new();
    for ServerKeypair {
        server_id: id,
        keypair_name,
    } in &b.servers
    {
        match st.store.server(&c.project_id, id)? {
            None => t.push(Target::Error {
                key: "server_id",
                id: id.clone(),
                err: ApiError::ServerNotFound(id.clone()),
            }),
            Some(s) => match st.store.keypair(&c.project_id, keypair_name)? {
                None => t.push(Target::Error {
                    key: "server_id",
                    id: id.clone(),
                    err: ApiError::KeypairNotFound(keypair_name.clone()),
                }),
                // Recorded for the server once its agent put the key in
                // place (a refused or failed change keeps the old name).
                Some(key) => t.push(Target::Server {
                    server_id: s.server_id,
                    node_id: s.node_id,
                    kind: JobKind::UpdateKeypair {
                        public_key: key,
                        keypair_name: Some(keypair_name.clone()),
                    },
                }),
            },
        }
    }
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct EncodeQuery {
    offset: Option<String>,
    limit: Option<String>,
    server_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    status: Option<String>,
}

/// Each server runs one encoding server, named after it.
pub async fn encode_servers_list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<EncodeQuery>,
) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let kind = match q.kind.as_deref() {
        None | Some("") => None,
        Some("0") => Some(0),
        Some("1") => Some(1),
        Some(_) => return Err(ApiError::Type.into()),
    };
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| ApiError::Status)?),
    };
    let f = crate::store::ServerFilter {
        server_id: q.server_id.filter(|s| !s.is_empty()),
        ..Default::default()
    };
    // Type and status belong to the encoding servers: filtered before paging.
    let servers = st.store.list_servers(&c.project_id, &f, 0, u32::MAX)?;
    let mut out = Vec::new();
    for s in &servers {
        // Servers whose phone flavor names an encoding server run it as a
        // container (type 1) on the phone subnet; others have none.
        let has_encoder = st
            .catalog
            .phone_model(&s.phone_model_name)
            .is_some_and(|m| m.extend_spec.get("encode_server_spec").is_some());
        if !has_encoder {
            continue;
        }
        let ip = st
            .store
            .node_inventory(&s.node_id)?
            .and_then(|inv| inv.encoder_ip)
            .unwrap_or_else(|| s.server_ip.clone());
        let encoder = st.store.encoder(&s.server_id)?;
        let public_ip = s.public_ip.clone().unwrap_or_default();
        let access: Vec<Value> = encoder
            .access_infos
            .iter()
            .map(|a| super::phones::access_info(a, &s.server_ip, &public_ip))
            .collect();
        out.push(json!({
            "encode_server_name": format!("{}-encode", s.server_name),
            "encode_server_id": s.server_id,
            "server_id": s.server_id,
            "keypair_name": s.keypair_name,
            // What the agent last reported; abnormal while the server
            // itself is (its agent silent).
            "status": if s.status == 2 { 2 } else { encoder.status },
            "type": 1,
            "encode_server_ip": ip,
            "access_infos": access,
            "create_time": s.create_time,
            "update_time": s.update_time,
        }));
    }
    let out: Vec<Value> = out
        .into_iter()
        .filter(|e| kind.is_none_or(|k| e["type"] == k))
        .filter(|e| status.is_none_or(|v| e["status"] == v))
        .skip(offset as usize)
        .take(limit as usize)
        .collect();
    Ok(Reply::ok(json!({"encode_servers": out})))
}

#[derive(Deserialize)]
pub struct EncodeRestartBody {
    encode_server_ids: Vec<String>,
}

pub async fn encode_servers_restart(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<EncodeRestartBody>,
) -> ApiResult {
    if b.encode_server_ids.is_empty() {
        return Err(ApiError::EncodeServerIds.into());
    }
    let mut t = Vec::new();
    for id in &b.encode_server_ids {
        match st.store.server(&c.project_id, id)? {
            None => t.push(Target::Error {
                key: "encode_server_id",
                id: id.clone(),
                err: ApiError::EncodeServerNotFound(id.clone()),
            }),
            Some(s) => t.push(Target::Server {
                server_id: s.server_id,
                node_id: s.node_id,
                kind: JobKind::RestartEncodeServer,
            }),
        }
    }
    // The reference names each job's target `encode_server_id` (a server's
    // encoding server has the server's id).
    let mut out = submit(&st, &c.project_id, t)?;
    for j in out["jobs"].as_array_mut().into_iter().flatten() {
        if let Some(id) = j.as_object_mut().and_then(|o| o.remove("server_id")) {
            j["encode_server_id"] = id;
        }
    }
    Ok(Reply::ok(out))
}

/// A bandwidth size (Mbit/s) from `min` up to the largest on sale, in steps
/// of 1 up to 300, of 50 up to 1,000 and of 500 beyond, as the reference's
/// minimum increments say. Shared bandwidths start at
/// [`BANDWIDTH_MIN`](super::servers::BANDWIDTH_MIN), dedicated ones at 1.
pub(super) fn bandwidth_step(size: i64, min: u32) -> bool {
    let on_sale = i64::from(min)..=i64::from(super::servers::BANDWIDTH_MAX);
    on_sale.contains(&size)
        && match size {
            ..=300 => true,
            301..=1000 => size % 50 == 0,
            _ => size % 500 == 0,
        }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_sizes_in_the_reference_steps() {
        for ok in [5, 299, 300, 350, 1000, 1500, 2000] {
            assert!(super::bandwidth_step(ok, 5), "{ok}");
        }
        for bad in [0, 4, 301, 351, 999, 1050, 1200, 2500] {
            assert!(!super::bandwidth_step(bad, 5), "{bad}");
        }
        assert!(super::bandwidth_step(1, 1));
        assert!(!super::bandwidth_step(0, 1));
    }
}
