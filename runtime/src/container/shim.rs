//! The shim: one small monitor process per phone, run as the `cph-shim`
//! binary (single-threaded, so fork and clone are safe).
//!
//! `cph-shim start STATE_DIR NAME CGROUP_PARENT` detaches (new session,
//! fork), creates the phone's cgroup, clones init into new mount, PID, UTS,
//! IPC, network and cgroup namespaces (all inside a user namespace of the
//! phone's own when its spec has one), reports `ok PID` or `err REASON` on
//! stdout, then waits for init and records its exit status in the state file.
//!
//! `cph-shim exec STATE_DIR NAME CGROUP_PARENT -- ARGV...` joins a running
//! phone's cgroup and namespaces, chroots into its root and runs ARGV as a
//! child, exiting with its status.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, execve, execvpe, fork, pivot_root, sethostname, setsid, ForkResult, Pid};

use super::cgroup;
use super::spec::ContainerSpec;
use super::state::{self, ContainerState, Status};

/// Entry point of the `cph-shim` binary; returns the process exit code.
pub fn shim_main(args: &[String]) -> i32 {
    match args.get(1).map(String::as_str) {
        Some("start") if args.len() == 5 => start(Path::new(&args[2]), &args[3], &args[4]),
        Some("exec") if args.len() > 6 && args[5] == "--" => {
            exec(Path::new(&args[2]), &args[3], &args[4], &args[6..])
        }
        _ => {
            eprintln!("usage: cph-shim start STATE_DIR NAME CGROUP_PARENT | exec STATE_DIR NAME CGROUP_PARENT -- ARGV...");
            2
        }
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Points stdio at /dev/null so the caller's pipes see EOF.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors of this
            // single-threaded process; `null` stays open until it returns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn start(root: &Path, name: &str, parent: &str) -> i32 {
    let spec: ContainerSpec =
        match state::read_json(&state::dir(root, name).join("spec.json"), name) {
            Ok(s) => s,
            Err(e) => {
                report(&format!("err {e}"));
                return 1;
            }
        };
    let _ = setsid();
    // SAFETY: this process is single-threaded.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => {
            report(&format!("err fork monitor: {e}"));
            return 1;
        }
    }
    // Keep the monitor alive when the caller's terminal or agent goes away.
    let _ = setsid();
    match monitor(root, &spec, parent) {
        Ok(()) => 0,
        Err(reason) => {
            report(&format!("err {reason}"));
            1
        }
    }
}

