//! Named network namespaces for phones: the bind-mounted files under
//! `/run/netns` that `ip netns add` makes and `ip -n NAME`, `ip link ...
//! netns PATH` and the phone network module use. A phone whose
//! [`super::ContainerSpec::netns`] names such a file joins it at start, so
//! its network (veth, address, routes) can be plumbed before or after the
//! container runs and survives a container restart.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::ContainerError;

/// Where named namespaces live, as for `ip netns`.
pub const NETNS_DIR: &str = "/run/netns";

/// `NS_GET_NSTYPE`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: u64 = 0xb703;

/// True when `path` is a namespace file of a network namespace.
pub fn is_netns(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: NS_GET_NSTYPE takes no argument and only inspects the fd.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

/// Path of the named namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn io(name: &str, step: &'static str, source: impl Into<std::io::Error>) -> ContainerError {
    ContainerError::Io {
        name: name.to_string(),
        step,
        source: source.into(),
    }
}

/// Creates a new, empty network namespace bound at `/run/netns/<name>`
/// (what `ip netns add <name>` does) and returns that path.
pub fn create(name: &str) -> Result<PathBuf, ContainerError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        return Err(ContainerError::InvalidSpec {
            name: name.to_string(),
            reason: format!("netns name {name:?} must be 1-63 letters, digits, '-', '_' or '.'"),
        });
    }
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|e| io(name, "create /run/netns", e))?;
    // Like iproute2: /run/netns is a shared mount of its own, so binds made
    // in it reach mount namespaces created later and unbinds reach them too.
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| io(name, "bind /run/netns", e))?;
        shared().map_err(|e| io(name, "share /run/netns", e))?;
    }
    let file = path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ContainerError::Exists {
                    name: format!("netns {name}"),
                }
            } else {
                io(name, "create netns file", e)
            }
        })?;
    // A short-lived thread enters a new network namespace and binds it, so
    // the calling threads keep theirs.
    let target = file.clone();
    let bound = std::thread::spawn(move || -> nix::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join();
    match bound {
        Ok(Ok(())) => Ok(file),
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&file);
            Err(io(name, "bind new netns", e))
        }
        Err(_) => {
            let _ = std::fs::remove_file(&file);
            Err(io(
                name,
                "bind new netns",
                std::io::Error::other("namespace thread panicked"),
            ))
        }
    }
}

/// Removes the named namespace (what `ip netns del <name>` does); the
/// namespace itself ends once no process is in it.
pub fn remove(name: &str) -> Result<(), ContainerError> {
    let file = path(name);
    if !file.exists() {
        return Err(ContainerError::NotFound {
            name: format!("netns {name}"),
        });
    }
    let _ = umount2(&file, MntFlags::MNT_DETACH);
    std::fs::remove_file(&file).map_err(|e| io(name, "remove netns file", e))
}
