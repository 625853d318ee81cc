//! Phone containers: a phone is a process tree in its own mount, PID, UTS,
//! IPC, network and cgroup namespaces, pivoted into its rootfs, with `/dev`
//! holding only the allowed nodes, limited by one cgroup per phone.
//!
//! Each phone has a monitor process, the shim (`cph-shim`, like containerd's
//! shims), that clones the phone's init, holds it as its child and records
//! its exit status in the state directory. The shim is detached from the
//! caller (new session, double fork), so phones outlive the agent; a new
//! [`Runtime`] over the same state directory re-adopts them, checking each
//! pid against its recorded start time so a recycled pid is never trusted.
//!
//! Optionally a phone has a user namespace of its own ([`UserNamespace`]):
//! root inside is an unprivileged host user, and its rootfs is mounted
//! idmapped so files keep their ids on disk.
//!
//! Android needs: each phone gets its own binderfs instance (`binder`,
//! `hwbinder`, `vndbinder`) when the host kernel has binderfs, and boot
//! properties reach init as `androidboot.*` arguments. Inside, `/proc/meminfo`,
//! `/proc/cpuinfo`, `/proc/stat` and the CPU lists under
//! `/sys/devices/system/cpu` show the phone's own memory limit and cpuset.
//!
//! State changes: [`Runtime::state`] and [`Runtime::list`] report each
//! phone's [`Status`] (running, paused, exited with code, failed to start
//! with reason); [`Runtime::changes`] polls them against what the caller saw
//! last and returns the differences as [`StatusChange`]s.

pub mod binder;
mod cgroup;
mod confine;
mod devfilter;
mod exec;
mod keyring;
pub mod netns;
mod runtime;
pub mod shim;
mod spec;
mod state;
mod userns;

pub use cgroup::{
    cgroups_named, mount_points as cgroup_mount_points, remove_parent as remove_cgroup_parent,
    Usage,
};
pub use exec::ExecOutput;
pub use keyring::keyring_name;
pub use runtime::{Runtime, StatusChange};
pub use spec::{BindMount, ContainerSpec, DeviceNode, UserNamespace};
pub use state::{ContainerState, Status};

use std::path::PathBuf;

/// Errors of phone containers; each names the phone and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("phone {name}: invalid spec: {reason}")]
    InvalidSpec { name: String, reason: String },
    #[error("phone {name}: rootfs {} does not exist or is not a directory", path.display())]
    RootfsMissing { name: String, path: PathBuf },
    #[error("phone {name}: rootfs {} is empty", path.display())]
    RootfsEmpty { name: String, path: PathBuf },
    #[error("phone {name}: init {init} is not an executable file in the rootfs")]
    InitNotExecutable { name: String, init: String },
    #[error("phone {name}: init exited at once with status {code}{}", console_note(.console))]
    InitExited {
        name: String,
        code: i32,
        /// The end of what init wrote to its console (empty when nothing).
        console: String,
    },
    #[error("phone {name}: {field} {list}: {missing} is not online on this host")]
    NotOnHost {
        name: String,
        /// `cpus` or `mems`.
        field: &'static str,
        list: String,
        missing: u32,
    },
    #[error("phone {name}: memory limit {limit} bytes is below the minimum {min}")]
    MemoryTooLow { name: String, limit: i64, min: i64 },
    #[error("phone {name} already exists")]
    Exists { name: String },
    #[error("phone {name} does not exist")]
    NotFound { name: String },
    #[error("phone {name} is not running")]
    NotRunning { name: String },
    #[error("phone {name}: {step}: {source}")]
    Io {
        name: String,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("phone {name}: cgroup {step}: {reason}")]
    Cgroup {
        name: String,
        step: &'static str,
        reason: String,
    },
    #[error("phone {name} failed to start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("phone {name}: state file {path}: {reason}")]
    State {
        name: String,
        path: PathBuf,
        reason: String,
    },
}

/// `: <the end of init's console>`, or nothing when it wrote nothing.
fn console_note(console: &str) -> String {
    if console.is_empty() {
        String::new()
    } else {
        format!("; its console ended with: {console}")
    }
}
