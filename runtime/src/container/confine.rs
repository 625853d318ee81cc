//! What a phone's processes may not do to the host, whatever capabilities
//! they hold: load or unload kernel modules, boot another kernel, set the
//! host's clock, turn swap on or off, start process accounting, open a
//! file by handle (which reaches past the phone's root on a filesystem it
//! shares with the host, the classic container escape), or on x86 reach
//! the host's I/O ports. A phone's root is the host's root unless it has a
//! user namespace of its own, and these act on the whole host.
//!
//! Nor may they manage the filesystem their root lives on, which is the
//! host's (overlay volumes) or the pool every phone of the host shares
//! (btrfs volumes): the filter refuses the btrfs family of `ioctl`s (a
//! phone's root could lift its own or another phone's disk cap, turn the
//! pool's quotas off, resize or balance it, or make a subvolume outside
//! its cap) but for the generic clone and dedupe calls of that family
//! (`FICLONE`, `FICLONERANGE`, `FIDEDUPERANGE`) and reading the label, and
//! the calls that freeze, thaw, shut down or grow a filesystem (`FIFREEZE`,
//! `FITHAW`, the ext4, xfs and f2fs shutdown, ext4 and xfs growth and
//! block reserves, xfs error injection, ext4 journal checkpoints and boot
//! loader swap). A command's low 16 bits (type and number) are compared,
//! the bits the kernel itself switches on, whatever the size, direction
//! or upper bits a caller passes.
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
    /// `ioctl`'s number, whose commands [`IOCTL_ALLOWED`],
    /// [`IOCTL_REFUSED`] and [`IOCTL_REFUSED_TYPES`] sort.
    ioctl: u32,
}

/// An `ioctl` command's type and number, the low 16 bits the kernel
/// dispatches on (`_IOC_TYPE << 8 | _IOC_NR`).
const fn cmd(kind: u8, nr: u8) -> u32 {
    (kind as u32) << 8 | nr as u32
}

/// `BTRFS_IOCTL_MAGIC`, also the type of the generic `FICLONE` family.
const BTRFS: u8 = 0x94;

/// Commands of a refused type that pass: `FICLONE`, `FICLONERANGE`,
/// `FIDEDUPERANGE` and `FS_IOC_GETFSLABEL` (`linux/fs.h`).
const IOCTL_ALLOWED: [u32; 4] = [
    cmd(BTRFS, 9),
    cmd(BTRFS, 13),
    cmd(BTRFS, 54),
    cmd(BTRFS, 49),
];

/// Single commands refused: `FIFREEZE`, `FITHAW` and the shutdown of ext4,
/// xfs and f2fs (`'X'` 119, 120, 125); xfs growth, block reserves and
/// error injection (`'X'` 110-112, 114, 116, 117); ext4 growth, boot
/// loader swap and journal checkpoint (`'f'` 7, 8, 16, 17, 43).
const IOCTL_REFUSED: [u32; 14] = [
    cmd(b'X', 119),
    cmd(b'X', 120),
    cmd(b'X', 125),
    cmd(b'X', 110),
    cmd(b'X', 111),
    cmd(b'X', 112),
    cmd(b'X', 114),
    cmd(b'X', 116),
    cmd(b'X', 117),
    cmd(b'f', 7),
    cmd(b'f', 8),
    cmd(b'f', 16),
    cmd(b'f', 17),
    cmd(b'f', 43),
];

/// Types refused whole (but for [`IOCTL_ALLOWED`]): btrfs.
const IOCTL_REFUSED_TYPES: [u32; 1] = [cmd(BTRFS, 0)];

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
        ioctl: libc::SYS_ioctl as u32,
    },
    // asm/unistd_32.h (no kexec_file_load).
    Abi {
        arch: AUDIT_ARCH_I386,
        refused: &[&[128, 350, 129, 283, 342, 87, 115, 51, 110, 101]],
        refused_from: None,
        ioctl: 54,
    },
];

