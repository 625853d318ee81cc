//! The CPH REST API: routes, shared state and the uniform request pipeline
//! (request id -> authenticate -> parse/validate -> controller -> response).

pub mod agent;
pub mod auth;
pub mod connect;
pub mod error;
pub mod events;
pub mod extract;
pub mod iam;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod misc;
pub mod phones;
pub mod purchase;
pub mod servers;
pub mod sharefs;
pub mod tags;
pub mod validate;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::dispatch::Dispatcher;
use crate::store::Store;
pub use error::ApiError;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 12 * 1024 * 1024;

/// What every handler shares.
pub struct AppState {
    pub store: Arc<Store>,
    pub catalog: Catalog,
    pub dispatcher: Dispatcher,
    /// Shared secret agents present.
    pub node_token: String,
    pub heartbeat_secs: u64,
    /// The object store custom images are written to, for deleting them.
    pub objects: Option<cph_agent::objstore::ObjectStore>,
}

pub type Shared = Arc<AppState>;

/// Per-request context set by the middleware: the request id, and the
/// authenticated project once auth ran.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub request_id: String,
}

/// The authenticated caller's project.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project_id: String,
}

/// An API answer: a JSON object that gets `request_id` added.
pub struct Reply(pub StatusCode, pub Value);

impl Reply {
    pub fn ok(v: Value) -> Self {
        Reply(StatusCode::OK, v)
    }
}

/// A failed answer, carrying the request id.
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure(e.into())
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(self.1)).into_response();
        r.extensions_mut().insert(NeedsRequestId);
        r
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, code) = self.0.status_and_code();
        if let ApiError::Internal(msg) = &self.0 {
            tracing::error!(error = %msg, "internal error");
        }
        let body = json!({"error_code": code, "error_msg": self.0.message()});
        let mut r = (status, axum::Json(body)).into_response();
        r.extensions_mut().insert(NeedsRequestId);
        r
    }
}

#[derive(Clone, Copy)]
struct NeedsRequestId;

pub type ApiResult = Result<Reply, Failure>;

/// Gives every request an id and writes it into the response's
/// `X-Request-Id` header and the JSON body's `request_id`.
async fn request_id_layer(mut req: Request, next: Next) -> Response {
    let request_id = crate::store::new_id();
    req.extensions_mut().insert(Ctx {
        request_id: request_id.clone(),
    });
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        parts.headers.insert("x-request-id", v);
    }
    if parts.extensions.get::<NeedsRequestId>().is_none() {
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => return Response::from_parts(parts, axum::body::Body::empty()),
    };
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut m)) => {
            // A handler that grouped jobs under its own request id keeps it.
            let id = match m.get("request_id") {
                Some(Value::String(own)) => own.clone(),
                _ => request_id,
            };
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
            m.insert("request_id".into(), Value::String(id));
            serde_json::to_vec(&Value::Object(m)).unwrap_or_else(|_| bytes.to_vec())
        }
        _ => bytes.to_vec(),
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(out))
}

async fn not_found() -> Failure {
    Failure(ApiError::NotFound)
}

