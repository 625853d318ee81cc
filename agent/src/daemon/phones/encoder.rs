//! The encoding server of a server whose phone flavor has an
//! `encode_server_spec`: one container per server (the reference's encoding
//! server of type 1, container), from the server's image, limited to the
//! spec's CPUs and memory, on the phone subnet at the encoder address that
//! phones switched to `routing` traffic use as their gateway (forwarding
//! on inside it). Made when the server is created, restarted by the
//! encoding-server restart job, removed with the server, started again
//! after a host reboot. With user namespaces enabled it runs in one of its
//! own, like a phone, its id range kept in `encoders/<name>.json`.

use std::collections::BTreeSet;

use cph_runtime::container::{ContainerError, ContainerSpec, Status, UserNamespace};

use super::{
    container_fail, container_name, io_fail, network_fail, write_atomic, JobFailure, Phones,
    STOP_GRACE,
};
use crate::protocol::EncoderState;

/// The reference's encoding server status codes.
const STATUS_CREATING: i32 = 0;
const STATUS_RUNNING: i32 = 1;
const STATUS_ABNORMAL: i32 = 2;
const STATUS_RESTARTING: i32 = 3;

/// Marks a server's encoder as restarting while it lives.
struct Restarting<'a> {
    phones: &'a Phones,
    server_id: String,
}

impl<'a> Restarting<'a> {
    fn mark(phones: &'a Phones, server_id: &str) -> Self {
        phones
            .encoders_restarting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server_id.to_string());
        Self {
            phones,
            server_id: server_id.to_string(),
        }
    }
}

impl Drop for Restarting<'_> {
    fn drop(&mut self) {
        self.phones
            .encoders_restarting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.server_id);
    }
}

/// Id of a server's encoding container (its volume, network and
/// container are named from it).
pub fn encoder_id(server_id: &str) -> String {
    format!("enc-{server_id}")
}

impl Phones {
    /// Starts the server's encoding container afresh: made the first time
    /// (volume from the server's image, network at the encoder address),
    /// stopped and started again when it exists. CPS.0123 when the
    /// server's flavor has no encoding server.
    pub fn restart_encoder(&self, server_id: &str) -> Result<(), JobFailure> {
        let _restarting = Restarting::mark(self, server_id);
        let server = self.server(server_id)?;
        let spec = server.flavor.encode_server_spec().ok_or_else(|| {
            JobFailure::new(
                "CPS.0123",
                format!(
                    "server {server_id} has no encoding server: flavor {} has no encode_server_spec",
                    server.flavor.flavor_id
                ),
            )
        })?;
        let id = encoder_id(server_id);
        let name = container_name(&id);
        let rootfs = match self.volumes.rootfs(&id) {
            Ok(p) => p,
            Err(_) => self.volumes.create(&id, &server.image, 0)?,
        };
        let netns = match &self.net {
            Some(net) => Some(net.ensure_encoder(&id, spec.ports).map_err(network_fail)?),
            None => None,
        };
        match self.rt.delete(&name, STOP_GRACE) {
            Ok(()) | Err(ContainerError::NotFound { .. }) => {}
            Err(e) => return Err(container_fail(e)),
        }
        let mut c = ContainerSpec::new(&name, &rootfs);
        c.netns = netns;
        c.user_ns = self.encoder_user_ns(&name)?;
        c.cpu_shares = Some(1024 * u64::from(spec.cpus));
        // The spec's CPUs as a quota over the default 100 ms period.
        c.cpu_quota_us = Some(100_000 * i64::from(spec.cpus));
        c.memory_limit = i64::try_from(spec.memory_mb * 1024 * 1024).ok();
        c.pids_limit = Some(4096);
        self.rt.start(&c).map_err(container_fail)?;
        self.wait_ready(&name);
        tracing::info!(server_id, encoder = %name, "encoding server started");
        Ok(())
    }