#[cfg(target_arch = "aarch64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: AUDIT_ARCH_AARCH64,
        refused: &[NATIVE],
        refused_from: None,
        ioctl: libc::SYS_ioctl as u32,
    },
    // arch/arm/tools/syscall.tbl (EABI).
    Abi {
        arch: AUDIT_ARCH_ARM,
        refused: &[&[128, 379, 129, 347, 401, 371, 87, 115, 51]],
        refused_from: None,
        ioctl: 54,
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

/// Offsets in `struct seccomp_data`: the number, the ABI, and the low
/// half of the second argument (an `ioctl`'s command).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const DATA_ARG1_LOW: u32 = 24;
#[cfg(target_endian = "big")]
const DATA_ARG1_LOW: u32 = 28;

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

/// The filter: per ABI, its refused numbers answered `EPERM`, `ioctl`
/// sorted by [`ioctl_block`] and the rest allowed; another ABI refused
/// whole.
fn program() -> Vec<libc::sock_filter> {
    let mut prog = vec![load(DATA_ARCH)];
    for abi in &ABIS {
        // The block: load the number, the range check, one test per
        // refused number, the test for `ioctl`, allow, refuse, then the
        // `ioctl` block.
        let mut block = vec![load(DATA_NR)];
        let refused = || abi.refused.iter().flat_map(|list| list.iter().copied());
        let tests = refused().count() + usize::from(abi.refused_from.is_some()) + 1;
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
        // Past `allow` and the refusal.
        block.push(jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            abi.ioctl,
            2,
            0,
        ));
        block.push(allow());
        block.push(eperm());
        block.extend(ioctl_block());
        prog.push(jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            abi.arch,
            0,
            block.len() as u8,
        ));
        prog.extend(block);
    }
    prog.push(eperm());
    prog
}

/// An `ioctl`'s command: the allowed ones pass, the refused ones and the
/// refused types are answered `EPERM`, the rest pass.
fn ioctl_block() -> Vec<libc::sock_filter> {
    let alu_and = |k| stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, k);
    let tests = IOCTL_ALLOWED.len() + IOCTL_REFUSED.len() + IOCTL_REFUSED_TYPES.len();
    let mut block = vec![load(DATA_ARG1_LOW), alu_and(0xffff)];
    // `allow` comes after the load, the mask, the tests and the type mask;
    // the refusal after it. From the test at `at` in the block to either:
    let allow_at = 3 + tests;
    let to = |at: usize, refuse: bool| (allow_at + usize::from(refuse) - at - 1) as u8;
    let jeq = |k, jt| jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, k, jt, 0);
    for k in IOCTL_ALLOWED {
        block.push(jeq(k, to(block.len(), false)));
    }
    for k in IOCTL_REFUSED {
        block.push(jeq(k, to(block.len(), true)));
    }
    block.push(alu_and(0xff00));
    for k in IOCTL_REFUSED_TYPES {
        block.push(jeq(k, to(block.len(), true)));
    }
    block.push(allow());
    block.push(eperm());
    block
}

fn load(offset: u32) -> libc::sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn allow() -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW)
}

