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

mod cgroup;
mod exec;
mod runtime;
pub mod shim;
mod spec;
mod state;

pub use exec::ExecOutput;
pub use runtime::Runtime;
pub use spec::{BindMount, ContainerSpec, DeviceNode};
pub use state::{ContainerState, Status};

use std::path::PathBuf;

/// Errors of phone containers; each names the phone and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("phone {name}: invalid spec: {reason}")]
    InvalidSpec { name: String, reason: String },
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
