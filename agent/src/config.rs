//! Agent configuration: defaults, then a TOML file, then the command line.
//! Every field has a documented default so an empty file is a valid config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::telemetry::LogFormat;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

/// The agent's configuration file (`/etc/cph/agent.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Control-plane base URL the agent registers with.
    pub control_plane_url: String,
    /// A certificate (PEM) trusted for an `https` control-plane URL beside
    /// the system's roots (a control plane with a certificate of its own).
    pub control_plane_ca: Option<PathBuf>,
    /// Shared secret the control plane and the agent present to each other.
    pub node_token: String,
    /// Address the agent protocol listens on.
    pub listen: String,
    /// Where phone, job and placement state is kept.
    pub state_dir: PathBuf,
    /// Log line format: `text` or `json`.
    pub log_format: LogFormat,
    /// URL the control plane reaches this agent at (default:
    /// `http://<listen>`, `https://<listen>` with TLS).
    pub advertise_url: Option<String>,
    /// Serve the agent protocol over TLS with this certificate chain and
    /// `tls_key` (PEM); the control plane trusts it with `--agent-ca`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// This host's id in the fleet (default: `/etc/machine-id`). Set it
    /// when one machine runs several agents, each a host of its own.
    pub node_id: Option<String>,
    /// Server flavor this host serves.
    pub server_model: String,
    /// Phones this host holds (sizes kernel limits, reported in the inventory).
    pub phone_capacity: u32,
    /// Address phones' access ports are reached at (default: the listen address's host).
    pub server_ip: Option<String>,
    /// Jobs running at once on this server (sync shell not counted).
    pub max_parallel_jobs: usize,
    /// Phones created at once by a CreateServer.
    pub max_parallel_creates: usize,
    /// Seconds running jobs get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Time limit of an async shell job, seconds.
    pub shell_timeout_secs: u64,
    /// Heartbeat period until the control plane names one, seconds.
    pub heartbeat_secs: u64,
    /// Hours an ended job's record is kept (a repeated job id answers with
    /// it) before it is removed; at least 1.
    pub job_retention_hours: u64,
    /// `cph-shim` binary (default: next to `cph-agent`).
    pub shim: Option<PathBuf>,
    /// cgroup parent of the phones.
    pub cgroup_parent: String,
    /// Raise kernel limits for the phone capacity at start.
    pub prepare_host: bool,
    /// Root of the sysctl tree written by host preparation.
    pub sysctl_root: PathBuf,
    /// Phone volumes.
    pub storage: StorageConfig,
    /// Phone networking.
    pub network: NetworkConfig,
    /// Object store holding images, APKs, push and export archives.
    pub object_store: Option<ObjectStoreConfig>,
    /// Phones in user namespaces of their own.
    pub user_namespaces: UserNamespacesConfig,
}

/// Each new phone in a user namespace of its own: root inside is an
/// unprivileged host user, with a range of host ids no other phone of this
/// host has (`first_host_id + n * ids_per_phone`, kept with the phone).
/// Its rootfs is mounted idmapped, which btrfs volumes support from kernel
/// 5.15 (an overlayfs mount cannot be: the agent refuses the two together).
/// Phones made before it was enabled keep running as host root.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserNamespacesConfig {
    pub enabled: bool,
    /// First host id of the ranges (above every id the host's users have).
    pub first_host_id: u32,
    /// Ids of each phone: Android's user 0 uses up to 99999.
    pub ids_per_phone: u32,
}

impl Default for UserNamespacesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            first_host_id: 1_000_000,
            ids_per_phone: 131_072,
        }
    }
}

/// Phone volumes: where images and per-phone copy-on-write volumes live.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Which backend holds the pool.
    pub backend: StorageBackend,
    /// `overlay`: the pool directory (default `<state_dir>/pool`).
    /// `btrfs`: a block device, or a sparse file made with `pool_size_gb`
    /// and attached to a loop device (default `<state_dir>/pool.img`).
    pub pool: Option<PathBuf>,
    /// `btrfs` on a file: the file's size in GiB when it is created.
    pub pool_size_gb: u64,
    /// `btrfs`: where the pool is mounted (default `<state_dir>/pool`).
    pub mount_point: Option<PathBuf>,
    /// Sharepool cap in GiB (0: no cap beyond the pool's size).
    pub share_size_gb: u64,
}

/// The storage backends of `cph-runtime` the agent runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Images are directories, a phone's rootfs an overlayfs mount over its
    /// image; needs no sizes, does not enforce the flavor's disk size.
    #[default]
    Overlay,
    /// btrfs subvolume snapshots with qgroup limits (production).
    Btrfs,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Overlay,
            pool: None,
            pool_size_gb: 0,
            mount_point: None,
            share_size_gb: 0,
        }
    }
}

