//! Cloud phone servers: list, detail, flavors, deletion, rename, batch
//! restart, flavor change, the switch to another host and the shared
//! storage files and apps (buying is `purchase`).

use std::collections::BTreeMap;

use axum::extract::{Extension, Path, State};
use cph_agent::protocol::{ImageRef, JobKind, JobRequest, PortSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, page_limit, Json, Query};
use super::jobs::{submit, Target};
use super::purchase::{new_server, phone_names, validate_ports, PortBody};
use super::validate;
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::catalog::Catalog;
use crate::store::{new_id, Server, ServerFilter, Switch, SERVER_NORMAL};

/// Most servers bought in one order.
pub const MAX_COUNT: u32 = 10;
/// Longest server name given at purchase.
pub const SERVER_NAME_MAX: usize = 60;
/// Most user ports.
pub const MAX_PORTS: usize = 10;
/// Shared bandwidth range and dedicated default, Mbit/s.
pub const BANDWIDTH_MIN: u32 = 5;
pub const BANDWIDTH_MAX: u32 = 2000;
pub const BANDWIDTH_DEDICATED: u32 = 300;

fn server_json(s: &Server) -> Value {
    let public = s.public_ip.clone().unwrap_or_default();
    json!({
        "server_name": s.server_name,
        "server_id": s.server_id,
        "server_model_name": s.server_model_name,
        "phone_model_name": s.phone_model_name,
        "keypair_name": s.keypair_name,
        "status": s.status,
        "vpc_id": s.vpc_id,
        "cidr": s.vpc_cidr,
        "vpc_cidr": s.vpc_cidr,
        "subnet_id": s.subnet_id,
        "subnet_cidr": s.subnet_cidr,
        "addresses": [{
            "intranet_ip": s.server_ip, "server_ip": s.server_ip,
            "access_ip": public, "public_ip": public,
        }],
        "resource_project_id": s.project_id,
        "metadata": {"order_id": s.order_id, "product_id": s.product_id, "charging_mode": 0},
        "availability_zone": s.availability_zone,
        "network_version": s.network_version,
        "enterprise_project_id": "0",
        "create_time": s.create_time,
        "update_time": s.update_time,
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    offset: Option<String>,
    limit: Option<String>,
    server_name: Option<String>,
    server_id: Option<String>,
    network_version: Option<String>,
}

pub async fn list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let network_version = match q.network_version.as_deref().map(str::to_ascii_lowercase) {
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) if v == "v1" || v == "v2" => Some(v),
        Some(_) => return Err(ApiError::NetworkVersion.into()),
    };
    let f = ServerFilter {
        server_name: q.server_name.filter(|s| !s.is_empty()),
        server_id: q.server_id.filter(|s| !s.is_empty()),
        network_version,
    };
    let servers = st.store.list_servers(&c.project_id, &f, offset, limit)?;
    let count = st.store.count_servers(&c.project_id, &f)?;
    Ok(Reply::ok(json!({
        "servers": servers.iter().map(server_json).collect::<Vec<_>>(),
        "count": count,
    })))
}

pub async fn detail(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, server_id)): Path<(String, String)>,
) -> ApiResult {
    if !validate::is_id(&server_id) {
        return Err(ApiError::InvalidServerId.into());
    }
    let s = st
        .store
        .server(&c.project_id, &server_id)?
        .ok_or(ApiError::ServerNotFound(server_id))?;
    let mut v = server_json(&s);
    let bw = st.store.bandwidth(&c.project_id, &s.band_width_id)?;
    v["band_widths"] = json!(bw
        .iter()
        .map(super::misc::bandwidth_json)
        .collect::<Vec<_>>());
    // The host's pools as its agent last measured them: the thinpool
    // (images and phones' volumes) and the sharepool.
    let pools = st
        .store
        .node_inventory(&s.node_id)?
        .map(|inv| inv.pools)
        .unwrap_or_default();
    v["volumes"] = json!(pools
        .iter()
        .map(|p| json!({
            "volume_name": format!("{}-{}", s.server_name, p.name),
            "volume_id": format!("{}-{}", s.server_id, p.name),
            "volume_size": p.size_bytes >> 30,
            "volume_type": p.backend,
            "create_time": s.create_time,
            "update_time": s.update_time,
        }))
        .collect::<Vec<_>>());
    v["security_groups"] = json!([]);
    Ok(Reply::ok(v))
}

