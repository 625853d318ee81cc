//! A phone in a user namespace of its own: its id maps, its root filesystem
//! mounted idmapped, and init becoming root inside.
//!
//! The idmapped mount needs host privileges, so the shim makes it (a
//! detached copy of the rootfs mount, `open_tree` + `mount_setattr`) once
//! the namespace's maps are written, and hands it to the cloned init over a
//! socket; init attaches it over its rootfs (`move_mount`) in its own mount
//! namespace. A phone joining a named network namespace (the host user
//! namespace's) gets its sysfs the same way, made by the shim in that
//! network namespace.
//!
//! Files keep their ids on disk: what the agent writes into a phone as root
//! stays root's inside, and what the phone's root writes is stored as uid 0,
//! while every process of the phone is an unprivileged host user.

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use super::spec::UserNamespace;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
/// `move_mount` flag: the target is the descriptor itself.
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// The descriptor a syscall returned, or the error it set.
fn owned_fd(raw: libc::c_long) -> std::io::Result<OwnedFd> {
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel has just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL byte", p.display()))
}

/// Writes `pid`'s uid and gid maps: `0 host_id size`.
pub(super) fn write_maps(pid: i32, u: &UserNamespace) -> Result<(), String> {
    let line = format!("0 {} {}\n", u.host_id, u.size);
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), &line)
            .map_err(|e| format!("user namespace {map} {}: {e}", line.trim()))?;
    }
    Ok(())
}

/// A detached copy of the mount tree at `path` whose ids are those of the
/// user namespace `userns` (`open_tree` and `mount_setattr`).
pub(super) fn idmapped_tree(path: &Path, userns: &OwnedFd) -> Result<OwnedFd, String> {
    cloned_tree(
        path,
        MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        },
    )
}

/// A detached read-only copy of the mount tree at `path`, not idmapped, for
/// a read-only bind mount of a phone with its own user namespace (the
/// sharepool). Its files keep the host's owners, none of which the phone's
/// map holds (they read as nobody): its root has no privilege over them.
/// The mount's flags could not hold alone: the phone's root owns the mount
/// namespace it is attached in and could remount it writable; what it may
/// then write is what any user may (the share holds nothing writable by
/// others), and no setuid bit of an owner outside its map takes effect.
pub(super) fn shared_tree(path: &Path) -> Result<OwnedFd, String> {
    cloned_tree(
        path,
        MountAttr {
            attr_set: u64::from(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV),
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        },
    )
}

fn cloned_tree(path: &Path, attr: MountAttr) -> Result<OwnedFd, String> {
    let c = cpath(path)?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: a NUL-terminated path and plain flags; returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    let tree = owned_fd(raw).map_err(|e| format!("open_tree {}: {e}", path.display()))?;
    let empty = c"";
    // SAFETY: `tree` is an open mount fd, the path is empty (AT_EMPTY_PATH)
    // and `attr` a valid mount_attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        let idmap = attr.attr_set & MOUNT_ATTR_IDMAP != 0;
        let hint = if idmap && e.raw_os_error() == Some(libc::EINVAL) {
            " (the filesystem of the phone's root cannot be mounted idmapped on this \
             kernel: ext4 and xfs can from 5.12, btrfs from 5.15, tmpfs from 6.3; \
             an overlayfs mount cannot)"
        } else {
            ""
        };
        let what = if idmap {
            "idmapped mount"
        } else {
            "read-only mount"
        };
        return Err(format!("{what} of {}: {e}{hint}", path.display()));
    }
    Ok(tree)
}

/// Attaches a detached mount tree at `target` (`move_mount`).
pub(super) fn attach(tree: &OwnedFd, target: &Path, what: &str) -> Result<(), String> {
    let to = cpath(target)?;
    move_tree(tree, libc::AT_FDCWD, &to, MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| format!("attach {what} at {}: {e}", target.display()))
}

/// [`attach`] onto what the descriptor `target` holds.
pub(super) fn attach_at(tree: &OwnedFd, target: &OwnedFd, what: &str) -> Result<(), String> {
    let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
    move_tree(tree, target.as_raw_fd(), c"", flags).map_err(|e| format!("attach {what}: {e}"))
}

fn move_tree(
    tree: &OwnedFd,
    to_dir: libc::c_int,
    to: &std::ffi::CStr,
    flags: libc::c_uint,
) -> std::io::Result<()> {
    let empty = c"";
    // SAFETY: an open mount fd with an empty path, and a directory fd (or
    // AT_FDCWD) with a NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            to_dir,
            to.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A detached, read-only sysfs mount of the calling process's network
/// namespace (`fsopen`, `fsconfig`, `fsmount`): the sysfs of a phone whose
/// network namespace belongs to the host's user namespace, where the
/// phone's root may not mount one.
pub(super) fn sysfs_tree() -> Result<OwnedFd, String> {
    let err = |what: &str, e: std::io::Error| format!("{what} sysfs: {e}");
    let fstype = c"sysfs";
    // SAFETY: a NUL-terminated filesystem name and flags.
    let raw = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    let fs = owned_fd(raw).map_err(|e| err("fsopen", e))?;
    // SAFETY: the create command takes no key or value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(err("create", std::io::Error::last_os_error()));
    }
    let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    // SAFETY: a configured filesystem context and flags.
    let raw = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    owned_fd(raw).map_err(|e| err("fsmount", e))
}

/// Sends `fds` over the connected unix socket `sock`.
pub(super) fn send_fds(sock: &OwnedFd, fds: &[&OwnedFd]) -> Result<(), String> {
    if fds.len() > MAX_TREES {
        return Err(format!(
            "a phone in its own user namespace takes at most {} bind mounts",
            MAX_TREES - 2
        ));
    }
    let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(b"t")];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("hand mounts to init: {e}"))
}

/// Mount trees a phone's init receives at most: its root, its sysfs and
/// its bind mounts.
pub(super) const MAX_TREES: usize = 16;

/// Receives the descriptors [`send_fds`] sent ([`MAX_TREES`] at most).
pub(super) fn recv_fds(sock: &OwnedFd) -> Result<Vec<OwnedFd>, String> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_TREES]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receive mounts from the shim: {e}"))?;
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| format!("receive mounts from the shim: {e}"))?;
    let mut got = Vec::new();
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel installed these descriptors for us.
            got.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if got.is_empty() {
        return Err("receive mounts from the shim: no descriptor came".to_string());
    }
    Ok(got)
}

/// Makes the calling process root of the user namespace it is in (after
/// its maps are written): no supplementary groups, uid and gid 0.
pub(super) fn become_root() -> Result<(), String> {
    setgroups(&[]).map_err(|e| format!("setgroups in user namespace: {e}"))?;
    let g = Gid::from_raw(0);
    setresgid(g, g, g).map_err(|e| format!("setgid 0 in user namespace: {e}"))?;
    let u = Uid::from_raw(0);
    setresuid(u, u, u).map_err(|e| format!("setuid 0 in user namespace: {e}"))
}

/// Whether process `pid` is in a user namespace other than ours.
pub(super) fn has_own(pid: i32) -> bool {
    let ino = |p: String| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (
        ino(format!("/proc/{pid}/ns/user")),
        ino("/proc/self/ns/user".to_string()),
    ) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// Remounts the bind mount at `target` read-only, keeping the flags it has
/// (in a user namespace the flags of a mount from the host are locked:
/// a remount that would clear them is refused).
pub(super) fn remount_read_only(target: &Path) -> Result<(), String> {
    let have = statvfs(target)
        .map_err(|e| format!("statvfs {}: {e}", target.display()))?
        .flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&Path>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remount {} read-only: {e}", target.display()))
}