    /// Removes the server's encoding container, network and volume
    /// (nothing when it has none).
    pub fn remove_encoder(&self, server_id: &str) -> Result<(), JobFailure> {
        let id = encoder_id(server_id);
        match self.rt.delete(&container_name(&id), STOP_GRACE) {
            Ok(()) | Err(ContainerError::NotFound { .. }) => {}
            Err(e) => return Err(container_fail(e)),
        }
        if let Some(net) = &self.net {
            net.remove_phone(&id).map_err(network_fail)?;
        }
        self.volumes.delete(&id)?;
        let kept = self.encoder_ns_file(&container_name(&id));
        match std::fs::remove_file(&kept) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_fail("remove", &kept, e)),
        }
    }

    /// Where the user namespace of the encoding container `name` is kept.
    fn encoder_ns_file(&self, name: &str) -> std::path::PathBuf {
        self.state_dir.join("encoders").join(format!("{name}.json"))
    }

    /// The encoding container's user namespace: the one it was given, or a
    /// new range when user namespaces are enabled (`None` otherwise).
    fn encoder_user_ns(&self, name: &str) -> Result<Option<UserNamespace>, JobFailure> {
        let path = self.encoder_ns_file(name);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let kept = serde_json::from_str(&text).map_err(|e| io_fail("decode", &path, e))?;
            return Ok(Some(kept));
        }
        let _ids = self.id_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ns) = self.new_id_range(name)? else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_fail("create", dir, e))?;
        }
        let bytes = serde_json::to_vec(&ns).map_err(|e| io_fail("encode", &path, e))?;
        write_atomic(&path, &bytes).map_err(|e| io_fail("write", &path, e))?;
        Ok(Some(ns))
    }

    /// Host id ranges the encoding containers hold.
    pub(super) fn encoder_id_ranges(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("encoders")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<UserNamespace>(&t).ok())
            .map(|u| u.host_id)
            .collect()
    }

    /// Whether the server's flavor has an encoding server and it runs.
    pub fn encoder_running(&self, server_id: &str) -> Result<bool, JobFailure> {
        if self
            .server(server_id)?
            .flavor
            .encode_server_spec()
            .is_none()
        {
            return Ok(false);
        }
        let name = container_name(&encoder_id(server_id));
        Ok(matches!(
            self.rt.state(&name).map(|s| s.status),
            Ok(Status::Running)
        ))
    }

    /// The encoding servers of the recorded servers and their status.
    pub fn encoder_states(&self) -> Vec<EncoderState> {
        let servers = self.servers_with_encoder();
        let restarting = self
            .encoders_restarting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        servers
            .into_iter()
            .map(|server_id| {
                let name = container_name(&encoder_id(&server_id));
                let status = match self.rt.state(&name).map(|s| s.status) {
                    _ if restarting.contains(&server_id) => STATUS_RESTARTING,
                    Ok(Status::Running) => STATUS_RUNNING,
                    Err(ContainerError::NotFound { .. }) => STATUS_CREATING,
                    _ => STATUS_ABNORMAL,
                };
                let access_infos = self
                    .net
                    .as_ref()
                    .map(|n| n.access_infos(&encoder_id(&server_id)))
                    .unwrap_or_default();
                EncoderState {
                    server_id,
                    status,
                    access_infos,
                }
            })
            .collect()
    }

    /// The recorded servers whose flavor has an encoding server.
    pub(super) fn servers_with_encoder(&self) -> Vec<String> {
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.flavor.encode_server_spec().is_some())
            .map(|s| s.server_id.clone())
            .collect()
    }

    /// Ids of the encoding containers the recorded servers should have.
    pub(super) fn encoder_ids(&self) -> BTreeSet<String> {
        self.servers_with_encoder()
            .iter()
            .map(|s| encoder_id(s))
            .collect()
    }

    /// After an agent restart: encoding containers that should run but do
    /// not (host reboot) are started again.
    pub(super) fn reconcile_encoders(&self) {
        let servers = self.servers_with_encoder();
        for server_id in servers {
            let name = container_name(&encoder_id(&server_id));
            if matches!(self.rt.state(&name).map(|s| s.status), Ok(Status::Running)) {
                continue;
            }
            if let Err(e) = self.restart_encoder(&server_id) {
                tracing::warn!(server_id, error = %e, "encoding server not restarted");
            }
        }
    }
}