#[derive(Deserialize)]
pub struct RenameBody {
    server_name: String,
}

pub async fn rename(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, server_id)): Path<(String, String)>,
    Json(b): Json<RenameBody>,
) -> ApiResult {
    if !validate::is_id(&server_id) {
        return Err(ApiError::InvalidServerId.into());
    }
    validate::name(&b.server_name, SERVER_NAME_MAX).map_err(|_| ApiError::ServerName)?;
    if !st
        .store
        .rename_server(&c.project_id, &server_id, &b.server_name)?
    {
        return Err(ApiError::ServerNotFound(server_id).into());
    }
    Ok(Reply::ok(json!({})))
}

#[derive(Deserialize)]
pub struct ModelsQuery {
    product_type: Option<String>,
}

pub async fn models(State(st): State<Shared>, Query(q): Query<ModelsQuery>) -> ApiResult {
    let pt = match q.product_type.as_deref() {
        None | Some("") => None,
        Some("0") => Some(0),
        Some("1") => Some(1),
        Some(_) => return Err(ApiError::ProductType.into()),
    };
    let out: Vec<Value> = st
        .catalog
        .server_models
        .iter()
        .filter(|m| pt.is_none_or(|p| m.product_type == p))
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
            // The hosts' disks are their own (no cloud disks to mount).
            if v.get("disk_max_num").is_none() {
                v["disk_max_num"] = json!(0);
            }
            v
        })
        .collect();
    Ok(Reply::ok(json!({"server_models": out})))
}

#[derive(Deserialize)]
pub struct OfferingsQuery {
    marker: Option<String>,
    limit: Option<String>,
}

/// Largest page of server model offerings.
pub const OFFERINGS_LIMIT_MAX: usize = 1000;

