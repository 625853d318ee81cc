//! The agent protocol: HTTP+JSON between the control plane and each node agent.
//!
//! These are wire types only; both sides convert them to and from their own
//! domain types. Every request carries `Authorization: Bearer <node token>`.
//!
//! Agent side (served by `cph-agent`, called by the control plane):
//! - `GET  /v1/inventory`          -> [`Inventory`]
//! - `POST /v1/servers`            [`CreateServer`] -> [`Accepted`] (phones are created as jobs)
//! - `DELETE /v1/servers/{id}`     -> [`Accepted`] (a [`JobKind::DeleteServer`] job `<id>:delete`)
//! - `POST /v1/jobs`               [`JobRequest`] -> [`JobStatus`] (idempotent on `job_id`)
//! - `GET  /v1/jobs/{job_id}`      -> [`JobStatus`]
//! - `GET  /v1/phones`             -> `Vec<PhoneState>`
//!
//! Control-plane side (served by `cph`, called by agents):
//! - `POST /agent/v1/register`     [`Inventory`] -> [`Registered`]
//! - `POST /agent/v1/heartbeat`    [`Heartbeat`] -> [`Accepted`]
//! - `POST /agent/v1/jobs`         `Vec<JobStatus>` -> [`Accepted`] (status reports)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Header carrying the node token (`Authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
/// Largest `execute_msg` a job reports, in bytes (the reference's limit).
pub const EXECUTE_MSG_MAX: usize = 1024;

/// What a host has and runs; sent at registration and on request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Stable host identity (machine-id), the key the control plane files it under.
    pub node_id: String,
    pub hostname: String,
    /// URL the control plane reaches this agent's protocol at.
    pub agent_url: String,
    pub agent_version: String,
    /// Server flavor this host serves (e.g. `physical.rx1.xlarge`, `dev.small`).
    pub server_model: String,
    /// Address phones' access ports are reached at from the private network.
    pub server_ip: String,
    /// Address reached from the internet, when the host has one.
    pub public_ip: Option<String>,
    pub cpus: u32,
    pub numa_nodes: u32,
    pub gpus: u32,
    pub memory_mb: u64,
    /// Phones this host can hold for its server model's phone flavor.
    pub phone_capacity: u32,
    /// What the host lacks (binderfs, cgroup controllers, ...), in words.
    pub missing: Vec<String>,
    pub phones: Vec<PhoneState>,
    /// Address of the encoding servers on the phone subnet (phones'
    /// `routing` gateway), when the host has phone networking.
    #[serde(default)]
    pub encoder_ip: Option<String>,
    /// The encoding servers of this host's servers.
    #[serde(default)]
    pub encoders: Vec<EncoderState>,
    /// The host's storage pools and their space.
    #[serde(default)]
    pub pools: Vec<PoolState>,
}

/// A storage pool of a host: `thinpool` (images and phones' volumes) or
/// `sharepool` (shared files and apps), with its backend (`btrfs`,
/// `overlay`) and space in bytes as last measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolState {
    pub name: String,
    pub backend: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
}

/// Answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub node_id: String,
    /// Seconds between heartbeats the control plane expects.
    pub heartbeat_secs: u64,
}

/// Periodic liveness report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    pub phones: Vec<PhoneState>,
    /// Jobs that changed since the last report.
    pub jobs: Vec<JobStatus>,
    /// The encoding servers of this host's servers.
    #[serde(default)]
    pub encoders: Vec<EncoderState>,
    /// The applications in this host's sharepool, as collected for this
    /// heartbeat (`None` when they could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_apps: Option<Vec<ShareApp>>,
    /// The host's storage pools (`None` when they could not be measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<PoolState>>,
}

/// One shared application: its package and the versions of its APKs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareApp {
    pub package_name: String,
    pub versions: Vec<String>,
}

