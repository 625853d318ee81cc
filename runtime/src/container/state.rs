//! The state directory: `<state>/<name>/spec.json` and `state.json`, written
//! by the runtime and the shim, read back to re-adopt phones.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ContainerError;

/// Phone lifecycle as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Init is running.
    Running,
    /// Init is frozen (pause).
    Paused,
    /// Init exited on its own or was stopped; `code` is its exit status
    /// (128 + signal when killed).
    Exited { code: i32 },
    /// Start failed; nothing of the phone is left running.
    Failed { reason: String },
}

/// What the state file records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub name: String,
    /// Host pid of the phone's init.
    pub pid: i32,
    /// Start time of that pid (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
    /// Pid of the phone's shim.
    pub shim_pid: i32,
    /// The boot the pids are of (`/proc/sys/kernel/random/boot_id`): a pid
    /// and start time recorded before a reboot may be another process's
    /// after it. Absent in records made before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(flatten)]
    pub status: Status,
}

impl ContainerState {
    /// Whether the recorded init still runs: same boot, pid alive with the
    /// recorded start time.
    pub fn init_alive(&self) -> bool {
        let same_boot = match (&self.boot_id, boot_id()) {
            (Some(recorded), Some(now)) => *recorded == now,
            _ => true,
        };
        same_boot && alive(self.pid, self.start_time)
    }
}

/// This boot's id, as the kernel gives it.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

pub(crate) fn dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

pub(crate) fn state_path(root: &Path, name: &str) -> PathBuf {
    dir(root, name).join("state.json")
}

/// Init's console log, written by the shim (`console.log.1` the one before).
pub(crate) fn console_path(root: &Path, name: &str) -> PathBuf {
    dir(root, name).join("console.log")
}

/// Writes `value` as JSON atomically (temporary file, fsync, rename).
pub(crate) fn write_json<T: Serialize>(
    path: &Path,
    value: &T,
    name: &str,
) -> Result<(), ContainerError> {
    let err = |reason: String| ContainerError::State {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err(e.to_string()))?;
    // The writer's own temporary file: a runtime and a shim, or two shims,
    // may write the same record at once.
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
    f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
    f.sync_all().map_err(|e| err(e.to_string()))?;
    fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    name: &str,
) -> Result<T, ContainerError> {
    let bytes = fs::read(path).map_err(|e| ContainerError::State {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ContainerError::State {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Start time of a live pid, or `None` when there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` is alive, not a zombie, and started at `start`.
pub fn alive(pid: i32, start: u64) -> bool {
    if start_time(pid) != Some(start) {
        return false;
    }
    let state = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s.get(i + 2..i + 3).map(str::to_string))
        });
    state.as_deref() != Some("Z")
}

#[cfg(test)]
mod boot_tests {
    use super::*;

    /// A record's init is alive only in the boot it was made in: the same
    /// pid and start time in another boot are another process.
    #[test]
    fn a_record_of_another_boot_is_not_alive() {
        let pid = std::process::id() as i32;
        let record = |boot_id: Option<String>| ContainerState {
            name: "p".into(),
            pid,
            start_time: start_time(pid).expect("own start time"),
            shim_pid: 0,
            boot_id,
            status: Status::Running,
        };
        assert!(record(boot_id()).init_alive());
        assert!(record(None).init_alive(), "a record made before boot ids");
        assert!(!record(Some("another-boot".into())).init_alive());
    }
}
