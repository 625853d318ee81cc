//! The phones of this host: servers and phones recorded under
//! `<state>/servers/<id>.json` and `<state>/phones/<id>.json`, each phone a
//! `cph-runtime` container named `cph-<phone_id>` whose state lives in
//! `<state>/containers` (so a restarted agent re-adopts running phones: the
//! runtime reads the same state directory and the shims kept running).
//!
//! Volumes ([`super::volumes`]): a phone's rootfs is a copy-on-write volume
//! of the storage pool cloned from its image (imported once per image id),
//! sized by the flavor's `disk_gb`; a reset clones it again, a delete drops
//! it. The sharepool's `files/` and `apps/` are bind-mounted into every phone.
//!
//! Network ([`super::network`], when enabled): the phone's namespace, veth,
//! address, port mappings and bandwidth class are made before its container
//! first starts, and the container joins that namespace; `access_infos` are
//! read from the network state. `com.cph.bandwidth_limit` is applied to the
//! phone's class at create and on every property change.
//!
//! Placement: the flavor's `core_bind_strategy` planned over the host's
//! topology and kept in `<state>/placement.json`; a phone takes the slot the
//! control plane gave it.
//!
//! Properties: checked against the reference's attribute list (A.1); all are
//! set with `setprop` when the phone starts; on an update of a running phone
//! those not starting with `ro.` are set at once, the others at next start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cph_runtime::container::{
    ContainerError, ContainerSpec, ExecOutput, Runtime, Status, UserNamespace,
};
use cph_runtime::placement::{self, PlanRequest, Slot, Topology};
use cph_runtime::storage::{SharePaths, ShareUsage};
use serde::{Deserialize, Serialize};

use super::jobstore::write_atomic;
use super::network::{network_fail, Network};
use super::volumes::Volumes;
use super::JobFailure;
use crate::config::UserNamespacesConfig;
use crate::property;
use crate::protocol::{
    CreateServer, ImageRef, PhoneFlavor, PhoneRunState, PhoneSpec, PhoneState, ShareFs,
    SHARE_FS_DIR,
};

/// Grace a phone gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Phones a server deletion removes at once.
const PARALLEL_DELETES: usize = 8;

/// What the agent keeps of a phone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneRecord {
    pub spec: PhoneSpec,
    pub server_id: String,
    pub image: ImageRef,
    /// A transient state (creating, resetting...) shown instead of the container's.
    #[serde(default)]
    pub phase: Option<PhoneRunState>,
    /// Why the last lifecycle step failed.
    #[serde(default)]
    pub failure: Option<String>,
    /// Whether the phone was stopped on purpose.
    #[serde(default)]
    pub stopped: bool,
    /// Stopped by a job that starts it again when done (restart, restore,
    /// migration, custom image): an agent killed before then starts the
    /// phone at its own next start instead of leaving it stopped.
    #[serde(default)]
    pub resume: bool,
    #[serde(default)]
    pub traffic_type: String,
    /// The phone's own user namespace (kept for its life), or `None` when
    /// it runs as host root.
    #[serde(default)]
    pub user_ns: Option<UserNamespace>,
    /// Its volume was made: a create done again after a later failure (a
    /// restart's) starts the phone rather than making its volume anew.
    /// Records from before the field were made.
    #[serde(default = "made_before")]
    pub made: bool,
    /// The step [`PhoneRecord::failure`] comes from (a reset, a restart),
    /// so a phone left down by it reads as that step failed.
    #[serde(default)]
    pub failed_in: Option<PhoneRunState>,
    /// `persist.*` properties to set at the next start: those of a phone
    /// whose data is new (made, reset) and those given while it was
    /// stopped. Android keeps them across starts itself
    /// ([`property::persistent`]).
    #[serde(default)]
    pub pending_persist: BTreeSet<String>,
}

/// The `persist.*` names of `property`.
fn persistent_names(property: &BTreeMap<String, String>) -> BTreeSet<String> {
    property
        .keys()
        .filter(|k| property::persistent(k))
        .cloned()
        .collect()
}

fn made_before() -> bool {
    true
}

/// The phone registry over a container runtime.
pub struct Phones {
    state_dir: PathBuf,
    rt: Runtime,
    records: Mutex<HashMap<String, PhoneRecord>>,
    servers: Mutex<HashMap<String, CreateServer>>,
    /// Serializes placement planning (one checkpoint file).
    plan_lock: Mutex<()>,
    volumes: Volumes,
    /// `None` when networking is off or the host lacks it.
    net: Option<Network>,
    /// Servers whose encoding container is being (re)started.
    encoders_restarting: Mutex<BTreeSet<String>>,
    /// New phones' user namespaces, when enabled.
    user_namespaces: Option<UserNamespacesConfig>,
    /// Held while a new phone's id range is chosen and recorded.
    id_lock: Mutex<()>,
    /// Phones a job is working on ([`Phones::hold`]), and the wake-up of
    /// those waiting for one.
    busy: Mutex<BTreeSet<String>>,
    freed: std::sync::Condvar,
    /// Read-held while an image is imported and a phone recorded on it;
    /// write-held while unused images are removed, so none is removed
    /// between its import and its first use.
    image_use: RwLock<()>,
    /// The fleet's node token, from which each phone's connection key is
    /// derived ([`crate::connect`]); `None` writes no key.
    connect_secret: Option<String>,
}

/// The first id range `first + n * size` no phone in `used` has; `None`
/// when the host ids run out.
fn free_id_range(used: &BTreeSet<u32>, cfg: &UserNamespacesConfig) -> Option<UserNamespace> {
    let size = cfg.ids_per_phone.max(1);
    (0u64..)
        .map(|n| u64::from(cfg.first_host_id.max(1)) + n * u64::from(size))
        .take_while(|start| start + u64::from(size) <= u64::from(u32::MAX))
        .filter_map(|start| u32::try_from(start).ok())
        .find(|start| !used.contains(start))
        .map(|host_id| UserNamespace { host_id, size })
}

mod encoder;
pub use encoder::encoder_id;

fn io_fail(what: &str, path: &Path, e: impl std::fmt::Display) -> JobFailure {
    JobFailure::internal(format!("{what} {}: {e}", path.display()))
}

/// The placement a flavor asks for, with room for at least `slots` slots.
fn plan_request(flavor: &PhoneFlavor, slots: u32) -> PlanRequest {
    PlanRequest {
        strategy: flavor.core_bind_strategy.clone(),
        capacity: flavor.phone_capacity.max(slots),
        vcpus: flavor.vcpus.max(1),
        memory_mb: 0,
        reserved: None,
    }
}

/// A phone's state and what it has used.
pub struct PhoneUsage {
    pub state: PhoneState,
    /// From its cgroup.
    pub usage: cph_runtime::container::Usage,
    /// Bytes (received, sent) on its network, when it has one.
    pub traffic: Option<(u64, u64)>,
}

/// Longest phone id: its container's name is `cph-` and the id whole.
pub const PHONE_ID_MAX: usize = 48;

