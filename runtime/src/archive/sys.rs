//! The few `*at` system calls extraction is built from, on raw file descriptors.
//!
//! Every lookup goes through `openat2(2)` with `RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS`, so a path can never resolve above the directory fd
//! it starts from, whatever symlinks or `..` a concurrent writer plants. The
//! other calls (`mkdirat`, `symlinkat`, `linkat`, `unlinkat`) only ever take a
//! single name component relative to a directory fd resolved that way.
//!
//! Kernels before 5.6 (the 4.19 of many Kunpeng distributions) and QEMU
//! user emulation have no `openat2`. There the same rules are applied in
//! user space: the path is walked one component at a time with
//! `O_NOFOLLOW`, holding a descriptor per level; a symlink met on the way is
//! read and its (relative) target spliced into the walk, `..` goes back to
//! the held parent descriptor, and anything that would climb above the
//! start, or an absolute link, fails with `EXDEV` as `RESOLVE_BENEATH` does.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// Resolution flags used for every lookup beneath the target.
const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A path component or relative path as a C string; NUL bytes are refused
/// earlier by path validation, so this only fails on a caller bug.
pub fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Set, this environment variable makes every lookup take the user-space
/// walk, as on a kernel without `openat2` (the test suite runs both ways).
pub const NO_OPENAT2_ENV: &str = "CPH_NO_OPENAT2";

/// Whether the kernel has `openat2` (cleared on the first `ENOSYS`).
static HAVE_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `openat2(dir, path, flags, mode)` confined beneath `dir`; retries `EAGAIN`
/// and `EINTR` (the kernel asks for a retry when a rename raced the lookup).
/// Without `openat2`, a component-wise walk that follows no link at all.
pub fn openat2(dir: RawFd, path: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    use std::sync::atomic::Ordering;
    static FORCED_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *FORCED_OFF.get_or_init(|| std::env::var_os(NO_OPENAT2_ENV).is_some());
    if off || !HAVE_OPENAT2.load(Ordering::Relaxed) {
        return open_beneath_walk(dir, path, flags, mode);
    }
    // SAFETY: `open_how` is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = RESOLVE;
    loop {
        // SAFETY: `how` and `path` outlive the call and the size matches the struct.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a fresh descriptor that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => {
                HAVE_OPENAT2.store(false, Ordering::Relaxed);
                return open_beneath_walk(dir, path, flags, mode);
            }
            _ => return Err(e),
        }
    }
}

/// Most links one lookup may expand (the kernel's limit).
const MAX_LINKS: u32 = 40;

