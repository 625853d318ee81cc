//! Cloud phones: list, detail, flavors, images and the batch operations
//! (reset, restart, stop, rename, property, export, restore, migrate,
//! traffic) and ADB commands, each turned into one job per phone.

use std::collections::BTreeMap;

use axum::extract::{Extension, Path, State};
use cph_agent::protocol::{ImageRef, JobKind, MigrateTarget, ObjectRef, MIGRATE_BUCKET};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, Json, Query};
use super::images::Usable;
use super::jobs::{submit, Target};
use super::validate;
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::store::{Phone, PhoneFilter};

/// Most phones in one batch request.
pub const MAX_BATCH_PHONES: usize = 1000;
/// Synchronous shell calls allowed per project per minute.
pub const SYNC_SHELL_PER_MINUTE: u32 = 6;

/// What a phone shows of its server: the order (`metadata`) and the
/// availability zone.
fn of_server(st: &Shared, p: &Phone) -> (Value, String) {
    match st.store.server(&p.project_id, &p.server_id) {
        Ok(Some(s)) => (
            json!({"order_id": s.order_id, "product_id": s.product_id}),
            s.availability_zone,
        ),
        _ => (json!({"order_id": "", "product_id": ""}), String::new()),
    }
}

/// One mapped port as the reference's `access_info` has it: the host's
/// private address, and its public one for a port reachable from the
/// internet.
pub(super) fn access_info(
    a: &cph_agent::protocol::AccessInfo,
    server_ip: &str,
    public_ip: &str,
) -> Value {
    let public = if a.internet_accessible { public_ip } else { "" };
    json!({
        "type": a.kind,
        "listen_port": a.listen_port,
        "access_ip": public,
        "public_ip": public,
        "intranet_ip": server_ip,
        "server_ip": server_ip,
        "access_port": a.access_port,
    })
}

/// What a phone's listing entry takes from its server (order and zone)
/// and its image (version), looked up once per listing.
#[derive(Clone)]
struct Context {
    server: (Value, String),
    image_version: String,
}

fn phone_json(p: &Phone, ctx: Context) -> Value {
    let (meta, zone) = ctx.server;
    json!({
        "phone_name": p.phone_name,
        "server_id": p.server_id,
        "phone_id": p.phone_id,
        "phone_model_name": p.phone_model_name,
        "image_id": p.image_id,
        "vnc_enable": "true",
        "status": p.status,
        "type": p.phone_type,
        "metadata": meta,
        "availability_zone": zone,
        "create_time": p.create_time,
        "update_time": p.update_time,
        "image_version": ctx.image_version,
        "traffic_type": p.traffic_type,
        // No modem (the reference's attribute list sets no IMEI); each
        // phone's data is a volume of the host's pool, not a disk of its
        // own; no file-level encryption.
        "imei": "",
        "volume_mode": 0,
        "has_encrypt": false,
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    phone_name: Option<String>,
    server_id: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    phone_type: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

pub async fn list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => {
            let v: i32 = s.parse().map_err(|_| ApiError::Status)?;
            if ![0, 1, 2, 3, 4, 6, 7, 8, -5, -6, -7, -8, -9].contains(&v) {
                return Err(ApiError::Status.into());
            }
            Some(v)
        }
    };
    let phone_type = match q.phone_type.as_deref() {
        None | Some("") => None,
        Some("0") => Some(0),
        Some("1") => Some(1),
        Some(_) => return Err(ApiError::Type.into()),
    };
    let f = PhoneFilter {
        phone_name: q.phone_name.filter(|s| !s.is_empty()),
        server_id: q.server_id.filter(|s| !s.is_empty()),
        status,
        phone_type,
    };
    let phones = st.store.list_phones(&c.project_id, &f, offset, limit)?;
    let count = st.store.count_phones(&c.project_id, &f)?;
    let mut servers: BTreeMap<String, (Value, String)> = BTreeMap::new();
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(phones.len());
    for p in &phones {
        let server = servers
            .entry(p.server_id.clone())
            .or_insert_with(|| of_server(&st, p))
            .clone();
        let image_version = match versions.get(&p.image_id) {
            Some(v) => v.clone(),
            None => {
                let v = super::images::version_of(&st, &c.project_id, &p.image_id)?;
                versions.insert(p.image_id.clone(), v.clone());
                v
            }
        };
        out.push(phone_json(
            p,
            Context {
                server,
                image_version,
            },
        ));
    }
    Ok(Reply::ok(json!({"phones": out, "count": count})))
}

pub async fn detail(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, phone_id)): Path<(String, String)>,
) -> ApiResult {
    if !validate::is_id(&phone_id) {
        return Err(ApiError::InvalidPhoneId(phone_id).into());
    }
    let p = st
        .store
        .phone(&c.project_id, &phone_id)?
        .ok_or(ApiError::PhoneNotFound(phone_id))?;
    let server = st.store.server(&c.project_id, &p.server_id)?;
    let (server_ip, public_ip) = server
        .as_ref()
        .map(|s| (s.server_ip.clone(), s.public_ip.clone().unwrap_or_default()))
        .unwrap_or_default();
    let infos: Vec<cph_agent::protocol::AccessInfo> =
        serde_json::from_str(&p.access_infos).unwrap_or_default();
    let access: Vec<Value> = infos
        .iter()
        .map(|a| {
            let mut v = access_info(a, &server_ip, &public_ip);
            v["device_ip"] = json!(a.phone_ip);
            v["phone_ip"] = json!(a.phone_ip);
            v
        })
        .collect();
    let ctx = Context {
        server: of_server(&st, &p),
        image_version: super::images::version_of(&st, &c.project_id, &p.image_id)?,
    };
    let mut v = phone_json(&p, ctx);
    v["access_infos"] = json!(access);
    v["property"] = json!(p.property);
    Ok(Reply::ok(v))
}

