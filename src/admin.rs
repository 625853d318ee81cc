//! `cph admin`: projects, credentials, users and keypairs, written straight
//! into the data dir's store; the fleet's hosts; scheduled events on servers.

use std::path::Path;

use crate::store::{Store, StoreError};

/// Creates a project and prints its id.
pub fn project_create(data_dir: &Path, name: &str) -> Result<String, StoreError> {
    let s = Store::open_dir(data_dir)?;
    Ok(s.create_project(name)?.project_id)
}

/// Lists projects as `id\tname` lines.
pub fn project_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let s = Store::open_dir(data_dir)?;
    Ok(s.projects()?
        .into_iter()
        .map(|p| format!("{}\t{}", p.project_id, p.name))
        .collect())
}

/// Creates an AK/SK for a project given by id or name.
pub fn credential_create(
    data_dir: &Path,
    project: &str,
) -> Result<(String, String, String), StoreError> {
    let s = Store::open_dir(data_dir)?;
    let p = s
        .project(project)?
        .ok_or_else(|| StoreError::ProjectNotFound(project.to_string()))?;
    let (ak, sk) = s.create_credential(&p.project_id)?;
    Ok((p.project_id, ak, sk))
}

/// Creates (or resets) a password user in a project.
pub fn user_create(
    data_dir: &Path,
    name: &str,
    password: &str,
    project: &str,
) -> Result<String, StoreError> {
    let s = Store::open_dir(data_dir)?;
    let p = s
        .project(project)?
        .ok_or_else(|| StoreError::ProjectNotFound(project.to_string()))?;
    s.create_user(name, password, &p.project_id)?;
    Ok(p.project_id)
}

/// Stores a keypair's public key for a project.
pub fn keypair_create(
    data_dir: &Path,
    project: &str,
    name: &str,
    public_key: &str,
) -> Result<(), StoreError> {
    let s = Store::open_dir(data_dir)?;
    let p = s
        .project(project)?
        .ok_or_else(|| StoreError::ProjectNotFound(project.to_string()))?;
    s.put_keypair(&p.project_id, name, public_key)
}

/// Why a keypair was not stored.
#[derive(Debug, thiserror::Error)]
pub enum KeypairError {
    #[error(
        "not an OpenSSH public key (one line `<type> <base64> [comment]`, type ssh-*, \
         ecdsa-* or sk-*, at most 16 KiB)"
    )]
    NotAPublicKey,
    #[error("keypair name {0:?} is invalid: 1 to 64 letters, digits, '-' or '_'")]
    Name(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks and stores a keypair of a project (replacing one of the same
/// name): an OpenSSH public key, one line of at most 16 KiB
/// (`<type> <base64> [comment]`), as the servers' SSH access and the phones'
/// ADB take it.
pub fn keypair_add(
    data_dir: &Path,
    project: &str,
    name: &str,
    public_key: &str,
) -> Result<(), KeypairError> {
    let key = public_key.trim();
    let mut words = key.split_whitespace();
    let (kind, body) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if !known || body.is_empty() || key.contains('\n') || key.len() > 16 * 1024 {
        return Err(KeypairError::NotAPublicKey);
    }
    if !crate::api::validate::is_keypair_name(name) {
        return Err(KeypairError::Name(name.to_string()));
    }
    Ok(keypair_create(data_dir, project, name, key)?)
}

/// Lists every project's keypairs as `project_id\tkeypair_name` lines.
pub fn keypair_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    Ok(Store::open_dir(data_dir)?
        .keypairs()?
        .into_iter()
        .map(|(p, n)| format!("{p}\t{n}"))
        .collect())
}

/// Lists the fleet's hosts as
/// `node_id\thostname\tmodel\tserver_ip\talive|silent\tserver_id|-\treleasing|-\tcordoned|-`
/// lines, `releasing` the server switched away whose phones the host still
/// holds.
pub fn host_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let s = Store::open_dir(data_dir)?;
    Ok(s.nodes()?
        .into_iter()
        .map(|n| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                n.node_id,
                n.hostname,
                n.server_model,
                n.server_ip,
                if n.alive { "alive" } else { "silent" },
                n.server_id.as_deref().unwrap_or("-"),
                n.releasing_server.as_deref().unwrap_or("-"),
                if n.cordoned { "cordoned" } else { "-" }
            )
        })
        .collect())
}

/// Keeps a host out of sale, or puts it back on sale.
pub fn host_cordon(data_dir: &Path, node_id: &str, cordoned: bool) -> Result<(), StoreError> {
    if Store::open_dir(data_dir)?.cordon(node_id, cordoned)? {
        Ok(())
    } else {
        Err(StoreError::NodeNotFound(node_id.to_string()))
    }
}