/// Creates the phone, reports, then holds init until it exits.
fn monitor(root: &Path, spec: &ContainerSpec, parent: &str) -> Result<(), String> {
    let name = spec.name.as_str();
    let dir = state::dir(root, name);
    let views = write_views(&dir, spec).map_err(|e| format!("proc views: {e}"))?;
    let cg = cgroup::create(parent, spec).map_err(|e| e.to_string())?;
    let binderfs = super::binder::available();

    // Init's console: a pipe this process copies into a capped log, never
    // the caller's pipes (which would then never see end-of-file) nor the
    // log file itself (which the phone could grow without end).
    let (mut log, console) = ConsoleLog::open(state::console_path(root, name))?;
    let null: OwnedFd = std::fs::File::open("/dev/null")
        .map_err(|e| format!("open /dev/null: {e}"))?
        .into();
    // Close-on-exec: init inherits neither end.
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // A named network namespace is joined by init; otherwise it gets a new one.
    let netns: Option<OwnedFd> = match &spec.netns {
        Some(p) => Some(
            std::fs::File::open(p)
                .map_err(|e| format!("open netns {}: {e}", p.display()))?
                .into(),
        ),
        None => None,
    };
    // The network namespace (a new one takes the kernel milliseconds) is
    // made by the child itself while this process moves it into its
    // cgroups (the first move takes milliseconds too); the cgroup namespace
    // once it is in them, so its root is the phone's cgroup.
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    // With a user namespace of its own the phone's other namespaces are
    // made inside it, so its root holds its capabilities there; a named
    // network namespace belongs to the host's user namespace, which init
    // could no longer enter: the shim enters it, and init is born in it.
    // The idmapped root comes over `tree_rx` ([`super::userns`]).
    let own_users = spec.user_ns.is_some();
    let (tree_tx, tree_rx) = if own_users {
        if let Some(fd) = &netns {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| format!("join netns: {e}"))?;
        }
        flags |= CloneFlags::CLONE_NEWUSER;
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let mut stack = vec![0u8; 1024 * 1024];
    let child_spec = spec.clone();
    let child_views = views.clone();
    // The shim's ends of the child's channels, which the child's copy of
    // the descriptor table holds too: closed there first, so a shim gone
    // before releasing it reads as end-of-file, not as a wait for ever.
    let parent_ends: Vec<i32> = std::iter::once(go_w.as_raw_fd())
        .chain(tree_tx.as_ref().map(|t| t.as_raw_fd()))
        .collect();
    let cb = Box::new(move || -> isize {
        for fd in &parent_ends {
            // SAFETY: closing the child's own copy of a descriptor it never
            // uses; the shim's stays open.
            unsafe {
                libc::close(*fd);
            }
        }
        // SAFETY: dup2 onto the standard descriptors of the cloned child,
        // which runs alone; both sources stay open until exec.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(console.as_raw_fd(), 1);
            libc::dup2(console.as_raw_fd(), 2);
        }
        if netns.is_none() {
            if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
                let _ = nix::unistd::write(&err_w, format!("new netns: {e}").as_bytes());
                return 127;
            }
        }
        // Released once the shim has put it in the phone's cgroup (and
        // given it its ids); a shim gone before that (EOF) means no phone:
        // it must not run outside its cgroup with no one watching it.
        let mut byte = [0u8; 1];
        loop {
            match nix::unistd::read(go_r.as_fd(), &mut byte) {
                Ok(1) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return 127,
            }
        }
        let tree = match &tree_rx {
            Some(sock) => {
                match super::userns::become_root().and_then(|()| super::userns::recv_fds(sock)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let _ = nix::unistd::write(&err_w, e.as_bytes());
                        return 127;
                    }
                }
            }
            None => None,
        };
        if let (Some(fd), None) = (&netns, &tree) {
            if let Err(e) = setns(fd, CloneFlags::CLONE_NEWNET) {
                let _ = nix::unistd::write(&err_w, format!("join netns: {e}").as_bytes());
                return 127;
            }
        }
        if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP) {
            let _ = nix::unistd::write(&err_w, format!("cgroup namespace: {e}").as_bytes());
            return 127;
        }
        let reason = match init_child(&child_spec, &child_views, binderfs, tree) {
            Ok(never) => match never {},
            Err(reason) => reason,
        };
        let _ = nix::unistd::write(&err_w, reason.as_bytes());
        127
    });
    // SAFETY: single-threaded process; the child only runs `cb` on its own
    // stack and then execs or exits.
    let child = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) };
    let child = match child {
        Ok(pid) => pid,
        Err(e) => {
            let _ = cgroup::destroy(&cg, name);
            return Err(format!("clone namespaces: {e}"));
        }
    };
    let fail = |reason: String| -> Result<(), String> {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        let _ = cgroup::destroy(&cg, name);
        Err(reason)
    };
    if let (Some(u), Some(sock)) = (&spec.user_ns, &tree_tx) {
        let handed = super::userns::write_maps(child.as_raw(), u)
            .and_then(|()| {
                std::fs::File::open(format!("/proc/{child}/ns/user"))
                    .map_err(|e| format!("open user namespace: {e}"))
            })
            .and_then(|ns| {
                let ns: OwnedFd = ns.into();
                // The root; the shim's sysfs when it is in a named network
                // namespace; then each bind mount's source: a writable one
                // idmapped too, so that its files show their owners rather
                // than nobody; a read-only one as it is on the host (see
                // `shared_tree`).
                let mut trees = vec![super::userns::idmapped_tree(&spec.rootfs, &ns)?];
                if spec.netns.is_some() {
                    trees.push(super::userns::sysfs_tree()?);
                }
                for b in &spec.mounts {
                    trees.push(if b.read_only {
                        super::userns::shared_tree(&b.source)?
                    } else {
                        super::userns::idmapped_tree(&b.source, &ns)?
                    });
                }
                super::userns::send_fds(sock, &trees.iter().collect::<Vec<_>>())
            });
        if let Err(e) = handed {
            return fail(e);
        }
    }
    if let Err(e) = cgroup::join(&cg, child.as_raw(), name) {
        return fail(e.to_string());
    }
    if let Err(e) = nix::unistd::write(&go_w, b"g") {
        return fail(format!("release init: {e}"));
    }
    drop(go_w);
    // The error pipe closes on a successful exec.
    let mut reason = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = nix::unistd::read(err_r.as_fd(), &mut buf) {
        if n == 0 {
            break;
        }
        reason.extend_from_slice(&buf[..n]);
    }
    if !reason.is_empty() {
        return fail(String::from_utf8_lossy(&reason).into_owned());
    }
    // An init that dies at once is a failed start, not a running phone: it
    // is watched until it shows it got going (it started a process, as
    // every init does early, Android's and a boot script alike) or for a
    // short window, whichever comes first.
    let window = std::time::Instant::now() + EXIT_WATCH;
    let children = format!("/proc/{child}/task/{child}/children");
    while std::time::Instant::now() < window {
        if let Ok(status) = waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            if !matches!(status, WaitStatus::StillAlive) {
                let _ = cgroup::destroy(&cg, name);
                log.drain();
                return match exit_code(status) {
                    Some(code) => Err(format!("{EXITED_AT_ONCE}{code}")),
                    None => Err(format!("init exited at once ({status:?})")),
                };
            }
        }
        if std::fs::read_to_string(&children).is_ok_and(|c| !c.trim().is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let start_time = state::start_time(child.as_raw()).unwrap_or(0);
    let mut st = ContainerState {
        name: name.to_string(),
        pid: child.as_raw(),
        start_time,
        shim_pid: std::process::id() as i32,
        boot_id: state::boot_id(),
        status: Status::Running,
    };
    let path = state::state_path(root, name);
    if let Err(e) = state::write_json(&path, &st, name) {
        return fail(e.to_string());
    }
    report(&format!("ok {}", child.as_raw()));
    detach_stdio();

    let code = hold(child, &views, spec, &cg, &mut log);
    st.status = Status::Exited { code };
    // Only over its own record: a shim slow to end (its phone given up on
    // and started again meanwhile) must not write over the new one's.
    let own = state::read_json::<ContainerState>(&path, name)
        .is_ok_and(|recorded| recorded.shim_pid == st.shim_pid);
    if own {
        let _ = state::write_json(&path, &st, name);
    }
    Ok(())
}

