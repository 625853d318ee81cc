//! One cgroup per phone under the agent's parent cgroup, through cgroups-rs
//! for v1 (this host: controllers under `/sys/fs/cgroup/<controller>`) and v2
//! (unified). cpuset cpus and mems, cpu shares and CFS quota, memory with swap
//! off, pids, the device allow-list (v1) and the freezer.

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::devices::{DevicePermissions, DeviceType, DevicesController};
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hierarchies;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Hierarchy, MaxValue};
use cgroups_rs::CgroupPid;
use std::path::PathBuf;
use std::sync::OnceLock;

use super::spec::ContainerSpec;
use super::ContainerError;

/// Character devices every phone may use: null, zero, full, random,
/// urandom, tty, ptmx and the devpts ptys.
const BASE_DEVICES: &[(u32, i32)] = &[
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 2),
    (136, -1),
];

fn err(name: &str, step: &'static str, e: impl std::fmt::Display) -> ContainerError {
    ContainerError::Cgroup {
        name: name.to_string(),
        step,
        reason: e.to_string(),
    }
}

/// The cgroup path of a phone relative to each hierarchy's root.
pub(crate) fn path(parent: &str, name: &str) -> String {
    format!("{parent}/{name}")
}

/// The host's cgroup hierarchy, found once per process: finding it reads
/// the whole mount table, and the cgroup mounts do not move while the
/// agent runs (a phone's state is read on every job).
fn hierarchy() -> Box<dyn Hierarchy> {
    enum Found {
        V1(hierarchies::V1),
        V2(hierarchies::V2),
    }
    static FOUND: OnceLock<Found> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        if hierarchies::is_cgroup2_unified_mode() {
            Found::V2(hierarchies::V2::new())
        } else {
            Found::V1(hierarchies::V1::new())
        }
    });
    match found {
        Found::V1(h) => Box::new(h.clone()),
        Found::V2(h) => Box::new(h.clone()),
    }
}

/// Mount points of every cgroup hierarchy of this host, v1 controllers,
/// named hierarchies (`name=systemd`) and the unified v2 one alike, read
/// from the mount table rather than assumed under `/sys/fs/cgroup`.
pub fn mount_points() -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> [tags] - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let point = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// Undoes the mount table's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup `name` (relative to each hierarchy's root) in every
/// hierarchy it exists in.
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .map(|m| m.join(name))
        .filter(|d| d.is_dir())
        .collect()
}

/// Removes the cgroup `parent` (relative to each hierarchy's root) from
/// every hierarchy it exists in, and says where it could not. `rmdir`
/// refuses a cgroup with children or tasks, so a parent that still holds a
/// phone stays and is reported.
pub fn remove_parent(parent: &str) -> Vec<(PathBuf, std::io::Error)> {
    cgroups_named(parent)
        .into_iter()
        .filter_map(|dir| match std::fs::remove_dir(&dir) {
            Ok(()) => None,
            // Removed meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some((dir, e)),
        })
        .collect()
}

/// Handle of an existing (or not yet created) phone cgroup.
pub(crate) fn load(parent: &str, name: &str) -> Cgroup {
    Cgroup::load(hierarchy(), path(parent, name))
}

/// Creates the phone's cgroup and applies the spec's limits.
pub(crate) fn create(parent: &str, spec: &ContainerSpec) -> Result<Cgroup, ContainerError> {
    let name = spec.name.as_str();
    let cg = Cgroup::new(hierarchy(), path(parent, name)).map_err(|e| err(name, "create", e))?;
    if let Err(e) = apply(&cg, spec) {
        let _ = cg.delete();
        return Err(e);
    }
    Ok(cg)
}

