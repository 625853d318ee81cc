//! What a phone container is made of.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ContainerError;

/// A host path mounted into the phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the phone.
    pub target: PathBuf,
    pub read_only: bool,
}

/// An extra device node (binder, render node, fuse, tun) given to the phone
/// when the host has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Host path, e.g. `/dev/dri/renderD128`; also its path inside the phone.
    pub path: PathBuf,
}

/// The phone's own user namespace: ids `0..size` inside are host ids
/// `host_id..host_id + size` (users and groups alike). Its root filesystem
/// is mounted idmapped, so files keep their ids on disk (root's files stay
/// uid 0 there and are root's inside) while the phone's root is an
/// unprivileged host user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespace {
    pub host_id: u32,
    pub size: u32,
}

/// A phone container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Unique name; also the hostname and the cgroup's name.
    pub name: String,
    /// The phone's root filesystem (its volume).
    pub rootfs: PathBuf,
    /// Init command (Android images run `/init`).
    pub init: Vec<String>,
    /// Environment of init, `KEY=value`.
    pub env: Vec<String>,
    /// `cpuset.cpus`, e.g. `0-1`; `None` for all host CPUs.
    pub cpus: Option<String>,
    /// `cpuset.mems`, e.g. `0`; `None` for all nodes.
    pub mems: Option<String>,
    /// cgroup v1 `cpu.shares` (v2 weight is derived).
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per 100 ms period.
    pub cpu_quota_us: Option<i64>,
    /// Memory limit in bytes (swap is off: memory+swap = memory).
    pub memory_limit: Option<i64>,
    /// Most tasks in the phone.
    pub pids_limit: Option<i64>,
    pub devices: Vec<DeviceNode>,
    pub mounts: Vec<BindMount>,
    /// An existing network namespace file (e.g. `/run/netns/<name>`, as
    /// `ip netns add` or [`super::netns::create`] make) that init joins
    /// instead of a fresh, empty one; the phone network module plumbs the
    /// phone's veth into that path.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Boot properties, given to init as `androidboot.KEY=VALUE` arguments
    /// (and shown in the phone's `/proc/cmdline`), which Android's init turns
    /// into `ro.boot.KEY`.
    #[serde(default)]
    pub boot_properties: BTreeMap<String, String>,
    /// A user namespace of its own; `None` runs the phone as host root.
    #[serde(default)]
    pub user_ns: Option<UserNamespace>,
}

/// The kernel will not run a memory cgroup below a few MiB; refuse earlier.
pub const MIN_MEMORY_LIMIT: i64 = 8 * 1024 * 1024;

impl ContainerSpec {
    /// Init's argument vector: the init command, then one
    /// `androidboot.KEY=VALUE` per boot property.
    pub fn init_argv(&self) -> Vec<String> {
        let mut argv = self.init.clone();
        argv.extend(
            self.boot_properties
                .iter()
                .map(|(k, v)| format!("androidboot.{k}={v}")),
        );
        argv
    }

    /// A spec with the image's defaults: `/init`, no limits.
    pub fn new(name: &str, rootfs: &Path) -> Self {
        Self {
            name: name.to_string(),
            rootfs: rootfs.to_path_buf(),
            init: vec!["/init".to_string()],
            env: vec!["PATH=/system/bin:/bin:/sbin:/usr/bin:/usr/sbin".to_string()],
            cpus: None,
            mems: None,
            cpu_shares: None,
            cpu_quota_us: None,
            memory_limit: None,
            pids_limit: None,
            devices: Vec::new(),
            mounts: Vec::new(),
            netns: None,
            boot_properties: BTreeMap::new(),
            user_ns: None,
        }
    }

