//! Share file systems (the SDK's `AttachShareFilesystem` and
//! `DetachShareFilesystem`, newer than the reference). The operator offers
//! a project a file system mounted at the same directory on every host
//! (`cph admin sharefs create`); attaching it to servers binds it, or a
//! sub-directory of it, read-write into each of their phones at
//! `/data/media/sfs/<id>` (the running phones restart to see it);
//! detaching takes it away. One job per server.

use axum::extract::{Extension, State};
use cph_agent::protocol::{JobKind, ShareFs};
use serde::Deserialize;

use super::extract::Json;
use super::jobs::{submit, Target};
use super::{ApiError, ApiResult, Caller, Reply, Shared};

/// Most servers one call names (the SDK's limit).
pub const MAX_SERVERS: usize = 20;

/// The one type the SDK names.
pub const SFS_TURBO: &str = "sfs_turbo";

#[derive(Deserialize)]
pub struct Body {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    server_ids: Vec<String>,
    #[serde(default)]
    path: Option<String>,
}

/// The servers of the call as job targets (unknown ones as refusals).
fn targets(st: &Shared, c: &Caller, b: &Body, kind: &JobKind) -> Result<Vec<Target>, ApiError> {
    if b.kind != SFS_TURBO {
        return Err(ApiError::Field("type"));
    }
    if b.server_ids.is_empty() {
        return Err(ApiError::ServerIdsEmpty);
    }
    if b.server_ids.len() > MAX_SERVERS {
        return Err(ApiError::TooManyServerIds(MAX_SERVERS));
    }
    let mut out = Vec::new();
    for id in &b.server_ids {
        out.push(match st.store.server(&c.project_id, id)? {
            Some(s) => Target::Server {
                server_id: s.server_id,
                node_id: s.node_id,
                kind: kind.clone(),
            },
            None => Target::Error {
                key: "server_id",
                id: id.clone(),
                err: ApiError::ServerNotFound(id.clone()),
            },
        });
    }
    Ok(out)
}

/// The host directory of `path` in the file system at `source`: `path`
/// is absolute within it (`/` or none for its root), without `..`.
fn directory(source: &str, path: Option<&str>) -> Result<String, ApiError> {
    let path = path.unwrap_or("/");
    let bad = !path.starts_with('/')
        || path.len() > 255
        || path.contains('\0')
        || path.split('/').any(|c| c == ".." || c == ".");
    if bad {
        return Err(ApiError::Field("path"));
    }
    let sub = path.trim_matches('/');
    Ok(if sub.is_empty() {
        source.to_string()
    } else {
        format!("{}/{sub}", source.trim_end_matches('/'))
    })
}

/// `POST /v1/{project_id}/servers/attach-share-filesystem`.
pub async fn attach(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<Body>,
) -> ApiResult {
    let fs = st
        .store
        .share_filesystems(Some(&c.project_id))?
        .into_iter()
        .find(|f| f.fs_id == b.id)
        .ok_or(ApiError::Field("id"))?;
    let kind = JobKind::AttachShareFs {
        fs: ShareFs {
            fs_id: fs.fs_id.clone(),
            source: directory(&fs.source, b.path.as_deref())?,
        },
    };
    let t = targets(&st, &c, &b, &kind)?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

/// `POST /v1/{project_id}/servers/detach-share-filesystem`.
pub async fn detach(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<Body>,
) -> ApiResult {
    if !st
        .store
        .share_filesystems(Some(&c.project_id))?
        .iter()
        .any(|f| f.fs_id == b.id)
    {
        return Err(ApiError::Field("id").into());
    }
    let kind = JobKind::DetachShareFs {
        fs_id: b.id.clone(),
    };
    let t = targets(&st, &c, &b, &kind)?;
    Ok(Reply::ok(submit(&st, &c.project_id, t)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_within_the_file_system() {
        assert_eq!(directory("/srv/sfs", None).ok(), Some("/srv/sfs".into()));
        assert_eq!(
            directory("/srv/sfs/", Some("/")).ok(),
            Some("/srv/sfs/".into())
        );
        assert_eq!(
            directory("/srv/sfs", Some("/games/a/")).ok(),
            Some("/srv/sfs/games/a".into())
        );
        for bad in ["games", "/../etc", "/a/../../b", "/./a", "/a\0b"] {
            assert!(directory("/srv/sfs", Some(bad)).is_err(), "{bad:?}");
        }
    }
}