/// The whole router.
pub fn router(state: Shared) -> Router {
    let cph = Router::new()
        // servers
        .route("/v1/{project_id}/cloud-phone/servers", get(servers::list))
        .route(
            "/v1/{project_id}/cloud-phone/servers/{server_id}",
            get(servers::detail),
        )
        .route(
            "/v1/{project_id}/cloud-phone/servers/{server_id}",
            put(servers::rename),
        )
        .route(
            "/v1/{project_id}/cloud-phone/server-models",
            get(servers::models),
        )
        .route(
            "/v1/{project_id}/server-model-offerings",
            get(servers::offerings),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones",
            post(purchase::buy_v1).get(phones::list),
        )
        .route(
            "/v2/{project_id}/cloud-phone/servers",
            post(purchase::buy_v2).delete(servers::delete),
        )
        .route(
            "/v2.1/{project_id}/cloud-phone/servers",
            post(purchase::buy_v21),
        )
        .route(
            "/v1/{project_id}/cloud-phone/servers/batch-restart",
            post(servers::batch_restart),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/share-files",
            post(servers::share_files_push).delete(servers::share_files_delete),
        )
        .route(
            "/v1/{project_id}/cloud-phone/servers/share-files",
            get(servers::share_files_list),
        )
        .route(
            "/v1/{project_id}/servers/{server_id}/share-apps-snapshot",
            get(servers::share_apps_snapshot),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/share-apps",
            post(servers::share_apps_push).delete(servers::share_apps_delete),
        )
        .route(
            "/v2/{project_id}/cloud-phone/servers/{server_id}/change",
            post(servers::switch),
        )
        .route(
            "/v1/{project_id}/servers/attach-share-filesystem",
            post(sharefs::attach),
        )
        .route(
            "/v1/{project_id}/servers/detach-share-filesystem",
            post(sharefs::detach),
        )
        .route(
            "/v1/{project_id}/cloud-phone/servers/change-server-model",
            post(servers::change_model),
        )
        // bandwidths
        .route(
            "/v1/{project_id}/cloud-phone/bandwidths",
            get(misc::bandwidth_list),
        )
        .route(
            "/v1/{project_id}/cloud-phone/bandwidths/{band_width_id}",
            put(misc::bandwidth_update),
        )
        // phones
        .route(
            "/v1/{project_id}/cloud-phone/phones/{phone_id}",
            get(phones::detail).put(phones::rename),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phone-models",
            get(phones::models),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phone-images",
            get(phones::images),
        )
        .route(
            "/v1/{project_id}/cloud-phone/scheduled-events",
            get(events::list),
        )
        .route(
            "/v1/{project_id}/cloud-phone/scheduled-events/{event_id}",
            put(events::update),
        )
        .route(
            "/v1/{project_id}/cloud-phone/scheduled-events/{event_id}/authorize",
            post(events::authorize),
        )
        .route(
            "/v1/{project_id}/cloud-phone/images",
            get(images::list).post(images::create),
        )
        .route(
            "/v1/{project_id}/cloud-phone/images/{image_id}",
            delete(images::delete),
        )
        .route(
            "/v1/{project_id}/cloud-phone/images/{image_id}/members",
            get(images::members)
                .post(images::add_member)
                .put(images::update_member),
        )
        .route(
            "/v1/{project_id}/cloud-phone/images/{image_id}/members/{member_id}",
            delete(images::delete_member),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-reset",
            post(phones::batch_reset),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/expand-volume",
            post(phones::expand_volume),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-restart",
            post(phones::batch_restart),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-stop",
            post(phones::batch_stop),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-update-property",
            post(phones::update_property),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-storage",
            post(phones::export),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-restore",
            post(phones::restore),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-migrate",
            post(phones::migrate),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones-traffic",
            post(phones::traffic),
        )
        // adb
        .route(
            "/v1/{project_id}/cloud-phone/phones/commands",
            post(phones::commands),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/sync-commands",
            post(phones::sync_commands),
        )
        .route(
            "/v1/{project_id}/cloud-phone/phones/batch-connection",
            post(connect::connection),
        )
        // jobs, keys, encoding servers
        .route(
            "/v1/{project_id}/cloud-phone/jobs/{job_id}",
            get(jobs::detail),
        )
        .route("/v1/{project_id}/cloud-phone/jobs", get(jobs::list))
        .route(
            "/v1/{project_id}/cloud-phone/servers/open-access",
            put(misc::change_keypair),
        )
        .route(
            "/v1/{project_id}/cloud-phone/encode-servers",
            get(misc::encode_servers_list),
        )
        .route(
            "/v1/{project_id}/cloud-phone/encode-servers/batch-restart",
            post(misc::encode_servers_restart),
        )
        // tags of a resource type's resources
        .route(
            "/v1/{project_id}/{resource_type}/{resource_id}/tags/action",
            post(tags::action),
        )
        .route(
            "/v1/{project_id}/{resource_type}/{resource_id}/tags",
            get(tags::of_resource),
        )
        .route(
            "/v1/{project_id}/{resource_type}/tags",
            get(tags::of_project),
        )
        .route(
            "/v1/{project_id}/{resource_type}/resource_instances/action",
            post(tags::instances),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let iam = Router::new()
        .route("/v3/auth/tokens", post(iam::issue_token))
        .route("/v3/projects", get(iam::projects));
    let agents = Router::new()
        .route("/agent/v1/register", post(agent::register))
        .route("/agent/v1/heartbeat", post(agent::heartbeat))
        .route("/agent/v1/jobs", post(agent::job_reports))
        .route("/metrics", get(metrics::metrics));
    Router::new()
        .merge(cph)
        .merge(iam)
        .merge(agents)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(request_id_layer))
        .with_state(state)
}

/// The state handlers see.
pub type St = State<Shared>;