/// An encoding server's state, with the reference's status codes: 1
/// running, 2 abnormal, 3 restarting, 0 being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderState {
    pub server_id: String,
    pub status: i32,
    /// Its mapped ports (`phone_ip` is the encoder's address).
    #[serde(default)]
    pub access_infos: Vec<AccessInfo>,
}

/// Generic acknowledgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub accepted: bool,
}

/// A phone flavor as the agent needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneFlavor {
    pub flavor_id: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    /// Phones per server for this flavor.
    pub phone_capacity: u32,
    /// `core_bind_strategy` from the flavor's `extend_spec`.
    pub core_bind_strategy: String,
    /// The rest of `extend_spec` (thinpool/sharepool sizes, encode server spec...).
    pub extend_spec: serde_json::Value,
}

/// The encoding server a flavor asks for (`extend_spec.encode_server_spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeServerSpec {
    pub cpus: u32,
    pub memory_mb: u64,
    /// Ports it serves (`port_num`, at most [`ENCODER_MAX_PORTS`]): listen
    /// ports from [`ENCODER_FIRST_PORT`] up, each mapped to a host port.
    pub ports: u16,
}

/// The first port an encoding server listens on; its others follow (the
/// reference's example lists 6900 to 6903).
pub const ENCODER_FIRST_PORT: u16 = 6900;
/// The most ports an encoding server maps.
pub const ENCODER_MAX_PORTS: u16 = 16;

impl PhoneFlavor {
    /// The flavor's encoding server, when `extend_spec` has an
    /// `encode_server_spec` (an object, or a JSON string of one, as the
    /// reference's examples write it); CPU count and memory default to 1
    /// and 256 MB when missing.
    pub fn encode_server_spec(&self) -> Option<EncodeServerSpec> {
        let raw = self.extend_spec.get("encode_server_spec")?;
        let spec = match raw {
            serde_json::Value::String(s) => serde_json::from_str(s).ok()?,
            serde_json::Value::Object(_) => raw.clone(),
            _ => return None,
        };
        let num = |k: &str| {
            spec.get(k).and_then(|v| match v {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })
        };
        Some(EncodeServerSpec {
            cpus: num("cpu")
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(1)
                .max(1),
            memory_mb: num("memory").unwrap_or(256).max(16),
            ports: num("port_num").map_or(0, |n| n.min(u64::from(ENCODER_MAX_PORTS)) as u16),
        })
    }

    /// `max_share_disk_size_g` of `extend_spec` (a number, or a string of
    /// digits as some flavor files write it); `None` when absent.
    pub fn max_share_disk_gb(&self) -> Option<u64> {
        match self.extend_spec.get("max_share_disk_size_g")? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// A phone image as the agent needs it: where to fetch the rootfs archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub image_id: String,
    /// `file:///abs/path.tar.gz` or `obs://bucket/key`.
    pub url: String,
}

/// A user port of a phone (the reference's `ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub listen_port: u16,
    pub internet_accessible: bool,
}

/// One phone to create on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneSpec {
    pub phone_id: String,
    pub phone_name: String,
    /// Placement slot on the host (0-based).
    pub slot: u32,
    pub property: BTreeMap<String, String>,
}

/// Create a server's phones on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateServer {
    pub server_id: String,
    pub server_name: String,
    pub flavor: PhoneFlavor,
    pub image: ImageRef,
    pub ports: Vec<PortSpec>,
    /// Server-wide shared bandwidth in Mbit/s.
    pub band_width_size: u32,
    /// Public key for ADB/SSH access, if the order named a keypair.
    pub public_key: Option<String>,
    pub phones: Vec<PhoneSpec>,
    /// Share file systems attached to the server, in each phone at
    /// [`SHARE_FS_DIR`]`/<fs_id>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub share_filesystems: Vec<ShareFs>,
}

/// Where an attached share file system is in a phone: `<dir>/<fs_id>`.
pub const SHARE_FS_DIR: &str = "/data/media/sfs";

