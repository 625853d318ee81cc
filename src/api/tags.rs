//! Resource tags, the way Huawei Cloud services expose them (the official
//! SDK's `BatchCreateTags`, `BatchDeleteTags`, `ListResourceTags`,
//! `ListProjectTags` and `ListResourceInstances`, with the reference's
//! `CPS.03xx` codes). The tagged resources are the project's servers,
//! resource type `cph-server`.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page, Json, PageQuery, Query};
use super::{ApiError, ApiResult, Caller, Failure, Reply, Shared};
use crate::store::{Server, ServerFilter, TagWrite, MAX_TAGS};

/// The one resource type: cloud phone servers.
pub const SERVER_TYPE: &str = "cph-server";
/// Longest key and value, in characters.
pub const KEY_MAX: usize = 127;
pub const VALUE_MAX: usize = 255;
/// Most keys, and values per key, a resource query names.
pub const QUERY_KEYS_MAX: usize = 10;
pub const QUERY_VALUES_MAX: usize = 10;
/// Largest page of a resource query.
pub const INSTANCES_LIMIT_MAX: usize = 1000;

/// Letters of any language, digits, spaces and `_.:=+-@`, no space at
/// either end, 1..=max characters.
fn tag_text(s: &str, max: usize) -> bool {
    let n = s.chars().count();
    n > 0
        && n <= max
        && s.trim() == s
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || "_.:=+-@".contains(c))
}

fn key(k: &str) -> Result<&str, ApiError> {
    if !tag_text(k, KEY_MAX) {
        return Err(ApiError::TagKey(k.to_string()));
    }
    if k.starts_with("_sys_") {
        return Err(ApiError::TagKeyReserved(k.to_string()));
    }
    Ok(k)
}

fn value(v: &str) -> Result<&str, ApiError> {
    tag_text(v, VALUE_MAX)
        .then_some(v)
        .ok_or_else(|| ApiError::TagValue(v.to_string()))
}

/// The project's server a tag request names.
fn resource(
    st: &Shared,
    c: &Caller,
    resource_type: &str,
    resource_id: &str,
) -> Result<Server, ApiError> {
    if resource_type != SERVER_TYPE {
        return Err(ApiError::TagResourceType(resource_type.to_string()));
    }
    if !super::validate::is_id(resource_id) {
        return Err(ApiError::TagResourceId);
    }
    st.store
        .server(&c.project_id, resource_id)?
        .ok_or_else(|| ApiError::TagResourceNotFound(resource_id.to_string()))
}