/// `GET /v1/{project_id}/server-model-offerings` (the SDK's
/// `ListCloudPhoneServerModelOfferings`): each server model of the catalog,
/// `available` while an alive host of it holds no server, `sellout`
/// otherwise; by name, `limit` (1..=1000, default 100) at a time after
/// `marker`, the last name of the page before.
pub async fn offerings(State(st): State<Shared>, Query(q): Query<OfferingsQuery>) -> ApiResult {
    let limit = page_limit(q.limit.as_deref(), OFFERINGS_LIMIT_MAX)?;
    let mut names: Vec<&str> = st
        .catalog
        .server_models
        .iter()
        .map(|m| m.server_model_name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let start = match q.marker.as_deref().filter(|m| !m.is_empty()) {
        None => 0,
        Some(m) => match names.iter().position(|n| *n == m) {
            Some(i) => i + 1,
            None => return Err(ApiError::Field("marker").into()),
        },
    };
    let free = st.store.free_hosts_by_model()?;
    let page: Vec<&str> = names.iter().skip(start).take(limit).copied().collect();
    let next = (start + page.len() < names.len())
        .then(|| page.last().map(|n| n.to_string()))
        .flatten();
    let models: Vec<Value> = page
        .iter()
        .map(|n| {
            let sell = if free.get(*n).is_some_and(|c| *c > 0) {
                "available"
            } else {
                "sellout"
            };
            json!({"model_name": n, "available_zone": "", "sell_status": sell})
        })
        .collect();
    Ok(Reply::ok(json!({
        "count": names.len(),
        "models": models,
        "page_info": {"next_marker": next},
    })))
}

#[derive(Deserialize)]
pub struct ShareAppsQuery {
    limit: Option<String>,
    marker: Option<String>,
    package_name: Option<String>,
}

/// Largest page of a share apps snapshot.
pub const SHARE_APPS_LIMIT_MAX: usize = 500;

/// `GET /v1/{project_id}/servers/{server_id}/share-apps-snapshot` (the
/// SDK's `ListShareAppsSnapshot`): the applications in the server's
/// sharepool with their versions, as its agent last collected them (every
/// heartbeat), by package name; `package_name` picks one; `limit`
/// (1..=500, default 100) at a time after `marker`, the last package of
/// the page before.
pub async fn share_apps_snapshot(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, server_id)): Path<(String, String)>,
    Query(q): Query<ShareAppsQuery>,
) -> ApiResult {
    let limit = page_limit(q.limit.as_deref(), SHARE_APPS_LIMIT_MAX)?;
    if let Some(p) = q.package_name.as_deref().filter(|p| !p.is_empty()) {
        validate::package(p)?;
    }
    let server = st
        .store
        .server(&c.project_id, &server_id)?
        .ok_or_else(|| ApiError::ServerNotFound(server_id.clone()))?;
    let (collect_time, apps) = st.store.share_apps(&server.node_id)?.unwrap_or_default();
    let marker = q.marker.as_deref().filter(|m| !m.is_empty());
    let wanted: Vec<_> = apps
        .into_iter()
        .filter(|a| {
            q.package_name
                .as_deref()
                .is_none_or(|p| p.is_empty() || a.package_name == p)
        })
        .filter(|a| marker.is_none_or(|m| a.package_name.as_str() > m))
        .collect();
    let next = (wanted.len() > limit).then(|| wanted[limit - 1].package_name.clone());
    let page: Vec<Value> = wanted
        .into_iter()
        .take(limit)
        .map(|a| json!({"package_name": a.package_name, "versions": a.versions}))
        .collect();
    Ok(Reply::ok(json!({
        "collect_time": collect_time,
        "share_apps": page,
        "page_info": {"next_marker": next},
    })))
}