/// Whether `id` can name a share file system: 1 to 64 ASCII letters,
/// digits, `-` or `_` (it becomes a directory name in every phone).
pub fn is_share_fs_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A share file system attached to a server: a directory of every host
/// (where the operator mounted the file system), bound read-write into the
/// server's phones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareFs {
    pub fs_id: String,
    /// The host directory (the file system's root or a sub-directory).
    pub source: String,
}

/// Phone lifecycle as the agent sees it; the control plane maps it to the
/// API's phone status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhoneRunState {
    Creating,
    Running,
    Stopped,
    Restarting,
    Resetting,
    Exited,
    /// Not running after its creation (or a start) failed.
    Failed,
    Deleting,
    /// Not running after a reset failed.
    ResetFailed,
    /// Not running after a restart failed.
    RestartFailed,
}

/// A phone's access address for one port (`access_infos` of the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessInfo {
    /// `adb`, `vnc` or the user port's name.
    #[serde(rename = "type")]
    pub kind: String,
    pub phone_ip: String,
    pub listen_port: u16,
    pub access_port: u16,
    pub internet_accessible: bool,
}

/// A phone's state as reported by its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneState {
    pub phone_id: String,
    pub server_id: String,
    pub phone_name: String,
    pub state: PhoneRunState,
    /// Exit code or failure reason when `state` is exited or failed.
    pub reason: Option<String>,
    pub image_id: String,
    pub slot: u32,
    pub access_infos: Vec<AccessInfo>,
    pub property: BTreeMap<String, String>,
    /// `direct` or `routing`.
    pub traffic_type: String,
}

/// An object in the object store (`obs://bucket/key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub bucket: String,
    pub key: String,
}

/// Where a migration lands: the target phone, its server and host, and the
/// source's properties to copy when asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateTarget {
    pub phone_id: String,
    pub server_id: String,
    pub node_id: String,
    #[serde(default)]
    pub property: BTreeMap<String, String>,
}

/// Bucket that migrations pass through when the request names none (the
/// source's agent creates it when missing).
pub const MIGRATE_BUCKET: &str = "cph-migrate";

/// Options of `pm install` an install job may carry (`-p`, which takes a
/// package name, is not one: an install-multiple names its APKs instead).
/// The API refuses others before a job is made; the agent checks again.
pub const INSTALL_FLAGS: &[&str] = &["-r", "-t", "-d", "-g", "-f", "-l", "-s"];
/// Most APKs of one install-multiple (the reference's limit).
pub const MAX_APKS: usize = 50;

/// Bucket of custom images made from phones (the agent creates it when
/// missing).
pub const IMAGE_BUCKET: &str = "cph-images";

/// The `execute_msg` of a [`JobKind::CreateImage`] that succeeded.
pub fn image_written(url: &str, bytes: u64) -> String {
    format!("image written to {url}: {bytes} bytes")
}

/// The size in bytes an [`image_written`] message gives.
pub fn image_size(execute_msg: &str) -> Option<u64> {
    execute_msg
        .strip_prefix("image written to ")?
        .rsplit_once(": ")?
        .1
        .strip_suffix(" bytes")?
        .parse()
        .ok()
}

impl JobKind {
    /// Kinds that work on every phone of their server, each in turn
    /// between that phone's own jobs (whatever `phone_id` a request names).
    pub fn is_server_wide(&self) -> bool {
        matches!(
            self,
            JobKind::RestartServer
                | JobKind::ChangeFlavor { .. }
                | JobKind::AttachShareFs { .. }
                | JobKind::DetachShareFs { .. }
                | JobKind::DeleteServer
                | JobKind::SharePushApps { .. }
                | JobKind::CreateServer { .. }
        )
    }

