//! The device allow-list on cgroup v2, which has no `devices` controller:
//! a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the phone's cgroup
//! answers every open and mknod of a device node by its phones' processes
//! (the kernel's own replacement for v1's `devices.allow`, as runc and crun
//! use it). The program allows the listed character devices, any access,
//! and refuses every other device, block devices included.
//!
//! It is built here instruction by instruction (a dozen per rule), loaded
//! with `bpf(2)` and attached to the cgroup's directory; the attachment
//! holds it, so no fd is kept, and it goes with the cgroup.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A character device a phone may use; `minor` `None` for any minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allowed {
    pub major: u32,
    pub minor: Option<u32>,
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst register in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// `BPF_DEVCG_DEV_CHAR`: the low 16 bits of `access_type`.
const DEV_CHAR: i32 = 2;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The program: `r1` is `struct bpf_cgroup_dev_ctx { u32 access_type;
/// u32 major; u32 minor; }`; the answer in `r0` is 1 to allow, 0 to refuse.
fn program(allowed: &[Allowed]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),        // r2 = access_type
        insn(ALU64_AND_K, 2, 0, 0, 0xffff), // r2 = device type
        insn(LDX_MEM_W, 3, 1, 4, 0),        // r3 = major
        insn(LDX_MEM_W, 4, 1, 8, 0),        // r4 = minor
    ];
    for rule in allowed {
        // Each check jumps past the rest of its rule when it fails: the
        // checks after it, then the two instructions that allow.
        let m = i16::from(rule.minor.is_some());
        p.push(insn(JMP_JNE_K, 2, 0, 3 + m, DEV_CHAR));
        p.push(insn(JMP_JNE_K, 3, 0, 2 + m, rule.major as i32));
        if let Some(minor) = rule.minor {
            p.push(insn(JMP_JNE_K, 4, 0, 2, minor as i32));
        }
        p.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Lets the parent's programs (if any) still apply, as they must.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel
/// takes a shorter attr and treats the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `repr(C)` struct of the layout the kernel
    // expects for `cmd`, and its size is passed with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads the program for `allowed` and attaches it to the cgroup at `dir`.
/// On failure the verifier's log, when it has one, is in the error.
pub(crate) fn attach(dir: &Path, allowed: &[Allowed]) -> Result<(), String> {
    let insns = program(allowed);
    let license = c"GPL";
    let mut log = vec![0u8; 64 << 10];
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    let prog = match bpf(BPF_PROG_LOAD, &mut load) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd we own.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            return Err(format!("load device program: {e} {}", text.trim()));
        }
    };
    let cgroup = std::fs::File::open(dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
    let mut at = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut at).map_err(|e| format!("attach device program: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program as the kernel would, for one device.
    fn run(p: &[Insn], kind: u32, major: u32, minor: u32) -> u64 {
        let ctx = [kind | (6 << 16), major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            assert_eq!(src, if i.code == LDX_MEM_W { 1 } else { 0 });
            pc += 1;
            match i.code {
                LDX_MEM_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU64_AND_K => r[dst] &= i.imm as u64,
                ALU64_MOV_K => r[dst] = i.imm as u64,
                JMP_JNE_K => {
                    if r[dst] != i.imm as u64 {
                        pc += i.off as usize;
                    }
                }
                JMP_EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn allows_the_listed_character_devices_only() {
        let p = program(&[
            Allowed {
                major: 1,
                minor: Some(3),
            },
            Allowed {
                major: 136,
                minor: None,
            },
            Allowed {
                major: 10,
                minor: Some(200),
            },
        ]);
        const CHAR: u32 = 2;
        const BLOCK: u32 = 1;
        assert_eq!(run(&p, CHAR, 1, 3), 1);
        assert_eq!(run(&p, CHAR, 1, 1), 0, "/dev/mem");
        assert_eq!(run(&p, CHAR, 136, 0), 1);
        assert_eq!(run(&p, CHAR, 136, 999), 1);
        assert_eq!(run(&p, CHAR, 10, 200), 1);
        assert_eq!(run(&p, CHAR, 10, 229), 0, "fuse not listed");
        assert_eq!(
            run(&p, BLOCK, 1, 3),
            0,
            "a block device of the same numbers"
        );
        assert_eq!(run(&p, BLOCK, 8, 0), 0);
        assert_eq!(run(&program(&[]), CHAR, 1, 3), 0, "empty list");
    }
}