/// Server targets of a batch, with in-place errors.
fn server_targets<F>(
    st: &Shared,
    project_id: &str,
    ids: &[String],
    mut kind: F,
) -> Result<Vec<Target>, ApiError>
where
    F: FnMut(&Server) -> Result<JobKind, ApiError>,
{
    if ids.is_empty() {
        return Err(ApiError::ServerIdsEmpty);
    }
    if ids.len() > 100 {
        return Err(ApiError::TooManyServerIds(100));
    }
    let mut out = Vec::new();
    for id in ids {
        match st.store.server(project_id, id)? {
            None => out.push(Target::Error {
                key: "server_id",
                id: id.clone(),
                err: ApiError::ServerNotFound(id.clone()),
            }),
            Some(s) => match kind(&s) {
                Ok(k) => out.push(Target::Server {
                    server_id: s.server_id.clone(),
                    node_id: s.node_id.clone(),
                    kind: k,
                }),
                Err(err) => out.push(Target::Error {
                    key: "server_id",
                    id: id.clone(),
                    err,
                }),
            },
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
pub struct ServerIds {
    server_ids: Vec<String>,
}

/// Restarting servers restarts each of their phones.
pub async fn batch_restart(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ServerIds>,
) -> ApiResult {
    // One job per server, as the reference answers: its agent restarts
    // each phone (stopped ones started) and the encoding server.
    let t = server_targets(&st, &c.project_id, &b.server_ids, |_| {
        Ok(JobKind::RestartServer)
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

/// Most servers one deletion names.
pub const MAX_DELETE: usize = 100;

/// Deleting servers (`DELETE /v2/{project_id}/cloud-phone/servers`): one
/// job per server, answered with the request id and the first server's job
/// (the jobs of the others are listed under the request id). All named
/// servers must exist and be neither being created nor being deleted, or
/// nothing is done. Each job waits for the jobs before it on its server,
/// then its agent deletes the phones, the encoding server, the host's SSH
/// keys of the server and, once the host holds no server, the sharepool;
/// when it succeeds the server and its phones are gone and the host can be
/// bought again.
pub async fn delete(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ServerIds>,
) -> ApiResult {
    if b.server_ids.is_empty() {
        return Err(ApiError::ServerIdsEmpty.into());
    }
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<&String> = b.server_ids.iter().filter(|id| seen.insert(*id)).collect();
    if ids.len() > MAX_DELETE {
        return Err(ApiError::TooManyServerIds(MAX_DELETE).into());
    }
    let mut targets = Vec::new();
    for id in ids {
        let Some(s) = st.store.server(&c.project_id, id)? else {
            return Err(ApiError::ServerNotFound(id.clone()).into());
        };
        if s.deleting {
            return Err(ApiError::ServerDeleting(id.clone()).into());
        }
        if matches!(s.status, 0 | 1 | 3 | 4) {
            return Err(ApiError::ServerCreating(id.clone()).into());
        }
        targets.push(Target::Server {
            server_id: s.server_id,
            node_id: s.node_id,
            kind: JobKind::DeleteServer,
        });
    }
    let out = submit(&st, &c.project_id, targets)?;
    tracing::info!(request_id = %out["request_id"], "server deletion requested");
    Ok(Reply::ok(json!({
        "request_id": out["request_id"],
        "job_id": out["jobs"][0]["job_id"],
    })))
}

#[derive(Deserialize)]
pub struct ShareFilesBody {
    bucket_name: Option<String>,
    object_path: Option<String>,
    file_paths: Option<Vec<String>>,
    server_ids: Vec<String>,
}

pub async fn share_files_push(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ShareFilesBody>,
) -> ApiResult {
    if b.file_paths.is_some() {
        return share_files_delete_inner(st, c, b);
    }
    let bucket = b.bucket_name.as_deref().ok_or(ApiError::BucketName)?;
    let path = b.object_path.as_deref().ok_or(ApiError::ObjectPath)?;
    validate::bucket(bucket)?;
    validate::object_path(path)?;
    if !path.ends_with(".tar") {
        return Err(ApiError::ObjectPath.into());
    }
    let object = cph_agent::protocol::ObjectRef {
        bucket: bucket.into(),
        key: path.into(),
    };
    let t = server_targets(&st, &c.project_id, &b.server_ids, |s| {
        share_files_supported(&st, s)?;
        Ok(JobKind::SharePushFiles {
            object: object.clone(),
            target_dir: "/".into(),
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

/// The server's phone flavor names `key` in its `extend_spec`, else
/// `unsupported` of the server (the reference: shared storage is there
/// when `max_share_disk_size_g` is; shared apps live in the flavor's
/// sharepool, `sharepool_size_g`).
fn flavor_offers(
    st: &Shared,
    s: &Server,
    key: &str,
    unsupported: fn(String) -> ApiError,
) -> Result<(), ApiError> {
    let offered = st
        .catalog
        .phone_model(&s.phone_model_name)
        .is_some_and(|m| m.extend_spec.get(key).is_some());
    offered
        .then_some(())
        .ok_or_else(|| unsupported(s.server_id.clone()))
}

fn share_files_supported(st: &Shared, s: &Server) -> Result<(), ApiError> {
    flavor_offers(
        st,
        s,
        "max_share_disk_size_g",
        ApiError::ShareFilesUnsupported,
    )
}

fn share_apps_supported(st: &Shared, s: &Server) -> Result<(), ApiError> {
    flavor_offers(st, s, "sharepool_size_g", ApiError::ShareAppsUnsupported)
}

pub async fn share_files_delete(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ShareFilesBody>,
) -> ApiResult {
    share_files_delete_inner(st, c, b)
}

fn share_files_delete_inner(st: Shared, c: Caller, b: ShareFilesBody) -> ApiResult {
    let paths = b.file_paths.unwrap_or_default();
    if paths.is_empty() || paths.len() > 100 {
        return Err(ApiError::FilePaths.into());
    }
    for p in &paths {
        validate::file_path(p)?;
    }
    let t = server_targets(&st, &c.project_id, &b.server_ids, |s| {
        share_files_supported(&st, s)?;
        Ok(JobKind::ShareDeleteFiles {
            paths: paths.clone(),
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct ShareListQuery {
    path: Option<String>,
    server_ids: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

pub async fn share_files_list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ShareListQuery>,
) -> ApiResult {
    // 50 a page unless asked, as the reference says.
    let limit = q.limit.as_deref().filter(|l| !l.is_empty()).or(Some("50"));
    let (offset, limit) = page(q.offset.as_deref(), limit)?;
    let path = q.path.unwrap_or_default();
    validate::share_dir(&path)?;
    let ids: Vec<String> = q
        .server_ids
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let t = server_targets(&st, &c.project_id, &ids, |s| {
        share_files_supported(&st, s)?;
        Ok(JobKind::ShareListFiles {
            path: path.clone(),
            offset,
            limit,
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct ShareAppsBody {
    bucket_name: Option<String>,
    object_path: Option<String>,
    package_name: Option<String>,
    package_names: Option<Vec<String>>,
    /// 1: the app is also installed in each running phone of the servers.
    pre_install_app: Option<i64>,
    server_ids: Vec<String>,
}

pub async fn share_apps_push(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ShareAppsBody>,
) -> ApiResult {
    let bucket = b.bucket_name.as_deref().ok_or(ApiError::BucketName)?;
    let path = b.object_path.as_deref().ok_or(ApiError::ObjectPath)?;
    validate::bucket(bucket)?;
    validate::object_path(path)?;
    if !path.ends_with(".tar") {
        return Err(ApiError::ObjectPath.into());
    }
    let pkg = b.package_name.clone().ok_or(ApiError::PackageName)?;
    validate::share_package(&pkg)?;
    let pre_install = match b.pre_install_app {
        None | Some(0) => false,
        Some(1) => true,
        Some(_) => return Err(ApiError::PreInstallApp.into()),
    };
    let object = cph_agent::protocol::ObjectRef {
        bucket: bucket.into(),
        key: path.into(),
    };
    let t = server_targets(&st, &c.project_id, &b.server_ids, |s| {
        share_apps_supported(&st, s)?;
        Ok(JobKind::SharePushApps {
            object: object.clone(),
            package_name: pkg.clone(),
            pre_install,
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

pub async fn share_apps_delete(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ShareAppsBody>,
) -> ApiResult {
    // The reference names one `package_name`; a list in `package_names` is
    // taken too.
    let mut names = b.package_names.clone().unwrap_or_default();
    names.extend(b.package_name.clone());
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(ApiError::PackageName.into());
    }
    // Each server's job carries the whole list.
    if names.len() > MAX_SHARE_APP_DELETES {
        return Err(ApiError::Field("package_names").into());
    }
    for n in &names {
        validate::share_package(n)?;
    }
    let t = server_targets(&st, &c.project_id, &b.server_ids, |s| {
        share_apps_supported(&st, s)?;
        Ok(JobKind::ShareDeleteApps {
            package_names: names.clone(),
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

/// Package names one share-apps deletion takes at most (the reference's call
/// names one; a list in `package_names` is this platform's).
const MAX_SHARE_APP_DELETES: usize = 100;

/// `POST .../servers/change-server-model`: one server and its new flavors.
#[derive(Deserialize)]
pub struct ChangeModelBody {
    server_id: String,
    server_model_name: String,
    phone_model_name: String,
    #[serde(default)]
    extend_param: Option<Value>,
}

pub async fn change_model(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ChangeModelBody>,
) -> ApiResult {
    let _ = &b.extend_param;
    let cur = st
        .store
        .server(&c.project_id, &b.server_id)?
        .ok_or_else(|| ApiError::ServerNotFound(b.server_id.clone()))?;
    let sm = st
        .catalog
        .server_model(&b.server_model_name)
        .ok_or_else(|| ApiError::ServerModelNotFound(b.server_model_name.clone()))?;
    let pm = st
        .catalog
        .phone_model(&b.phone_model_name)
        .ok_or(ApiError::PhoneModelName)?;
    if cur.server_model_name == b.server_model_name && cur.phone_model_name == b.phone_model_name {
        return Err(ApiError::SameModel.into());
    }
    if cur.phone_model_name.is_empty() {
        return Err(ApiError::ModelChangeRefused(format!(
            "server {} is a BMS without phones (bought through v2.1)",
            cur.server_id
        ))
        .into());
    }
    // Only a running server changes (not one being made, deleted or
    // abnormal), and only to a model of the same hardware: its host stays.
    if cur.status != SERVER_NORMAL || cur.deleting {
        return Err(ApiError::ModelChangeRefused(format!(
            "server {} is not running (status {})",
            cur.server_id, cur.status
        ))
        .into());
    }
    let same_hardware = st
        .catalog
        .server_model(&cur.server_model_name)
        .is_some_and(|old| {
            (old.server_type.as_str(), old.cpu, old.memory)
                == (sm.server_type.as_str(), sm.cpu, sm.memory)
        });
    if !same_hardware {
        return Err(ApiError::ServerModelUnsupported(format!(
            "server model {} is not of the same hardware as {}",
            sm.server_model_name, cur.server_model_name
        ))
        .into());
    }
    let server_phones = st.store.server_phones(&cur.server_id)?;
    let phones = server_phones.len();
    let refuse = |why: String| ApiError::PhoneModelUnsupported(pm.phone_model_name.clone(), why);
    // The phones keep their images: each must be of the flavor's label.
    for p in &server_phones {
        let label = super::images::label_of(&st, &c.project_id, &p.image_id)?;
        if let Some(label) = label.filter(|l| *l != pm.image_label) {
            return Err(refuse(format!(
                "phone {} runs a {label} image and the flavor runs {} images",
                p.phone_id, pm.image_label
            ))
            .into());
        }
    }
    if pm.server_model_name != sm.server_model_name || pm.status != 1 {
        return Err(refuse(format!(
            "it is not an on-sale flavor of {}",
            sm.server_model_name
        ))
        .into());
    }
    if pm.phone_capacity as usize != phones {
        return Err(refuse(format!(
            "it holds {} phones and the server has {phones}; the count must stay",
            pm.phone_capacity
        ))
        .into());
    }
    let kind = JobKind::ChangeFlavor {
        server_model_name: sm.server_model_name.clone(),
        flavor: Catalog::agent_flavor(pm),
    };
    let out = submit(
        &st,
        &c.project_id,
        vec![Target::Server {
            server_id: cur.server_id.clone(),
            node_id: cur.node_id.clone(),
            kind,
        }],
    )?;
    let order_id = format!("CS{}", &new_id()[..15].to_uppercase());
    // The request id its job is filed under, so `jobs?request_id=` finds it.
    Ok(Reply::ok(json!({
        "request_id": out["request_id"],
        "order_id": order_id,
        "product_id": cur.product_id,
        "job_id": out["jobs"][0]["job_id"],
    })))
}

/// A data or share volume of a switch: `SSD` or `GPSSD`, 10 to 32,768 GiB.
#[derive(Deserialize)]
pub struct VolumeBody {
    volume_type: Option<String>,
    size: Option<i64>,
}

impl VolumeBody {
    /// The size in GiB, when the volume is valid.
    fn checked(&self, field: &'static str) -> Result<Option<u64>, ApiError> {
        if self
            .volume_type
            .as_deref()
            .is_some_and(|t| t != "SSD" && t != "GPSSD")
        {
            return Err(ApiError::Field(field));
        }
        match self.size {
            None => Ok(None),
            Some(n) if (10..=32_768).contains(&n) => Ok(Some(n as u64)),
            Some(_) => Err(ApiError::Field(field)),
        }
    }
}

/// `POST /v2/{project_id}/cloud-phone/servers/{server_id}/change`: what the
/// server becomes on its new host. The network fields (`tenant_vpc_id`,
/// `nics`, `public_ip`, `availability_zone`, `phone_count_per_ip`) and
/// `band_width` are read for their shape only: the server keeps its
/// network and bandwidth.
#[derive(Deserialize)]
pub struct SwitchBody {
    phone_model_name: String,
    image_id: String,
    #[serde(default)]
    keypair_name: Option<String>,
    #[serde(default)]
    ports: Option<Vec<PortBody>>,
    #[serde(default)]
    property: Option<String>,
    #[serde(default)]
    phone_data_volume: Option<VolumeBody>,
    #[serde(default)]
    server_share_data_volume: Option<VolumeBody>,
    #[serde(default)]
    phone_count_per_ip: Option<i64>,
    #[serde(default)]
    extend_param: Option<Value>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    tenant_vpc_id: Option<String>,
    #[serde(default)]
    nics: Option<Vec<Value>>,
    #[serde(default)]
    public_ip: Option<Value>,
    #[serde(default)]
    band_width: Option<Value>,
}

/// Switching a server to another host (`ChangeCloudPhoneServer`): the
/// server keeps its id, name, model, network and bandwidth and moves to a
/// free host of its server model; its phones are made anew there, of
/// `phone_model_name` (a flavor of the same server model) from
/// `image_id`, and nothing of the old phones is kept. One job, answered
/// here, makes the server on the new host; the old host deletes the old
/// phones when its agent answers and is free to buy once it has. With no
/// free host the switch is refused (`CPS.0242`) and nothing changes.
pub async fn switch(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, server_id)): Path<(String, String)>,
    Json(b): Json<SwitchBody>,
) -> ApiResult {
    let _ = (&b.extend_param, &b.availability_zone, &b.tenant_vpc_id);
    let _ = (&b.nics, &b.public_ip, &b.band_width);
    let cur = st
        .store
        .server(&c.project_id, &server_id)?
        .ok_or_else(|| ApiError::ServerNotFound(server_id.clone()))?;
    if cur.phone_model_name.is_empty() {
        return Err(ApiError::ServerState(format!(
            "server {} is a BMS without phones (bought through v2.1); only a cloud phone server switches",
            cur.server_id
        ))
        .into());
    }
    if cur.deleting || !matches!(cur.status, SERVER_NORMAL | 2) {
        return Err(ApiError::ServerState(format!(
            "server {} is {}; only a running or abnormal server switches",
            cur.server_id,
            if cur.deleting {
                "being deleted".to_string()
            } else {
                format!("in status {}", cur.status)
            }
        ))
        .into());
    }
    let pm = st
        .catalog
        .phone_model(&b.phone_model_name)
        .ok_or(ApiError::PhoneModelName)?;
    if pm.server_model_name != cur.server_model_name || pm.status != 1 {
        return Err(ApiError::PhoneModelUnsupported(
            pm.phone_model_name.clone(),
            format!(
                "it is not an on-sale flavor of the server's model {}",
                cur.server_model_name
            ),
        )
        .into());
    }
    let usable =
        super::images::usable(&st, &c.project_id, &b.image_id)?.ok_or(ApiError::ImageId)?;
    usable.check_model(pm)?;
    let ports = validate_ports(b.ports.as_deref().unwrap_or(&[]))?;
    let property = match b.property.as_deref() {
        Some(p) => validate::property(p)?,
        None => BTreeMap::new(),
    };
    let mut flavor = Catalog::agent_flavor(pm);
    if let Some(disk) = b
        .phone_data_volume
        .as_ref()
        .map(|v| v.checked("phone_data_volume"))
        .transpose()?
        .flatten()
    {
        flavor.disk_gb = disk;
    }
    if let Some(v) = &b.server_share_data_volume {
        v.checked("server_share_data_volume")?;
    }
    if b.phone_count_per_ip
        .is_some_and(|n| !(1..=i64::from(pm.phone_capacity)).contains(&n))
    {
        return Err(ApiError::Field("phone_count_per_ip").into());
    }
    // A keypair named must exist (a redeploy takes the server's as it is).
    if let Some(k) = b.keypair_name.as_deref().filter(|k| !k.is_empty()) {
        if st.store.keypair(&c.project_id, k)?.is_none() {
            return Err(ApiError::KeypairNotFound(k.to_string()).into());
        }
    }
    let sw = switch_plan(
        &st.store,
        &c.project_id,
        &cur,
        SwitchSpec {
            flavor,
            image: usable.image,
            ports,
            property,
            keypair_name: b.keypair_name.clone().unwrap_or_default(),
        },
    )?;
    let Some(crate::store::Switched {
        server: moved,
        job,
        failed_jobs,
    }) = st.store.switch_server(&sw)?
    else {
        return Err(ApiError::InsufficientBms(cur.server_model_name.clone()).into());
    };
    crate::dispatch::after_failures(&st.store, &failed_jobs);
    st.dispatcher.kick();
    tracing::info!(server_id = %moved.server_id, from = %cur.node_id, to = %moved.node_id, job_id = %job.job_id, "server switched to another host");
    Ok(Reply::ok(json!({
        "request_id": job.request_id,
        "server_id": moved.server_id,
        "job_id": job.job_id,
    })))
}

/// What a server becomes on the host it switches to.
pub(crate) struct SwitchSpec {
    pub flavor: cph_agent::protocol::PhoneFlavor,
    pub image: ImageRef,
    pub ports: Vec<PortSpec>,
    pub property: BTreeMap<String, String>,
    pub keypair_name: String,
}

/// The switch of server `cur` to `spec` ([`crate::store::Store::switch_server`]
/// picks the host): new phones named as bought ones, the keypair's key,
/// the server's bandwidth and share file systems, the `create_server` job
/// and the release job id.
pub(crate) fn switch_plan(
    store: &crate::store::Store,
    project_id: &str,
    cur: &Server,
    spec: SwitchSpec,
) -> Result<Switch, ApiError> {
    let public_key = match spec.keypair_name.as_str() {
        "" => None,
        k => store.keypair(project_id, k)?,
    };
    let band_width_size = store
        .bandwidth(project_id, &cur.band_width_id)?
        .map_or(BANDWIDTH_DEDICATED, |bw| bw.band_width_size);
    let phone_model_name = spec.flavor.flavor_id.clone();
    let mut req = new_server(
        &cur.server_id,
        &cur.server_name,
        spec.flavor,
        &spec.image,
        &spec.ports,
        band_width_size,
        public_key,
        &spec.property,
    );
    // The server takes its share file systems along.
    req.share_filesystems = store
        .server_share_filesystems(&cur.server_id)?
        .into_iter()
        .map(|(fs_id, source)| cph_agent::protocol::ShareFs { fs_id, source })
        .collect();
    let job = JobRequest {
        job_id: new_id(),
        request_id: new_id(),
        server_id: cur.server_id.clone(),
        phone_id: None,
        kind: JobKind::CreateServer {
            server: req.clone(),
        },
    };
    let internal = |e: serde_json::Error| ApiError::Internal(e.to_string());
    Ok(Switch {
        server_id: cur.server_id.clone(),
        phone_model_name,
        image_id: spec.image.image_id.clone(),
        keypair_name: spec.keypair_name,
        ports: serde_json::to_string(&spec.ports).map_err(internal)?,
        property: serde_json::to_string(&spec.property).map_err(internal)?,
        phones: phone_names(&req),
        job: super::jobs::job_row(&job, project_id, "", &crate::store::now_string())?,
        release_job: format!("{}:release:{}", cur.server_id, new_id()),
    })
}