    /// The wire name of the kind (`sync_shell`, `push`, ...), for logs.
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("kind")?.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// Suffix of the agent job id of a migration's restore phase: the CPH job
/// keeps its id, the target agent sees `<job_id>` + this.
pub const MIGRATE_RESTORE_SUFFIX: &str = "-restore";

/// What a job does. The control plane validates the API's input and sends it
/// in this typed form; the agent never parses CPH `content` strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Create (or re-create) one phone of a server already sent with [`CreateServer`].
    CreatePhone {
        phone: PhoneSpec,
    },
    StartPhone,
    StopPhone,
    /// With `image` (another than the phone's): the phone is updated to
    /// it, keeping its `/data` and `/cache` (a reset would drop them).
    RestartPhone {
        #[serde(default)]
        image: Option<ImageRef>,
        property: Option<BTreeMap<String, String>>,
    },
    ResetPhone {
        image: Option<ImageRef>,
        property: Option<BTreeMap<String, String>>,
    },
    RenamePhone {
        new_name: String,
    },
    UpdateProperty {
        property: BTreeMap<String, String>,
    },
    DeletePhone,
    /// `push`: a tar extracted into the phone's root.
    Push {
        object: ObjectRef,
    },
    /// `install`/`install-multiple`: `flags` such as `-t -r`; first APK is the base.
    Install {
        flags: Vec<String>,
        objects: Vec<ObjectRef>,
    },
    Uninstall {
        flags: Vec<String>,
        package: String,
    },
    /// Async `shell`.
    Shell {
        command: String,
    },
    /// Sync `shell`: answered within `timeout_ms`.
    SyncShell {
        command: String,
        timeout_ms: u64,
    },
    /// `batch-storage` export of `/data`, `/cache` subtrees as a tar.
    Export {
        object: ObjectRef,
        include: Vec<String>,
        exclude: Vec<String>,
    },
    /// `batch-restore` from an export tar, extracted over the phone's
    /// root; `property` (a migration's copied properties) is applied after
    /// it.
    Restore {
        object: ObjectRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        property: Option<BTreeMap<String, String>>,
        /// A migration's whole phone: it replaces the root (unpacked beside
        /// it first) rather than being extracted over it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        whole_phone: bool,
        /// The object is the platform's own (a migration that named no
        /// bucket): removed once restored.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        remove_object: bool,
    },
    /// Whole-phone migration, source side: the phone is stopped and written
    /// to `object`. The control plane then sends the target's agent a
    /// [`JobKind::Restore`] under the same CPH job (the agent ignores `target`).
    Migrate {
        object: ObjectRef,
        keep_property: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<MigrateTarget>,
        /// `object` was named by the control plane in the platform's
        /// bucket (the request named none): the restore removes it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        platform_object: bool,
    },
    SharePushFiles {
        object: ObjectRef,
        target_dir: String,
    },
    ShareListFiles {
        path: String,
        offset: u32,
        limit: u32,
    },
    ShareDeleteFiles {
        paths: Vec<String>,
    },
    /// A shared application into the sharepool; with `pre_install` (the
    /// API's `pre_install_app`) also installed in each running phone of the
    /// server from there.
    SharePushApps {
        object: ObjectRef,
        package_name: String,
        #[serde(default)]
        pre_install: bool,
    },
    ShareDeleteApps {
        package_names: Vec<String>,
    },
    UpdateKeypair {
        public_key: String,
        /// The keypair's name, which the control plane records for the
        /// server once the key is in place (the agent does not use it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keypair_name: Option<String>,
    },
    /// `direct` or `routing`.
    SetTraffic {
        traffic_type: String,
    },
    /// Server-wide shared bandwidth in Mbit/s.
    UpdateBandwidth {
        band_width_size: u32,
    },
    RestartEncodeServer,
    /// `RestartCloudPhoneServer`: every phone of the server restarted
    /// (stopped ones started), each once no job of its own runs, and the
    /// server's encoding server.
    RestartServer,
    /// Releases the server from its host: its phones (containers, networks
    /// and volumes) and its encoding server are deleted, its keys no longer
    /// open the host's SSH access, and the sharepool is emptied once no
    /// server is left on the host. Done again, it finishes what is left.
    DeleteServer,
    /// Raises the cap of the phone's data volume to `disk_gb` GiB (never
    /// lowers it), kept across resets.
    ExpandVolume {
        disk_gb: u64,
    },
    /// A custom image of the phone: it is stopped, its root written to
    /// `object` as a tar, and started again if it was meant to run. The
    /// answer is [`image_written`]'s.
    CreateImage {
        image_id: String,
        object: ObjectRef,
    },
    /// The server's new flavor (`change-server-model`): recorded once its
    /// placement fits the host, each phone's volume cap raised to the new
    /// disk size, running phones restarted on it (stopped ones take it
    /// at their next start), the encoding server made, restarted or
    /// removed as the flavor asks. `server_model_name` is the control
    /// plane's, which records the change when the job succeeds.
    ChangeFlavor {
        server_model_name: String,
        flavor: PhoneFlavor,
    },
    /// A whole server made on this host as one job (a server switched here
    /// from another host): recorded, its key let into the host's SSH
    /// access, its encoding server made when the flavor has one, and each
    /// phone created, a few at once. It fails when any phone could not be
    /// made, naming them; the phones made stay.
    CreateServer {
        server: CreateServer,
    },
    /// A share file system attached to the server (or its directory
    /// changed): recorded, and the running phones restarted to see it at
    /// [`SHARE_FS_DIR`]`/<fs_id>`. The source must be a directory of the
    /// host.
    AttachShareFs {
        fs: ShareFs,
    },
    /// A share file system detached: its record dropped and the running
    /// phones restarted without it.
    DetachShareFs {
        fs_id: String,
    },
}

