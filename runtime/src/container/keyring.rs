//! A session keyring of its own for a phone's init and for each process
//! started in a phone.
//!
//! Processes inherit their session keyring: without this every phone of a
//! host would share the one the agent was started with (systemd gives a
//! service a private one, a shell the host root's), and keys one phone's
//! processes put there (Android's `init` makes a keyring there for its
//! file-encryption keys on older releases) would be readable by every
//! other phone and the agent. As OCI runtimes do, the phone's first process
//! joins a new keyring, named `cph.<phone>` so an operator can tell whose
//! it is in `/proc/keys`. A keyring of that name that someone else made
//! and left searchable would be joined instead of a new one being made;
//! one made for us never is searchable, so such a keyring is recognised
//! and an anonymous one joined instead.

use std::ffi::CString;

const KEYCTL_JOIN_SESSION_KEYRING: libc::c_int = 1;
const KEYCTL_DESCRIBE: libc::c_int = 6;
/// The search bits of the user, group and other permissions (not the
/// possessor's): what `KEYCTL_JOIN_SESSION_KEYRING` needs to join a
/// keyring by name.
const SEARCH_BY_OTHERS: u32 = 0x0008_0808;

/// The description given to `phone`'s session keyrings.
pub fn keyring_name(phone: &str) -> String {
    format!("cph.{phone}")
}

/// Makes the calling process (and its future children) use a new session
/// keyring named for `phone`. Nothing where keyrings cannot be used.
pub(super) fn join_own(phone: &str) -> Result<(), String> {
    let name =
        CString::new(keyring_name(phone)).map_err(|_| "keyring name holds a NUL".to_string())?;
    let serial = match join(Some(&name)) {
        Ok(serial) => serial,
        // No keyrings in this kernel, or a filter above the agent refuses
        // them (a container's seccomp profile): the phone, under the same
        // filter, cannot use one either.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            return Ok(())
        }
        Err(e) => return Err(format!("join a session keyring of its own: {e}")),
    };
    if perm(serial).is_none_or(|p| p & SEARCH_BY_OTHERS != 0) {
        // Not the one just made: someone left a keyring of that name open.
        join(None).map_err(|e| format!("join an anonymous session keyring: {e}"))?;
    }
    Ok(())
}

fn join(name: Option<&CString>) -> std::io::Result<libc::c_long> {
    let ptr = name.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: keyctl with a NUL-terminated name (or NULL) that outlives
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, ptr) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Keyring `serial`'s description (`type;uid;gid;perm;description`).
fn describe(serial: libc::c_long) -> Option<String> {
    let mut buf = vec![0u8; 512];
    // SAFETY: keyctl writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_DESCRIBE,
            serial,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?.min(buf.len());
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    Some(text.trim_end_matches('\0').to_string())
}

/// The permission mask of keyring `serial`.
fn perm(serial: libc::c_long) -> Option<u32> {
    parse_perm(&describe(serial)?)
}

fn parse_perm(description: &str) -> Option<u32> {
    let field = description.split(';').nth(3)?;
    u32::from_str_radix(field, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_permission_field_is_read_from_a_description() {
        assert_eq!(parse_perm("keyring;0;0;3f130000;cph.p1"), Some(0x3f13_0000));
        assert_eq!(parse_perm("keyring;0;0;3f1b0000;a;b"), Some(0x3f1b_0000));
        assert_eq!(parse_perm("keyring;0;0"), None);
        assert_eq!(parse_perm("keyring;0;0;zz;x"), None);
        // What the kernel gives a keyring it makes for a join is not
        // searchable by others; one left searchable is.
        assert_eq!(0x3f13_0000 & SEARCH_BY_OTHERS, 0);
        assert_ne!(0x3f1b_0000 & SEARCH_BY_OTHERS, 0);
    }

    /// On a thread of its own (a session keyring belongs to a thread's
    /// credentials): a new keyring named so, then a name someone left open.
    #[test]
    fn a_thread_joins_a_new_keyring_and_never_one_left_open() {
        if !crate::privilege::check("a_thread_joins_a_new_keyring_and_never_one_left_open") {
            return;
        }
        let run = || -> Result<(), String> {
            let before = session()?;
            join_own("keyring-test")?;
            let own = session()?;
            if own == before {
                return Err("kept the inherited keyring".into());
            }
            let desc = describe(own).unwrap_or_default();
            if !desc.ends_with(";cph.keyring-test")
                || perm(own).unwrap_or(!0) & SEARCH_BY_OTHERS != 0
            {
                return Err(format!("joined {desc}"));
            }
            // A keyring of the next name left searchable, held by this
            // thread's own keyring.
            let squat = CString::new("cph.keyring-squat").map_err(|e| e.to_string())?;
            let ty = CString::new("keyring").map_err(|e| e.to_string())?;
            // SAFETY: add_key with valid strings and no payload, into
            // KEY_SPEC_THREAD_KEYRING (-1).
            let k = unsafe {
                libc::syscall(
                    libc::SYS_add_key,
                    ty.as_ptr(),
                    squat.as_ptr(),
                    std::ptr::null::<u8>(),
                    0usize,
                    -1i32,
                )
            };
            if k < 0 {
                return Err(format!("add_key: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: KEYCTL_SETPERM (5) on the key just made: the user's
            // search bit set.
            let r = unsafe { libc::syscall(libc::SYS_keyctl, 5, k, 0x3f1b_0000u32) };
            if r < 0 {
                return Err(format!("setperm: {}", std::io::Error::last_os_error()));
            }
            join_own("keyring-squat")?;
            let now = session()?;
            let desc = describe(now).unwrap_or_default();
            if now == k || !desc.ends_with(";_ses") {
                return Err(format!("joined {desc}"));
            }
            Ok(())
        };
        let outcome = std::thread::spawn(run).join().expect("thread");
        assert_eq!(outcome, Ok(()));
    }

    fn session() -> Result<libc::c_long, String> {
        // SAFETY: KEYCTL_GET_KEYRING_ID (0) of KEY_SPEC_SESSION_KEYRING (-3).
        let r = unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i32, 0) };
        if r < 0 {
            Err(format!("session: {}", std::io::Error::last_os_error()))
        } else {
            Ok(r)
        }
    }
}