fn apply(cg: &Cgroup, spec: &ContainerSpec) -> Result<(), ContainerError> {
    let name = spec.name.as_str();
    if let Some(c) = cg.controller_of::<CpuSetController>() {
        if let Some(cpus) = &spec.cpus {
            c.set_cpus(cpus).map_err(|e| err(name, "cpuset.cpus", e))?;
        }
        if let Some(mems) = &spec.mems {
            c.set_mems(mems).map_err(|e| err(name, "cpuset.mems", e))?;
        }
    }
    if let Some(c) = cg.controller_of::<CpuController>() {
        if let Some(shares) = spec.cpu_shares {
            let value = if cg.v2() {
                shares_to_weight(shares)
            } else {
                shares
            };
            c.set_shares(value)
                .map_err(|e| err(name, "cpu.shares", e))?;
        }
        if let Some(quota) = spec.cpu_quota_us {
            c.set_cfs_quota_and_period(Some(quota), Some(100_000))
                .map_err(|e| err(name, "cpu quota", e))?;
        }
    }
    if let (Some(c), Some(limit)) = (cg.controller_of::<MemController>(), spec.memory_limit) {
        c.set_limit(limit)
            .map_err(|e| err(name, "memory limit", e))?;
        // Swap off: memory+swap equals memory. v1 hosts without swap
        // accounting have no memsw file; that is already no swap for us.
        if cg.v2() {
            c.set_memswap_limit(0)
                .map_err(|e| err(name, "memory.swap.max", e))?;
        } else {
            let _ = c.set_memswap_limit(limit);
        }
    }
    if let (Some(c), Some(max)) = (cg.controller_of::<PidController>(), spec.pids_limit) {
        c.set_pid_max(MaxValue::Value(max))
            .map_err(|e| err(name, "pids.max", e))?;
    }
    let allowed = allowed_devices(spec).map_err(|e| err(name, "stat extra device", e))?;
    if let Some(c) = cg.controller_of::<DevicesController>() {
        let rwm = DevicePermissions::all();
        c.deny_device(DeviceType::All, -1, -1, &rwm)
            .map_err(|e| err(name, "devices.deny", e))?;
        for d in &allowed {
            let minor = d.minor.map_or(-1, i64::from);
            c.allow_device(DeviceType::Char, i64::from(d.major), minor, &rwm)
                .map_err(|e| err(name, "devices.allow", e))?;
        }
    } else if cg.v2() {
        let dir = std::path::Path::new(hierarchies::UNIFIED_MOUNTPOINT).join(cg.path());
        super::devfilter::attach(&dir, &allowed).map_err(|e| err(name, "device filter", e))?;
    }
    Ok(())
}

/// The character devices the phone may use: the base set, its binderfs
/// devices (any minor of binderfs's major) and the spec's extra nodes.
fn allowed_devices(spec: &ContainerSpec) -> Result<Vec<super::devfilter::Allowed>, String> {
    use super::devfilter::Allowed;
    let any = |major: u32| Allowed { major, minor: None };
    let mut out: Vec<Allowed> = BASE_DEVICES
        .iter()
        .map(|&(major, minor)| Allowed {
            major,
            minor: (minor >= 0).then_some(minor as u32),
        })
        .collect();
    if super::binder::available() {
        if let Some(major) = super::binder::major() {
            out.push(any(major as u32));
        }
    }
    for dev in &spec.devices {
        let (major, minor) =
            device_numbers(&dev.path).map_err(|e| format!("{}: {e}", dev.path.display()))?;
        out.push(Allowed {
            major: major as u32,
            minor: Some(minor as u32),
        });
    }
    Ok(out)
}

/// cpu.shares (v1, 2 to 262144, 1024 the default) on cgroup v2's cpu.weight
/// scale (1 to 10000, 100 the default), as the OCI runtimes map it.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + (shares - 2) * 9999 / 262_142
}

/// Major and minor numbers of a character device node.
pub(crate) fn device_numbers(path: &std::path::Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)?.rdev();
    Ok((
        i64::from(nix::sys::stat::major(rdev) as u32),
        i64::from(nix::sys::stat::minor(rdev) as u32),
    ))
}

/// Moves a process into the phone's cgroup.
pub(crate) fn join(cg: &Cgroup, pid: i32, name: &str) -> Result<(), ContainerError> {
    cg.add_task_by_tgid(CgroupPid::from(pid as u64))
        .map_err(|e| err(name, "join", e))
}

/// Memory the phone uses now: `(usage, page cache)` in bytes.
pub(crate) fn memory_usage(cg: &Cgroup) -> Option<(u64, u64)> {
    let m = cg.controller_of::<MemController>()?.memory_stat();
    Some((m.usage_in_bytes, m.stat.cache))
}

/// What a phone has used, from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of all its tasks since it started, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory it uses now (page cache included), in bytes.
    pub memory_bytes: u64,
    /// Its processes.
    pub processes: usize,
}

/// [`Usage`] of a phone's cgroup: `cpuacct.usage` (v1) or the
/// `usage_usec` of `cpu.stat` (v2); the memory controller's usage.
pub(crate) fn usage(cg: &Cgroup) -> Usage {
    use cgroups_rs::fs::cpuacct::CpuAcctController;
    let cpu_ns = match cg.controller_of::<CpuAcctController>() {
        Some(acct) => acct.cpuacct().usage,
        None => cg
            .controller_of::<CpuController>()
            .and_then(|c| usage_usec(&c.cpu().stat))
            .map_or(0, |us| us.saturating_mul(1000)),
    };
    Usage {
        cpu_ns,
        memory_bytes: memory_usage(cg).map_or(0, |(usage, _)| usage),
        processes: procs(cg).len(),
    }
}