fn openat_nofollow(at: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is a valid C string for the duration of the call.
        let r = unsafe {
            libc::openat(
                at,
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        };
        if r >= 0 {
            // SAFETY: a fresh descriptor that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The target of the link `name` in `at`, or `None` when it is not a link.
fn link_target(at: RawFd, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its length; `name` is a valid C string.
    let n = unsafe { libc::readlinkat(at, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EINVAL) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` in user space: see the module
/// documentation.
fn open_beneath_walk(
    dir: RawFd,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let exdev = || io::Error::from_raw_os_error(libc::EXDEV);
    let bytes = path.to_bytes();
    if bytes.first() == Some(&b'/') {
        return Err(exdev());
    }
    // Components still to walk, the next one last.
    let mut todo: Vec<Vec<u8>> = bytes
        .split(|b| *b == b'/')
        .rev()
        .map(<[u8]>::to_vec)
        .collect();
    // Descriptors of the directories walked into (the start is `dir`).
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut links = 0;
    let follow_last = flags & libc::O_NOFOLLOW == 0;
    while let Some(comp) = todo.pop() {
        let at = stack.last().map_or(dir, |f| f.as_raw_fd());
        if comp.is_empty() || comp == b"." {
            if todo.is_empty() {
                return openat_nofollow(at, c".", flags, mode);
            }
            continue;
        }
        if comp == b".." {
            stack.pop().ok_or_else(exdev)?;
            if todo.is_empty() {
                let at = stack.last().map_or(dir, |f| f.as_raw_fd());
                return openat_nofollow(at, c".", flags, mode);
            }
            continue;
        }
        let name = cstr(&comp)?;
        let last = todo.is_empty();
        let opened = if last {
            openat_nofollow(at, &name, flags, mode)
        } else {
            openat_nofollow(at, &name, libc::O_PATH | libc::O_DIRECTORY, 0)
        };
        let e = match opened {
            Ok(fd) if last => return Ok(fd),
            Ok(fd) => {
                stack.push(fd);
                continue;
            }
            Err(e) => e,
        };
        // ELOOP (a final link under O_NOFOLLOW) or ENOTDIR (a link on the
        // way): a link to expand, unless the caller refused final links.
        if !matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
            || (last && !follow_last)
        {
            return Err(e);
        }
        let Some(target) = link_target(at, &name)? else {
            return Err(e);
        };
        links += 1;
        if links > MAX_LINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        if target.first() == Some(&b'/') {
            return Err(exdev());
        }
        todo.extend(target.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
    }
    // An empty path: the directory itself.
    openat_nofollow(dir, c".", flags, mode)
}

/// Opens a directory beneath `dir` (read-only, so `fchmod`/`futimens` work
/// on it) as a lookup anchor; a final symlink is refused.
pub fn open_dir(dir: RawFd, path: &CStr) -> io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Opens a directory beneath `dir`, following symlinks that stay beneath it.
pub fn open_dir_follow(dir: RawFd, path: &CStr) -> io::Result<OwnedFd> {
    openat2(dir, path, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string for the duration of the call.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are valid for the duration of the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// Hard link `odir/oname` as `dir/name`; neither final component is followed.
pub fn linkat(odir: RawFd, oname: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both names are valid C strings.
    cvt(unsafe { libc::linkat(odir, oname.as_ptr(), dir, name.as_ptr(), 0) }).map(drop)
}

/// `name` in `dir`, not followed if a symlink.
pub fn lstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid C string and a buffer of the size fstatat fills.
    cvt(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// Whether `a` in `adir` and `b` in `bdir` are one inode (neither followed
/// if a symlink).
pub fn same_inode(adir: RawFd, a: &CStr, bdir: RawFd, b: &CStr) -> io::Result<bool> {
    let (x, y) = (lstatat(adir, a)?, lstatat(bdir, b)?);
    Ok((x.st_dev, x.st_ino) == (y.st_dev, y.st_ino))
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a buffer of the size fstat fills; an invalid fd is an error.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// `SECBIT_NO_SETUID_FIXUP` (`<linux/securebits.h>`).
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// Lets the calling thread change its filesystem ids and keep its
/// capabilities (`SECBIT_NO_SETUID_FIXUP`): root's thread creating files as
/// another user still overrides permissions, as root. Needs
/// `CAP_SETPCAP`; applies to this thread alone.
pub fn keep_caps_across_id_changes() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let bits = cvt(unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) })?;
    let bits = bits as libc::c_ulong | SECBIT_NO_SETUID_FIXUP;
    // SAFETY: as above.
    cvt(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) }).map(drop)
}

/// `setfsuid`/`setfsgid` (`nr`) with `id`, then with -1, which is never a
/// valid id: that call changes nothing and returns the id in effect.
fn fs_id(nr: libc::c_long, id: u32) -> u32 {
    // SAFETY: both calls take an integer and cannot fail.
    unsafe {
        libc::syscall(nr, id);
        libc::syscall(nr, u32::MAX) as u32
    }
}

/// Sets the calling thread's filesystem uid (the owner of what it creates)
/// and returns the one in effect after: `uid` unless the kernel refused it
/// (an id this user namespace does not map, or no `CAP_SETUID`).
pub fn set_fsuid(uid: u32) -> u32 {
    fs_id(libc::SYS_setfsuid, uid)
}

/// As [`set_fsuid`], for the filesystem gid.
pub fn set_fsgid(gid: u32) -> u32 {
    fs_id(libc::SYS_setfsgid, gid)
}

/// The calling thread's filesystem uid and gid.
pub fn fs_ids() -> (u32, u32) {
    (
        fs_id(libc::SYS_setfsuid, u32::MAX),
        fs_id(libc::SYS_setfsgid, u32::MAX),
    )
}

/// Whether the process is dumpable (`PR_GET_DUMPABLE` is 1).
pub fn dumpable() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// Marks the process dumpable again.
pub fn set_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is a valid C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

/// `fchownat` on `dir/name` without following a final symlink.
pub fn lchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

/// Sets access and modification time of `fd` (an `O_PATH` fd works through
/// `AT_EMPTY_PATH`), or of `dir/name` without following a final symlink.
pub fn set_mtime(dir: RawFd, name: Option<&CStr>, mtime: i64) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        },
    ];
    let (path, flags) = match name {
        Some(n) => (n.as_ptr(), libc::AT_SYMLINK_NOFOLLOW),
        None => (c"".as_ptr(), libc::AT_EMPTY_PATH),
    };
    // SAFETY: `ts` holds two timespecs and `path` is a valid C string.
    cvt(unsafe { libc::utimensat(dir, path, ts.as_ptr(), flags) }).map(drop)
}

pub fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` and `value` are valid for the stated lengths.
    cvt(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
        .map(drop)
}

/// Starts writeback of `len` bytes at `offset` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); durability still needs a
/// sync.
pub fn start_writeback(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) }).map(drop)
}

/// Whether the filesystem holding `fd` is btrfs.
pub fn on_btrfs(fd: &impl std::os::fd::AsFd) -> io::Result<bool> {
    use nix::sys::statfs::{fstatfs, BTRFS_SUPER_MAGIC};
    Ok(fstatfs(fd)?.filesystem_type() == BTRFS_SUPER_MAGIC)
}

pub fn syncfs(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::syncfs(fd) }).map(drop)
}

/// Writes all of `buf` at the fd's current offset.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[r as usize..];
    }
    Ok(())
}

/// Gives the calling thread its own filesystem context (cwd, root, umask)
/// and a zero umask, so modes passed to `open`/`mkdir` are applied exactly
/// without touching the umask of the rest of the process.
pub fn private_zero_umask() -> io::Result<()> {
    // SAFETY: CLONE_FS unshare affects only the calling thread's fs struct.
    cvt(unsafe { libc::unshare(libc::CLONE_FS) })?;
    // SAFETY: umask cannot fail; it now applies only to this thread.
    unsafe { libc::umask(0) };
    Ok(())
}

/// `renameat2(.., RENAME_NOREPLACE)` between two absolute or cwd-relative paths.
pub fn rename_noreplace(from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: both strings are valid C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes `fd`, reporting the error `close(2)` may return (a dropped
/// `OwnedFd` ignores it, and in debug builds also checks the fd first).
pub fn close(fd: OwnedFd) -> io::Result<()> {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` was owned and is closed exactly once here.
    cvt(unsafe { libc::close(raw) }).map(drop)
}

/// The soft limit on open files (`RLIMIT_NOFILE`; unlimited is
/// `RLIM_INFINITY`, `u64::MAX`), or `None` when it cannot be read.
pub fn open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}
