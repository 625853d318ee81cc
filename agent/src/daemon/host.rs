//! Host preparation at agent start: kernel limits sized from the phone
//! capacity, read and raised through `/proc/sys` (the root is a parameter so
//! tests use a temporary directory), and a list of what the host lacks for
//! phones (binderfs, cgroup controllers, nftables, btrfs, seccomp), reported in
//! `Inventory.missing`. Limits are only ever raised, never lowered.

use std::path::Path;

/// One sysctl and the least value the phones need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlNeed {
    /// Dotted name, e.g. `fs.inotify.max_user_watches`.
    pub name: &'static str,
    pub min: u64,
}

/// What happened to one sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SysctlOutcome {
    AlreadyEnough {
        name: &'static str,
        value: u64,
    },
    Raised {
        name: &'static str,
        from: u64,
        to: u64,
    },
    Failed {
        name: &'static str,
        reason: String,
    },
}

/// The limits for `capacity` phones: each Android runs a few hundred
/// processes, inotify users and large memory maps.
pub fn sysctl_needs(capacity: u32) -> Vec<SysctlNeed> {
    let n = u64::from(capacity.max(1));
    vec![
        SysctlNeed {
            name: "fs.inotify.max_user_instances",
            min: (n * 128).max(8192),
        },
        SysctlNeed {
            name: "fs.inotify.max_user_watches",
            min: (n * 65_536).max(524_288),
        },
        SysctlNeed {
            name: "kernel.pid_max",
            min: (n * 4096).clamp(65_536, 4_194_304),
        },
        SysctlNeed {
            name: "vm.max_map_count",
            min: (n * 65_530).max(262_144),
        },
    ]
}

fn sysctl_path(root: &Path, name: &str) -> std::path::PathBuf {
    root.join(name.replace('.', "/"))
}

/// Reads each sysctl under `root` (normally `/proc/sys`) and raises it when
/// below its need.
pub fn apply_sysctls(root: &Path, needs: &[SysctlNeed]) -> Vec<SysctlOutcome> {
    needs
        .iter()
        .map(|need| {
            let path = sysctl_path(root, need.name);
            let current = match std::fs::read_to_string(&path) {
                Ok(t) => match t.trim().parse::<u64>() {
                    Ok(v) => v,
                    Err(e) => {
                        return SysctlOutcome::Failed {
                            name: need.name,
                            reason: format!("{} is not a number: {e}", path.display()),
                        }
                    }
                },
                Err(e) => {
                    return SysctlOutcome::Failed {
                        name: need.name,
                        reason: format!("read {}: {e}", path.display()),
                    }
                }
            };
            if current >= need.min {
                return SysctlOutcome::AlreadyEnough {
                    name: need.name,
                    value: current,
                };
            }
            match std::fs::write(&path, format!("{}\n", need.min)) {
                Ok(()) => SysctlOutcome::Raised {
                    name: need.name,
                    from: current,
                    to: need.min,
                },
                Err(e) => SysctlOutcome::Failed {
                    name: need.name,
                    reason: format!("write {}: {e}", path.display()),
                },
            }
        })
        .collect()
}

/// Raises this process's soft limit on open files to its hard limit, as
/// the unit's `LimitNOFILE` does under systemd (an agent started by hand,
/// or by `cph up`, gets a shell's 1,024): each extraction caches directory
/// fds in proportion to it. Returns the limit before and after.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard.max(soft)))
}

/// What the host lacks, in words, looking at `proc_root` (`/proc`),
/// `cgroup_root` (`/sys/fs/cgroup`) and `PATH`.
pub fn missing_features(proc_root: &Path, cgroup_root: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let filesystems = std::fs::read_to_string(proc_root.join("filesystems")).unwrap_or_default();
    let has_fs = |fs: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    if !has_fs("binder") {
        missing.push("binderfs (binder filesystem not in the kernel)".to_string());
    }
    if !has_fs("btrfs") {
        missing.push("btrfs (filesystem not in the kernel)".to_string());
    }
    let controllers = std::fs::read_to_string(cgroup_root.join("cgroup.controllers"));
    match controllers {
        Ok(text) => {
            for c in ["cpuset", "cpu", "memory", "pids"] {
                if !text.split_whitespace().any(|x| x == c) {
                    missing.push(format!("cgroup controller {c}"));
                }
            }
        }
        Err(_) => {
            for c in ["cpuset", "cpu", "memory", "pids"] {
                if !cgroup_root.join(c).exists() {
                    missing.push(format!("cgroup controller {c}"));
                }
            }
        }
    }
    if !on_path("nft") {
        missing.push("nftables (nft not on PATH)".to_string());
    }
    // Every phone is confined with a seccomp filter answering errors.
    let seccomp = std::fs::read_to_string(proc_root.join("sys/kernel/seccomp/actions_avail"))
        .unwrap_or_default();
    if !seccomp.split_whitespace().any(|a| a == "errno") {
        missing.push("seccomp filters (phones are confined with one: none will start)".to_string());
    }
    missing
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // One below the hard limit: lowering is allowed to anyone, and
        // leaves the other tests of this process their descriptors.
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).expect("lower soft limit");
        assert_eq!(raise_open_files_limit().expect("raise"), (hard - 1, hard));
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
        // Already at the hard limit: nothing to do.
        assert_eq!(raise_open_files_limit().expect("raise"), (hard, hard));
    }

    #[test]
    fn raises_only_what_is_below_need() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("fs/inotify")).expect("mkdir");
        std::fs::create_dir_all(root.join("kernel")).expect("mkdir");
        std::fs::create_dir_all(root.join("vm")).expect("mkdir");
        std::fs::write(root.join("fs/inotify/max_user_instances"), "128\n").expect("w");
        std::fs::write(root.join("fs/inotify/max_user_watches"), "99999999\n").expect("w");
        std::fs::write(root.join("kernel/pid_max"), "32768\n").expect("w");
        let out = apply_sysctls(root, &sysctl_needs(60));
        assert_eq!(
            out[0],
            SysctlOutcome::Raised {
                name: "fs.inotify.max_user_instances",
                from: 128,
                to: 8192
            }
        );
        assert!(matches!(
            out[1],
            SysctlOutcome::AlreadyEnough {
                value: 99_999_999,
                ..
            }
        ));
        assert_eq!(
            std::fs::read_to_string(root.join("kernel/pid_max"))
                .expect("r")
                .trim(),
            "245760"
        );
        assert!(
            matches!(out[3], SysctlOutcome::Failed { .. }),
            "{:?}",
            out[3]
        );
    }

    #[test]
    fn missing_lists_absent_features() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("filesystems"), "nodev\tproc\n\tbtrfs\n").expect("w");
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu memory\n").expect("w");
        let m = missing_features(dir.path(), dir.path());
        assert!(m.iter().any(|x| x.starts_with("seccomp")), "{m:?}");
        let seccomp = dir.path().join("sys/kernel/seccomp");
        std::fs::create_dir_all(&seccomp).expect("mkdir");
        std::fs::write(
            seccomp.join("actions_avail"),
            "kill_process trap errno allow\n",
        )
        .expect("w");
        let m = missing_features(dir.path(), dir.path());
        assert!(!m.iter().any(|x| x.starts_with("seccomp")), "{m:?}");
        assert!(m.iter().any(|x| x.starts_with("binderfs")), "{m:?}");
        assert!(!m.iter().any(|x| x.starts_with("btrfs")), "{m:?}");
        assert!(m.contains(&"cgroup controller pids".to_string()), "{m:?}");
        assert!(!m.contains(&"cgroup controller cpu".to_string()), "{m:?}");
    }
}