    /// Checks what can be checked before anything is made.
    pub fn validate(&self) -> Result<(), ContainerError> {
        let bad = |reason: String| ContainerError::InvalidSpec {
            name: self.name.clone(),
            reason,
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !self.name.starts_with('-');
        if !name_ok {
            return Err(bad(format!(
                "name {:?} must be 1-63 letters, digits, '-' or '_'",
                self.name
            )));
        }
        if !self.rootfs.is_dir() {
            return Err(ContainerError::RootfsMissing {
                name: self.name.clone(),
                path: self.rootfs.clone(),
            });
        }
        let empty = std::fs::read_dir(&self.rootfs)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            return Err(ContainerError::RootfsEmpty {
                name: self.name.clone(),
                path: self.rootfs.clone(),
            });
        }
        let Some(init) = self.init.first() else {
            return Err(bad("init command is empty".to_string()));
        };
        let rel = init.trim_start_matches('/');
        if !init.starts_with('/') || rel.split('/').any(|c| c == "..") {
            return Err(bad(format!(
                "init {init:?} must be an absolute path inside the rootfs"
            )));
        }
        // Resolve symlinks inside the rootfs the way the phone will see them.
        let host_path = resolve_in_root(&self.rootfs, rel);
        let executable = host_path
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false);
        if !executable {
            return Err(ContainerError::InitNotExecutable {
                name: self.name.clone(),
                init: init.clone(),
            });
        }
        if let Some(limit) = self.memory_limit {
            if limit < MIN_MEMORY_LIMIT {
                return Err(ContainerError::MemoryTooLow {
                    name: self.name.clone(),
                    limit,
                    min: MIN_MEMORY_LIMIT,
                });
            }
        }
        for (field, list) in [("cpus", &self.cpus), ("mems", &self.mems)] {
            if let Some(list) = list {
                let wanted = crate::placement::cpulist::parse(list)
                    .map_err(|e| bad(format!("{field}: {e}")))?;
                let online = if field == "cpus" {
                    "/sys/devices/system/cpu/online"
                } else {
                    "/sys/devices/system/node/online"
                };
                let have = std::fs::read_to_string(online)
                    .ok()
                    .and_then(|t| crate::placement::cpulist::parse(&t).ok())
                    .unwrap_or_else(|| vec![0]);
                if let Some(&missing) = wanted.iter().find(|c| !have.contains(c)) {
                    return Err(ContainerError::NotOnHost {
                        name: self.name.clone(),
                        field,
                        list: list.clone(),
                        missing,
                    });
                }
            }
        }
        for (key, value) in &self.boot_properties {
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !key_ok {
                return Err(bad(format!(
                    "boot property {key:?} must be letters, digits, '.', '_' or '-'"
                )));
            }
            if value.chars().any(|c| c.is_control() || c == '"') {
                return Err(bad(format!(
                    "boot property {key}: value {value:?} holds a control character or '\"'"
                )));
            }
        }
        if let Some(ns) = &self.netns {
            if !super::netns::is_netns(ns) {
                return Err(bad(format!(
                    "netns {} is not a network namespace file",
                    ns.display()
                )));
            }
        }
        if let Some(u) = &self.user_ns {
            let end = u64::from(u.host_id) + u64::from(u.size);
            if u.host_id == 0 || u.size == 0 || end > u64::from(u32::MAX) {
                return Err(bad(format!(
                    "user namespace: host ids {}..{end} must be a non-empty range above 0 \
                     (0 is the host's root)",
                    u.host_id
                )));
            }
        }
        for m in &self.mounts {
            if !m.target.is_absolute() || m.target.components().any(|c| c.as_os_str() == "..") {
                return Err(bad(format!(
                    "mount target {} must be absolute without '..'",
                    m.target.display()
                )));
            }
        }
        Ok(())
    }
}

/// Follows symlinks of `rel` as if `root` were `/`.
fn resolve_in_root(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    let mut parts: Vec<String> = rel
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    parts.reverse();
    let mut hops = 0;
    while let Some(part) = parts.pop() {
        let next = path.join(&part);
        match std::fs::read_link(&next) {
            Ok(target) => {
                hops += 1;
                if hops > 32 {
                    return None;
                }
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    path = root.to_path_buf();
                }
                for p in t.split('/').filter(|s| !s.is_empty()).rev() {
                    parts.push(p.to_string());
                }
            }
            Err(_) if part == ".." => {
                if path != root {
                    path.pop();
                }
            }
            Err(_) => path = next,
        }
    }
    Some(path)
}
