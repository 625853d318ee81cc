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
//! Nor may they reach the keyrings of the user they run as, which for a
//! phone without a user namespace is host root's: the kernel's keyrings
//! are not namespaced, and the user keyring and user session keyring
//! (`KEY_SPEC_USER_KEYRING`, `KEY_SPEC_USER_SESSION_KEYRING`) named in any
//! argument of `keyctl`, `add_key` or `request_key` that takes a keyring,
//! made the default destination of requested keys, or a persistent
//! keyring (one per user, host root's too) asked for, are answered
//! `EPERM`. Every phone process
//! has a session keyring of its own ([`super::keyring`]), where Android
//! keeps its keys, and a search there does not go on into the user's.
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
    /// The numbers of `keyctl`, `add_key` and `request_key`, whose keyring
    /// arguments [`keys_blocks`] checks.
    keys: Keys,
}

struct Keys {
    keyctl: u32,
    add_key: u32,
    request_key: u32,
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

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NATIVE_KEYS: Keys = Keys {
    keyctl: libc::SYS_keyctl as u32,
    add_key: libc::SYS_add_key as u32,
    request_key: libc::SYS_request_key as u32,
};

#[cfg(target_arch = "x86_64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: AUDIT_ARCH_X86_64,
        refused: &[NATIVE, &[libc::SYS_iopl as u32, libc::SYS_ioperm as u32]],
        refused_from: Some(X32_SYSCALL_BIT),
        ioctl: libc::SYS_ioctl as u32,
        keys: NATIVE_KEYS,
    },
    // asm/unistd_32.h (no kexec_file_load).
    Abi {
        arch: AUDIT_ARCH_I386,
        refused: &[&[128, 350, 129, 283, 342, 87, 115, 51, 110, 101]],
        refused_from: None,
        ioctl: 54,
        keys: Keys {
            keyctl: 288,
            add_key: 286,
            request_key: 287,
        },
    },
];

