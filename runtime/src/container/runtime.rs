//! The runtime handle: start, observe, exec into, stop and delete phones
//! kept in one state directory under one parent cgroup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::exec::{self, ExecOutput};
use super::spec::ContainerSpec;
use super::state::{self, ContainerState, Status};
use super::{cgroup, ContainerError};

/// Phones of one agent.
#[derive(Debug, Clone)]
pub struct Runtime {
    state_dir: PathBuf,
    cgroup_parent: String,
    shim: PathBuf,
    /// Phones whose last start failed, with the reason, reported as
    /// [`Status::Failed`] (nothing of them is left on disk); shared by clones
    /// of this handle, kept until the next start or delete of the name.
    failures: Arc<Mutex<BTreeMap<String, String>>>,
}

/// One difference found by [`Runtime::changes`]: `old` is what the caller
/// saw last (`None`: not known), `new` what holds now (`None`: gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub name: String,
    pub old: Option<Status>,
    pub new: Option<Status>,
}

static NO_BINDERFS: Once = Once::new();

impl Runtime {
    /// A handle over `state_dir`; phones' cgroups live under
    /// `cgroup_parent` in every hierarchy; `shim` is the `cph-shim` binary.
    /// Phones already running there are adopted as they are.
    pub fn new(state_dir: &Path, cgroup_parent: &str, shim: &Path) -> Result<Self, ContainerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| ContainerError::Io {
            name: String::new(),
            step: "create state dir",
            source,
        })?;
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
            shim: shim.to_path_buf(),
            failures: Arc::default(),
        })
    }

    /// Creates and starts a phone; returns once init runs (or the start failed
    /// and everything made for it is gone).
    pub fn start(&self, spec: &ContainerSpec) -> Result<ContainerState, ContainerError> {
        let result = self.start_inner(spec);
        match &result {
            Ok(_) => {
                self.forget_failure(&spec.name);
            }
            // A duplicate leaves the running phone's status alone.
            Err(ContainerError::Exists { .. }) => {}
            Err(e) => {
                if let Ok(mut f) = self.failures.lock() {
                    f.insert(spec.name.clone(), e.to_string());
                }
            }
        }
        result
    }

    fn forget_failure(&self, name: &str) -> bool {
        self.failures
            .lock()
            .map(|mut f| f.remove(name).is_some())
            .unwrap_or(false)
    }

    fn start_inner(&self, spec: &ContainerSpec) -> Result<ContainerState, ContainerError> {
        spec.validate()?;
        if !super::binder::available() {
            NO_BINDERFS.call_once(|| {
                warn!("host kernel has no binderfs: phones get no binder devices (Android images will not boot; others do)");
            });
        }
        let name = spec.name.as_str();
        let dir = state::dir(&self.state_dir, name);
        if dir.exists() {
            match self.state(name) {
                Ok(st) if matches!(st.status, Status::Exited { .. } | Status::Failed { .. }) => {
                    // A stopped phone starts again in place.
                    let _ = std::fs::remove_file(state::state_path(&self.state_dir, name));
                }
                Ok(_) => {
                    return Err(ContainerError::Exists {
                        name: name.to_string(),
                    })
                }
                Err(_) if !state::state_path(&self.state_dir, name).exists() => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::create_dir_all(&dir).map_err(|source| ContainerError::Io {
            name: name.to_string(),
            step: "create phone state dir",
            source,
        })?;
        state::write_json(&dir.join("spec.json"), spec, name)?;
        let result = self.spawn_shim(name);
        if let Err(e) = &result {
            warn!(phone = name, error = %e, "phone failed to start");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = cgroup::load(&self.cgroup_parent, name).delete();
        }
        result
    }

    fn spawn_shim(&self, name: &str) -> Result<ContainerState, ContainerError> {
        let out = Command::new(&self.shim)
            .arg("start")
            .arg(&self.state_dir)
            .arg(name)
            .arg(&self.cgroup_parent)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| ContainerError::Io {
                name: name.to_string(),
                step: "run cph-shim",
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or("");
        if let Some(pid) = line.strip_prefix("ok ") {
            info!(phone = name, pid = pid.trim(), "phone started");
            return self.state(name);
        }
        let reason = line
            .strip_prefix("err ")
            .unwrap_or("shim reported nothing")
            .to_string();
        if let Some(code) = reason
            .strip_prefix(super::shim::EXITED_AT_ONCE)
            .and_then(|c| c.trim().parse().ok())
        {
            let log = state::console_path(&self.state_dir, name);
            return Err(ContainerError::InitExited {
                name: name.to_string(),
                code,
                console: console_tail(&log),
            });
        }
        Err(ContainerError::StartFailed {
            name: name.to_string(),
            reason,
        })
    }

    /// The phone's state, checked against the live process: a recorded pid
    /// that is gone or was recycled reads as exited.
    pub fn state(&self, name: &str) -> Result<ContainerState, ContainerError> {
        let path = state::state_path(&self.state_dir, name);
        if !path.exists() {
            let failed = self.failures.lock().ok().and_then(|f| f.get(name).cloned());
            if let Some(reason) = failed {
                return Ok(ContainerState {
                    name: name.to_string(),
                    pid: 0,
                    start_time: 0,
                    shim_pid: 0,
                    boot_id: None,
                    status: Status::Failed { reason },
                });
            }
            return Err(ContainerError::NotFound {
                name: name.to_string(),
            });
        }
        let mut st: ContainerState = state::read_json(&path, name)?;
        if matches!(st.status, Status::Running | Status::Paused) {
            if !st.init_alive() {
                st.status = Status::Exited { code: -1 };
            } else if self.frozen(name) {
                st.status = Status::Paused;
            }
        }
        Ok(st)
    }

    /// What the phone has used (CPU time, memory, processes), read from
    /// its cgroup; zeros for a phone without one.
    pub fn usage(&self, name: &str) -> cgroup::Usage {
        cgroup::usage(&cgroup::load(&self.cgroup_parent, name))
    }

    fn frozen(&self, name: &str) -> bool {
        let cg = cgroup::load(&self.cgroup_parent, name);
        cg.controller_of::<cgroups_rs::fs::freezer::FreezerController>()
            .and_then(|f| f.state().ok())
            .is_some_and(|s| {
                matches!(
                    s,
                    cgroups_rs::FreezerState::Frozen | cgroups_rs::FreezerState::Freezing
                )
            })
    }

    /// Removes the parent cgroup from every hierarchy once it holds no
    /// phone: `rmdir` refuses a cgroup with children or tasks, so this is a
    /// no-op while one is left.
    pub fn release_parent(&self) {
        for (dir, e) in cgroup::remove_parent(&self.cgroup_parent) {
            warn!(cgroup = %dir.display(), error = %e, "parent cgroup not removed");
        }
    }

    /// Every phone in the state directory, and those whose last start
    /// through this handle failed.
    pub fn list(&self) -> Result<Vec<ContainerState>, ContainerError> {
        let mut out = Vec::new();
        let failed: Vec<String> = self
            .failures
            .lock()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default();
        for name in failed {
            if !state::state_path(&self.state_dir, &name).exists() {
                if let Ok(st) = self.state(&name) {
                    out.push(st);
                }
            }
        }
        let entries = std::fs::read_dir(&self.state_dir).map_err(|source| ContainerError::Io {
            name: String::new(),
            step: "list state dir",
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(st) = self.state(&name) {
                out.push(st);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// State changes since the caller last looked: compares [`Self::list`]
    /// with `seen` (name to the status the caller knows), returns each
    /// difference and updates `seen`. Polling this is how the agent learns
    /// that a phone started, was paused, exited (with its code), failed to
    /// start (with the reason) or was deleted.
    pub fn changes(
        &self,
        seen: &mut BTreeMap<String, Status>,
    ) -> Result<Vec<StatusChange>, ContainerError> {
        let now: BTreeMap<String, Status> = self
            .list()?
            .into_iter()
            .map(|st| (st.name, st.status))
            .collect();
        let mut out = Vec::new();
        for (name, status) in &now {
            let old = seen.get(name);
            if old != Some(status) {
                out.push(StatusChange {
                    name: name.clone(),
                    old: old.cloned(),
                    new: Some(status.clone()),
                });
            }
        }
        for (name, old) in seen.iter() {
            if !now.contains_key(name) {
                out.push(StatusChange {
                    name: name.clone(),
                    old: Some(old.clone()),
                    new: None,
                });
            }
        }
        *seen = now;
        Ok(out)
    }

    /// The spec a phone was started with.
    pub fn spec(&self, name: &str) -> Result<ContainerSpec, ContainerError> {
        state::read_json(&state::dir(&self.state_dir, name).join("spec.json"), name)
    }

    /// Runs `argv` inside a running phone; stdout and stderr are kept up to
    /// `cap` bytes each; past `timeout` the exec's process tree is killed.
    pub fn exec(
        &self,
        name: &str,
        argv: &[&str],
        timeout: Duration,
        cap: usize,
    ) -> Result<ExecOutput, ContainerError> {
        let st = self.state(name)?;
        if st.status != Status::Running {
            return Err(ContainerError::NotRunning {
                name: name.to_string(),
            });
        }
        let mut cmd = Command::new(&self.shim);
        cmd.arg("exec")
            .arg(&self.state_dir)
            .arg(name)
            .arg(&self.cgroup_parent)
            .arg("--")
            .args(argv);
        exec::run(cmd, name, timeout, cap)
    }

    /// SIGTERM to init, up to `grace` to exit, then SIGKILL of everything in
    /// the phone's cgroup, which is removed. Returns the final status.
    pub fn stop(&self, name: &str, grace: Duration) -> Result<Status, ContainerError> {
        let st = self.state(name)?;
        let cg = cgroup::load(&self.cgroup_parent, name);
        if matches!(st.status, Status::Running | Status::Paused) {
            let _ = cgroup::freeze(&cg, name, false);
            let _ = kill(Pid::from_raw(st.pid), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while st.init_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        cgroup::destroy(&cg, name)?;
        // The shim records the exit status once it has reaped init; wait for
        // that record (or for the shim to be gone) rather than guess.
        let path = state::state_path(&self.state_dir, name);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let recorded: ContainerState = state::read_json(&path, name)?;
            let shim_alive =
                recorded.shim_pid > 0 && kill(Pid::from_raw(recorded.shim_pid), None).is_ok();
            let settled = !matches!(recorded.status, Status::Running | Status::Paused);
            if settled || !shim_alive || Instant::now() >= deadline {
                let now = self.state(name)?;
                info!(phone = name, status = ?now.status, "phone stopped");
                return Ok(now.status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the phone and starts it again on the same rootfs.
    pub fn restart(&self, name: &str, grace: Duration) -> Result<ContainerState, ContainerError> {
        let spec = self.spec(name)?;
        self.stop(name, grace)?;
        self.start(&spec)
    }

    /// Freezes every process of the phone.
    pub fn pause(&self, name: &str) -> Result<(), ContainerError> {
        cgroup::freeze(&cgroup::load(&self.cgroup_parent, name), name, true)
    }

    /// Thaws a paused phone.
    pub fn resume(&self, name: &str) -> Result<(), ContainerError> {
        cgroup::freeze(&cgroup::load(&self.cgroup_parent, name), name, false)
    }

    /// Stops the phone if needed and removes its cgroup and state.
    pub fn delete(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        let dir = state::dir(&self.state_dir, name);
        let was_failed = self.forget_failure(name);
        if !dir.exists() {
            if was_failed {
                return Ok(());
            }
            return Err(ContainerError::NotFound {
                name: name.to_string(),
            });
        }
        if state::state_path(&self.state_dir, name).exists() {
            self.stop(name, grace)?;
        }
        std::fs::remove_dir_all(&dir).map_err(|source| ContainerError::Io {
            name: name.to_string(),
            step: "remove state dir",
            source,
        })
    }

    /// Path of the phone's cgroup relative to each hierarchy root.
    pub fn cgroup_path(&self, name: &str) -> String {
        cgroup::path(&self.cgroup_parent, name)
    }
}

/// Bytes of init's console an error quotes at most.
const CONSOLE_TAIL: u64 = 300;

/// The last lines of a console log (at most [`CONSOLE_TAIL`] bytes), on one
/// line: what an init that failed at once said about it.
fn console_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL)))
        .is_err()
        || f.read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    // A cut first line is left out, unless it is all there is.
    let text = match text.split_once('\n') {
        Some((_, rest)) if len > CONSOLE_TAIL && !rest.trim().is_empty() => rest,
        _ => &text,
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_tail_is_its_last_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        assert_eq!(console_tail(&log), "", "no log");
        std::fs::write(&log, "booting\n\n  mount failed  \n").expect("write");
        assert_eq!(console_tail(&log), "booting / mount failed");
        // Longer than the tail: the line cut by it is left out.
        let long = format!("{}\nsecond\nlast\n", "x".repeat(1000));
        std::fs::write(&log, long).expect("write");
        assert_eq!(console_tail(&log), "second / last");
        // One long line: its end.
        std::fs::write(&log, "y".repeat(1000)).expect("write");
        assert_eq!(console_tail(&log), "y".repeat(CONSOLE_TAIL as usize));
    }
}