#[derive(Deserialize)]
pub struct ModelsQuery {
    status: Option<String>,
    product_type: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

pub async fn models(State(st): State<Shared>, Query(q): Query<ModelsQuery>) -> ApiResult {
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some("0") => Some(0),
        Some("1") => Some(1),
        Some(_) => return Err(ApiError::Status.into()),
    };
    let product_type = match q.product_type.as_deref() {
        None | Some("") => None,
        Some("0") => Some(0),
        Some("1") => Some(1),
        Some(_) => return Err(ApiError::ProductType.into()),
    };
    let out: Vec<Value> = st
        .catalog
        .phone_models
        .iter()
        .filter(|m| status.is_none_or(|s| m.status == s))
        .filter(|m| product_type.is_none_or(|t| m.product_type == t))
        .skip(offset as usize)
        .take(limit as usize)
        .map(|m| {
            json!({
                "server_model_name": m.server_model_name,
                "phone_model_name": m.phone_model_name,
                "status": m.status,
                "cpu": m.cpu,
                "memory": m.memory,
                "disk": m.disk,
                "resolution": m.resolution,
                "extend_spec": m.extend_spec.to_string(),
                "spec_code": m.spec_code,
                "phone_capacity": m.phone_capacity,
                "image_label": m.image_label,
                "product_type": m.product_type,
                "phone_model_version": spec_number(&m.extend_spec, "phone_model_version").unwrap_or(0),
                "volume_mode": spec_number(&m.extend_spec, "volume_mode").unwrap_or(0),
                "dpi": spec_number(&m.extend_spec, "dpi"),
                "fps": m.extend_spec.get("fps").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
                "render_fps": spec_number(&m.extend_spec, "render_fps"),
                "stream_fps": spec_number(&m.extend_spec, "stream_fps"),
            })
        })
        .collect();
    Ok(Reply::ok(json!({"phone_models": out})))
}