#[cfg(target_arch = "aarch64")]
const ABIS: [Abi; 2] = [
    Abi {
        arch: AUDIT_ARCH_AARCH64,
        refused: &[NATIVE],
        refused_from: None,
        ioctl: libc::SYS_ioctl as u32,
        keys: NATIVE_KEYS,
    },
    // arch/arm/tools/syscall.tbl (EABI).
    Abi {
        arch: AUDIT_ARCH_ARM,
        refused: &[&[128, 379, 129, 347, 401, 371, 87, 115, 51]],
        refused_from: None,
        ioctl: 54,
        keys: Keys {
            keyctl: 311,
            add_key: 309,
            request_key: 310,
        },
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
/// half of an argument (the second is an `ioctl`'s command; the kernel
/// reads a keyring's id as a 32-bit int, whatever the upper half holds).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const fn data_arg_low(i: u32) -> u32 {
    16 + 8 * i + if cfg!(target_endian = "big") { 4 } else { 0 }
}
const DATA_ARG1_LOW: u32 = data_arg_low(1);

/// `KEY_SPEC_USER_KEYRING` and `KEY_SPEC_USER_SESSION_KEYRING` as the
/// 32-bit words a caller passes (-4, -5).
const USER_KEYRINGS: [u32; 2] = [-4i32 as u32, -5i32 as u32];

/// `keyctl` operations (`linux/keyctl.h`) and which of their arguments
/// (counted from 0, the operation) is a key or keyring id. Every
/// operation naming a key by id takes it first; of those not listed,
/// the request-key default and persistent keyrings are checked apart
/// (below), and the rest take no id (joining a keyring by name, the
/// session-to-parent move, Diffie-Hellman and public-key operations,
/// whose parameters are in memory, and the capability query).
const KEYCTL_ID_ARGS: [(u32, &[u32]); 4] = [
    (
        1,
        &[
            0,  // GET_KEYRING_ID
            2,  // UPDATE
            3,  // REVOKE
            4,  // CHOWN
            5,  // SETPERM
            6,  // DESCRIBE
            7,  // CLEAR
            8,  // LINK
            9,  // UNLINK
            10, // SEARCH
            11, // READ
            12, // INSTANTIATE
            13, // NEGATE
            15, // SET_TIMEOUT
            16, // ASSUME_AUTHORITY
            17, // GET_SECURITY
            19, // REJECT
            20, // INSTANTIATE_IOV
            21, // INVALIDATE
            24, // PKEY_QUERY
            29, // RESTRICT_KEYRING
            30, // MOVE
            32, // WATCH_KEY
        ],
    ),
    // LINK, UNLINK and MOVE: the keyring; NEGATE and MOVE: the keyring to
    // link into; SEARCH, INSTANTIATE, REJECT and INSTANTIATE_IOV: the same.
    (2, &[8, 9, 30]),
    (3, &[13, 30]),
    (4, &[10, 12, 19, 20]),
];
/// `KEYCTL_SET_REQKEY_KEYRING`, and the defaults it may not set:
/// `KEY_REQKEY_DEFL_USER_KEYRING` and `KEY_REQKEY_DEFL_USER_SESSION_KEYRING`.
const KEYCTL_SET_REQKEY_KEYRING: u32 = 14;
const REQKEY_USER_DEFAULTS: [u32; 2] = [4, 5];
/// `KEYCTL_GET_PERSISTENT`: any user's persistent keyring, refused whole.
const KEYCTL_GET_PERSISTENT: u32 = 22;

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
        // refused number, the tests for `ioctl` and the key calls, allow,
        // refuse, then the blocks of those calls.
        let mut block = vec![load(DATA_NR)];
        let refused = || abi.refused.iter().flat_map(|list| list.iter().copied());
        let tests = refused().count() + usize::from(abi.refused_from.is_some()) + 4;
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
        // The calls whose arguments decide, each to its block past `allow`
        // and the refusal.
        let ioctl = ioctl_block();
        let [keyctl, add_key, request_key] = keys_blocks();
        let sorted = [
            (abi.ioctl, &ioctl),
            (abi.keys.keyctl, &keyctl),
            (abi.keys.add_key, &add_key),
            (abi.keys.request_key, &request_key),
        ];
        let mut skip = sorted.len() - 1 + 2;
        for (nr, sub) in sorted {
            block.push(jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                nr,
                skip as u8,
                0,
            ));
            // The next test is one nearer, its block this one's length farther.
            skip = skip - 1 + sub.len();
        }
        block.push(allow());
        block.push(eperm());
        for (_, sub) in sorted {
            block.extend_from_slice(sub);
        }
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

