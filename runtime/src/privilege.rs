//! Whether this process may do privileged kernel work (namespaces, cgroups,
//! mounts, nftables), so tests that need it can skip with a printed reason
//! instead of passing silently.

/// Environment variable that forbids privileged work even as root, set when
/// tests run under QEMU user emulation, which cannot emulate namespaces,
/// mounts or netlink for a foreign architecture faithfully.
pub const UNPRIVILEGED_ENV: &str = "CPH_TEST_UNPRIVILEGED";

/// Why privileged work is not possible here, or `None` when it is.
pub fn unavailable_reason() -> Option<String> {
    if std::env::var_os(UNPRIVILEGED_ENV).is_some() {
        return Some(format!("{UNPRIVILEGED_ENV} is set"));
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_string());
    }
    None
}

/// Returns true when privileged work may proceed; otherwise prints why the
/// named test is skipped and returns false.
pub fn check(test: &str) -> bool {
    match unavailable_reason() {
        None => true,
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_forbids_privileged_work() {
        // The variable is process-wide; this test only reads it when set by
        // the caller (cross runs set it), and otherwise checks the root rule.
        match std::env::var_os(UNPRIVILEGED_ENV) {
            Some(_) => assert!(unavailable_reason().is_some()),
            None => assert_eq!(
                unavailable_reason().is_none(),
                nix::unistd::geteuid().is_root()
            ),
        }
    }
}