/// How long a new init that starts no process is watched for an exit
/// before the phone counts as started. An init that forks ends the watch
/// at once, so only one that does not pays it; 15 ms proved too short for
/// an emulated host to exec a failing init.
const EXIT_WATCH: std::time::Duration = std::time::Duration::from_millis(50);

/// How often the views inside a running phone are brought up to date.
const VIEW_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds init until it exits, returning its exit code; meanwhile keeps the
/// phone's `/proc` views current (memory in use, CPU times), as lxcfs does
/// on every read, and copies init's console into its log. Waits on a pidfd
/// so the exit is seen at once.
fn hold(
    child: Pid,
    views: &Views,
    spec: &ContainerSpec,
    cg: &cgroups_rs::fs::Cgroup,
    log: &mut ConsoleLog,
) -> i32 {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    let pidfd: Option<OwnedFd> = (raw >= 0).then(|| {
        // SAFETY: `raw` is a freshly opened descriptor owned by nobody else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) }
    });
    let mut next_refresh = std::time::Instant::now();
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    log.drain();
                    return code;
                }
                continue;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return -1,
        }
        let now = std::time::Instant::now();
        if now >= next_refresh {
            refresh_views(views, spec, cg);
            next_refresh = now + VIEW_REFRESH;
        }
        let wait = next_refresh.saturating_duration_since(std::time::Instant::now());
        let mut fds = Vec::with_capacity(2);
        if let Some(fd) = &pidfd {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(fd) = log.reader() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a pidfd, waitpid is tried again every 200 ms; a console
        // that used its rate waits for its next second.
        let mut timeout = wait.min(log.resumes_in());
        if pidfd.is_none() {
            timeout = timeout.min(std::time::Duration::from_millis(200));
        }
        // SAFETY: `fds` holds valid pollfds for the duration of the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                // Rounded up: a wait of less than a millisecond would spin.
                timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
            )
        };
        log.pump();
    }
}

/// Bytes of init's console a log file holds before it is rotated: the
/// phone keeps `console.log` and the one before it, `console.log.1`.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;

/// Bytes of init's console copied per second at most: beyond them the pipe
/// fills and the phone's writers wait, so a phone cannot make its shim
/// (whose CPU is the host's, not the phone's) spin on its output.
pub const CONSOLE_RATE: u64 = 1 << 20;

/// Init's console: the pipe init writes to, and the log this process
/// copies it into, rotated at [`CONSOLE_LOG_MAX`].
struct ConsoleLog {
    reader: Option<OwnedFd>,
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
    /// The current second of [`CONSOLE_RATE`], and the bytes copied in it.
    window: std::time::Instant,
    copied: u64,
}

