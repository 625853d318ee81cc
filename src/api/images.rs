//! Custom images: made from a phone (its root written to the object store
//! by a `create_image` job), listed, deleted, and shared with other
//! projects, which accept or reject them. A project starts, resets and
//! restarts phones from its own active images and from active ones shared
//! with it that it accepted, as from the catalog's.

use axum::extract::{Path, State};
use axum::Extension;
use cph_agent::objstore::{ObjectStoreError, ObjectUrl};
use cph_agent::protocol::{ImageRef, JobKind, ObjectRef, IMAGE_BUCKET};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, page_limit, Json, Query};
use super::jobs::{submit, Target};
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::catalog::{PhoneImage, PhoneModel};
use crate::store::{
    new_id, now_ms, utc_string, Image, ImageFilter, MemberWrite, IMAGE_ACTIVE, IMAGE_CREATING,
};

/// An image a project may run phones from, with its label
/// (`cloud_phone`, `cloud_game`, ...), which must be its phone model's.
pub struct Usable {
    pub image: ImageRef,
    pub label: String,
}

impl Usable {
    /// Refuses the image for a phone model of another label (`CPS.0142`):
    /// a game image does not boot on a plain phone's host, nor an image
    /// of a QEMU phone in a container.
    pub fn check_model(&self, model: &PhoneModel) -> Result<(), ApiError> {
        if self.label == model.image_label {
            return Ok(());
        }
        Err(ApiError::ImageModelMismatch {
            image_id: self.image.image_id.clone(),
            image_label: self.label.clone(),
            phone_model: model.phone_model_name.clone(),
            model_label: model.image_label.clone(),
        })
    }
}

/// An image a project may run phones from: the catalog's, or a custom one
/// it owns or accepted. A custom image not active yet is `CPS.0220`.
pub fn usable(st: &Shared, project_id: &str, image_id: &str) -> Result<Option<Usable>, ApiError> {
    usable_in(&st.catalog, &st.store, project_id, image_id)
}

/// [`usable`] from a catalog and a store.
pub fn usable_in(
    catalog: &crate::catalog::Catalog,
    store: &crate::store::Store,
    project_id: &str,
    image_id: &str,
) -> Result<Option<Usable>, ApiError> {
    if let Some(i) = catalog.image(project_id, image_id) {
        return Ok(Some(Usable {
            image: ImageRef {
                image_id: i.image_id.clone(),
                url: i.url.clone(),
            },
            label: i.image_label.clone(),
        }));
    }
    match store.visible_image(project_id, image_id)? {
        Some(i) if i.status == IMAGE_ACTIVE => Ok(Some(Usable {
            image: ImageRef {
                image_id: i.image_id,
                url: i.url,
            },
            label: i.image_label,
        })),
        Some(i) => Err(ApiError::ImageNotActive(i.image_id)),
        None => Ok(None),
    }
}

/// The label of an image the project can see (the catalog's or a custom
/// one, in any state); `None` when there is no such image any more.
pub fn label_of(st: &Shared, project_id: &str, image_id: &str) -> Result<Option<String>, ApiError> {
    if let Some(i) = st.catalog.image(project_id, image_id) {
        return Ok(Some(i.image_label.clone()));
    }
    Ok(st
        .store
        .visible_image(project_id, image_id)?
        .map(|i| i.image_label))
}

/// The system (`os_name`) of an image the project can use, as a phone's
/// `image_version`; empty for one it no longer sees.
pub fn version_of(st: &Shared, project_id: &str, image_id: &str) -> Result<String, ApiError> {
    if let Some(i) = st.catalog.image(project_id, image_id) {
        return Ok(i.os_name.clone());
    }
    Ok(st
        .store
        .visible_image(project_id, image_id)?
        .map(|i| i.os_name)
        .unwrap_or_default())
}

/// A custom image as the catalog lists images: private (2) to its owner.
pub fn as_phone_image(i: &Image) -> PhoneImage {
    PhoneImage {
        image_name: i.image_name.clone(),
        os_type: i.os_type.clone(),
        os_name: i.os_name.clone(),
        image_id: i.image_id.clone(),
        is_public: 2,
        image_label: i.image_label.clone(),
        url: i.url.clone(),
        project_id: Some(i.project_id.clone()),
    }
}

/// A custom image's name: 1 to 128 bytes of letters, digits, `-`, `_`,
/// `.` and spaces.
fn valid_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
}

#[derive(Deserialize)]
pub struct CreateBody {
    phone_id: String,
    image_name: String,
}