/// A job sent to an agent: one target (a phone or, for server jobs, the server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: String,
    pub request_id: String,
    pub server_id: String,
    /// Target phone, or `None` for a server-wide job.
    pub phone_id: Option<String>,
    #[serde(flatten)]
    pub kind: JobKind,
}

/// Job status codes of the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "i32", try_from = "i32")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

impl From<JobState> for i32 {
    fn from(s: JobState) -> i32 {
        match s {
            JobState::Running => 1,
            JobState::Succeeded => 2,
            JobState::Failed => -1,
        }
    }
}

impl TryFrom<i32> for JobState {
    type Error = String;
    fn try_from(v: i32) -> Result<Self, Self::Error> {
        match v {
            1 => Ok(Self::Running),
            2 => Ok(Self::Succeeded),
            -1 => Ok(Self::Failed),
            other => Err(format!("unknown job status {other}")),
        }
    }
}

/// A job's status as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub status: JobState,
    /// The reference's `CPS.xxxx` code when failed.
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    /// Output for the user, at most [`EXECUTE_MSG_MAX`] bytes.
    pub execute_msg: Option<String>,
}

/// Several jobs for one agent in one request (`POST /v1/jobs/batch`),
/// recorded by the agent with one flush.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobBatch {
    pub jobs: Vec<JobRequest>,
}

/// The agent's answer for one job of a batch, in the batch's order: its
/// status when recorded (or known), otherwise why it was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchedJob {
    pub job_id: String,
    pub status: Option<JobStatus>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
}

impl BatchedJob {
    pub fn accepted(status: JobStatus) -> Self {
        Self {
            job_id: status.job_id.clone(),
            status: Some(status),
            error_code: None,
            error_msg: None,
        }
    }

    pub fn refused(job_id: String, code: &str, msg: String) -> Self {
        Self {
            job_id,
            status: None,
            error_code: Some(code.to_string()),
            error_msg: Some(msg),
        }
    }
}

