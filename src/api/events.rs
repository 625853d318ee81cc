//! Scheduled events (the SDK's `ListScheduledEvents`,
//! `AuthorizeScheduledEvent`, `UpdateScheduledEvent`): maintenance the
//! operator announced on the project's servers (`cph admin event create`),
//! which the project authorizes for a time of its choice before the
//! event's deadline. See [`crate::events`] for what happens then.

use axum::extract::{Path, State};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{page_limit, Json, Query};
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::store::{now_ms, parse_utc, utc_string, Event, EventFilter};

/// Largest page of events.
pub const EVENTS_LIMIT_MAX: usize = 100;
/// The least time between an authorization and the start it names.
pub const MIN_NOTICE_MS: i64 = 5 * 60 * 1000;

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    marker: Option<String>,
    event_id: Option<String>,
    server_id: Option<String>,
    publish_since: Option<String>,
    publish_until: Option<String>,
    state: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| json!(utc_string(ms.div_euclid(1000))))
}

fn event_json(e: &Event) -> Value {
    json!({
        "event_id": e.event_id,
        "server_id": e.server_id,
        "server_name": e.server_name,
        "server_model_name": e.server_model_name,
        "server_state": e.server_status,
        "type": e.kind,
        "authorization_type": (!e.authorization_type.is_empty()).then_some(&e.authorization_type),
        "state": e.state,
        "publish_time": time(Some(e.publish_ms)),
        "start_time": time(e.start_ms),
        "finish_time": time(e.finish_ms),
        "not_before": time(e.not_before_ms),
        "not_after": Value::Null,
        "not_before_deadline": time(Some(e.not_before_deadline_ms)),
        "description": e.description,
    })
}

/// A time filter or start: `YYYY-MM-DDTHH:MM:SSZ`, in ms.
fn parse_time(field: &'static str, s: &str) -> Result<i64, ApiError> {
    parse_utc(s).map(|secs| secs * 1000).ok_or_else(|| {
        ApiError::EventParam(format!(
            "{field} {s:?} is not a time like 2026-12-05T08:00:00Z"
        ))
    })
}

/// The comma-separated values of a multi-valued filter, each one of `known`.
fn values(field: &'static str, raw: Option<&str>, known: &[&str]) -> Result<Vec<String>, ApiError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(|v| {
            let v = v.trim();
            if known.contains(&v) {
                Ok(v.to_string())
            } else {
                Err(ApiError::EventParam(format!(
                    "{field} {v:?} is not one of {}",
                    known.join(", ")
                )))
            }
        })
        .collect()
}

pub const EVENT_TYPES: &[&str] = &["system-maintenance", "localdisk-recovery"];
const EVENT_STATES: &[&str] = &[
    "inquiring",
    "scheduled",
    "executing",
    "completed",
    "failed",
    "canceled",
];

/// `GET /v1/{project_id}/cloud-phone/scheduled-events`.
pub async fn list(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let limit = if q.limit.as_deref().is_none_or(str::is_empty) {
        10
    } else {
        page_limit(q.limit.as_deref(), EVENTS_LIMIT_MAX)?
    };
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let f = EventFilter {
        event_id: nonempty(&q.event_id),
        server_id: nonempty(&q.server_id),
        states: values("state", q.state.as_deref(), EVENT_STATES)?,
        kinds: values("type", q.kind.as_deref(), EVENT_TYPES)?,
        publish_since_ms: nonempty(&q.publish_since)
            .map(|s| parse_time("publish_since", &s))
            .transpose()?,
        publish_until_ms: nonempty(&q.publish_until)
            .map(|s| parse_time("publish_until", &s))
            .transpose()?,
    };
    let marker = nonempty(&q.marker);
    if let Some(m) = &marker {
        st.store
            .event(Some(&c.project_id), m)?
            .ok_or(ApiError::Field("marker"))?;
    }
    let (page, total, more) =
        st.store
            .list_events(Some(&c.project_id), &f, marker.as_deref(), limit)?;
    let next = page.last().filter(|_| more).map(|e| e.event_id.clone());
    let events: Vec<Value> = page.iter().map(event_json).collect();
    Ok(Reply::ok(json!({
        "count": total,
        "scheduled_events": events,
        "page_info": {"next_marker": next},
    })))
}

#[derive(Deserialize)]
pub struct AuthorizeBody {
    authorization_type: String,
    #[serde(default)]
    not_before: Option<String>,
}

#[derive(Deserialize)]
pub struct UpdateBody {
    #[serde(default)]
    not_before: Option<String>,
}

/// The start an authorization or an update names: now when empty, else
/// at least [`MIN_NOTICE_MS`] ahead and not past the event's deadline.
fn start_time(e: &Event, not_before: Option<&str>) -> Result<i64, ApiError> {
    let now = now_ms();
    let Some(s) = not_before.filter(|s| !s.is_empty()) else {
        return Ok(now);
    };
    let t = parse_time("not_before", s)?;
    if t < now + MIN_NOTICE_MS {
        return Err(ApiError::EventParam(format!(
            "not_before {s} is less than 5 minutes ahead (an empty one starts the event now)"
        )));
    }
    if t > e.not_before_deadline_ms {
        return Err(ApiError::EventParam(format!(
            "not_before {s} is after the event's deadline {}",
            utc_string(e.not_before_deadline_ms.div_euclid(1000))
        )));
    }
    Ok(t)
}

fn project_event(st: &Shared, c: &Caller, event_id: &str) -> Result<Event, ApiError> {
    st.store
        .event(Some(&c.project_id), event_id)?
        .ok_or_else(|| ApiError::EventNotFound(event_id.to_string()))
}

/// `POST .../scheduled-events/{event_id}/authorize`: `maintenance` or
/// `redeploy` (the server switched to another host, its phones made anew
/// there; [`crate::events`]) at `not_before` (now when empty).
pub async fn authorize(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, event_id)): Path<(String, String)>,
    Json(b): Json<AuthorizeBody>,
) -> ApiResult {
    let e = project_event(&st, &c, &event_id)?;
    let kind = match b.authorization_type.as_str() {
        k @ ("maintenance" | "redeploy") => k,
        other => {
            return Err(ApiError::EventParam(format!(
                "authorization_type {other:?} is not maintenance or redeploy"
            ))
            .into())
        }
    };
    let at = start_time(&e, b.not_before.as_deref())?;
    if !st.store.authorize_event(&e.event_id, kind, at)? {
        return Err(ApiError::EventState(
            e.event_id,
            e.state,
            "only an inquiring event is authorized",
        )
        .into());
    }
    st.dispatcher.kick();
    Ok(Reply::ok(json!({})))
}

/// `PUT .../scheduled-events/{event_id}`: a new start for an authorized
/// event that has not started.
pub async fn update(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((_p, event_id)): Path<(String, String)>,
    Json(b): Json<UpdateBody>,
) -> ApiResult {
    let e = project_event(&st, &c, &event_id)?;
    let at = start_time(&e, b.not_before.as_deref())?;
    if !st.store.reschedule_event(&e.event_id, at)? {
        return Err(ApiError::EventState(
            e.event_id,
            e.state,
            "only a scheduled event that has not started is moved",
        )
        .into());
    }
    st.dispatcher.kick();
    Ok(Reply::ok(json!({})))
}
