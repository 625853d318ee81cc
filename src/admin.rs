//! `cph admin`: projects, credentials and users, written straight into the
//! data dir's store; the fleet's hosts.

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

/// Lists the fleet's hosts as `node_id\thostname\tmodel\tserver_ip\talive|silent\tserver_id|-` lines.
pub fn host_list(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let s = Store::open_dir(data_dir)?;
    Ok(s.nodes()?
        .into_iter()
        .map(|n| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                n.node_id,
                n.hostname,
                n.server_model,
                n.server_ip,
                if n.alive { "alive" } else { "silent" },
                n.server_id.as_deref().unwrap_or("-")
            )
        })
        .collect())
}

/// Takes a silent host out of the fleet, releasing the server on it;
/// the released server's id.
pub fn host_forget(data_dir: &Path, node_id: &str) -> Result<Option<String>, StoreError> {
    Store::open_dir(data_dir)?.forget_node(node_id)
}