fn eperm() -> libc::sock_filter {
    stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
    )
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

    /// Runs `prog` over one call as the kernel does (for the instructions
    /// it uses) and returns its answer.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, arg1: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[24..32].copy_from_slice(&arg1.to_ne_bytes());
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let ins = prog.get(pc).expect("the program ran past its end");
            pc += 1;
            let code = u32::from(ins.code);
            let taken = |yes: bool| usize::from(if yes { ins.jt } else { ins.jf });
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                let at = ins.k as usize;
                let word: [u8; 4] = data[at..at + 4].try_into().expect("4 bytes");
                a = u32::from_ne_bytes(word);
            } else if code == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K {
                a &= ins.k;
            } else if code == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K {
                pc += taken(a == ins.k);
            } else if code == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K {
                pc += taken(a >= ins.k);
            } else if code == libc::BPF_RET | libc::BPF_K {
                return ins.k;
            } else {
                panic!("instruction {code:#x} the filter does not use");
            }
        }
    }

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn the_filter_refuses_what_it_names_and_passes_the_rest() {
        let prog = program();
        assert!(prog.len() < 4096, "longer than the kernel takes");
        assert_eq!(run(&prog, 0x1234, 1, 0), EPERM, "another ABI");
        // `ioctl` commands as a caller passes them (direction and size in
        // the upper bits), each with some of the upper half set too.
        let passed: &[(u64, &str)] = &[
            (0x4004_9409, "FICLONE"),
            (0x4020_940d, "FICLONERANGE"),
            (0xc018_9436, "FIDEDUPERANGE"),
            (0x8100_9431, "FS_IOC_GETFSLABEL"),
            (0xc018_5879, "FITRIM"),
            (0x8008_6601, "FS_IOC_GETFLAGS"),
            (0xc030_6201, "BINDER_WRITE_READ"),
            (0x5401, "TCGETS"),
        ];
        let refused: &[(u64, &str)] = &[
            (0x8030_942b, "BTRFS_IOC_QGROUP_LIMIT"),
            (0xc010_9428, "BTRFS_IOC_QUOTA_CTL"),
            (0x5000_940e, "BTRFS_IOC_SUBVOL_CREATE"),
            (0x5000_9417, "BTRFS_IOC_SNAP_CREATE_V2"),
            (0x5000_9403, "BTRFS_IOC_RESIZE"),
            (0x4100_9432, "FS_IOC_SETFSLABEL"),
            (0xc004_5877, "FIFREEZE"),
            (0xc004_5878, "FITHAW"),
            (0x8004_587d, "EXT4_IOC_SHUTDOWN"),
            (0x4008_6610, "EXT4_IOC_RESIZE_FS"),
            (0x4004_662b, "EXT4_IOC_CHECKPOINT"),
            (0x4010_586e, "XFS_IOC_FSGROWFSDATA"),
        ];
        for abi in &ABIS {
            for &nr in abi.refused.iter().flat_map(|list| list.iter()) {
                assert_eq!(run(&prog, abi.arch, nr, 0), EPERM, "{:#x} {nr}", abi.arch);
            }
            // A number no ABI refuses (on the 32-bit ones `fork`).
            assert_eq!(run(&prog, abi.arch, 2, 0), libc::SECCOMP_RET_ALLOW);
            if let Some(from) = abi.refused_from {
                assert_eq!(run(&prog, abi.arch, from | 2, 0), EPERM, "x32");
            }
            for high in [0, 0xffff_ffff_0000_0000] {
                for (cmd, name) in passed {
                    let r = run(&prog, abi.arch, abi.ioctl, cmd | high);
                    assert_eq!(r, libc::SECCOMP_RET_ALLOW, "{name} {:#x}", abi.arch);
                }
                for (cmd, name) in refused {
                    let r = run(&prog, abi.arch, abi.ioctl, cmd | high);
                    assert_eq!(r, EPERM, "{name} {:#x}", abi.arch);
                }
            }
        }
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
            // Each call's errno, read right after it.
            // SAFETY: invalid pointers and descriptors; the calls are refused
            // or fail on them without touching memory of ours.
            let errnos = unsafe {
                [
                    errno_of(libc::syscall(libc::SYS_init_module, 0usize, 0usize, 0usize)),
                    errno_of(libc::syscall(libc::SYS_finit_module, -1, 0usize, 0)),
                    errno_of(libc::syscall(libc::SYS_open_by_handle_at, -1, 0usize, 0)),
                    errno_of(libc::syscall(libc::SYS_swapoff, 0usize)),
                    errno_of(libc::syscall(
                        libc::SYS_kexec_load,
                        0usize,
                        0usize,
                        0usize,
                        0usize,
                    )),
                    // BTRFS_IOC_QGROUP_LIMIT, BTRFS_IOC_SUBVOL_CREATE,
                    // FIFREEZE with the upper half set (the kernel takes
                    // the low one).
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0x8030_942b_u64, 0usize)),
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0x5000_940e_u64, 0usize)),
                    errno_of(libc::syscall(
                        libc::SYS_ioctl,
                        -1,
                        0x1_c004_5877_u64,
                        0usize,
                    )),
                ]
            };
            for (i, errno) in errnos.into_iter().enumerate() {
                if errno != libc::EPERM {
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
            // Everything else passes: FICLONE reaches the kernel, which
            // finds no descriptor.
            // SAFETY: no arguments.
            if unsafe { libc::getppid() } <= 0 {
                return 30;
            }
            // SAFETY: an invalid descriptor; fails with EBADF.
            let clone = unsafe { libc::syscall(libc::SYS_ioctl, -1, 0x4004_9409_u64, 0usize) };
            if errno_of(clone) != libc::EBADF {
                return 31;
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
