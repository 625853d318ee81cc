//! What a phone's processes may not do to the host, whatever capabilities
//! they hold: load or unload kernel modules, boot another kernel, set the
//! host's clock, turn swap on or off, start process accounting, open a
//! file by handle (which reaches past the phone's root on a filesystem it
//! shares with the host, the classic container escape), or on x86 reach
//! the host's I/O ports. A phone's root is the host's root unless it has a
//! user namespace of its own, and these act on the whole host.
//!
//! Two layers, set by the shim just before it execs the phone's init or a
//! command run in the phone, and inherited by everything they start: the
//! capabilities for modules and time leave the bounding set, and a seccomp
//! filter answers the other calls with `EPERM`, for the native ABI and the
//! 32-bit one (arm on aarch64, i386 on x86_64, which a 32-bit app may use);
//! x32 calls and any other ABI are refused whole. Android itself makes none
//! of these calls in a container. No `no_new_privs`: the shim holds
//! `CAP_SYS_ADMIN`, and Android's setuid and file-capability binaries must
//! keep working.

/// `CAP_SYS_MODULE` and `CAP_SYS_TIME`.
const DROPPED_CAPS: [libc::c_ulong; 2] = [16, 25];

/// `AUDIT_ARCH_*` of `linux/audit.h`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AUDIT_ARCH_ARM: u32 = 0x4000_0028;

/// x32 calls on x86_64 carry this bit in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// One ABI a phone's process may call the kernel through, and the numbers
/// of the refused calls in it.
struct Abi {
    arch: u32,
    refused: &'static [&'static [u32]],
    /// Numbers from this one up are refused too (x32).
    refused_from: Option<u32>,
}

/// The refused calls, in this order in every ABI: init_module,
/// finit_module, delete_module, kexec_load, kexec_file_load (where the
/// ABI has it), open_by_handle_at, swapon, swapoff, acct; on x86 also
/// iopl and ioperm (the host's I/O ports). The native numbers.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NATIVE: &[u32] = &[
    libc::SYS_init_module as u32,
    libc::SYS_finit_module as u32,
    libc::SYS_delete_module as u32,
    libc::SYS_kexec_load as u32,
    libc::SYS_kexec_file_load as u32,
    libc::SYS_open_by_handle_at as u32,
    libc::SYS_swapon as u32,
    libc::SYS_swapoff as u32,
    libc::SYS_acct as u32,
];

#[cfg(target_arch = "x86_64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: AUDIT_ARCH_X86_64,
        refused: &[NATIVE, &[libc::SYS_iopl as u32, libc::SYS_ioperm as u32]],
        refused_from: Some(X32_SYSCALL_BIT),
    },
    // asm/unistd_32.h (no kexec_file_load).
    Abi {
        arch: AUDIT_ARCH_I386,
        refused: &[&[128, 350, 129, 283, 342, 87, 115, 51, 110, 101]],
        refused_from: None,
    },
];

#[cfg(target_arch = "aarch64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: AUDIT_ARCH_AARCH64,
        refused: &[NATIVE],
        refused_from: None,
    },
    // arch/arm/tools/syscall.tbl (EABI).
    Abi {
        arch: AUDIT_ARCH_ARM,
        refused: &[&[128, 379, 129, 347, 401, 371, 87, 115, 51]],
        refused_from: None,
    },
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ABIS: [Abi; 0] = [];

// Keeps the constants of the other architecture in the build.
const _: [u32; 4] = [
    AUDIT_ARCH_X86_64,
    AUDIT_ARCH_I386,
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_ARM,
];

/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The filter: per ABI, its refused numbers answered `EPERM` and the rest
/// allowed; another ABI refused whole.
fn program() -> Vec<libc::sock_filter> {
    let load = |offset| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let ret = |action| stmt(libc::BPF_RET | libc::BPF_K, action);
    let allow = ret(libc::SECCOMP_RET_ALLOW);
    let eperm = ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    let mut prog = vec![load(DATA_ARCH)];
    for abi in &ABIS {
        // The block: load the number, the range check, one test per
        // refused number, allow, refuse.
        let mut block = vec![load(DATA_NR)];
        let refused = || abi.refused.iter().flat_map(|list| list.iter().copied());
        let tests = refused().count() + usize::from(abi.refused_from.is_some());
        // From test `i` (0-based) to the refusal after `allow`.
        let to_refusal = |i: usize| (tests - i) as u8;
        if let Some(from) = abi.refused_from {
            block.push(jump(
                libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                from,
                to_refusal(0),
                0,
            ));
        }
        for nr in refused() {
            let i = block.len() - 1;
            block.push(jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                nr,
                to_refusal(i),
                0,
            ));
        }
        block.push(allow);
        block.push(eperm);
        prog.push(jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            abi.arch,
            0,
            block.len() as u8,
        ));
        prog.extend(block);
    }
    prog.push(eperm);
    prog
}