/// A number of a flavor's `extend_spec` (a number, or a string of digits
/// as flavor files often write them): the newer SDK's `dpi`, frame rates
/// and versions, which an operator's catalog gives there.
fn spec_number(spec: &Value, key: &str) -> Option<i64> {
    match spec.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[derive(Deserialize)]
pub struct ImagesQuery {
    image_label: Option<String>,
    is_public: Option<String>,
}

pub async fn images(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ImagesQuery>,
) -> ApiResult {
    let is_public = match q.is_public.as_deref() {
        None | Some("") => None,
        Some("1") => Some(1),
        Some("2") => Some(2),
        Some(_) => return Err(ApiError::IsPublic.into()),
    };
    // The catalog's images, then the project's custom ones (private).
    let custom: Vec<_> = st
        .store
        .usable_images(&c.project_id)?
        .iter()
        .map(super::images::as_phone_image)
        .collect();
    let out: Vec<Value> = st
        .catalog
        .phone_images
        .iter()
        .filter(|i| i.is_public == 1 || i.project_id.as_deref() == Some(c.project_id.as_str()))
        .chain(&custom)
        .filter(|i| {
            q.image_label
                .as_deref()
                .is_none_or(|l| l.is_empty() || i.image_label == l)
        })
        .filter(|i| is_public.is_none_or(|p| i.is_public == p))
        .map(|i| {
            json!({
                "image_name": i.image_name,
                "os_type": i.os_type,
                "os_name": i.os_name,
                "image_id": i.image_id,
                "is_public": i.is_public,
                "is_support_encrypt": false,
                "image_label": i.image_label,
            })
        })
        .collect();
    Ok(Reply::ok(json!({"phone_images": out})))
}

/// Looks up each phone id of a batch: a job target or an in-place error.
fn targets<F>(
    st: &Shared,
    project_id: &str,
    ids: Vec<(String, Option<String>)>,
    mut kind: F,
) -> Result<Vec<Target>, ApiError>
where
    F: FnMut(&Phone, Option<BTreeMap<String, String>>) -> Result<JobKind, ApiError>,
{
    if ids.is_empty() {
        return Err(ApiError::PhoneIdsEmpty);
    }
    if ids.len() > MAX_BATCH_PHONES {
        return Err(ApiError::TooManyPhoneIds);
    }
    let mut out = Vec::with_capacity(ids.len());
    for (id, property) in ids {
        if !validate::is_id(&id) {
            out.push(Target::Error {
                key: "phone_id",
                id,
                err: ApiError::InvalidPhoneId("phone_id".into()),
            });
            continue;
        }
        let Some(p) = st.store.phone(project_id, &id)? else {
            out.push(Target::Error {
                key: "phone_id",
                id: id.clone(),
                err: ApiError::PhoneNotFound(id),
            });
            continue;
        };
        let prop = match property.as_deref().map(validate::property) {
            Some(Err(e)) => {
                out.push(Target::Error {
                    key: "phone_id",
                    id,
                    err: e,
                });
                continue;
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        match kind(&p, prop) {
            Ok(k) => out.push(Target::Phone(p, k)),
            Err(err) => out.push(Target::Error {
                key: "phone_id",
                id,
                err,
            }),
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
pub struct PhoneProp {
    phone_id: String,
    #[serde(default)]
    property: Option<String>,
}

#[derive(Deserialize)]
pub struct ResetBody {
    phones: Vec<PhoneProp>,
    #[serde(default)]
    image_id: Option<String>,
}

fn phone_props(v: Vec<PhoneProp>) -> Vec<(String, Option<String>)> {
    v.into_iter().map(|p| (p.phone_id, p.property)).collect()
}

/// The image a reset or restart names, if any: one the project may use
/// (`CPS.0166` otherwise).
fn requested_image(
    st: &Shared,
    project_id: &str,
    image_id: Option<&str>,
) -> Result<Option<Usable>, ApiError> {
    let Some(id) = image_id else {
        return Ok(None);
    };
    super::images::usable(st, project_id, id)?
        .ok_or_else(|| ApiError::ImageNotFound(id.to_string()))
        .map(Some)
}

/// `image` for phone `p`, refused (`CPS.0142`, that phone alone) when its
/// label is not the phone model's. A phone whose model the catalog no
/// longer lists is not checked.
fn image_for(st: &Shared, image: Option<&Usable>, p: &Phone) -> Result<Option<ImageRef>, ApiError> {
    let Some(u) = image else {
        return Ok(None);
    };
    if let Some(model) = st.catalog.phone_model(&p.phone_model_name) {
        u.check_model(model)?;
    }
    Ok(Some(u.image.clone()))
}

pub async fn batch_reset(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ResetBody>,
) -> ApiResult {
    let image = requested_image(&st, &c.project_id, b.image_id.as_deref())?;
    let t = targets(&st, &c.project_id, phone_props(b.phones), |p, property| {
        Ok(JobKind::ResetPhone {
            image: image_for(&st, image.as_ref(), p)?,
            property,
        })
    })?;
    for t in &t {
        if let Target::Phone(p, _) = t {
            st.store.set_phone_status(&p.phone_id, 3)?;
        }
    }
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

pub async fn batch_restart(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ResetBody>,
) -> ApiResult {
    let image = requested_image(&st, &c.project_id, b.image_id.as_deref())?;
    let t = targets(&st, &c.project_id, phone_props(b.phones), |p, property| {
        // A restart's properties are merged into the phone's.
        if let Some(property) = &property {
            fits_with(p, property)?;
        }
        Ok(JobKind::RestartPhone {
            image: image_for(&st, image.as_ref(), p)?,
            property,
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct StopBody {
    phone_ids: Vec<String>,
}

pub async fn batch_stop(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<StopBody>,
) -> ApiResult {
    let ids = b.phone_ids.into_iter().map(|i| (i, None)).collect();
    let t = targets(&st, &c.project_id, ids, |_, _| Ok(JobKind::StopPhone))?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct RenameBody {
    phone_name: String,
}

pub async fn rename(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, phone_id)): Path<(String, String)>,
    Json(b): Json<RenameBody>,
) -> ApiResult {
    if !validate::is_id(&phone_id) {
        return Err(ApiError::InvalidPhoneId(phone_id).into());
    }
    validate::name(&b.phone_name, 60).map_err(|_| ApiError::PhoneName)?;
    if !st
        .store
        .rename_phone(&c.project_id, &phone_id, &b.phone_name)?
    {
        return Err(ApiError::PhoneNotFound(phone_id).into());
    }
    Ok(Reply::ok(json!({})))
}

#[derive(Deserialize)]
pub struct PropertyBody {
    phones: Vec<PhoneProp>,
}

pub async fn update_property(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<PropertyBody>,
) -> ApiResult {
    if b.phones.iter().any(|p| p.property.is_none()) {
        return Err(ApiError::Property("property is required".into()).into());
    }
    // The phone's recorded properties change when its agent has applied
    // the new ones (`dispatch::apply_status`).
    let t = targets(&st, &c.project_id, phone_props(b.phones), |p, property| {
        let property = property.unwrap_or_default();
        fits_with(p, &property)?;
        Ok(JobKind::UpdateProperty { property })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

/// A phone's recorded properties with `property` merged in (as an update
/// or a restart leaves them) stay within the reference's 2,048 bytes.
fn fits_with(p: &Phone, property: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let mut merged: BTreeMap<String, Value> = serde_json::from_str(&p.property).unwrap_or_default();
    for (k, v) in property {
        merged.insert(k.clone(), Value::String(v.clone()));
    }
    if Value::from_iter(merged).to_string().len() > validate::PROPERTY_MAX {
        return Err(ApiError::Property(
            "the phone's properties with these would be longer than 2048 bytes".into(),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct ExpandPhone {
    phone_id: String,
    new_size: Option<Value>,
}

#[derive(Deserialize)]
pub struct ExpandBody {
    phones: Vec<ExpandPhone>,
}

/// Largest data volume a phone may be given, in GiB.
pub const VOLUME_MAX_GIB: u64 = 32768;

/// `POST .../phones/expand-volume` (the SDK's `ExpandPhoneDataVolumeSize`):
/// a job per phone raising the cap of its data volume to `new_size` GiB
/// (1..=32768; a size below the volume's cap fails the phone's job, as a
/// volume never shrinks).
pub async fn expand_volume(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ExpandBody>,
) -> ApiResult {
    let sizes: BTreeMap<String, Option<u64>> = b
        .phones
        .iter()
        .map(|p| {
            (
                p.phone_id.clone(),
                p.new_size.as_ref().and_then(Value::as_u64),
            )
        })
        .collect();
    let ids = b.phones.into_iter().map(|p| (p.phone_id, None)).collect();
    let t = targets(&st, &c.project_id, ids, |p, _| {
        match sizes.get(&p.phone_id).copied().flatten() {
            Some(gb) if (1..=VOLUME_MAX_GIB).contains(&gb) => {
                Ok(JobKind::ExpandVolume { disk_gb: gb })
            }
            _ => Err(ApiError::Field("new_size")),
        }
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct StorageInfo {
    phone_id: String,
    bucket_name: String,
    object_path: String,
    #[serde(default)]
    include_files: Option<Vec<String>>,
    #[serde(default)]
    exclude_files: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub struct ExportBody {
    storage_infos: Vec<StorageInfo>,
}

fn object(bucket: &str, path: &str) -> Result<ObjectRef, ApiError> {
    validate::bucket(bucket)?;
    validate::object_path(path)?;
    Ok(ObjectRef {
        bucket: bucket.to_string(),
        key: path.to_string(),
    })
}

/// Whether a phone is named twice (its entries would be one job's).
fn repeats<'a>(ids: impl Iterator<Item = &'a String>) -> bool {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().any(|id| !seen.insert(id))
}

pub async fn export(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<ExportBody>,
) -> ApiResult {
    if b.storage_infos.is_empty() {
        return Err(ApiError::StorageInfos.into());
    }
    if b.storage_infos.len() > MAX_BATCH_PHONES {
        return Err(ApiError::StorageInfosLimit.into());
    }
    if repeats(b.storage_infos.iter().map(|s| &s.phone_id)) {
        return Err(ApiError::StorageInfos.into());
    }
    let mut infos = BTreeMap::new();
    let ids: Vec<_> = b
        .storage_infos
        .iter()
        .map(|s| (s.phone_id.clone(), None))
        .collect();
    for s in b.storage_infos {
        infos.insert(s.phone_id.clone(), s);
    }
    let t = targets(&st, &c.project_id, ids, |p, _| {
        let s = infos.get(&p.phone_id).ok_or(ApiError::StorageInfos)?;
        // Both lists name paths in /data or /cache; the include list is
        // required, the exclude list optional but not empty when given.
        let include = s.include_files.clone().unwrap_or_default();
        if include.is_empty() || !include.iter().all(|f| validate::export_path(f)) {
            return Err(ApiError::IncludeFiles);
        }
        let exclude = s.exclude_files.clone();
        if exclude
            .as_ref()
            .is_some_and(|e| e.is_empty() || !e.iter().all(|f| validate::export_path(f)))
        {
            return Err(ApiError::ExcludeFiles);
        }
        let exclude = exclude.unwrap_or_default();
        Ok(JobKind::Export {
            object: object(&s.bucket_name, &s.object_path)?,
            include,
            exclude,
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct RestoreInfo {
    phone_id: String,
    bucket_name: String,
    object_path: String,
}

#[derive(Deserialize)]
pub struct RestoreBody {
    restore_infos: Vec<RestoreInfo>,
}

pub async fn restore(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<RestoreBody>,
) -> ApiResult {
    if b.restore_infos.is_empty() || repeats(b.restore_infos.iter().map(|r| &r.phone_id)) {
        return Err(ApiError::RestoreInfos.into());
    }
    let ids: Vec<_> = b
        .restore_infos
        .iter()
        .map(|s| (s.phone_id.clone(), None))
        .collect();
    let infos: BTreeMap<String, RestoreInfo> = b
        .restore_infos
        .into_iter()
        .map(|r| (r.phone_id.clone(), r))
        .collect();
    let t = targets(&st, &c.project_id, ids, |p, _| {
        let r = infos.get(&p.phone_id).ok_or(ApiError::RestoreInfos)?;
        Ok(JobKind::Restore {
            object: object(&r.bucket_name, &r.object_path)?,
            property: None,
            whole_phone: false,
            remove_object: false,
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct MigrateInfo {
    source_phone_id: String,
    target_phone_id: String,
    /// Where the phone travels through; the platform's own bucket when absent.
    #[serde(default)]
    bucket_name: Option<String>,
    #[serde(default)]
    object_path: Option<String>,
    /// `"true"` (any case) copies the source's properties; the SDK may send
    /// a boolean.
    #[serde(default)]
    is_migrate_property: Option<Value>,
}

#[derive(Deserialize)]
pub struct MigrateBody {
    migrate_infos: Vec<MigrateInfo>,
}

pub async fn migrate(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<MigrateBody>,
) -> ApiResult {
    if b.migrate_infos.is_empty() {
        return Err(ApiError::MigrateInfos.into());
    }
    let pairs: Vec<(String, String)> = b
        .migrate_infos
        .iter()
        .map(|m| (m.source_phone_id.clone(), m.target_phone_id.clone()))
        .collect();
    let mut out = Vec::new();
    for m in b.migrate_infos {
        if m.source_phone_id == m.target_phone_id {
            out.push(Target::Error {
                key: "phone_id",
                id: m.source_phone_id,
                err: ApiError::SamePhone,
            });
            continue;
        }
        let src = st.store.phone(&c.project_id, &m.source_phone_id)?;
        let dst = st.store.phone(&c.project_id, &m.target_phone_id)?;
        let (src, dst) = match (src, dst) {
            (Some(src), Some(dst)) => (src, dst),
            (None, _) => {
                out.push(Target::Error {
                    key: "phone_id",
                    id: m.source_phone_id.clone(),
                    err: ApiError::SourcePhone(m.source_phone_id),
                });
                continue;
            }
            (Some(_), None) => {
                out.push(Target::Error {
                    key: "phone_id",
                    id: m.source_phone_id,
                    err: ApiError::TargetPhone(m.target_phone_id),
                });
                continue;
            }
        };
        let target_server = st.store.server(&c.project_id, &dst.server_id)?;
        if target_server.as_ref().is_some_and(|s| s.deleting) {
            out.push(Target::Error {
                key: "phone_id",
                id: m.source_phone_id.clone(),
                err: ApiError::ServerDeleting(dst.server_id),
            });
            continue;
        }
        let node_id = target_server.map(|s| s.node_id).unwrap_or_default();
        let property = serde_json::from_str(&src.property).unwrap_or_default();
        let keep_property = match &m.is_migrate_property {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        // With no bucket named the phone goes through the platform's own,
        // and its copy there is removed once restored.
        let (object, platform_object) = match (&m.bucket_name, &m.object_path) {
            (Some(b), Some(p)) => (object(b, p), false),
            _ => (
                Ok(ObjectRef {
                    bucket: MIGRATE_BUCKET.to_string(),
                    key: format!("{}/{}.tar", crate::store::new_id(), src.phone_id),
                }),
                true,
            ),
        };
        match object {
            Ok(o) => out.push(Target::Phone(
                src,
                JobKind::Migrate {
                    object: o,
                    keep_property,
                    platform_object,
                    target: Some(MigrateTarget {
                        phone_id: dst.phone_id,
                        server_id: dst.server_id,
                        node_id,
                        property,
                    }),
                },
            )),
            Err(e) => out.push(Target::Error {
                key: "phone_id",
                id: m.source_phone_id,
                err: e,
            }),
        }
    }
    let mut answer = submit(&st, &c.project_id, out)?;
    // The reference names both phones in each job entry.
    if let Some(jobs) = answer["jobs"].as_array_mut() {
        for (j, (source, target)) in jobs.iter_mut().zip(pairs) {
            if let Some(o) = j.as_object_mut() {
                o.remove("phone_id");
                o.insert("source_phone_id".into(), Value::String(source));
                o.insert("target_phone_id".into(), Value::String(target));
            }
        }
    }
    Ok(Reply::ok(answer))
}

#[derive(Deserialize)]
pub struct TrafficBody {
    phone_ids: Vec<String>,
    traffic_type: String,
}

/// Most phones of one traffic diversion (the reference's limit).
const MAX_TRAFFIC_PHONES: usize = 100;

pub async fn traffic(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<TrafficBody>,
) -> ApiResult {
    if !matches!(b.traffic_type.as_str(), "direct" | "routing") {
        return Err(ApiError::TrafficType.into());
    }
    if b.phone_ids.len() > MAX_TRAFFIC_PHONES {
        return Err(ApiError::TooManyPhoneIds.into());
    }
    let ids = b.phone_ids.into_iter().map(|i| (i, None)).collect();
    let tt = b.traffic_type.clone();
    let t = targets(&st, &c.project_id, ids, |_, _| {
        Ok(JobKind::SetTraffic {
            traffic_type: tt.clone(),
        })
    })?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[derive(Deserialize)]
pub struct CommandBody {
    command: String,
    content: String,
    #[serde(default)]
    phone_ids: Option<Vec<String>>,
    #[serde(default)]
    server_ids: Option<Vec<String>>,
}

pub async fn commands(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<CommandBody>,
) -> ApiResult {
    let kind = validate::adb_command(&b.command, &b.content, false)?;
    let ids = phone_ids_of(&st, &c.project_id, b.phone_ids, b.server_ids)?;
    let t = targets(&st, &c.project_id, ids, |_, _| Ok(kind.clone()))?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

pub async fn sync_commands(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<CommandBody>,
) -> ApiResult {
    let kind = validate::adb_command(&b.command, &b.content, true)?;
    let ids = phone_ids_of(&st, &c.project_id, b.phone_ids, b.server_ids)?;
    if ids.len() > MAX_SYNC_PHONES {
        return Err(ApiError::TooManyPhoneIds.into());
    }
    if !st
        .store
        .take_sync_shell_slot(&c.project_id, SYNC_SHELL_PER_MINUTE)?
    {
        return Err(ApiError::SyncShellRate.into());
    }
    let t = targets(&st, &c.project_id, ids, |_, _| Ok(kind.clone()))?;
    let mut answer = submit(&st, &c.project_id, t)?;
    let request_id = answer["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ended = sync_results(&st, &c.project_id, &request_id).await?;
    if let Some(jobs) = answer["jobs"].as_array_mut() {
        for j in jobs {
            let job = j["job_id"].as_str().and_then(|id| ended.get(id));
            let text = |v: Option<&String>| json!(v.cloned().unwrap_or_default());
            let fields = match job {
                Some(job) => json!({
                    "status": job.status,
                    "error_code": text(job.error_code.as_ref()),
                    "error_msg": text(job.error_msg.as_ref()),
                    "execute_msg": text(job.execute_msg.as_ref()),
                }),
                // Refused before a job was made: its code is already there.
                None => json!({"status": -1, "execute_msg": ""}),
            };
            for (k, v) in fields.as_object().into_iter().flatten() {
                j[k] = v.clone();
            }
        }
    }
    Ok(Reply::ok(answer))
}

/// Phones one sync command reaches at most, named or through `server_ids`
/// (the reference sets no number; its calls that do allow 100 phones, and
/// a whole server of the largest flavors fits).
const MAX_SYNC_PHONES: usize = 100;

/// How long a sync command request waits for its phones (the reference's
/// bound on the call).
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for the jobs of a sync command request to end (each phone's agent
/// answers within its 2 s limit) and returns them by id. A job still
/// running at [`SYNC_WAIT`] (its agent out of reach) is failed with
/// CPS.0054, so the answer and any later query agree.
async fn sync_results(
    st: &Shared,
    project_id: &str,
    request_id: &str,
) -> Result<std::collections::HashMap<String, crate::store::Job>, ApiError> {
    let ids = [request_id.to_string()];
    let deadline = tokio::time::Instant::now() + SYNC_WAIT;
    let mut wait = std::time::Duration::from_millis(5);
    loop {
        let jobs = st.store.jobs_by_requests(project_id, &ids, 0, 1000)?;
        let running: Vec<&crate::store::Job> = jobs.iter().filter(|j| j.status == 1).collect();
        if running.is_empty() {
            return Ok(jobs.into_iter().map(|j| (j.job_id.clone(), j)).collect());
        }
        if tokio::time::Instant::now() >= deadline {
            for j in running {
                crate::dispatch::fail_job(
                    &st.store,
                    &j.job_id,
                    "CPS.0054",
                    "no answer from the phone's agent within 30 s",
                )?;
            }
            // Read again: an answer may have come in meanwhile.
            let jobs = st.store.jobs_by_requests(project_id, &ids, 0, 1000)?;
            return Ok(jobs.into_iter().map(|j| (j.job_id.clone(), j)).collect());
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_millis(50));
    }
}

fn phone_ids_of(
    st: &Shared,
    project_id: &str,
    phone_ids: Option<Vec<String>>,
    server_ids: Option<Vec<String>>,
) -> Result<Vec<(String, Option<String>)>, ApiError> {
    let mut ids: Vec<(String, Option<String>)> = phone_ids
        .unwrap_or_default()
        .into_iter()
        .map(|i| (i, None))
        .collect();
    // With both lists the phones named are the targets (the reference:
    // "if both are available, set phone_ids only").
    let server_ids = if ids.is_empty() {
        server_ids.unwrap_or_default()
    } else {
        Vec::new()
    };
    for s in server_ids {
        if st.store.server(project_id, &s)?.is_none() {
            return Err(ApiError::ServerNotFound(s));
        }
        for p in st.store.server_phones(&s)? {
            ids.push((p.phone_id, None));
        }
    }
    if ids.is_empty() {
        return Err(ApiError::PhoneIdsEmpty);
    }
    Ok(ids)
}
