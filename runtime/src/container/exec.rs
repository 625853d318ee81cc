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

/// What a pipe gave so far, at most `cap` bytes kept.
#[derive(Default)]
struct Drained {
    kept: Vec<u8>,
    truncated: bool,
    /// The pipe reached its end (every writer closed it).
    ended: bool,
}

type Shared = std::sync::Arc<std::sync::Mutex<Drained>>;

/// Reads a pipe to its end on a thread of its own, keeping at most `cap`
/// bytes where [`run`] can take them also before the end.
fn drain(mut r: impl Read + Send + 'static, cap: usize) -> Shared {
    let shared = Shared::default();
    let out = shared.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut d = out.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 {
                d.ended = true;
                return;
            }
            let room = cap.saturating_sub(d.kept.len());
            d.kept.extend_from_slice(&buf[..n.min(room)]);
            d.truncated |= n > room;
        }
    });
    shared
}

fn ended(d: &Option<Shared>) -> bool {
    d.as_ref()
        .is_none_or(|d| d.lock().unwrap_or_else(|p| p.into_inner()).ended)
}

fn take(d: Option<Shared>) -> (Vec<u8>, bool) {
    d.map(|d| {
        let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut d.kept), d.truncated)
    })
    .unwrap_or_default()
}

/// Runs `cmd` (the shim entering the phone) until it exits and its output
/// ends, within `timeout`: at the deadline its whole process group is
/// killed. A command that exited while a process it left in the background
/// still holds its output is waited for to the deadline too, then that
/// group is killed and the output so far kept (a daemon started with its
/// output redirected is left running).
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
    let group = Pid::from_raw(child.id() as i32);
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
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The output ends once every process holding it is gone: at once
    // mostly; after a timeout, when the killed group has exited.
    let mut killed = timed_out;
    let grace = Duration::from_millis(500);
    loop {
        if ended(&out) && ended(&err) {
            break;
        }
        let now = Instant::now();
        if now >= deadline && !killed {
            let _ = killpg(group, Signal::SIGKILL);
            killed = true;
        }
        if now >= deadline + grace {
            // Held by a process that left the group (setsid): the output
            // stops here.
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (stdout, t1) = take(out);
    let (stderr, t2) = take(err);
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