/// `usage_usec` of a v2 `cpu.stat`.
fn usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Pids in the phone's cgroup.
pub(crate) fn procs(cg: &Cgroup) -> Vec<i32> {
    cg.procs().into_iter().map(|p| p.pid as i32).collect()
}

pub(crate) fn freeze(cg: &Cgroup, name: &str, frozen: bool) -> Result<(), ContainerError> {
    let c = cg
        .controller_of::<FreezerController>()
        .ok_or_else(|| err(name, "freezer", "no freezer controller"))?;
    if frozen {
        c.freeze().map_err(|e| err(name, "freeze", e))?;
    } else {
        c.thaw().map_err(|e| err(name, "thaw", e))?;
    }
    // v1 passes through FREEZING while tasks stop: wait for the end state.
    let want = if frozen {
        cgroups_rs::FreezerState::Frozen
    } else {
        cgroups_rs::FreezerState::Thawed
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let state = c.state().map_err(|e| err(name, "freezer state", e))?;
        if std::mem::discriminant(&state) == std::mem::discriminant(&want) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(err(
                name,
                "freezer",
                "did not reach the requested state within 5 s",
            ));
        }
        if frozen {
            // Retry the write, as a task may have been forking.
            let _ = c.freeze();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The cgroups beneath `dir` (v2), deepest first: a phone holding
/// `CAP_SYS_ADMIN` makes its own (Android's init puts each app's processes
/// in `uid_N/pid_M`), and a cgroup with children cannot be removed.
fn descendants(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
                found.push(e.path());
            }
        }
    }
    // A child is always found after its parent.
    found.reverse();
    found
}

/// Pids in the cgroups `dirs` (v2).
fn procs_in(dirs: &[std::path::PathBuf]) -> Vec<i32> {
    dirs.iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Kills every process of the phone and removes its cgroup, with the
/// cgroups the phone made beneath it.
pub(crate) fn destroy(cg: &Cgroup, name: &str) -> Result<(), ContainerError> {
    // A frozen cgroup cannot die: thaw first.
    let _ = freeze(cg, name, false);
    // Listed again at each round: the phone's processes may make more
    // until they are dead.
    let v2_dir = cg
        .v2()
        .then(|| std::path::Path::new(hierarchies::UNIFIED_MOUNTPOINT).join(cg.path()));
    let below = || v2_dir.as_deref().map(descendants).unwrap_or_default();
    for _ in 0..200 {
        let mut pids = procs(cg);
        pids.extend(procs_in(&below()));
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A cgroup whose last process just died may still count as populated
    // for a moment (rmdir: EBUSY); one already removed (by the phone's
    // shim) is what was asked: v1 skips a missing directory, v2 reports it.
    let mut tries = 0;
    loop {
        for d in below() {
            let _ = std::fs::remove_dir(d);
        }
        match cg.delete() {
            Ok(()) => return Ok(()),
            Err(_) if !cg.exists() => return Ok(()),
            Err(e) if tries >= 50 => return Err(err(name, "delete", e)),
            Err(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_cpu_time_is_read_from_cpu_stat() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(usage_usec(stat), Some(1_234_567));
        assert_eq!(usage_usec("user_usec 5\n"), None);
    }

    #[test]
    fn shares_map_onto_the_v2_weight_scale() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(512), 20);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Beyond either end: clamped, never out of the kernel's range.
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(16 * 1024 * 1024), 10_000);
    }

    #[test]
    fn mount_table_escapes_are_undone() {
        assert_eq!(
            unescape("/sys/fs/cgroup/cpu,cpuacct"),
            "/sys/fs/cgroup/cpu,cpuacct"
        );
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/tab\011x\134y"), "/mnt/tab\tx\\y");
        // A backslash not followed by three octal digits is kept as it is.
        assert_eq!(unescape(r"/mnt/x\9"), r"/mnt/x\9");
    }

    #[test]
    fn every_mounted_hierarchy_is_found() {
        let points = mount_points();
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cgroup_mounts = table
            .lines()
            .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
            .count();
        assert_eq!(points.len(), cgroup_mounts);
        assert!(points.iter().all(|p| p.is_absolute()));
    }
}
