//! Per-phone binder devices from a phone's own binderfs instance: each mount
//! of binderfs is a new instance, so phones never share `binder`, `hwbinder`
//! or `vndbinder` (sharing them breaks Android). Android's shared memory
//! uses memfd, so no ashmem device is needed.

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// The devices each phone gets, linked as `/dev/<name>`.
pub const DEVICES: &[&str] = &["binder", "hwbinder", "vndbinder"];

/// `struct binderfs_device` of `linux/android/binderfs.h`.
#[repr(C)]
struct BinderfsDevice {
    name: [u8; 256],
    major: u32,
    minor: u32,
}

/// `BINDER_CTL_ADD`: `_IOWR('b', 1, struct binderfs_device)`.
const BINDER_CTL_ADD: u64 =
    (3 << 30) | ((std::mem::size_of::<BinderfsDevice>() as u64) << 16) | ((b'b' as u64) << 8) | 1;

/// True when the host kernel offers binderfs.
pub fn available() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("binder"))
        })
        .unwrap_or(false)
}

/// The character major of binderfs devices (one for every instance), for the
/// device allow-list.
pub fn major() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/devices").ok()?;
    let mut chars = false;
    for line in text.lines() {
        if line.starts_with("Character devices") {
            chars = true;
        } else if line.starts_with("Block devices") {
            chars = false;
        } else if chars {
            let mut it = line.split_whitespace();
            if let (Some(num), Some("binder")) = (it.next(), it.next()) {
                return num.parse().ok();
            }
        }
    }
    None
}

/// In the phone's mount namespace: mounts a fresh binderfs at
/// `<dev>/binderfs`, creates the devices through `binder-control` and links
/// `<dev>/<name>` to them.
pub fn setup(dev: &Path) -> Result<(), String> {
    let at = dev.join("binderfs");
    std::fs::create_dir_all(&at).map_err(|e| format!("mkdir {}: {e}", at.display()))?;
    mount(
        Some("binder"),
        &at,
        Some("binder"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount binderfs at {}: {e}", at.display()))?;
    let control = std::fs::File::open(at.join("binder-control"))
        .map_err(|e| format!("open binder-control: {e}"))?;
    for name in DEVICES {
        let mut req = BinderfsDevice {
            name: [0; 256],
            major: 0,
            minor: 0,
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: BINDER_CTL_ADD reads and fills the struct passed by pointer,
        // which lives for the call.
        let rc = unsafe { libc::ioctl(control.as_raw_fd(), BINDER_CTL_ADD as _, &mut req) };
        if rc != 0 {
            return Err(format!(
                "binderfs add {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        std::os::unix::fs::symlink(format!("binderfs/{name}"), dev.join(name))
            .map_err(|e| format!("link /dev/{name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ctl_add_request_matches_the_kernel_header() {
        // 264-byte struct, read-write, type 'b', number 1.
        assert_eq!(super::BINDER_CTL_ADD, 0xc108_6201);
    }
}