/// Takes a silent host out of the fleet, releasing the server on it;
/// the released server's id. The host's unfinished jobs fail with their
/// effects (an image being made from one of its phones reads failed).
pub fn host_forget(data_dir: &Path, node_id: &str) -> Result<Option<String>, StoreError> {
    let store = Store::open_dir(data_dir)?;
    let gone = store.forget_node(node_id)?;
    crate::dispatch::after_failures(&store, &gone.failed_jobs);
    Ok(gone.server_id)
}

/// Announces maintenance of a server's host to its project: the event is
/// inquiring until the project authorizes it, and starts by itself
/// `deadline_hours` from now if it does not. Its id.
pub fn event_create(
    data_dir: &Path,
    server_id: &str,
    kind: &str,
    description: &str,
    deadline_hours: u32,
) -> Result<String, crate::events::EventError> {
    let s = Store::open_dir(data_dir)?;
    let server = s
        .server_by_id(server_id)?
        .ok_or_else(|| crate::events::EventError::NotFound(format!("(server {server_id})")))?;
    let id = crate::store::new_id();
    let now = crate::store::now_ms();
    s.insert_event(&crate::store::NewEvent {
        event_id: &id,
        project_id: &server.project_id,
        server_id,
        kind,
        description,
        publish_ms: now,
        not_before_deadline_ms: now + i64::from(deadline_hours) * 3_600_000,
    })?;
    Ok(id)
}

/// Lists every project's events as
/// `event_id\tproject_id\tserver_id\ttype\tstate\tnot_before|-` lines.
pub fn event_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let s = Store::open_dir(data_dir)?;
    let (events, _, _) = s.list_events(None, &Default::default(), None, usize::MAX)?;
    Ok(events
        .into_iter()
        .map(|e| {
            let at = e.not_before_ms.map_or("-".to_string(), |ms| {
                crate::store::utc_string(ms.div_euclid(1000))
            });
            format!(
                "{}\t{}\t{}\t{}\t{}\t{at}",
                e.event_id, e.project_id, e.server_id, e.kind, e.state
            )
        })
        .collect())
}

/// Ends an executing event: its phones start again.
pub fn event_complete(data_dir: &Path, event_id: &str) -> Result<usize, crate::events::EventError> {
    let s = Store::open_dir(data_dir)?;
    Ok(crate::events::complete(&s, event_id)?.stopped_phones.len())
}

/// Cancels an event that has not started.
pub fn event_cancel(data_dir: &Path, event_id: &str) -> Result<(), crate::events::EventError> {
    crate::events::cancel(&Store::open_dir(data_dir)?, event_id)
}

/// Writes a consistent copy of the control plane's database to `to` (it may
/// run meanwhile). Restore: stop `cph serve`, put the copy in place of
/// `<data-dir>/cph.db` (and remove `cph.db-wal`, `cph.db-shm`), start it.
pub fn backup(data_dir: &Path, to: &Path) -> Result<(), StoreError> {
    Store::open_dir(data_dir)?.backup(to)
}

/// Offers a project a share file system: `source`, a directory every host
/// has (where the operator mounted the file system); its id (`id`, or a new
/// one).
pub fn sharefs_create(
    data_dir: &Path,
    project: &str,
    source: &Path,
    id: Option<&str>,
) -> Result<String, StoreError> {
    let s = Store::open_dir(data_dir)?;
    let p = s
        .project(project)?
        .ok_or_else(|| StoreError::ProjectNotFound(project.to_string()))?;
    let invalid = |why: &str| StoreError::DataDir {
        path: source.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    };
    if !source.is_absolute() || source.to_str().is_none() {
        return Err(invalid("the source must be an absolute UTF-8 path"));
    }
    let fs_id = id.map_or_else(crate::store::new_id, str::to_string);
    if !cph_agent::protocol::is_share_fs_id(&fs_id) {
        return Err(invalid(
            "the id must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let fs = crate::store::ShareFilesystem {
        fs_id: fs_id.clone(),
        project_id: p.project_id,
        kind: "sfs_turbo".into(),
        source: source.to_string_lossy().into_owned(),
        create_time: crate::store::now_string(),
    };
    if !s.insert_share_fs(&fs)? {
        return Err(invalid("the id is taken"));
    }
    Ok(fs_id)
}

/// `fs_id\tproject_id\ttype\tsource` lines.
pub fn sharefs_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    Ok(Store::open_dir(data_dir)?
        .share_filesystems(None)?
        .into_iter()
        .map(|f| format!("{}\t{}\t{}\t{}", f.fs_id, f.project_id, f.kind, f.source))
        .collect())
}