/// The blocks of `keyctl`, `add_key` and `request_key`: a user keyring in
/// an argument that takes a keyring is answered `EPERM` (see the module
/// doc), the rest passes. Each block ends with its `allow` and refusal.
fn keys_blocks() -> [Vec<libc::sock_filter>; 3] {
    let jeq = |k, jt, jf| jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, k, jt, jf);
    // Jumps to the refusal are written as `REFUSE` and resolved at the end.
    const REFUSE: u8 = u8::MAX;
    // Loads argument `arg`; refuses when it is one of `values`.
    let refuse_if = |block: &mut Vec<libc::sock_filter>, arg: u32, values: &[u32]| {
        block.push(load(data_arg_low(arg)));
        for &v in values {
            block.push(jeq(v, REFUSE, 0));
        }
    };
    // Runs the check of `values` in argument `arg` when the operation
    // (argument 0) is one of `ops`, and goes on past it otherwise.
    let when_op = |block: &mut Vec<libc::sock_filter>, ops: &[u32], arg: u32, values: &[u32]| {
        block.push(load(data_arg_low(0)));
        for (i, &op) in ops.iter().enumerate() {
            let left = (ops.len() - 1 - i) as u8;
            if left == 0 {
                // The last: on to the check, or past it (a load and a
                // test per value).
                block.push(jeq(op, 0, 1 + values.len() as u8));
            } else {
                block.push(jeq(op, left, 0));
            }
        }
        refuse_if(block, arg, values);
    };
    let finish = |mut block: Vec<libc::sock_filter>| {
        block.push(allow());
        block.push(eperm());
        let refusal = block.len() - 1;
        for (at, ins) in block.iter_mut().enumerate() {
            if ins.jt == REFUSE {
                ins.jt = (refusal - at - 1) as u8;
            }
        }
        block
    };

    let mut keyctl = vec![load(data_arg_low(0))];
    keyctl.push(jeq(KEYCTL_GET_PERSISTENT, REFUSE, 0));
    when_op(
        &mut keyctl,
        &[KEYCTL_SET_REQKEY_KEYRING],
        1,
        &REQKEY_USER_DEFAULTS,
    );
    for (arg, ops) in KEYCTL_ID_ARGS {
        when_op(&mut keyctl, ops, arg, &USER_KEYRINGS);
    }
    // add_key(type, description, payload, length, keyring) and
    // request_key(type, description, callout, keyring).
    let mut add_key = Vec::new();
    refuse_if(&mut add_key, 4, &USER_KEYRINGS);
    let mut request_key = Vec::new();
    refuse_if(&mut request_key, 3, &USER_KEYRINGS);
    [finish(keyctl), finish(add_key), finish(request_key)]
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
        run_args(prog, arch, nr, &[0, arg1])
    }

    /// As [`run`], with the call's first arguments.
    fn run_args(prog: &[libc::sock_filter], arch: u32, nr: u32, args: &[u64]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_ne_bytes());
        }
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
    fn the_filter_keeps_the_user_keyrings_out_of_reach() {
        let prog = program();
        // -4 and -5 as a 64-bit caller passes them, and with the upper
        // half clear (the kernel reads an int either way).
        let user = [-4i64 as u64, -5i64 as u64, 0xffff_fffc, 0xffff_fffb];
        const SESSION: u64 = -3i64 as u64;
        const PROCESS: u64 = -2i64 as u64;
        const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
        for abi in &ABIS {
            let keyctl = |args: &[u64]| run_args(&prog, abi.arch, abi.keys.keyctl, args);
            for id in user {
                // GET_KEYRING_ID, DESCRIBE, CLEAR, LINK (key, keyring),
                // UNLINK, SEARCH (keyring, type, description, destination),
                // NEGATE (key, timeout, keyring), INSTANTIATE (key,
                // payload, length, keyring), MOVE (key, from, to).
                for args in [
                    [0, id, 0, 0, 0],
                    [6, id, 0, 0, 0],
                    [7, id, 0, 0, 0],
                    [8, 5, id, 0, 0],
                    [8, id, SESSION, 0, 0],
                    [9, 5, id, 0, 0],
                    [10, SESSION, 1, 1, id],
                    [10, id, 1, 1, 0],
                    [13, 5, 60, id, 0],
                    [12, 5, 1, 1, id],
                    [30, 5, id, SESSION, 0],
                    [30, 5, SESSION, id, 0],
                ] {
                    assert_eq!(keyctl(&args), EPERM, "keyctl {args:?} {:#x}", abi.arch);
                }
                // Where an argument is a pointer or a length, or the
                // operation takes no id, the value passes: JOIN's name,
                // DESCRIBE's buffer, UPDATE's length, DH_COMPUTE's
                // parameters, the capability query.
                for args in [
                    [1, id, 0, 0, 0],
                    [6, SESSION, id, 0, 0],
                    [2, 5, 1, id, 0],
                    [23, id, id, id, id],
                    [31, id, id, 0, 0],
                ] {
                    assert_eq!(keyctl(&args), ALLOW, "keyctl {args:?} {:#x}", abi.arch);
                }
                // add_key(type, description, payload, length, keyring),
                // request_key(type, description, callout, keyring).
                let add_key =
                    |keyring| run_args(&prog, abi.arch, abi.keys.add_key, &[1, 1, 1, 1, keyring]);
                let request_key =
                    |keyring| run_args(&prog, abi.arch, abi.keys.request_key, &[1, 1, 0, keyring]);
                assert_eq!(add_key(id), EPERM);
                assert_eq!(request_key(id), EPERM);
            }
            // The phone's own keyrings pass.
            for id in [SESSION, PROCESS, 0x1234_5678] {
                for op in [0, 6, 7, 11] {
                    assert_eq!(keyctl(&[op, id]), ALLOW, "keyctl {op} {id:#x}");
                }
                assert_eq!(keyctl(&[8, 5, id]), ALLOW);
                assert_eq!(keyctl(&[10, SESSION, 1, 1, id]), ALLOW);
            }
            assert_eq!(
                run_args(&prog, abi.arch, abi.keys.add_key, &[1, 1, 1, 1, SESSION]),
                ALLOW
            );
            assert_eq!(
                run_args(&prog, abi.arch, abi.keys.request_key, &[1, 1, 0, 0]),
                ALLOW
            );
            // Requested keys may not go to the user keyrings by default,
            // nor may any user's persistent keyring be had.
            assert_eq!(keyctl(&[14, 4]), EPERM);
            assert_eq!(keyctl(&[14, 5]), EPERM);
            assert_eq!(keyctl(&[14, 3]), ALLOW);
            assert_eq!(keyctl(&[14, -1i64 as u64]), ALLOW);
            assert_eq!(keyctl(&[22, 0, SESSION]), EPERM);
            assert_eq!(keyctl(&[22, -1i64 as u64, SESSION]), EPERM);
            // The other calls' blocks are where they were.
            assert_eq!(run(&prog, abi.arch, abi.ioctl, 0x8030_942b), EPERM);
            assert_eq!(run(&prog, abi.arch, abi.ioctl, 0x5401), ALLOW);
        }
    }

    #[test]
    fn confined_processes_reach_keyrings_of_their_own_only() {
        if !crate::privilege::check("confined_processes_reach_keyrings_of_their_own_only") {
            return;
        }
        let code = in_confined_child(|| {
            const GET_KEYRING_ID: libc::c_long = 0;
            let get = |id: libc::c_long, create: libc::c_long| {
                // SAFETY: no pointers.
                unsafe { libc::syscall(libc::SYS_keyctl, GET_KEYRING_ID, id, create) }
            };
            // A keyring of the process's own: made, found (where the
            // kernel has keyrings at all).
            let own = get(-2, 1);
            if own < 0 && errno_of(own) == libc::ENOSYS {
                return 0;
            }
            if own <= 0 {
                return 1;
            }
            // The user's keyrings: refused, by id and as a destination.
            if errno_of(get(-4, 0)) != libc::EPERM || errno_of(get(-5, 1)) != libc::EPERM {
                return 2;
            }
            let add = |keyring: libc::c_long| {
                // SAFETY: NUL-terminated strings and a payload that
                // outlive the call.
                unsafe {
                    libc::syscall(
                        libc::SYS_add_key,
                        c"user".as_ptr(),
                        c"cph-confine-test".as_ptr(),
                        b"x".as_ptr(),
                        1usize,
                        keyring,
                    )
                }
            };
            if errno_of(add(-4)) != libc::EPERM {
                return 3;
            }
            // Into the process keyring, gone with the process.
            if add(-2) <= 0 {
                return 4;
            }
            // SAFETY: NUL-terminated strings that outlive the call.
            let req = unsafe {
                libc::syscall(
                    libc::SYS_request_key,
                    c"user".as_ptr(),
                    c"cph-confine-test-none".as_ptr(),
                    std::ptr::null::<libc::c_char>(),
                    -4 as libc::c_long,
                )
            };
            if errno_of(req) != libc::EPERM {
                return 5;
            }
            0
        });
        assert_eq!(code, 0, "a confined child reached a user keyring");
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