impl ConsoleLog {
    /// The log at `path` and the pipe's write end, for init.
    fn open(path: PathBuf) -> Result<(Self, OwnedFd), String> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let flags = fcntl(&r, FcntlArg::F_GETFL).map_err(|e| format!("console pipe: {e}"))?;
            let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
            fcntl(&r, FcntlArg::F_SETFL(flags)).map_err(|e| format!("console pipe: {e}"))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("console log: {e}"))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let log = ConsoleLog {
            reader: Some(r),
            path,
            file: Some(file),
            size,
            window: std::time::Instant::now(),
            copied: 0,
        };
        Ok((log, w))
    }

    /// Starts a new second of the rate when the last one is over.
    fn tick(&mut self) {
        if self.window.elapsed() >= std::time::Duration::from_secs(1) {
            self.window = std::time::Instant::now();
            self.copied = 0;
        }
    }

    /// The pipe to wait on: while a writer holds it and this second's rate
    /// is not used up.
    fn reader(&mut self) -> Option<libc::c_int> {
        self.tick();
        if self.copied >= CONSOLE_RATE {
            return None;
        }
        self.reader.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// How long until the pipe is read again: at once unless this second's
    /// rate is used up.
    fn resumes_in(&self) -> std::time::Duration {
        if self.reader.is_none() || self.copied < CONSOLE_RATE {
            return std::time::Duration::MAX;
        }
        std::time::Duration::from_secs(1).saturating_sub(self.window.elapsed())
    }

    /// Copies what the pipe holds into the log, within this second's rate.
    fn pump(&mut self) {
        self.tick();
        let left = CONSOLE_RATE.saturating_sub(self.copied);
        self.copied += self.copy(left);
    }

    /// Copies what the pipe holds (a log's worth at most) whatever the
    /// rate: init has exited.
    fn drain(&mut self) {
        self.copy(CONSOLE_LOG_MAX);
    }

    /// Copies up to `limit` bytes from the pipe into the log; the bytes
    /// copied. Best effort: a log that cannot be written drops the output
    /// (the pipe is still emptied, so init does not wait on it).
    fn copy(&mut self, limit: u64) -> u64 {
        let mut buf = [0u8; 64 << 10];
        let mut copied = 0u64;
        while copied < limit {
            let Some(r) = &self.reader else { break };
            let want = buf.len().min((limit - copied) as usize);
            match nix::unistd::read(r.as_fd(), &mut buf[..want]) {
                Ok(0) => self.reader = None,
                Ok(n) => {
                    self.write(&buf[..n]);
                    copied += n as u64;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        copied
    }

    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.size >= CONSOLE_LOG_MAX {
                self.rotate();
            }
            let n = data.len().min((CONSOLE_LOG_MAX - self.size) as usize);
            if let Some(f) = &mut self.file {
                let _ = f.write_all(&data[..n]);
            }
            self.size += n as u64;
            data = &data[n..];
        }
    }

    /// `console.log` becomes `console.log.1` (replacing it); a new one is
    /// begun.
    fn rotate(&mut self) {
        self.file = None;
        let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.size = 0;
    }
}

/// Rewrites a view file in place: it is bind-mounted over a `/proc` entry,
/// so its inode must stay the same.
fn rewrite(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())?;
    f.set_len(text.len() as u64)
}

fn refresh_views(views: &Views, spec: &ContainerSpec, cg: &cgroups_rs::fs::Cgroup) {
    if let (Some(path), Some(limit)) = (&views.meminfo, spec.memory_limit) {
        let _ = rewrite(path, &meminfo_view(limit, cgroup::memory_usage(cg)));
    }
    if let (Some(path), Some(cpus)) = (&views.stat, &views.cpus) {
        if let Ok(host) = std::fs::read_to_string("/proc/stat") {
            let _ = rewrite(path, &stat_view(&host, cpus));
        }
    }
}

fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Start failure line of an init that exited within the watch window,
/// followed by its exit status; the runtime turns it into
/// [`super::ContainerError::InitExited`].
pub const EXITED_AT_ONCE: &str = "init exited at once: status ";

/// Files shown over `/proc` and `/sys` entries inside the phone so it sizes
/// itself to its own limits (the lxcfs idea: written at start, then kept
/// current by the shim while the phone runs).
#[derive(Clone)]
struct Views {
    meminfo: Option<PathBuf>,
    cpuinfo: Option<PathBuf>,
    stat: Option<PathBuf>,
    /// `0-(n-1)` for the cpuset's n CPUs: `online`, `present`, `possible`.
    cpu_list: Option<PathBuf>,
    /// `androidboot.*` boot properties, as a kernel command line.
    cmdline: Option<PathBuf>,
    /// The host CPUs of the cpuset, in order (the `stat` view's source).
    cpus: Option<Vec<u32>>,
}

fn write_views(dir: &Path, spec: &ContainerSpec) -> std::io::Result<Views> {
    let mut v = Views {
        meminfo: None,
        cpuinfo: None,
        stat: None,
        cpu_list: None,
        cmdline: None,
        cpus: None,
    };
    if let Some(limit) = spec.memory_limit {
        let p = dir.join("meminfo");
        std::fs::write(&p, meminfo_view(limit, None))?;
        v.meminfo = Some(p);
    }
    if let Some(cpus) = &spec.cpus {
        let mut list = crate::placement::cpulist::parse(cpus).unwrap_or_default();
        list.sort_unstable();
        list.dedup();
        if list.is_empty() {
            list.push(0);
        }
        let n = list.len() as u32;
        let p = dir.join("cpu_list");
        std::fs::write(
            &p,
            format!(
                "{}\n",
                crate::placement::cpulist::format(&(0..n).collect::<Vec<_>>())
            ),
        )?;
        v.cpu_list = Some(p);
        let host = std::fs::read_to_string("/proc/cpuinfo")?;
        if let Some(text) = cpuinfo_view(&host, &list) {
            let p = dir.join("cpuinfo");
            std::fs::write(&p, text)?;
            v.cpuinfo = Some(p);
        }
        let host = std::fs::read_to_string("/proc/stat")?;
        let p = dir.join("stat");
        std::fs::write(&p, stat_view(&host, &list))?;
        v.stat = Some(p);
        v.cpus = Some(list);
    }
    if !spec.boot_properties.is_empty() {
        let line: Vec<String> = spec
            .boot_properties
            .iter()
            .map(|(k, val)| {
                if val.contains(' ') {
                    format!("androidboot.{k}=\"{val}\"")
                } else {
                    format!("androidboot.{k}={val}")
                }
            })
            .collect();
        let p = dir.join("cmdline");
        std::fs::write(&p, format!("{}\n", line.join(" ")))?;
        v.cmdline = Some(p);
    }
    Ok(v)
}