/// `POST /v1/{project_id}/cloud-phone/images`: an image of a running or
/// stopped phone (the phone is stopped while it is written and started
/// again if it was running). Answers the image id and its job.
pub async fn create(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<CreateBody>,
) -> ApiResult {
    if !valid_name(&b.image_name) {
        return Err(ApiError::ImageName.into());
    }
    let phone = st
        .store
        .phone(&c.project_id, &b.phone_id)?
        .ok_or_else(|| ApiError::PhoneNotFound(b.phone_id.clone()))?;
    // Running (2) or stopped (8).
    if phone.status != 2 && phone.status != 8 {
        return Err(ApiError::PhoneNotSettled(phone.phone_id).into());
    }
    if st
        .store
        .server(&c.project_id, &phone.server_id)?
        .is_some_and(|s| s.deleting)
    {
        return Err(ApiError::ServerDeleting(phone.server_id).into());
    }
    // The new image keeps what its phone's image says of itself.
    let (image_label, os_type, os_name) = match st.catalog.image(&c.project_id, &phone.image_id) {
        Some(i) => (i.image_label.clone(), i.os_type.clone(), i.os_name.clone()),
        None => match st.store.image_by_id(&phone.image_id)? {
            Some(i) => (i.image_label, i.os_type, i.os_name),
            None => ("cloud_phone".into(), "android".into(), String::new()),
        },
    };
    let image_id = new_id();
    let object = ObjectRef {
        bucket: IMAGE_BUCKET.to_string(),
        key: format!("{}/{image_id}.tar", c.project_id),
    };
    let now = now_ms();
    st.store.insert_image(&Image {
        image_id: image_id.clone(),
        project_id: c.project_id.clone(),
        image_name: b.image_name,
        base_image_id: phone.image_id.clone(),
        image_label,
        os_type,
        os_name,
        url: format!("obs://{}/{}", object.bucket, object.key),
        status: IMAGE_CREATING,
        image_size: 0,
        create_ms: now,
        update_ms: now,
    })?;
    let kind = JobKind::CreateImage {
        image_id: image_id.clone(),
        object,
    };
    let server_id = phone.server_id.clone();
    let job = submit(&st, &c.project_id, vec![Target::Phone(phone, kind)]).map(|answer| {
        let job_id = answer["jobs"][0]["job_id"].as_str().map(str::to_string);
        job_id.map(|j| (j, answer["request_id"].clone()))
    });
    match job {
        Ok(Some((job_id, request_id))) => Ok(Reply::ok(json!({
            "request_id": request_id,
            "image_id": image_id,
            "job_id": job_id,
        }))),
        // No job will end it: the image goes rather than stay creating.
        // A phone's job is refused only when its server began to be
        // deleted since the check above.
        Ok(None) => {
            st.store.delete_image(&image_id)?;
            Err(ApiError::ServerDeleting(server_id).into())
        }
        Err(e) => {
            st.store.delete_image(&image_id)?;
            Err(e.into())
        }
    }
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    image_type: Option<String>,
    status: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
    image_id: Option<String>,
    image_name: Option<String>,
    create_since: Option<String>,
    create_until: Option<String>,
    src_project_id: Option<String>,
}

fn opt(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

fn ms(v: &Option<String>, field: &'static str) -> Result<Option<i64>, ApiError> {
    opt(v)
        .map(|s| s.parse::<i64>().map_err(|_| ApiError::Field(field)))
        .transpose()
}

/// `GET /v1/{project_id}/cloud-phone/images`: the project's images
/// (`private`) and those shared with it (`share`), newest first.
pub async fn list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let own = match opt(&q.image_type) {
        None => None,
        Some("private") => Some(true),
        Some("share") => Some(false),
        Some(_) => return Err(ApiError::Field("image_type").into()),
    };
    let status = match opt(&q.status) {
        None => None,
        Some(s) => match s.parse::<i32>() {
            Ok(n @ 0..=2) => Some(n),
            _ => return Err(ApiError::Status.into()),
        },
    };
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let filter = ImageFilter {
        own,
        status,
        image_id: opt(&q.image_id).map(str::to_string),
        image_name: opt(&q.image_name).map(str::to_string),
        create_since: ms(&q.create_since, "create_since")?,
        create_until: ms(&q.create_until, "create_until")?,
        src_project_id: opt(&q.src_project_id).map(str::to_string),
    };
    let (images, total) = st
        .store
        .list_images(&c.project_id, &filter, offset, limit)?;
    let infos: Vec<Value> = images
        .into_iter()
        .map(|i| {
            let mine = i.project_id == c.project_id;
            let mut v = json!({
                "domain_id": "",
                "image_name": i.image_name,
                "image_id": i.image_id,
                "image_version": i.os_name,
                "image_type": if mine { "private" } else { "share" },
                "status": i.status,
                "image_size": i.image_size,
                "create_time": utc_string(i.create_ms / 1000),
                "update_time": utc_string(i.update_ms / 1000),
            });
            let key = if mine { "project_id" } else { "src_project_id" };
            v[key] = Value::String(i.project_id);
            v
        })
        .collect();
    Ok(Reply::ok(json!({"image_infos": infos, "total": total})))
}

/// The caller's own image, else `CPS.0166` (another project's image is not
/// found, as if it did not exist).
fn owned(st: &Shared, project_id: &str, image_id: &str) -> Result<Image, ApiError> {
    st.store
        .image_by_id(image_id)?
        .filter(|i| i.project_id == project_id)
        .ok_or_else(|| ApiError::ImageNotFound(image_id.to_string()))
}