/// Confines the calling process and what it execs (see the module doc).
/// Needs `CAP_SETPCAP` and `CAP_SYS_ADMIN` in its user namespace, or
/// `no_new_privs` set for the filter.
pub fn confine() -> Result<(), String> {
    for cap in DROPPED_CAPS {
        // SAFETY: PR_CAPBSET_DROP takes the capability number and no pointers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(format!(
                "drop capability {cap} from the bounding set: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(format!(
            "install the seccomp filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child confined first; its exit code.
    fn in_confined_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child only makes system calls and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // Nothing that takes a lock another thread may have held
                // at the fork: exit codes only.
                let code = match confine() {
                    Ok(()) => f(),
                    Err(_) => 100,
                };
                // SAFETY: leaves the forked child without running the
                // parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).expect("wait") {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    other => panic!("child ended {other:?}"),
                }
            }
        }
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn the_filter_jumps_stay_in_the_program() {
        let prog = program();
        for (i, ins) in prog.iter().enumerate() {
            if u32::from(ins.code) & 0x07 == libc::BPF_JMP {
                let last = i + 1 + usize::from(ins.jt.max(ins.jf));
                assert!(last < prog.len(), "instruction {i} jumps past the end");
            }
        }
        // Every refusal test lands on a return of EPERM.
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        for abi in &ABIS {
            let start = prog
                .iter()
                .position(|ins| ins.k == abi.arch)
                .expect("the ABI's check");
            for &nr in abi.refused.iter().flat_map(|list| list.iter()) {
                let (i, ins) = prog
                    .iter()
                    .enumerate()
                    .skip(start)
                    .find(|(_, ins)| ins.k == nr && u32::from(ins.code) & 0x07 == libc::BPF_JMP)
                    .expect("the number's test");
                assert_eq!(prog[i + 1 + usize::from(ins.jt)].k, eperm, "{nr}");
            }
        }
        assert_eq!(prog.last().map(|ins| ins.k), Some(eperm), "another ABI");
    }

    #[test]
    fn confined_processes_cannot_load_modules_or_open_by_handle_nor_exec_with_time_caps() {
        if !crate::privilege::check(
            "confined_processes_cannot_load_modules_or_open_by_handle_nor_exec_with_time_caps",
        ) {
            return;
        }
        // Refused by the filter, before the kernel looks at the arguments
        // (unconfined, these answer EFAULT or EBADF).
        let code = in_confined_child(|| {
            // SAFETY: invalid pointers and descriptors; the calls are refused
            // or fail on them without touching memory of ours.
            let calls = unsafe {
                [
                    libc::syscall(libc::SYS_init_module, 0usize, 0usize, 0usize),
                    libc::syscall(libc::SYS_finit_module, -1, 0usize, 0),
                    libc::syscall(libc::SYS_open_by_handle_at, -1, 0usize, 0),
                    libc::syscall(libc::SYS_swapoff, 0usize),
                    libc::syscall(libc::SYS_kexec_load, 0usize, 0usize, 0usize, 0usize),
                ]
            };
            for (i, r) in calls.into_iter().enumerate() {
                if errno_of(r) != libc::EPERM {
                    return 1 + i as i32;
                }
            }
            // iopl(0) drops nothing and passes unconfined.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: no pointers.
            if errno_of(unsafe { libc::syscall(libc::SYS_iopl, 0) }) != libc::EPERM {
                return 10;
            }
            // Modules and the clock: their capabilities are out of the
            // bounding set, so no program the process execs holds them.
            for (i, cap) in DROPPED_CAPS.into_iter().enumerate() {
                // SAFETY: PR_CAPBSET_READ takes the capability number only.
                if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } != 0 {
                    return 20 + i as i32;
                }
            }
            // Everything else passes.
            // SAFETY: no arguments.
            if unsafe { libc::getppid() } <= 0 {
                return 30;
            }
            0
        });
        assert_eq!(code, 0, "a confined child made a refused call");
        // Unconfined, the same calls reach the kernel's own checks.
        // SAFETY: invalid descriptor; fails with EBADF.
        let r = unsafe { libc::syscall(libc::SYS_open_by_handle_at, -1, 0usize, 0) };
        assert_ne!(errno_of(r), libc::EPERM);
    }
}