/// A phone id a new phone may have: 1 to [`PHONE_ID_MAX`] ASCII letters,
/// digits or `-`, so its container, network and volume names are the id
/// itself and two phones never share them (the control plane makes 32 hex
/// digits).
pub fn valid_phone_id(id: &str) -> bool {
    (1..=PHONE_ID_MAX).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The container name of a phone.
pub fn container_name(phone_id: &str) -> String {
    prefixed_name("cph-", phone_id)
}

/// `prefix` and the phone id made safe for a name (at most 48 of its
/// characters, each other than ASCII letters, digits and `-` as `-`).
pub fn prefixed_name(prefix: &str, phone_id: &str) -> String {
    let clean: String = phone_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    format!("{prefix}{clean}")
}

fn container_fail(e: ContainerError) -> JobFailure {
    match e {
        ContainerError::NotRunning { .. } => JobFailure::new("CPS.0141", e.to_string()),
        ContainerError::NotFound { .. } => JobFailure::new("CPS.0005", e.to_string()),
        other => JobFailure::internal(other.to_string()),
    }
}

fn read_dir_json<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&p).map(|b| serde_json::from_slice::<T>(&b)) {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(err)) => tracing::warn!(path = %p.display(), error = %err, "record skipped"),
            Err(err) => tracing::warn!(path = %p.display(), error = %err, "record unreadable"),
        }
    }
    out
}