/// Phone networking: a bridge carrying the phone subnet, one network
/// namespace and veth per phone, access ports mapped by nftables DNAT on the
/// server address, download bandwidth shaped with tc. Every name is the
/// agent's own so two agents (or tests) on one host do not collide.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Give phones a network. When off (or when the host lacks nft, tc or
    /// ip), phones run in an empty namespace of their own.
    pub enabled: bool,
    /// Host bridge carrying the phone subnet (at most 15 characters).
    pub bridge: String,
    /// Phone subnet; the bridge takes its first address.
    pub subnet: String,
    /// The agent's nftables table (family `ip`).
    pub nft_table: String,
    /// Prefix of the host-side veth names (1-10 characters, not ending in a
    /// digit); the phone's network slot follows.
    pub veth_prefix: String,
    /// Prefix of the phones' named network namespaces
    /// (`/run/netns/<prefix><phone_id>`); agents sharing a machine need
    /// their own.
    pub netns_prefix: String,
    /// Inclusive range of host access ports mapped to phones' ports.
    pub access_port_first: u16,
    pub access_port_last: u16,
    /// Source prefixes of the private network, the only ones reaching ports
    /// that are not internet accessible (and ADB/VNC).
    pub private_prefixes: Vec<String>,
    /// Public address shown for internet-accessible ports.
    pub public_ip: Option<String>,
    /// Address of the encoding container phones route through with
    /// `traffic_type = routing` (default: the subnet's last host address).
    pub encoder_ip: Option<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bridge: "cph0".to_string(),
            subnet: "172.31.0.0/24".to_string(),
            nft_table: "cph".to_string(),
            veth_prefix: "cphv".to_string(),
            netns_prefix: "cph-".to_string(),
            access_port_first: 20000,
            access_port_last: 29999,
            private_prefixes: vec![
                "10.0.0.0/8".to_string(),
                "172.16.0.0/12".to_string(),
                "192.168.0.0/16".to_string(),
            ],
            public_ip: None,
            encoder_ip: None,
        }
    }
}

/// S3-protocol object store access.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Part sizes and parallelism of streamed downloads and uploads
    /// (`[object_store.transfer]`: `range_bytes`, `part_bytes`,
    /// `parts_in_flight`, `queued_parts`); a store far away may want more
    /// parts in flight.
    #[serde(default)]
    pub transfer: crate::objstore::TransferConfig,
}

impl ObjectStoreConfig {
    /// The client configuration of this store.
    pub fn client_config(&self) -> crate::objstore::ObjectStoreConfig {
        crate::objstore::ObjectStoreConfig {
            region: self.region.clone(),
            path_style: self.path_style,
            transfer: self.transfer.clone(),
            ..crate::objstore::ObjectStoreConfig::local(
                self.endpoint.clone(),
                self.access_key.clone(),
                self.secret_key.clone(),
            )
        }
    }
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_true() -> bool {
    true
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            control_plane_url: "http://127.0.0.1:8443".to_string(),
            control_plane_ca: None,
            node_token: String::new(),
            listen: "127.0.0.1:8600".to_string(),
            state_dir: PathBuf::from("/var/lib/cph-agent"),
            log_format: LogFormat::Text,
            advertise_url: None,
            tls_cert: None,
            tls_key: None,
            node_id: None,
            server_model: "dev.small".to_string(),
            phone_capacity: 2,
            server_ip: None,
            max_parallel_jobs: 8,
            max_parallel_creates: 4,
            shutdown_grace_secs: 30,
            shell_timeout_secs: 60,
            heartbeat_secs: 15,
            job_retention_hours: 168,
            shim: None,
            cgroup_parent: "cph".to_string(),
            prepare_host: true,
            sysctl_root: PathBuf::from("/proc/sys"),
            storage: StorageConfig::default(),
            network: NetworkConfig::default(),
            object_store: None,
            user_namespaces: UserNamespacesConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Loads a TOML file over the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg: AgentConfig = toml::from_str("").expect("empty config parses");
        assert_eq!(cfg, AgentConfig::default());
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = toml::from_str::<AgentConfig>("nonsense = 1").expect_err("unknown key");
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn storage_and_network_sections_parse() {
        let cfg: AgentConfig = toml::from_str(
            "[storage]\nbackend = \"btrfs\"\npool = \"/dev/sdb\"\n\
             [network]\nbridge = \"cphx\"\nsubnet = \"10.99.0.0/24\"\naccess_port_first = 41000\n",
        )
        .expect("config parses");
        assert_eq!(cfg.storage.backend, StorageBackend::Btrfs);
        assert_eq!(cfg.storage.pool, Some(PathBuf::from("/dev/sdb")));
        assert_eq!(cfg.network.bridge, "cphx");
        assert_eq!(cfg.network.access_port_first, 41000);
        assert_eq!(cfg.network.access_port_last, 29999);
        assert!(cfg.network.enabled);
        assert_eq!(
            AgentConfig::default().storage.backend,
            StorageBackend::Overlay
        );
        let err = toml::from_str::<AgentConfig>("[storage]\nbackend = \"dir\"\n")
            .expect_err("dir is gone");
        assert!(err.to_string().contains("overlay"), "{err}");
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "state_dir = \"/srv/cph\"\nlog_format = \"json\"\n").expect("write");
        let cfg = AgentConfig::load(&path).expect("load");
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/cph"));
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.listen, AgentConfig::default().listen);
    }
}