/// `DELETE /v1/{project_id}/cloud-phone/images/{image_id}`: the image, its
/// shares and its object. Phones already made from it keep running (each
/// host keeps its own copy of an image its phones use). An image still
/// being made cannot be deleted (`CPS.0220`).
pub async fn delete(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, image_id)): Path<(String, String)>,
) -> ApiResult {
    let image = owned(&st, &c.project_id, &image_id)?;
    if image.status == IMAGE_CREATING {
        return Err(ApiError::ImageNotActive(image_id).into());
    }
    delete_object(&st, &image).await?;
    st.store.delete_image(&image_id)?;
    Ok(Reply::ok(json!({})))
}

/// Removes an image's tar from the object store, when the control plane
/// has one configured; one already gone is fine. Without a store the
/// object is left, and the log says so.
async fn delete_object(st: &Shared, image: &Image) -> Result<(), ApiError> {
    let Ok(url) = ObjectUrl::parse(&image.url) else {
        return Ok(());
    };
    let Some(store) = &st.objects else {
        tracing::warn!(image_id = %image.image_id, url = %image.url,
            "no object store configured (cph serve --object-store): the image's object is kept");
        return Ok(());
    };
    match store.delete(&url.bucket, &url.key).await {
        Ok(()) | Err(ObjectStoreError::NotFound { .. }) => Ok(()),
        Err(ObjectStoreError::NoSuchBucket { .. }) => Ok(()),
        Err(e) => Err(ApiError::Internal(format!(
            "deleting image object {}: {e}",
            image.url
        ))),
    }
}

#[derive(Deserialize)]
pub struct MemberBody {
    #[serde(default)]
    member: String,
}

/// `POST .../images/{image_id}/members`: shares an active image with a
/// project of this platform (at most 10); it is pending until accepted.
pub async fn add_member(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, image_id)): Path<(String, String)>,
    Json(b): Json<MemberBody>,
) -> ApiResult {
    let image = owned(&st, &c.project_id, &image_id)?;
    if image.status != IMAGE_ACTIVE {
        return Err(ApiError::ImageNotActive(image_id).into());
    }
    // A project of this platform, by id (its name is not a member).
    let member = b.member.trim();
    let is_project = st
        .store
        .project(member)?
        .is_some_and(|p| p.project_id == member);
    if member == c.project_id || !is_project {
        return Err(ApiError::Field("member").into());
    }
    match st.store.add_image_member(&image_id, member)? {
        MemberWrite::Added | MemberWrite::Exists => Ok(Reply::ok(json!({}))),
        MemberWrite::TooMany => {
            Err(ApiError::TooManyMembers(image_id, crate::store::MAX_MEMBERS).into())
        }
    }
}

#[derive(Deserialize, Default)]
pub struct MembersQuery {
    marker: Option<String>,
    limit: Option<String>,
}

/// `GET .../images/{image_id}/members`: the projects an image is shared
/// with, by member id, paged by marker.
pub async fn members(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, image_id)): Path<(String, String)>,
    Query(q): Query<MembersQuery>,
) -> ApiResult {
    owned(&st, &c.project_id, &image_id)?;
    let limit = page_limit(q.limit.as_deref(), 100)? as u32;
    let rows = st.store.image_members(&image_id, opt(&q.marker), limit)?;
    let next = if rows.len() == limit as usize {
        rows.last().map(|m| m.member_id.clone())
    } else {
        None
    };
    let members: Vec<Value> = rows
        .into_iter()
        .map(|m| {
            json!({
                "image_id": m.image_id,
                "member_id": m.member_id,
                "status": m.status,
                "create_time": m.create_ms,
                "update_time": m.update_ms,
            })
        })
        .collect();
    Ok(Reply::ok(json!({
        "members": members,
        "page_info": {"next_marker": next},
    })))
}

#[derive(Deserialize)]
pub struct StatusBody {
    #[serde(default)]
    status: String,
}

/// `PUT .../images/{image_id}/members`: the caller, a member, accepts or
/// rejects the image shared with it.
pub async fn update_member(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, image_id)): Path<(String, String)>,
    Json(b): Json<StatusBody>,
) -> ApiResult {
    if !matches!(b.status.as_str(), "accepted" | "rejected") {
        return Err(ApiError::Status.into());
    }
    if !st
        .store
        .set_image_member_status(&image_id, &c.project_id, &b.status)?
    {
        return Err(ApiError::ImageNotFound(image_id).into());
    }
    Ok(Reply::ok(json!({})))
}

/// `DELETE .../images/{image_id}/members/{member_id}`: stops sharing.
pub async fn delete_member(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, image_id, member_id)): Path<(String, String, String)>,
) -> ApiResult {
    owned(&st, &c.project_id, &image_id)?;
    if !st.store.delete_image_member(&image_id, &member_id)? {
        return Err(ApiError::Field("member_id").into());
    }
    Ok(Reply::ok(json!({})))
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn image_names() {
        assert!(valid_name("golden-1.0 base_image"));
        assert!(valid_name("镜像"));
        assert!(!valid_name(""));
        assert!(!valid_name("   "));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(129)));
    }
}