fn tags_json(tags: impl IntoIterator<Item = (String, String)>) -> Value {
    Value::Array(
        tags.into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

#[derive(Deserialize)]
pub struct TagIn {
    key: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
pub struct TagAction {
    action: Option<String>,
    tags: Option<Vec<TagIn>>,
}

/// `POST /v1/{project_id}/{resource_type}/{resource_id}/tags/action`:
/// `create` sets the tags (a key already there takes the new value),
/// `delete` removes them (by key; a given value must match). All or none;
/// 204 on success.
pub async fn action(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, resource_type, resource_id)): Path<(String, String, String)>,
    Json(b): Json<TagAction>,
) -> Result<Response, Failure> {
    resource(&st, &c, &resource_type, &resource_id)?;
    let tags = b.tags.unwrap_or_default();
    if tags.is_empty() {
        return Err(ApiError::Tags("the list is empty").into());
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::TooManyTags(MAX_TAGS).into());
    }
    let mut keys = BTreeSet::new();
    for t in &tags {
        let k = t.key.as_deref().unwrap_or_default();
        if !keys.insert(key(k)?) {
            return Err(ApiError::Tags("a key is given twice").into());
        }
    }
    match b.action.as_deref() {
        Some("create") => {
            let mut set = Vec::with_capacity(tags.len());
            for t in &tags {
                let v = value(t.value.as_deref().unwrap_or_default())?;
                set.push((t.key.clone().unwrap_or_default(), v.to_string()));
            }
            let wrote = st
                .store
                .put_tags(&c.project_id, &resource_type, &resource_id, &set)?;
            if wrote == TagWrite::TooMany {
                return Err(ApiError::TooManyTags(MAX_TAGS).into());
            }
        }
        Some("delete") => {
            let mut gone = Vec::with_capacity(tags.len());
            for t in &tags {
                let v = match t.value.as_deref() {
                    None | Some("") => None,
                    Some(v) => Some(value(v)?.to_string()),
                };
                gone.push((t.key.clone().unwrap_or_default(), v));
            }
            st.store.delete_tags(&resource_type, &resource_id, &gone)?;
        }
        _ => return Err(ApiError::Field("action").into()),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/{project_id}/{resource_type}/{resource_id}/tags`.
pub async fn of_resource(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, resource_type, resource_id)): Path<(String, String, String)>,
) -> ApiResult {
    resource(&st, &c, &resource_type, &resource_id)?;
    let tags = st.store.resource_tags(&resource_type, &resource_id)?;
    Ok(Reply::ok(json!({ "tags": tags_json(tags) })))
}

/// `GET /v1/{project_id}/{resource_type}/tags`: every key the project's
/// resources use, with its values, a page of keys at a time.
pub async fn of_project(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, resource_type)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> ApiResult {
    if resource_type != SERVER_TYPE {
        return Err(ApiError::TagResourceType(resource_type).into());
    }
    let (offset, limit) = page(q.offset.as_deref(), q.limit.as_deref())?;
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for tags in st
        .store
        .project_tags(&c.project_id, &resource_type)?
        .into_values()
    {
        for (k, v) in tags {
            by_key.entry(k).or_default().insert(v);
        }
    }
    let total = by_key.len();
    let tags: Vec<Value> = by_key
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(|(k, v)| json!({"key": k, "values": v}))
        .collect();
    Ok(Reply::ok(json!({"tags": tags, "total_count": total})))
}

#[derive(Deserialize)]
pub struct TagsIn {
    key: Option<String>,
    values: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub struct MatchIn {
    key: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
pub struct InstancesQuery {
    action: Option<String>,
    offset: Option<Value>,
    limit: Option<Value>,
    without_any_tag: Option<bool>,
    tags: Option<Vec<TagsIn>>,
    matches: Option<Vec<MatchIn>>,
}

/// A number given as a string or a number; `None` when absent.
fn number(v: Option<&Value>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| ApiError::OffsetLimit),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or(ApiError::OffsetLimit),
        Some(_) => Err(ApiError::OffsetLimit),
    }
}

/// What a resource query asks for: every key with one of its values (any
/// value when none are given), or no tag at all; and an exact name.
struct Wanted {
    tags: BTreeMap<String, BTreeSet<String>>,
    without_any_tag: bool,
    name: Option<String>,
}

impl Wanted {
    fn parse(b: &InstancesQuery) -> Result<Self, ApiError> {
        let given = b.tags.as_deref().unwrap_or_default();
        if given.len() > QUERY_KEYS_MAX {
            return Err(ApiError::Tags("more than 10 keys"));
        }
        let mut tags = BTreeMap::new();
        for t in given {
            let k = t.key.as_deref().unwrap_or_default();
            if !tag_text(k, KEY_MAX) {
                return Err(ApiError::TagKey(k.to_string()));
            }
            let values = t.values.as_deref().unwrap_or_default();
            let mut set = BTreeSet::new();
            for v in values {
                if !tag_text(v, VALUE_MAX) || !set.insert(v.clone()) {
                    return Err(ApiError::TagValues(k.to_string()));
                }
            }
            if set.len() > QUERY_VALUES_MAX {
                return Err(ApiError::TagValues(k.to_string()));
            }
            if tags.insert(k.to_string(), set).is_some() {
                return Err(ApiError::Tags("a key is given twice"));
            }
        }
        let mut name = None;
        for m in b.matches.as_deref().unwrap_or_default() {
            let k = m.key.as_deref().unwrap_or_default();
            if k != "resource_name" {
                return Err(ApiError::MatchKey(k.to_string()));
            }
            match m.value.as_deref() {
                Some(v) if !v.is_empty() && v.chars().count() <= VALUE_MAX => {
                    name = Some(v.to_string())
                }
                _ => return Err(ApiError::MatchValue),
            }
        }
        Ok(Self {
            tags,
            without_any_tag: b.without_any_tag.unwrap_or(false),
            name,
        })
    }

    fn admits(&self, name: &str, tags: Option<&BTreeMap<String, String>>) -> bool {
        if self.name.as_deref().is_some_and(|n| n != name) {
            return false;
        }
        let empty = BTreeMap::new();
        let tags = tags.unwrap_or(&empty);
        if self.without_any_tag {
            return tags.is_empty();
        }
        self.tags.iter().all(|(k, values)| {
            tags.get(k)
                .is_some_and(|v| values.is_empty() || values.contains(v))
        })
    }
}

/// `POST /v1/{project_id}/{resource_type}/resource_instances/action`: the
/// project's resources by tags and name; `filter` answers a page of them
/// with their tags, `count` how many there are.
pub async fn instances(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_, resource_type)): Path<(String, String)>,
    Json(b): Json<InstancesQuery>,
) -> ApiResult {
    if resource_type != SERVER_TYPE {
        return Err(ApiError::TagResourceType(resource_type).into());
    }
    let count_only = match b.action.as_deref() {
        Some("filter") => false,
        Some("count") => true,
        _ => return Err(ApiError::Field("action").into()),
    };
    let offset = number(b.offset.as_ref())?.unwrap_or(0);
    let limit = number(b.limit.as_ref())?.unwrap_or(INSTANCES_LIMIT_MAX);
    if !(1..=INSTANCES_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::OffsetLimit.into());
    }
    let wanted = Wanted::parse(&b)?;
    let tags = st.store.project_tags(&c.project_id, &resource_type)?;
    let servers = st
        .store
        .list_servers(&c.project_id, &ServerFilter::default(), 0, u32::MAX)?;
    let matched: Vec<&Server> = servers
        .iter()
        .filter(|s| wanted.admits(&s.server_name, tags.get(&s.server_id)))
        .collect();
    if count_only {
        return Ok(Reply::ok(json!({ "total_count": matched.len() })));
    }
    let resources: Vec<Value> = matched
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| {
            let own = tags.get(&s.server_id).cloned().unwrap_or_default();
            json!({
                "resource_id": s.server_id,
                "resource_name": s.server_name,
                "resource_detail": "",
                "tags": tags_json(own),
            })
        })
        .collect();
    Ok(Reply::ok(
        json!({"resources": resources, "total_count": matched.len()}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_text_follows_the_sdk_rules() {
        assert!(tag_text("env", KEY_MAX));
        assert!(tag_text("环境 1_.:=+-@", KEY_MAX));
        assert!(!tag_text("", KEY_MAX));
        assert!(!tag_text(" lead", KEY_MAX));
        assert!(!tag_text("trail ", KEY_MAX));
        assert!(!tag_text("semi;colon", KEY_MAX));
        assert!(!tag_text("slash/", KEY_MAX));
        assert!(tag_text(&"k".repeat(KEY_MAX), KEY_MAX));
        assert!(!tag_text(&"k".repeat(KEY_MAX + 1), KEY_MAX));
        assert!(matches!(key("_sys_x"), Err(ApiError::TagKeyReserved(_))));
        assert!(matches!(value("a/b"), Err(ApiError::TagValue(_))));
    }

    #[test]
    fn a_query_wants_every_key_and_one_of_its_values() {
        let q = |tags: Value, without: bool, matches: Value| {
            let b: InstancesQuery = serde_json::from_value(json!({"action": "filter",
                "tags": tags, "without_any_tag": without, "matches": matches}))
            .expect("body");
            Wanted::parse(&b)
        };
        let has = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let w = q(
            json!([{"key": "env", "values": ["prod", "stage"]}, {"key": "team", "values": []}]),
            false,
            json!([]),
        )
        .expect("query");
        assert!(w.admits("a", Some(&has(&[("env", "prod"), ("team", "x")]))));
        assert!(!w.admits("a", Some(&has(&[("env", "dev"), ("team", "x")]))));
        assert!(!w.admits("a", Some(&has(&[("env", "prod")]))));
        assert!(!w.admits("a", None));
        let w = q(
            json!([]),
            true,
            json!([{"key": "resource_name", "value": "a"}]),
        )
        .expect("q");
        assert!(w.admits("a", None));
        assert!(!w.admits("b", None));
        assert!(!w.admits("a", Some(&has(&[("env", "prod")]))));
        assert!(matches!(
            q(json!([]), false, json!([{"key": "id", "value": "a"}])),
            Err(ApiError::MatchKey(_))
        ));
        assert!(matches!(
            q(
                json!([{"key": "k", "values": ["v", "v"]}]),
                false,
                json!([])
            ),
            Err(ApiError::TagValues(_))
        ));
        assert!(matches!(
            q(json!([{"key": "k"}, {"key": "k"}]), false, json!([])),
            Err(ApiError::Tags(_))
        ));
    }
}