/// Cuts `msg` to at most [`EXECUTE_MSG_MAX`] bytes on a character boundary.
pub fn cap_execute_msg(msg: &str) -> String {
    if msg.len() <= EXECUTE_MSG_MAX {
        return msg.to_string();
    }
    let mut end = EXECUTE_MSG_MAX;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_wire_tags() {
        assert_eq!(JobKind::StartPhone.name(), "start_phone");
        let shell = JobKind::SyncShell {
            command: "true".into(),
            timeout_ms: 1,
        };
        assert_eq!(shell.name(), "sync_shell");
        // The control plane's store matches this name in SQL.
        assert_eq!(JobKind::DeleteServer.name(), "delete_server");
    }

    #[test]
    fn share_cap_reads_numbers_and_digit_strings() {
        let flavor = |spec: serde_json::Value| PhoneFlavor {
            flavor_id: "f".into(),
            vcpus: 1,
            memory_mb: 1,
            disk_gb: 1,
            phone_capacity: 1,
            core_bind_strategy: String::new(),
            extend_spec: spec,
        };
        use serde_json::json;
        assert_eq!(
            flavor(json!({"max_share_disk_size_g": 50})).max_share_disk_gb(),
            Some(50)
        );
        assert_eq!(
            flavor(json!({"max_share_disk_size_g": " 7"})).max_share_disk_gb(),
            Some(7)
        );
        assert_eq!(
            flavor(json!({"max_share_disk_size_g": "x"})).max_share_disk_gb(),
            None
        );
        assert_eq!(flavor(json!({})).max_share_disk_gb(), None);
        let enc = flavor(
            json!({"encode_server_spec": {"cpu": 2, "memory": 14448, "disk": 10, "port_num": 4}}),
        );
        assert_eq!(
            enc.encode_server_spec(),
            Some(EncodeServerSpec {
                cpus: 2,
                memory_mb: 14448,
                ports: 4
            })
        );
        let text = flavor(json!({"encode_server_spec": "{\"cpu\": \"3\", \"port_num\": 99}"}));
        assert_eq!(
            text.encode_server_spec(),
            Some(EncodeServerSpec {
                cpus: 3,
                memory_mb: 256,
                ports: ENCODER_MAX_PORTS
            })
        );
        assert_eq!(flavor(json!({})).encode_server_spec(), None);
    }

    #[test]
    fn job_state_uses_reference_codes() {
        assert_eq!(
            serde_json::to_string(&JobState::Failed).expect("json"),
            "-1"
        );
        assert_eq!(
            serde_json::from_str::<JobState>("2").expect("json"),
            JobState::Succeeded
        );
        assert!(serde_json::from_str::<JobState>("7").is_err());
    }

    #[test]
    fn job_request_is_flat_with_kind_tag() {
        let req = JobRequest {
            job_id: "j1".into(),
            request_id: "r1".into(),
            server_id: "s1".into(),
            phone_id: Some("p1".into()),
            kind: JobKind::SyncShell {
                command: "echo hi".into(),
                timeout_ms: 2000,
            },
        };
        let v = serde_json::to_value(&req).expect("json");
        assert_eq!(v["kind"], "sync_shell");
        assert_eq!(v["command"], "echo hi");
        let back: JobRequest = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, req);
    }

    #[test]
    fn image_size_reads_what_image_written_says() {
        let msg = image_written("obs://cph-images/p/i.tar", 123_456);
        assert_eq!(image_size(&msg), Some(123_456));
        assert_eq!(image_size("exported to obs://b/k: 5 bytes"), None);
        assert_eq!(image_size("image written to obs://b/k: many bytes"), None);
    }

    #[test]
    fn execute_msg_is_capped_on_char_boundary() {
        let long = "é".repeat(600); // 1,200 bytes
        let capped = cap_execute_msg(&long);
        assert!(capped.len() <= EXECUTE_MSG_MAX);
        assert_eq!(capped.len() % 2, 0);
        assert_eq!(cap_execute_msg("short"), "short");
    }
}