impl Phones {
    /// Opens the registry over prepared volumes and the network (if any);
    /// running containers are re-adopted by the runtime.
    pub fn open(
        state_dir: &Path,
        cgroup_parent: &str,
        shim: &Path,
        volumes: Volumes,
        net: Option<Network>,
    ) -> Result<Self, JobFailure> {
        let rt = Runtime::new(&state_dir.join("containers"), cgroup_parent, shim)
            .map_err(container_fail)?;
        for d in ["phones", "servers"] {
            let p = state_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| io_fail("create", &p, e))?;
        }
        let mut records = HashMap::new();
        for mut r in read_dir_json::<PhoneRecord>(&state_dir.join("phones")) {
            // A phone a killed agent's job had stopped for a while runs.
            if std::mem::take(&mut r.resume) {
                r.stopped = false;
            }
            // A transient phase left by a killed agent is over.
            if let Some(phase) = r.phase.take() {
                // A phone half made, half reset or half deleted is not
                // booted again; it reads failed until made, reset or
                // deleted anew.
                if matches!(
                    phase,
                    PhoneRunState::Creating | PhoneRunState::Resetting | PhoneRunState::Deleting
                ) {
                    r.failure = Some(format!("{phase:?} interrupted by an agent restart"));
                }
            }
            records.insert(r.spec.phone_id.clone(), r);
        }
        let servers = read_dir_json::<CreateServer>(&state_dir.join("servers"))
            .into_iter()
            .map(|s| (s.server_id.clone(), s))
            .collect();
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            rt,
            records: Mutex::new(records),
            servers: Mutex::new(servers),
            plan_lock: Mutex::new(()),
            volumes,
            net,
            encoders_restarting: Mutex::new(BTreeSet::new()),
            user_namespaces: None,
            id_lock: Mutex::new(()),
            busy: Mutex::new(BTreeSet::new()),
            freed: std::sync::Condvar::new(),
            image_use: RwLock::new(()),
            connect_secret: None,
        })
    }

    /// Each phone gets its connection key, derived from `node_token`, at
    /// every start (none when the token is empty).
    pub fn with_connect_secret(mut self, node_token: &str) -> Self {
        self.connect_secret = (!node_token.is_empty()).then(|| node_token.to_string());
        self
    }

    /// New phones get user namespaces of their own per `cfg` (when enabled).
    pub fn with_user_namespaces(mut self, cfg: &UserNamespacesConfig) -> Self {
        self.user_namespaces = cfg.enabled.then(|| cfg.clone());
        self
    }

    /// Deletes every phone (container, volume, network) and any container
    /// left without a record, then takes the phone network and the pool's
    /// mounts off the host. Returns the deleted phones' ids.
    pub fn purge(&self) -> Result<Vec<String>, JobFailure> {
        let mut ids: Vec<String> = self.records().keys().cloned().collect();
        ids.sort();
        for id in &ids {
            self.delete(id)?;
        }
        for server_id in self.server_ids() {
            self.remove_encoder(&server_id)?;
        }
        for c in self.rt.list().map_err(container_fail)? {
            match self.rt.delete(&c.name, STOP_GRACE) {
                Ok(()) | Err(ContainerError::NotFound { .. }) => {}
                Err(e) => return Err(container_fail(e)),
            }
        }
        if let Some(net) = &self.net {
            net.teardown().map_err(network_fail)?;
        }
        self.volumes.teardown()?;
        self.rt.release_parent();
        Ok(ids)
    }

    /// The phone network, when this agent has one.
    pub fn network(&self) -> Option<&Network> {
        self.net.as_ref()
    }

    /// The container runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, PhoneRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, rec: &PhoneRecord) -> Result<(), JobFailure> {
        let path = self
            .state_dir
            .join("phones")
            .join(format!("{}.json", container_name(&rec.spec.phone_id)));
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| io_fail("encode", &path, e))?;
        write_atomic(&path, &bytes).map_err(|e| io_fail("write", &path, e))?;
        self.records()
            .insert(rec.spec.phone_id.clone(), rec.clone());
        Ok(())
    }

    fn update(
        &self,
        phone_id: &str,
        f: impl FnOnce(&mut PhoneRecord),
    ) -> Result<PhoneRecord, JobFailure> {
        let mut rec = self.record(phone_id)?;
        f(&mut rec);
        self.save(&rec)?;
        Ok(rec)
    }

    /// A phone's record.
    pub fn record(&self, phone_id: &str) -> Result<PhoneRecord, JobFailure> {
        self.records().get(phone_id).cloned().ok_or_else(|| {
            JobFailure::new("CPS.0005", format!("phone {phone_id} is not on this host"))
        })
    }

    /// Records a server (idempotent: the same id replaces its record) and
    /// caps the sharepool at its flavor's `max_share_disk_size_g`.
    pub fn put_server(&self, server: &CreateServer) -> Result<(), JobFailure> {
        if let Some(gb) = server.flavor.max_share_disk_gb() {
            self.volumes.set_share_limit_gb(gb)?;
        }
        let path = self
            .state_dir
            .join("servers")
            .join(format!("{}.json", container_name(&server.server_id)));
        let bytes = serde_json::to_vec_pretty(server).map_err(|e| io_fail("encode", &path, e))?;
        write_atomic(&path, &bytes).map_err(|e| io_fail("write", &path, e))?;
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server.server_id.clone(), server.clone());
        Ok(())
    }

    /// A recorded server.
    pub fn server(&self, server_id: &str) -> Result<CreateServer, JobFailure> {
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(server_id)
            .cloned()
            .ok_or_else(|| {
                JobFailure::new(
                    "CPS.0159",
                    format!("server {server_id} is not on this host"),
                )
            })
    }

    /// Forgets a server whose phones are gone.
    pub fn remove_server(&self, server_id: &str) -> Result<(), JobFailure> {
        let path = self
            .state_dir
            .join("servers")
            .join(format!("{}.json", container_name(server_id)));
        let _ = std::fs::remove_file(&path);
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
        Ok(())
    }

    /// Removes a server from this host: its phones, a few at a time, then
    /// its encoding server, its placement and its record. A phone that
    /// cannot be deleted fails the whole and keeps the record, so the
    /// deletion can be done again. Returns how many phones were deleted.
    /// Held by a job while it imports an image and records a phone on it.
    pub fn image_use(&self) -> RwLockReadGuard<'_, ()> {
        self.image_use.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the images of `candidates` imported from the object store
    /// (custom images) that no phone or server of the host uses any more;
    /// the ids removed. The catalog's `file://` images stay for the next
    /// server.
    pub(super) fn drop_unused_images(
        &self,
        candidates: &[ImageRef],
    ) -> Result<Vec<String>, JobFailure> {
        let _g = self.image_use.write().unwrap_or_else(|p| p.into_inner());
        let mut in_use: BTreeSet<String> = self
            .records()
            .values()
            .map(|r| r.image.image_id.clone())
            .collect();
        in_use.extend(
            self.servers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|s| s.image.image_id.clone()),
        );
        let unused: BTreeSet<&str> = candidates
            .iter()
            .filter(|i| i.url.starts_with("obs://") && !in_use.contains(&i.image_id))
            .map(|i| i.image_id.as_str())
            .collect();
        let mut removed = Vec::new();
        for id in unused {
            if self.volumes.has_image(id)? {
                self.volumes.delete_image(id)?;
                tracing::info!(image_id = %id, "unused image removed");
                removed.push(id.to_string());
            }
        }
        Ok(removed)
    }

    /// Deletes a server's phones, encoding server, placement and record,
    /// then the custom images only it used; the phones deleted and the
    /// images removed.
    pub fn delete_server(&self, server_id: &str) -> Result<(usize, Vec<String>), JobFailure> {
        let phones = self.phones_of(server_id);
        let mut images: Vec<ImageRef> = phones
            .iter()
            .filter_map(|p| self.record(p).ok().map(|r| r.image))
            .collect();
        images.extend(self.server(server_id).ok().map(|s| s.image));
        let queue = Mutex::new(phones.iter());
        let failure: Mutex<Option<JobFailure>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..phones.len().min(PARALLEL_DELETES) {
                s.spawn(|| loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some(phone) = next else { break };
                    // After the job the phone runs, if any.
                    let _held = self.hold(phone);
                    if let Err(e) = self.delete(phone) {
                        tracing::warn!(phone_id = %phone, error = %e.msg, "phone not deleted");
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        // Whatever the flavor says now: a flavor change whose removal of
        // the encoding server failed left it behind (a no-op without one).
        self.remove_encoder(server_id)?;
        let placement = self.placement_path(server_id);
        if let Err(e) = std::fs::remove_file(&placement) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(JobFailure::internal(format!(
                    "remove {}: {e}",
                    placement.display()
                )));
            }
        }
        self.remove_server(server_id)?;
        let removed = self.drop_unused_images(&images)?;
        Ok((phones.len(), removed))
    }

    /// Gives a server a new flavor ([`crate::protocol::JobKind::ChangeFlavor`]);
    /// the `execute_msg`. Nothing changes when the flavor has room for
    /// fewer phones than the server has or its placement does not fit the
    /// host (`CPS.0257`). Once recorded, a phone that does not restart is
    /// named in the message and shows as failed; it takes the flavor at
    /// its next start like a stopped one.
    pub fn change_flavor(
        &self,
        server_id: &str,
        flavor: &PhoneFlavor,
    ) -> Result<String, JobFailure> {
        let mut server = self.server(server_id)?;
        let phones = self.phones_of(server_id);
        let unsupported = |why: String| {
            JobFailure::new(
                "CPS.0257",
                format!(
                    "phone model {} cannot run server {server_id}: {why}",
                    flavor.flavor_id
                ),
            )
        };
        if (flavor.phone_capacity as usize) < phones.len() {
            return Err(unsupported(format!(
                "it holds {} phones, the server has {}",
                flavor.phone_capacity,
                phones.len()
            )));
        }
        {
            let _g = self.plan_lock.lock().unwrap_or_else(|p| p.into_inner());
            let topo = Topology::discover(Path::new("/sys"))
                .map_err(|e| JobFailure::internal(e.to_string()))?;
            placement::plan(&topo, &plan_request(flavor, 1))
                .map_err(|e| unsupported(format!("its placement does not fit this host: {e}")))?;
        }
        let was = std::mem::replace(&mut server.flavor, flavor.clone());
        self.put_server(&server)?;
        tracing::info!(server_id, flavor = %flavor.flavor_id, was = %was.flavor_id, "server flavor changed");
        let mut msg = format!(
            "server {server_id}: flavor {} (was {})",
            flavor.flavor_id, was.flavor_id
        );
        let (restarted, mut failed) = self.restart_running(&phones, |phone| {
            self.volumes.raise_to(phone, flavor.disk_gb)
        });
        msg.push_str(&format!(", {restarted} running phones restarted on it"));
        let had_encoder = self.servers_with_encoder().iter().any(|s| s == server_id);
        let encoder = match (had_encoder, flavor.encode_server_spec().is_some()) {
            (_, true) => self
                .restart_encoder(server_id)
                .map(|()| Some("encoding server started")),
            (true, false) => self
                .remove_encoder(server_id)
                .map(|()| Some("encoding server removed")),
            (false, false) => Ok(None),
        };
        match encoder {
            Ok(Some(what)) => msg.push_str(&format!(", {what}")),
            Ok(None) => {}
            Err(e) => failed.push(format!("encoding server ({})", e.msg)),
        }
        if !failed.is_empty() {
            msg.push_str(&format!("; not applied yet: {}", failed.join(", ")));
        }
        Ok(msg)
    }

    /// Waits until no other job works on `phone`, and keeps others off it
    /// until the guard drops: a phone's own jobs run one at a time from its
    /// queue, and a server's job that restarts its phones takes each in
    /// turn this way, never in the middle of a phone's job.
    pub fn hold(&self, phone: &str) -> PhoneHeld<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(phone) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(phone.to_string());
        PhoneHeld {
            phones: self,
            phone: phone.to_string(),
        }
    }

    /// Restarts a server (`RestartCloudPhoneServer`): every phone of it,
    /// stopped ones included (a server restart brings all of them up), and
    /// its encoding server. Fails naming the phones that did not start.
    pub fn restart_server(&self, server_id: &str) -> Result<String, JobFailure> {
        self.server(server_id)?;
        let phones = self.phones_of(server_id);
        let mut failed: Vec<(String, JobFailure)> = Vec::new();
        for phone in &phones {
            let _held = self.hold(phone);
            if let Err(e) = self.restart(phone, None, None) {
                tracing::warn!(phone_id = %phone, error = %e.msg, "phone not restarted with its server");
                failed.push((phone.clone(), e));
            }
        }
        let mut msg = format!(
            "server {server_id}: {} phones restarted",
            phones.len() - failed.len()
        );
        if self.servers_with_encoder().iter().any(|s| s == server_id) {
            match self.restart_encoder(server_id) {
                Ok(()) => msg.push_str(", encoding server restarted"),
                Err(e) => failed.push(("encoding server".into(), e)),
            }
        }
        match failed.first() {
            None => Ok(msg),
            Some((_, first)) => {
                let names: Vec<String> = failed
                    .iter()
                    .map(|(what, e)| format!("{what} ({})", e.msg))
                    .collect();
                Err(JobFailure {
                    code: first.code.clone(),
                    msg: format!("{msg}; not restarted: {}", names.join(", ")),
                    execute_msg: None,
                })
            }
        }
    }

    /// Restarts those of `phones` that run, after `prepare` of each phone
    /// (stopped ones take the change at their next start); how many were
    /// restarted and `phone (reason)` of each that failed.
    fn restart_running(
        &self,
        phones: &[String],
        prepare: impl Fn(&str) -> Result<(), JobFailure>,
    ) -> (usize, Vec<String>) {
        let mut restarted = 0;
        let mut failed = Vec::new();
        for phone in phones {
            let _held = self.hold(phone);
            let applied = prepare(phone).and_then(|()| {
                match self.rt.state(&container_name(phone)).map(|s| s.status) {
                    Ok(Status::Running) => self.restart(phone, None, None).map(|()| true),
                    _ => Ok(false),
                }
            });
            match applied {
                Ok(true) => restarted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(phone_id = %phone, error = %e.msg, "phone not restarted on the change");
                    failed.push(format!("{phone} ({})", e.msg));
                }
            }
        }
        (restarted, failed)
    }

    /// Attaches a share file system to a server (or moves it to another
    /// directory): recorded, and the running phones restarted to see it at
    /// [`SHARE_FS_DIR`]`/<fs_id>`. The source must be a directory of this
    /// host (`CPS.0104` otherwise).
    pub fn attach_share_fs(&self, server_id: &str, fs: &ShareFs) -> Result<String, JobFailure> {
        if !crate::protocol::is_share_fs_id(&fs.fs_id) {
            return Err(JobFailure::new(
                "CPS.0001",
                format!("share file system id {:?} is invalid", fs.fs_id),
            ));
        }
        let source = Path::new(&fs.source);
        if !source.is_absolute() || !source.is_dir() {
            return Err(JobFailure::new(
                "CPS.0104",
                format!(
                    "share file system {}: {} is not a directory of this host",
                    fs.fs_id, fs.source
                ),
            ));
        }
        let mut server = self.server(server_id)?;
        server.share_filesystems.retain(|f| f.fs_id != fs.fs_id);
        server.share_filesystems.push(fs.clone());
        self.share_fs_changed(
            &server,
            &format!(
                "share file system {} attached at {SHARE_FS_DIR}/{}",
                fs.fs_id, fs.fs_id
            ),
        )
    }

    /// Detaches a share file system from a server: its record dropped and
    /// the running phones restarted without it (`CPS.0001` when it is not
    /// attached).
    pub fn detach_share_fs(&self, server_id: &str, fs_id: &str) -> Result<String, JobFailure> {
        let mut server = self.server(server_id)?;
        let before = server.share_filesystems.len();
        server.share_filesystems.retain(|f| f.fs_id != fs_id);
        if server.share_filesystems.len() == before {
            return Err(JobFailure::new(
                "CPS.0001",
                format!("share file system {fs_id} is not attached to server {server_id}"),
            ));
        }
        self.share_fs_changed(&server, &format!("share file system {fs_id} detached"))
    }

    /// Records the server's share file systems and restarts its running
    /// phones on them; the message.
    fn share_fs_changed(&self, server: &CreateServer, what: &str) -> Result<String, JobFailure> {
        self.put_server(server)?;
        let phones = self.phones_of(&server.server_id);
        let (restarted, failed) = self.restart_running(&phones, |_| Ok(()));
        let mut msg = format!("{what}; {restarted} running phones restarted");
        if !failed.is_empty() {
            msg.push_str(&format!("; not restarted: {}", failed.join(", ")));
        }
        Ok(msg)
    }

    /// Ids of the servers on this host.
    pub fn server_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Ids of a server's phones.
    pub fn phones_of(&self, server_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .records()
            .values()
            .filter(|r| r.server_id == server_id)
            .map(|r| r.spec.phone_id.clone())
            .collect();
        v.sort();
        v
    }

    /// The phone's root filesystem on the host: its volume's rootfs
    /// (CPS.0005 when the phone has no volume).
    pub fn rootfs(&self, phone_id: &str) -> Result<PathBuf, JobFailure> {
        self.volumes.rootfs(phone_id)
    }

    /// Imports an image into the pool from a tar or tar.gz stream, unless it
    /// is there already: the hook for images that are not `file://`
    /// archives (the object store's `obs://`).
    /// Whether the image is imported already.
    pub fn has_image(&self, image_id: &str) -> Result<bool, JobFailure> {
        self.volumes.has_image(image_id)
    }

    pub fn import_from(
        &self,
        image: &ImageRef,
        reader: Box<dyn std::io::Read + Send + '_>,
    ) -> Result<(), JobFailure> {
        self.volumes.import_from(image, reader)
    }

    /// The sharepool's host directories (`files/`, `apps/`); every phone has
    /// them mounted at the fixed phone paths.
    pub fn share_paths(&self) -> Result<SharePaths, JobFailure> {
        self.volumes.share_paths()
    }

    /// Returns the sharepool to the configured cap.
    pub fn reset_share_limit(&self) -> Result<(), JobFailure> {
        self.volumes.reset_share_limit()
    }

    /// Size, use and room of the sharepool.
    pub fn share_usage(&self) -> Result<ShareUsage, JobFailure> {
        self.volumes.share_usage()
    }

    /// The host's storage pools and their space.
    pub fn pools(&self) -> Result<Vec<crate::protocol::PoolState>, JobFailure> {
        self.volumes.pools()
    }

    /// Where a server's placement checkpoint is kept.
    fn placement_path(&self, server_id: &str) -> PathBuf {
        self.state_dir
            .join(format!("placement-{}.json", container_name(server_id)))
    }

    fn slot(&self, server: &CreateServer, index: u32) -> Result<Slot, JobFailure> {
        let _g = self.plan_lock.lock().unwrap_or_else(|p| p.into_inner());
        let topo = Topology::discover(Path::new("/sys"))
            .map_err(|e| JobFailure::internal(e.to_string()))?;
        let request = plan_request(&server.flavor, index + 1);
        let path = self.placement_path(&server.server_id);
        let loaded = placement::Checkpoint::load_or_plan(&path, &topo, &request, &BTreeSet::new())
            .map_err(|e| {
                JobFailure::internal(format!("placement of server {}: {e}", server.server_id))
            })?;
        loaded
            .checkpoint
            .plan
            .slots
            .iter()
            .find(|s| s.slot == index)
            .cloned()
            .ok_or_else(|| JobFailure::internal(format!("placement has no slot {index}")))
    }

    /// The phone's network made or repaired (see [`Network::ensure_phone`]);
    /// its namespace, or `None` without networking.
    fn ensure_network(
        &self,
        rec: &PhoneRecord,
        server: &CreateServer,
    ) -> Result<Option<PathBuf>, JobFailure> {
        let Some(net) = &self.net else {
            return Ok(None);
        };
        if let Err(e) = net.set_shared_bandwidth(server.band_width_size) {
            tracing::warn!(server_id = %server.server_id, error = %e, "shared bandwidth kept");
        }
        net.ensure_phone(
            &rec.spec.phone_id,
            &server.ports,
            bandwidth_limit(&rec.spec.property),
        )
        .map(Some)
        .map_err(network_fail)
    }

    fn container_spec(&self, rec: &PhoneRecord) -> Result<ContainerSpec, JobFailure> {
        let server = self.server(&rec.server_id)?;
        let slot = self.slot(&server, rec.spec.slot)?;
        let name = container_name(&rec.spec.phone_id);
        let mut spec = ContainerSpec::new(&name, &self.rootfs(&rec.spec.phone_id)?);
        spec.netns = self.ensure_network(rec, &server)?;
        spec.user_ns = rec.user_ns;
        spec.cpus = Some(slot.cpuset());
        spec.mems = Some(slot.mems_list());
        spec.cpu_shares = Some(slot.cpu_shares);
        spec.memory_limit = i64::try_from(server.flavor.memory_mb * 1024 * 1024)
            .ok()
            .filter(|m| *m > 0);
        spec.pids_limit = Some(4096);
        for (source, target) in self.share_paths()?.mounts() {
            spec.mounts.push(cph_runtime::container::BindMount {
                source,
                target,
                read_only: true,
            });
        }
        for fs in &server.share_filesystems {
            spec.mounts.push(cph_runtime::container::BindMount {
                source: PathBuf::from(&fs.source),
                target: Path::new(SHARE_FS_DIR).join(&fs.fs_id),
                read_only: false,
            });
        }
        spec.init
            .push(format!("androidboot.serialno={}", rec.spec.phone_id));
        // Read-only properties are init arguments (the Redroid convention):
        // Android takes an `ro.*` value once, before anything else sets it.
        spec.init.extend(
            rec.spec
                .property
                .iter()
                .filter(|(k, _)| property::read_only(k))
                .map(|(k, v)| format!("{k}={v}")),
        );
        if let Some(dev) = slot.render_device().filter(|d| Path::new(d).exists()) {
            spec.devices
                .push(cph_runtime::container::DeviceNode { path: dev.into() });
        }
        Ok(spec)
    }

    /// Starts the phone's container and applies its properties.
    fn boot(&self, rec: &PhoneRecord) -> Result<(), JobFailure> {
        let spec = self.container_spec(rec)?;
        let name = spec.name.clone();
        if matches!(self.rt.state(&name).map(|s| s.status), Ok(Status::Running)) {
            return Ok(());
        }
        // Never on a root a migration's restore left between two phones.
        if let Ok(root) = self.rootfs(&rec.spec.phone_id) {
            super::transfer::settle_migration(&root).map_err(|e| {
                JobFailure::new(
                    &e.code,
                    format!(
                        "not started: a migration's restore left its root unsettled: {}",
                        e.msg
                    ),
                )
            })?;
        }
        if self.rt.state(&name).is_ok() {
            self.rt.delete(&name, STOP_GRACE).map_err(container_fail)?;
        }
        self.write_connect_key(&rec.spec.phone_id);
        self.rt.start(&spec).map_err(container_fail)?;
        self.wait_ready(&name);
        // Android forgets the others at every boot, but for the
        // persistent ones it keeps.
        for (k, v) in &rec.spec.property {
            let kept = property::persistent(k) && !rec.pending_persist.contains(k);
            if !property::read_only(k) && !kept {
                self.setprop(&name, k, v)?;
            }
        }
        if !rec.pending_persist.is_empty() {
            self.update(&rec.spec.phone_id, |r| r.pending_persist.clear())?;
        }
        Ok(())
    }

    /// Puts the phone's connection key in its root ([`crate::connect`]),
    /// afresh at every start: a new phone, a reset one and one that came
    /// from another host all get theirs. A phone whose own files keep the
    /// key out (a link where its directory goes) starts all the same.
    fn write_connect_key(&self, phone_id: &str) {
        let Some(secret) = &self.connect_secret else {
            return;
        };
        let key = crate::connect::phone_key(secret, phone_id);
        let written = self.rootfs(phone_id).and_then(|root| {
            super::transfer::write_into_phone(
                &root,
                crate::connect::KEY_PATH,
                format!("{key}\n").as_bytes(),
                0o600,
            )
        });
        if let Err(e) = written {
            tracing::warn!(phone_id, error = %e.msg, "connection key not written");
        }
    }

    /// Waits (up to 5 s) for the image's readiness mark.
    fn wait_ready(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(out) = self.rt.exec(
                name,
                &["/bin/sh", "-c", "test -e /run/cph-ready"],
                Duration::from_secs(2),
                64,
            ) {
                if out.exit_code == Some(0) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn setprop(&self, name: &str, key: &str, value: &str) -> Result<(), JobFailure> {
        let out = self
            .rt
            .exec(name, &["setprop", key, value], Duration::from_secs(5), 4096)
            .map_err(container_fail)?;
        if out.exit_code != Some(0) {
            return Err(JobFailure::internal(format!(
                "setprop {key} in {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Host id ranges taken, by phones and by encoding containers.
    fn used_id_ranges(&self) -> BTreeSet<u32> {
        let mut used: BTreeSet<u32> = self
            .records()
            .values()
            .filter_map(|r| r.user_ns.map(|u| u.host_id))
            .collect();
        used.extend(self.encoder_id_ranges());
        used
    }

    /// A free host id range for the container `what`, when user namespaces
    /// are enabled; the caller holds `id_lock` until it has recorded it.
    fn new_id_range(&self, what: &str) -> Result<Option<UserNamespace>, JobFailure> {
        let Some(cfg) = &self.user_namespaces else {
            return Ok(None);
        };
        free_id_range(&self.used_id_ranges(), cfg)
            .map(Some)
            .ok_or_else(|| {
                JobFailure::internal(format!(
                    "no host id range left for {what} (user_namespaces: first_host_id {}, \
                     ids_per_phone {})",
                    cfg.first_host_id, cfg.ids_per_phone
                ))
            })
    }

    /// Creates a phone: volume from the image, container started.
    pub fn create(&self, server_id: &str, spec: &PhoneSpec) -> Result<(), JobFailure> {
        validate_properties(&spec.property)?;
        let server = self.server(server_id)?;
        let existing = self.record(&spec.phone_id).ok();
        if let Some(existing) = &existing {
            if existing.phase.is_none() && (existing.failure.is_none() || existing.made) {
                // Already made (a repeated create, or one after a later
                // step failed): its volume and data stay; make sure it runs.
                return self.start(&spec.phone_id);
            }
        }
        let ids_guard = self.id_lock.lock().unwrap_or_else(|p| p.into_inner());
        let user_ns = match existing.and_then(|e| e.user_ns) {
            Some(kept) => Some(kept),
            None => self.new_id_range(&spec.phone_id)?,
        };
        let rec = PhoneRecord {
            spec: spec.clone(),
            server_id: server_id.to_string(),
            image: server.image.clone(),
            phase: Some(PhoneRunState::Creating),
            failure: None,
            stopped: false,
            resume: false,
            traffic_type: "direct".to_string(),
            user_ns,
            made: false,
            failed_in: None,
            pending_persist: persistent_names(&spec.property),
        };
        self.save(&rec)?;
        drop(ids_guard);
        let result = self
            .volumes
            .create(&spec.phone_id, &server.image, server.flavor.disk_gb)
            .and_then(|_| self.update(&spec.phone_id, |r| r.made = true))
            .and_then(|rec| self.boot(&rec));
        self.finish_phase(&spec.phone_id, &result)?;
        result
    }

    fn finish_phase(
        &self,
        phone_id: &str,
        result: &Result<(), JobFailure>,
    ) -> Result<(), JobFailure> {
        self.update(phone_id, |r| {
            // A step's inner start recorded the step already.
            r.failed_in = if result.is_err() {
                r.phase.or(r.failed_in)
            } else {
                None
            };
            r.phase = None;
            r.failure = result.as_ref().err().map(|e| e.msg.clone());
        })
        .map(|_| ())
    }

    pub fn start(&self, phone_id: &str) -> Result<(), JobFailure> {
        let rec = self.update(phone_id, |r| {
            r.stopped = false;
            r.resume = false;
        })?;
        let result = self.boot(&rec);
        self.finish_phase(phone_id, &result)?;
        result
    }

    /// Stops a phone for a job that works on its root and starts it again
    /// when done if it was meant to run ([`PhoneRecord::resume`]); whether
    /// it was. A phone stopped on purpose stays stopped, and its container
    /// is stopped all the same: a stop whose container did not stop leaves
    /// one running with the phone recorded as stopped.
    pub fn stop_for_job(&self, phone_id: &str) -> Result<bool, JobFailure> {
        let meant_to_run = !self.record(phone_id)?.stopped;
        if meant_to_run {
            self.update(phone_id, |r| r.resume = true)?;
        }
        self.stop(phone_id)?;
        Ok(meant_to_run)
    }

    /// Records that a phone a job stopped stays stopped (a migrated
    /// source, as the reference asks).
    pub fn keep_stopped(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.update(phone_id, |r| r.resume = false).map(|_| ())
    }

    pub fn stop(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.update(phone_id, |r| r.stopped = true)?;
        let name = container_name(phone_id);
        match self.rt.stop(&name, STOP_GRACE) {
            Ok(_)
            | Err(ContainerError::NotRunning { .. })
            | Err(ContainerError::NotFound { .. }) => Ok(()),
            Err(e) => Err(container_fail(e)),
        }
    }

    /// Stops and starts the phone. With `image`, an image update: the
    /// container is removed, the volume moves to `image` keeping `/data`
    /// and `/cache`, and the phone starts on it; the record names the new
    /// image only once the volume has it.
    pub fn restart(
        &self,
        phone_id: &str,
        image: Option<&ImageRef>,
        property: Option<&BTreeMap<String, String>>,
    ) -> Result<(), JobFailure> {
        if let Some(p) = property {
            validate_properties(p)?;
        }
        self.update(phone_id, |r| {
            r.phase = Some(PhoneRunState::Restarting);
            // Runs afterwards, even when the agent is killed in between.
            r.resume = true;
            if let Some(p) = property {
                r.spec.property.extend(p.clone());
                r.pending_persist.extend(persistent_names(p));
            }
        })?;
        let stopped = match image {
            None => self.stop(phone_id),
            Some(image) => self
                .stop_and_remove(phone_id)
                .and_then(|()| self.volumes.upgrade(phone_id, image))
                .and_then(|_| self.update(phone_id, |r| r.image = image.clone()))
                .map(|_| ()),
        };
        let result = stopped.and_then(|()| self.start(phone_id));
        self.finish_phase(phone_id, &result)?;
        result
    }

    /// Stops the phone and removes its container (its volume stays), before
    /// the volume is made again or moved to another image.
    fn stop_and_remove(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.stop(phone_id)?;
        match self.rt.delete(&container_name(phone_id), STOP_GRACE) {
            Ok(()) | Err(ContainerError::NotFound { .. }) => Ok(()),
            Err(e) => Err(container_fail(e)),
        }
    }

    /// Reset: the volume is made again from the (new) image, then started.
    pub fn reset(
        &self,
        phone_id: &str,
        image: Option<&ImageRef>,
        property: Option<&BTreeMap<String, String>>,
    ) -> Result<(), JobFailure> {
        if let Some(p) = property {
            validate_properties(p)?;
        }
        let rec = self.update(phone_id, |r| {
            r.phase = Some(PhoneRunState::Resetting);
            if let Some(i) = image {
                r.image = i.clone();
            }
            if let Some(p) = property {
                r.spec.property = p.clone();
            }
            // The phone's data is made anew.
            r.pending_persist = persistent_names(&r.spec.property);
        })?;
        let result = self
            .stop_and_remove(phone_id)
            .and_then(|()| self.server(&rec.server_id))
            .and_then(|server| {
                self.volumes
                    .reset(phone_id, &rec.image, server.flavor.disk_gb)
            })
            .and_then(|_| self.start(phone_id));
        self.finish_phase(phone_id, &result)?;
        result
    }

    pub fn rename(&self, phone_id: &str, new_name: &str) -> Result<(), JobFailure> {
        if new_name.is_empty() || new_name.len() > 60 {
            return Err(JobFailure::new(
                "CPS.0025",
                format!("phone name {new_name:?} is invalid"),
            ));
        }
        self.update(phone_id, |r| r.spec.phone_name = new_name.to_string())
            .map(|_| ())
    }

    /// Records new properties; live ones are set at once in a running
    /// phone, the others at its next start. When one cannot be applied the
    /// phone's recorded properties are put back as they were (as the
    /// control plane keeps them), so its next start does not bring in what
    /// the failed job carried.
    pub fn update_property(
        &self,
        phone_id: &str,
        property: &BTreeMap<String, String>,
    ) -> Result<String, JobFailure> {
        validate_properties(property)?;
        let name = container_name(phone_id);
        let running = matches!(self.rt.state(&name).map(|s| s.status), Ok(Status::Running));
        let (live, deferred): (Vec<_>, Vec<_>) = property
            .iter()
            .partition(|(k, _)| running && !property::read_only(k));
        let before = self.record(phone_id)?;
        let rec = self.update(phone_id, |r| {
            r.spec.property.extend(property.clone());
            r.pending_persist.extend(
                deferred
                    .iter()
                    .filter(|(k, _)| property::persistent(k))
                    .map(|(k, _)| (*k).clone()),
            );
        })?;
        let limit = self
            .net
            .as_ref()
            .filter(|_| property.contains_key(BANDWIDTH_LIMIT));
        let mut set: Vec<&String> = Vec::new();
        let applied = limit
            .map_or(Ok(()), |net| {
                net.set_bandwidth_limit(phone_id, bandwidth_limit(&rec.spec.property))
                    .map_err(network_fail)
            })
            .and_then(|()| {
                live.iter().try_for_each(|(k, v)| {
                    self.setprop(&name, k, v)?;
                    set.push(k);
                    Ok(())
                })
            });
        if let Err(mut e) = applied {
            let _ = self.update(phone_id, |r| {
                r.spec.property = before.spec.property.clone();
                r.pending_persist = before.pending_persist.clone();
            });
            if let Some(net) = limit {
                let _ = net.set_bandwidth_limit(phone_id, bandwidth_limit(&before.spec.property));
            }
            // The ones set before the failure get their former values back
            // (empty where the platform had none): the phone is left as
            // it was, or the failure names what stays changed.
            let kept: Vec<&str> = set
                .into_iter()
                .filter(|k| {
                    let old = before.spec.property.get(*k).map_or("", String::as_str);
                    self.setprop(&name, k, old).is_err()
                })
                .map(String::as_str)
                .collect();
            if !kept.is_empty() {
                e.msg
                    .push_str(&format!("; left set in the phone: {}", kept.join(",")));
            }
            return Err(e);
        }
        Ok(if deferred.is_empty() {
            "applied".to_string()
        } else {
            let names: Vec<&str> = deferred.iter().map(|(k, _)| k.as_str()).collect();
            format!("applied at next start: {}", names.join(","))
        })
    }

    /// Removes the phone: container, network, volume and record.
    pub fn delete(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.update(phone_id, |r| r.phase = Some(PhoneRunState::Deleting))?;
        let name = container_name(phone_id);
        match self.rt.delete(&name, STOP_GRACE) {
            Ok(()) | Err(ContainerError::NotFound { .. }) => {}
            Err(e) => return Err(container_fail(e)),
        }
        if let Some(net) = &self.net {
            net.remove_phone(phone_id).map_err(network_fail)?;
        }
        self.volumes.delete(phone_id)?;
        let rec_path = self.state_dir.join("phones").join(format!("{name}.json"));
        let _ = std::fs::remove_file(&rec_path);
        self.records().remove(phone_id);
        Ok(())
    }

    /// Raises the cap of the phone's data volume to `disk_gb` GiB.
    pub fn expand_volume(&self, phone_id: &str, disk_gb: u64) -> Result<String, JobFailure> {
        self.record(phone_id)?;
        let was = self.volumes.grow(phone_id, disk_gb)?;
        Ok(format!(
            "volume of {phone_id}: {disk_gb} GiB (was {} GiB)",
            was / (1 << 30)
        ))
    }

    /// Runs a command in a running phone.
    pub fn exec(
        &self,
        phone_id: &str,
        argv: &[&str],
        timeout: Duration,
        cap: usize,
    ) -> Result<ExecOutput, JobFailure> {
        self.record(phone_id)?;
        self.rt
            .exec(&container_name(phone_id), argv, timeout, cap)
            .map_err(|e| match e {
                // A known phone without a container (stopped, or a reset
                // that failed) is one that does not run.
                ContainerError::NotRunning { .. } | ContainerError::NotFound { .. } => {
                    JobFailure::new("CPS.0141", format!("phone {phone_id} is not running"))
                }
                e => container_fail(e),
            })
    }

    /// Fails with CPS.0141 unless the phone runs.
    pub fn require_running(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.record(phone_id)?;
        match self.rt.state(&container_name(phone_id)) {
            Ok(st) if st.status == Status::Running => Ok(()),
            _ => Err(JobFailure::new(
                "CPS.0141",
                format!("phone {phone_id} is not running"),
            )),
        }
    }

    /// Every phone's state.
    pub fn states(&self) -> Vec<PhoneState> {
        let recs: Vec<PhoneRecord> = self.records().values().cloned().collect();
        let mut out: Vec<PhoneState> = recs.iter().map(|r| self.state_of(r)).collect();
        out.sort_by(|a, b| a.phone_id.cmp(&b.phone_id));
        out
    }

    /// Every phone's state with what it has used, in phone id order.
    pub fn usage(&self) -> Vec<PhoneUsage> {
        self.states()
            .into_iter()
            .map(|state| PhoneUsage {
                usage: self.rt.usage(&container_name(&state.phone_id)),
                traffic: self.net.as_ref().and_then(|n| n.traffic(&state.phone_id)),
                state,
            })
            .collect()
    }

    fn state_of(&self, r: &PhoneRecord) -> PhoneState {
        let (state, reason) = if let Some(phase) = r.phase {
            (phase, None)
        } else {
            match self
                .rt
                .state(&container_name(&r.spec.phone_id))
                .map(|s| s.status)
            {
                Ok(Status::Running) => (PhoneRunState::Running, None),
                Ok(Status::Paused) => (PhoneRunState::Stopped, Some("paused".to_string())),
                Ok(Status::Exited { code }) if r.stopped => {
                    (PhoneRunState::Stopped, Some(format!("exit code {code}")))
                }
                // Down after a step of its own failed: that step's state.
                Ok(Status::Exited { .. } | Status::Failed { .. }) | Err(_)
                    if r.failure.is_some() =>
                {
                    (failed_state(r.failed_in), r.failure.clone())
                }
                Ok(Status::Exited { code }) => {
                    (PhoneRunState::Exited, Some(format!("exit code {code}")))
                }
                Ok(Status::Failed { reason }) => (PhoneRunState::Failed, Some(reason)),
                Err(_) if r.stopped => (PhoneRunState::Stopped, None),
                Err(e) => (PhoneRunState::Failed, Some(e.to_string())),
            }
        };
        let reason = reason.or_else(|| {
            if matches!(
                state,
                PhoneRunState::Failed | PhoneRunState::ResetFailed | PhoneRunState::RestartFailed
            ) {
                r.failure.clone()
            } else {
                None
            }
        });
        PhoneState {
            phone_id: r.spec.phone_id.clone(),
            server_id: r.server_id.clone(),
            phone_name: r.spec.phone_name.clone(),
            state,
            reason,
            image_id: r.image.image_id.clone(),
            slot: r.spec.slot,
            access_infos: self
                .net
                .as_ref()
                .map(|n| n.access_infos(&r.spec.phone_id))
                .unwrap_or_default(),
            property: r.spec.property.clone(),
            traffic_type: r.traffic_type.clone(),
        }
    }

    /// Points the phone's default route at the bridge (`direct`) or the
    /// encoding container (`routing`) and records it.
    pub fn set_traffic(&self, phone_id: &str, traffic_type: &str) -> Result<(), JobFailure> {
        let rec = self.record(phone_id)?;
        if !matches!(traffic_type, "direct" | "routing") {
            return Err(JobFailure::new(
                "CPS.0207",
                format!("traffic type {traffic_type:?} is neither direct nor routing"),
            ));
        }
        // Routed traffic leaves through the server's encoding container; a
        // phone sent to one that does not run would lose its network.
        if traffic_type == "routing" && !self.encoder_running(&rec.server_id)? {
            return Err(JobFailure::new(
                "CPS.0208",
                format!(
                    "the encoding server of server {} does not run (or its flavor has none), so phone {phone_id} cannot route through it",
                    rec.server_id
                ),
            ));
        }
        self.require_network()?
            .set_traffic(phone_id, traffic_type)
            .map_err(network_fail)?;
        self.update(phone_id, |r| r.traffic_type = traffic_type.to_string())
            .map(|_| ())
    }

    /// Changes the server's shared bandwidth (Mbit/s) and records it.
    pub fn update_bandwidth(&self, server_id: &str, mbit: u32) -> Result<(), JobFailure> {
        let mut server = self.server(server_id)?;
        self.require_network()?
            .set_shared_bandwidth(mbit)
            .map_err(network_fail)?;
        server.band_width_size = mbit;
        self.put_server(&server)
    }

    fn require_network(&self) -> Result<&Network, JobFailure> {
        self.net
            .as_ref()
            .ok_or_else(|| JobFailure::internal("phone networking is not available on this agent"))
    }

    /// After an agent restart: phones that should run but whose container
    /// exited (host reboot) are started again; running ones are left alone.
    /// The network of phones without a record (a delete cut short) is
    /// removed; volumes without a record are reported, never dropped.
    pub fn reconcile(&self) {
        let mut known: BTreeSet<String> = self.records().keys().cloned().collect();
        known.extend(self.encoder_ids());
        if let Some(net) = &self.net {
            net.retain_phones(&known);
        }
        match self.volumes.phones() {
            Ok(ids) => {
                for id in ids.iter().filter(|id| !known.contains(*id)) {
                    tracing::warn!(phone_id = %id, "volume without a phone record");
                }
            }
            Err(e) => tracing::warn!(error = %e, "volumes not listed"),
        }
        let recs: Vec<PhoneRecord> = self.records().values().cloned().collect();
        for r in recs {
            // What an installation cut off by the agent's kill left in the
            // phone, running or not (no job runs yet).
            if let Ok(root) = self.rootfs(&r.spec.phone_id) {
                match super::transfer::remove_install_leftovers(&root) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(phone = %r.spec.phone_id, removed = n, "installation files left by a job cut off, removed")
                    }
                    Err(e) => {
                        tracing::warn!(phone = %r.spec.phone_id, error = %e.msg, "installation files left by a job cut off, not removed")
                    }
                }
            }
            // A running phone (an agent restart leaves it be) has its root
            // as it runs on it.
            let name = container_name(&r.spec.phone_id);
            if matches!(
                self.rt.state(&name).map(|s| s.status),
                Ok(Status::Running) | Ok(Status::Paused)
            ) {
                continue;
            }
            // A migration's restore cut off by a kill: its unpack removed,
            // or its swap finished.
            if let Ok(root) = self.rootfs(&r.spec.phone_id) {
                match super::transfer::settle_migration(&root) {
                    Ok(super::transfer::Settled::Nothing) => {}
                    Ok(s) => {
                        tracing::warn!(phone = %r.spec.phone_id, outcome = ?s, "migration cut off by a restart settled")
                    }
                    Err(e) => {
                        tracing::warn!(phone = %r.spec.phone_id, error = %e.msg, "migration leftovers not settled")
                    }
                }
            }
            if r.stopped || r.failure.is_some() {
                continue;
            }
            if let Err(e) = self.boot(&r) {
                tracing::warn!(phone = %r.spec.phone_id, error = %e, "phone not restarted");
            }
        }
        self.reconcile_encoders();
    }
}

/// The state of a phone down after the step `failed_in` failed.
fn failed_state(failed_in: Option<PhoneRunState>) -> PhoneRunState {
    match failed_in {
        Some(PhoneRunState::Resetting) => PhoneRunState::ResetFailed,
        Some(PhoneRunState::Restarting) => PhoneRunState::RestartFailed,
        _ => PhoneRunState::Failed,
    }
}

/// A phone a job works on ([`Phones::hold`]), until dropped.
pub struct PhoneHeld<'a> {
    phones: &'a Phones,
    phone: String,
}

impl Drop for PhoneHeld<'_> {
    fn drop(&mut self) {
        let mut busy = self.phones.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.phone);
        self.phones.freed.notify_all();
    }
}

/// Property holding a phone's download limit (kbit/s, -1 unlimited).
pub const BANDWIDTH_LIMIT: &str = "com.cph.bandwidth_limit";

/// The phone's `com.cph.bandwidth_limit`, -1 (unlimited) when unset.
fn bandwidth_limit(property: &BTreeMap<String, String>) -> i64 {
    property
        .get(BANDWIDTH_LIMIT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

/// Checks names against the attribute list (CPS.0163) and values (the
/// attribute's code, [`crate::property::invalid_code`]).
pub fn validate_properties(property: &BTreeMap<String, String>) -> Result<(), JobFailure> {
    crate::property::check_all(property).map_err(|r| JobFailure::new(r.code, r.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_get_id_ranges_no_other_phone_has() {
        let cfg = UserNamespacesConfig {
            enabled: true,
            first_host_id: 1_000_000,
            ids_per_phone: 131_072,
        };
        let range = |used: &[u32]| free_id_range(&used.iter().copied().collect(), &cfg);
        let first = range(&[]).expect("a range");
        assert_eq!((first.host_id, first.size), (1_000_000, 131_072));
        assert_eq!(range(&[1_000_000]).map(|u| u.host_id), Some(1_131_072));
        // A range freed by a deleted phone is taken again.
        assert_eq!(
            range(&[1_131_072, 1_262_144]).map(|u| u.host_id),
            Some(1_000_000)
        );
        // Ranges end below the last host id.
        let tight = UserNamespacesConfig {
            first_host_id: u32::MAX - 200_000,
            ..cfg.clone()
        };
        let one = free_id_range(&BTreeSet::new(), &tight).expect("one range fits");
        assert_eq!(
            free_id_range(&[one.host_id].into_iter().collect(), &tight),
            None
        );
    }

    #[test]
    fn properties_are_checked_against_the_reference() {
        let ok: BTreeMap<String, String> = [
            ("com.cph.mainkeys".to_string(), "1".to_string()),
            ("persist.sys.locale".into(), "en-US".into()),
        ]
        .into();
        assert!(validate_properties(&ok).is_ok());
        let unknown: BTreeMap<String, String> = [("foo.bar".to_string(), "1".to_string())].into();
        assert_eq!(
            validate_properties(&unknown).map_err(|e| e.code),
            Err("CPS.0163".to_string())
        );
        let bad: BTreeMap<String, String> =
            [("disable.status.bar".to_string(), "7".to_string())].into();
        assert_eq!(
            validate_properties(&bad).map_err(|e| e.code),
            Err("CPS.0164".to_string())
        );
        let bw: BTreeMap<String, String> =
            [("com.cph.bandwidth_limit".to_string(), "0".to_string())].into();
        assert!(validate_properties(&bw).is_err());
    }

    #[test]
    fn container_names_are_safe() {
        assert_eq!(container_name("ab/c.d"), "cph-ab-c-d");
    }

    /// Ids that would share a container name with another are refused.
    #[test]
    fn new_phone_ids_name_their_container_as_they_are() {
        for ok in ["0123456789abcdef0123456789abcdef", "p-1", &"a".repeat(48)] {
            assert!(valid_phone_id(ok), "{ok}");
            assert_eq!(container_name(ok), format!("cph-{ok}"));
        }
        for bad in ["", "a.b", "a_b", "a/b", "ä", &"a".repeat(49)] {
            assert!(!valid_phone_id(bad), "{bad}");
        }
    }
}
