//! Running a command inside a phone (ADB shell jobs): the shim joins the
//! phone's cgroup and namespaces; output is captured up to a cap; on timeout
//! the exec's whole process group is killed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::ContainerError;

/// What an exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit status (128 + signal when killed); `None` after a timeout.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// True when output past the cap was dropped.
    pub truncated: bool,
}

/// Reads a pipe to its end, keeping at most `cap` bytes.
fn drain(
    mut r: impl Read + Send + 'static,
    cap: usize,
) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        let mut truncated = false;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    truncated |= n > room;
                }
            }
        }
        (kept, truncated)
    })
}

pub(crate) fn run(
    mut cmd: Command,
    name: &str,
    timeout: Duration,
    cap: usize,
) -> Result<ExecOutput, ContainerError> {
    use std::os::unix::process::CommandExt;
    let io = |source| ContainerError::Io {
        name: name.to_string(),
        step: "exec",
        source,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(io)?;
    let out = child.stdout.take().map(|s| drain(s, cap));
    let err = child.stderr.take().map(|s| drain(s, cap));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io)? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // After a timeout, processes of the group may still hold the pipes a
    // moment; they were killed with the group.
    let (stdout, t1) = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let (stderr, t2) = err.and_then(|h| h.join().ok()).unwrap_or_default();
    let exit_code = status.and_then(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code().or_else(|| s.signal().map(|sig| 128 + sig))
    });
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code: if timed_out { None } else { exit_code },
        timed_out,
        truncated: t1 || t2,
    })
}