/// `/proc/meminfo` of a phone limited to `limit` bytes, without swap, with
/// `usage` (bytes in use, of which page cache) from its memory cgroup.
fn meminfo_view(limit: i64, usage: Option<(u64, u64)>) -> String {
    let total = limit.max(0) as u64 / 1024;
    let (used, cache) = usage.map_or((0, 0), |(u, c)| (u / 1024, c.min(u) / 1024));
    let used = used.min(total);
    let free = total - used;
    let available = (free + cache).min(total);
    format!(
        "MemTotal:       {total:>8} kB\nMemFree:        {free:>8} kB\nMemAvailable:   {available:>8} kB\n\
         Buffers:               0 kB\nCached:         {cache:>8} kB\nSwapCached:            0 kB\n\
         SwapTotal:             0 kB\nSwapFree:              0 kB\n"
    )
}

/// The host's `/proc/cpuinfo` blocks of the cpuset's CPUs, renumbered from 0.
fn cpuinfo_view(host: &str, cpus: &[u32]) -> Option<String> {
    let blocks: Vec<&str> = host
        .split("\n\n")
        .filter(|b| b.lines().any(|l| l.starts_with("processor")))
        .collect();
    if blocks.is_empty() {
        return None;
    }
    let number = |b: &str| -> Option<u32> {
        b.lines()
            .find(|l| l.starts_with("processor"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|n| n.trim().parse().ok())
    };
    let mut out = String::new();
    for (i, cpu) in cpus.iter().enumerate() {
        let block = blocks
            .iter()
            .find(|b| number(b) == Some(*cpu))
            .unwrap_or(&blocks[i % blocks.len()]);
        for line in block.lines() {
            if line.starts_with("processor") {
                out.push_str(&format!("processor\t: {i}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    Some(out)
}

/// The host's `/proc/stat` with only the cpuset's `cpuN` lines, renumbered
/// from 0, and the `cpu` total summed over them; other lines as they are.
fn stat_view(host: &str, cpus: &[u32]) -> String {
    let mut per_cpu: Vec<(u32, Vec<u64>)> = Vec::new();
    let mut rest = Vec::new();
    for line in host.lines() {
        let mut it = line.split_whitespace();
        let key = it.next().unwrap_or("");
        if key == "cpu" {
            continue;
        }
        if let Some(num) = key.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) {
            per_cpu.push((num, it.filter_map(|f| f.parse().ok()).collect()));
        } else {
            rest.push(line);
        }
    }
    let chosen: Vec<&Vec<u64>> = cpus
        .iter()
        .filter_map(|c| per_cpu.iter().find(|(n, _)| n == c).map(|(_, f)| f))
        .collect();
    let width = chosen.iter().map(|f| f.len()).max().unwrap_or(10);
    let mut total = vec![0u64; width];
    for fields in &chosen {
        for (t, f) in total.iter_mut().zip(fields.iter()) {
            *t += f;
        }
    }
    let join = |f: &[u64]| f.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    let mut out = format!("cpu  {}\n", join(&total));
    for (i, fields) in chosen.iter().enumerate() {
        out.push_str(&format!("cpu{i} {}\n", join(fields)));
    }
    for line in rest {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Runs in the cloned child: builds the phone's mounts and execs init.
/// `trees`, for a phone with its own user namespace: its idmapped root,
/// then its sysfs when the shim made it, then its bind mounts' sources,
/// idmapped, in order.
fn init_child(
    spec: &ContainerSpec,
    views: &Views,
    binderfs: bool,
    trees: Option<Vec<OwnedFd>>,
) -> Result<std::convert::Infallible, String> {
    let mut trees = trees.map(Vec::into_iter);
    let root_tree = trees.as_mut().and_then(Iterator::next);
    let sys_tree = match spec.netns {
        Some(_) => trees.as_mut().and_then(Iterator::next),
        None => None,
    };
    let rootfs = &spec.rootfs;
    let m = |src: Option<&Path>,
             target: &Path,
             fstype: Option<&str>,
             flags: MsFlags,
             data: Option<&str>,
             what: &str| {
        mount(src, target, fstype, flags, data)
            .map_err(|e| format!("mount {what} at {}: {e}", target.display()))
    };
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
        "private /",
    )?;
    match &root_tree {
        Some(t) => super::userns::attach(t, rootfs, "idmapped root")?,
        None => m(
            Some(rootfs),
            rootfs,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
            "rootfs",
        )?,
    }
    let at = |rel: &str| rootfs.join(rel);
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()));
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    mkdir(&at("proc"))?;
    m(
        Some(Path::new("proc")),
        &at("proc"),
        Some("proc"),
        nodev,
        None,
        "proc",
    )?;
    // As OCI runtimes do: read-only what in /proc acts on the whole host
    // (sysctls outside the phone's namespaces, the SysRq trigger, IRQ
    // affinities, bus and filesystem settings), and masked what shows the
    // host's memory, keys, timers and firmware.
    for rel in [
        "proc/sys",
        "proc/sysrq-trigger",
        "proc/irq",
        "proc/bus",
        "proc/fs",
    ] {
        let p = at(rel);
        if p.symlink_metadata().is_err() {
            continue;
        }
        m(Some(&p), &p, None, MsFlags::MS_BIND, None, rel)?;
        m(
            None,
            &p,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
            rel,
        )?;
    }
    // The network sysctls are the phone's own network namespace's (a phone
    // always has one): writable, as Android's init and netd set them.
    let net = at("proc/sys/net");
    m(
        Some(&net),
        &net,
        None,
        MsFlags::MS_BIND,
        None,
        "proc/sys/net",
    )?;
    m(
        None,
        &net,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
        None,
        "proc/sys/net",
    )?;
    for rel in [
        "proc/kcore",
        "proc/keys",
        "proc/timer_list",
        "proc/sched_debug",
        "proc/latency_stats",
        "proc/acpi",
        "proc/scsi",
    ] {
        mask(&at(rel), rel)?;
    }
    mkdir(&at("sys"))?;
    match &sys_tree {
        Some(t) => super::userns::attach(t, &at("sys"), "sysfs")?,
        None => m(
            Some(Path::new("sysfs")),
            &at("sys"),
            Some("sysfs"),
            nodev | MsFlags::MS_RDONLY,
            None,
            "sysfs",
        )?,
    }
    mask(&at("sys/firmware"), "sys/firmware")?;

    mkdir(&at("dev"))?;
    m(
        Some(Path::new("tmpfs")),
        &at("dev"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        "/dev tmpfs",
    )?;
    for (node, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = at("dev").join(node);
        if root_tree.is_some() {
            // No mknod in a user namespace: the host's node, bound.
            std::fs::File::create(&p).map_err(|e| format!("device node {}: {e}", p.display()))?;
            m(
                Some(&Path::new("/dev").join(node)),
                &p,
                None,
                MsFlags::MS_BIND,
                None,
                "device",
            )?;
            continue;
        }
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| format!("mknod {}: {e}", p.display()))?;
    }
    mkdir(&at("dev/pts"))?;
    m(
        Some(Path::new("devpts")),
        &at("dev/pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
        "devpts",
    )?;
    std::os::unix::fs::symlink("pts/ptmx", at("dev/ptmx"))
        .map_err(|e| format!("ptmx link: {e}"))?;
    mkdir(&at("dev/shm"))?;
    m(
        Some(Path::new("tmpfs")),
        &at("dev/shm"),
        Some("tmpfs"),
        nodev,
        Some("mode=1777"),
        "/dev/shm",
    )?;
    if binderfs {
        super::binder::setup(&at("dev"))?;
    }
    for dev in &spec.devices {
        let rel = dev.path.strip_prefix("/").unwrap_or(&dev.path);
        let target = rootfs.join(rel);
        if let Some(p) = target.parent() {
            mkdir(p)?;
        }
        std::fs::File::create(&target)
            .map_err(|e| format!("device node {}: {e}", target.display()))?;
        m(
            Some(&dev.path),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
            "device",
        )?;
    }

    for (file, rel) in [
        (&views.meminfo, "proc/meminfo"),
        (&views.cpuinfo, "proc/cpuinfo"),
        (&views.stat, "proc/stat"),
        (&views.cmdline, "proc/cmdline"),
        (&views.cpu_list, "sys/devices/system/cpu/online"),
        (&views.cpu_list, "sys/devices/system/cpu/present"),
        (&views.cpu_list, "sys/devices/system/cpu/possible"),
    ] {
        if let Some(src) = file {
            if at(rel).exists() {
                m(
                    Some(src),
                    &at(rel),
                    None,
                    MsFlags::MS_BIND,
                    None,
                    "proc view",
                )?;
                // Files of the host's state directory: the phone reads
                // them, and writing them would grow the host's disk.
                super::userns::remount_read_only(&at(rel))?;
            }
        }
    }
    // The phone owns what is beneath its root: mount points are made and
    // opened without a link leading out, and mounted onto through their
    // descriptors.
    let root_fd = std::fs::File::open(rootfs)
        .map(OwnedFd::from)
        .map_err(|e| format!("open root {}: {e}", rootfs.display()))?;
    for b in &spec.mounts {
        let rel = b.target.strip_prefix("/").unwrap_or(&b.target);
        let point = mount_point_beneath(&root_fd, rel, b.source.is_dir())
            .map_err(|e| format!("mount point {}: {e}", b.target.display()))?;
        match trees.as_mut().and_then(Iterator::next) {
            Some(t) => super::userns::attach_at(&t, &point, "idmapped bind mount")?,
            None => m(
                Some(&b.source),
                &fd_path(&point),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
                "bind",
            )?,
        }
        if b.read_only {
            // The mount now on the point, reached the same way.
            let mounted = crate::archive::sys::openat2(
                root_fd.as_raw_fd(),
                &path_cstr(rel)?,
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| format!("reopen {}: {e}", b.target.display()))?;
            super::userns::remount_read_only(&fd_path(&mounted))?;
        }
    }

    sethostname(&spec.name).map_err(|e| format!("sethostname: {e}"))?;
    chdir(rootfs).map_err(|e| format!("chdir rootfs: {e}"))?;
    pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    let argv = cstrings(&spec.init_argv())?;
    let env = cstrings(&spec.env)?;
    super::keyring::join_own(&spec.name)?;
    super::confine::confine()?;
    match execve(&argv[0], &argv, &env) {
        Ok(never) => match never {},
        Err(e) => Err(format!("exec {}: {e}", spec.init[0])),
    }
}

/// Hides `path` (`what` in errors) under an empty read-only tmpfs, or
/// `/dev/null` for a file; nothing when the kernel has no such entry.
fn mask(path: &Path, what: &str) -> Result<(), String> {
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(());
    };
    let r = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=0"),
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    r.map_err(|e| format!("mask {what} at {}: {e}", path.display()))
}

fn cstrings(list: &[String]) -> Result<Vec<CString>, String> {
    list.iter()
        .map(|s| CString::new(s.as_str()).map_err(|_| format!("{s:?} holds a NUL byte")))
        .collect()
}

/// `cph-shim exec`: runs ARGV inside a running phone.
fn exec(root: &Path, name: &str, parent: &str, argv: &[String]) -> i32 {
    let fail = |msg: String| {
        eprintln!("cph-shim exec {name}: {msg}");
        126
    };
    let st: ContainerState = match state::read_json(&state::state_path(root, name), name) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    if !st.init_alive() {
        return fail("phone is not running".to_string());
    }
    let open = |what: &str| -> Result<OwnedFd, String> {
        std::fs::File::open(format!("/proc/{}/{what}", st.pid))
            .map(OwnedFd::from)
            .map_err(|e| format!("open {what}: {e}"))
    };
    let own_users = super::userns::has_own(st.pid);
    let result = (|| -> Result<(OwnedFd, Vec<OwnedFd>), String> {
        let root_fd = open("root")?;
        // The network namespace first: a named one is the host user
        // namespace's, which cannot be entered from the phone's.
        let mut names = vec!["ns/net"];
        if own_users {
            names.push("ns/user");
        }
        names.extend(["ns/ipc", "ns/uts", "ns/cgroup", "ns/pid", "ns/mnt"]);
        let ns = names
            .iter()
            .map(|n| open(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((root_fd, ns))
    })();
    let (root_fd, ns) = match result {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    // Join the cgroup while the host's /sys/fs/cgroup is still visible.
    let cg = cgroup::load(parent, name);
    if let Err(e) = cgroup::join(&cg, std::process::id() as i32, name) {
        return fail(e.to_string());
    }
    for fd in &ns {
        if let Err(e) = setns(fd, CloneFlags::empty()) {
            return fail(format!("setns: {e}"));
        }
    }
    if own_users {
        if let Err(e) = super::userns::become_root() {
            return fail(e);
        }
    }
    let argv = match cstrings(argv) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let env = match cstrings(&["PATH=/system/bin:/bin:/sbin:/usr/bin:/usr/sbin".to_string()]) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    // SAFETY: single-threaded process.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let r = nix::unistd::fchdir(&root_fd)
                .and_then(|()| nix::unistd::chroot("."))
                .and_then(|()| chdir("/"));
            if let Err(e) = r {
                eprintln!("cph-shim exec {name}: enter root: {e}");
                std::process::exit(126);
            }
            if let Err(e) = super::keyring::join_own(name).and_then(|()| super::confine::confine())
            {
                eprintln!("cph-shim exec {name}: {e}");
                std::process::exit(126);
            }
            let e = execvpe(&argv[0], &argv, &env).err();
            eprintln!(
                "cph-shim exec {name}: {}: {}",
                argv[0].to_string_lossy(),
                e.map_or(String::new(), |e| e.to_string())
            );
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { child }) => wait_child(child),
        Err(e) => fail(format!("fork: {e}")),
    }
}

fn wait_child(child: Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return code;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 125,
        }
    }
}

/// `/proc/self/fd/<fd>`: a path that reaches what the descriptor holds.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn path_cstr(rel: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    crate::archive::sys::cstr(rel.as_os_str().as_bytes()).map_err(|e| e.to_string())
}

/// Makes the mount point `rel` beneath the root `root` (its directories,
/// and the last component a directory or, for a file source, an empty
/// file) and opens it. Every step resolves beneath the directory it starts
/// from, so a link the phone planted (absolute, or climbing with `..`)
/// fails rather than leading to the host.
fn mount_point_beneath(root: &OwnedFd, rel: &Path, dir: bool) -> Result<OwnedFd, String> {
    use crate::archive::sys;
    use std::os::unix::ffi::OsStrExt;
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(n) => Ok(n),
            other => Err(format!("{other:?} in a mount point")),
        })
        .collect::<Result<_, _>>()?;
    let Some((last, parents)) = names.split_last() else {
        return Err("an empty mount point".into());
    };
    let mut cur = sys::open_dir(root.as_raw_fd(), c".").map_err(|e| e.to_string())?;
    let step = |cur: &OwnedFd, name: &std::ffi::OsStr, make_dir: bool| {
        let c = sys::cstr(name.as_bytes()).map_err(|e| e.to_string())?;
        if make_dir {
            match sys::mkdirat(cur.as_raw_fd(), &c, 0o755) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(format!("mkdir {}: {e}", name.to_string_lossy())),
            }
            sys::open_dir_follow(cur.as_raw_fd(), &c)
                .map_err(|e| format!("open {}: {e}", name.to_string_lossy()))
        } else {
            // Created when missing; opened as a path only (a FIFO the phone
            // put there would block an open for writing).
            let path_only = libc::O_PATH | libc::O_NOFOLLOW;
            match sys::openat2(cur.as_raw_fd(), &c, path_only, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                    drop(
                        sys::openat2(cur.as_raw_fd(), &c, create, 0o644)
                            .map_err(|e| format!("create {}: {e}", name.to_string_lossy()))?,
                    );
                    sys::openat2(cur.as_raw_fd(), &c, path_only, 0)
                }
                other => other,
            }
            .map_err(|e| format!("open {}: {e}", name.to_string_lossy()))
        }
    };
    for name in parents {
        cur = step(&cur, name, true)?;
    }
    step(&cur, last, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10 0 20 300 0 0 0 0 0 0\ncpu0 4 0 8 100 0 0 0 0 0 0\n\
        cpu1 6 0 12 200 0 0 0 0 0 0\nintr 5 1\nctxt 9\nbtime 1700000000\n";

    #[test]
    fn meminfo_view_counts_use_and_cache_within_the_limit() {
        let mib = 1024 * 1024;
        let v = meminfo_view(256 * mib, Some((100 * mib as u64, 30 * mib as u64)));
        let kb = |key: &str| -> u64 {
            v.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
                .expect("field")
        };
        assert_eq!(kb("MemTotal:"), 256 * 1024);
        assert_eq!(kb("MemFree:"), 156 * 1024);
        assert_eq!(kb("MemAvailable:"), 186 * 1024);
        assert_eq!(kb("Cached:"), 30 * 1024);
        // Usage over the limit (kernel slack) never shows negative memory.
        let over = meminfo_view(64 * mib, Some((80 * mib as u64, 0)));
        assert!(over.contains("MemFree:               0 kB"), "{over}");
    }

    #[test]
    fn stat_view_keeps_the_cpuset_renumbered_and_sums_it() {
        let v = stat_view(STAT, &[1]);
        assert_eq!(
            v,
            "cpu  6 0 12 200 0 0 0 0 0 0\ncpu0 6 0 12 200 0 0 0 0 0 0\n\
             intr 5 1\nctxt 9\nbtime 1700000000\n"
        );
        let v = stat_view(STAT, &[0, 1]);
        assert!(v.starts_with("cpu  10 0 20 300 0 0 0 0 0 0\ncpu0 4 "));
        assert!(v.contains("cpu1 6 "));
    }

    #[test]
    fn cpuinfo_view_takes_the_cpuset_blocks_renumbered() {
        let host = "processor\t: 0\nBogoMIPS\t: 1\n\nprocessor\t: 1\nBogoMIPS\t: 2\n\n";
        let v = cpuinfo_view(host, &[1]).expect("view");
        assert_eq!(v, "processor\t: 0\nBogoMIPS\t: 2\n\n");
    }
}
