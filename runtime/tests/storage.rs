//! Real btrfs pools on loop-attached sparse files in temporary directories:
//! image import, clone isolation, quota enforcement, reset, rediscovery after
//! a restart and a simulated reboot, refusals, and clean-up. Privileged:
//! skipped (with the reason printed) without root or btrfs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use cph_runtime::storage::{
    btrfs::{quota_mode, QuotaMode},
    capacity_report, list_share_dir, BtrfsConfig, BtrfsStorage, PoolDevice, Storage, StorageError,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn btrfs_available(test: &str) -> bool {
    if !cph_runtime::privilege::check(test) {
        return false;
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_tools = Command::new("mkfs.btrfs").arg("--version").output().is_ok();
    if !has_tools {
        eprintln!("SKIPPED {test}: mkfs.btrfs is not installed (apt package btrfs-progs)");
        return false;
    }
    if !fs.contains("btrfs") {
        // The module loads on first mount; probe once.
        let _ = Command::new("modprobe").arg("btrfs").status();
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.contains("btrfs") {
            eprintln!("SKIPPED {test}: the kernel has no btrfs");
            return false;
        }
    }
    true
}

const POOL_BYTES: u64 = 512 << 20;

/// A pool on a sparse file in a temp dir; Drop unmounts and detaches
/// whatever is left, even when the test failed.
struct Pool {
    tmp: tempfile::TempDir,
    file: PathBuf,
    mount: PathBuf,
    owner: String,
}

impl Pool {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join(format!("{}.img", unique("pool")));
        let mount = tmp.path().join("mnt");
        Self {
            tmp,
            file,
            mount,
            owner: unique("agent"),
        }
    }

    fn config(&self, owner: &str) -> BtrfsConfig {
        BtrfsConfig {
            device: PoolDevice::LoopFile {
                path: self.file.clone(),
                size_bytes: POOL_BYTES,
            },
            mount_point: self.mount.clone(),
            owner: owner.to_string(),
            max_share_bytes: 64 << 20,
        }
    }

    fn open(&self) -> BtrfsStorage {
        let s = BtrfsStorage::new(self.config(&self.owner));
        s.prepare().expect("prepare");
        s
    }

    fn loops(&self) -> Vec<String> {
        let out = Command::new("losetup")
            .args(["--noheadings", "--output", "NAME", "--associated"])
            .arg(&self.file)
            .output()
            .expect("losetup");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Whether the pool file's filesystem lets it be opened for direct I/O
    /// (ramfs does not, nor tmpfs on older kernels such as 6.1): the loop
    /// device then does it.
    fn file_takes_direct_io(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.file)
            .is_ok()
    }

    /// Whether each of the file's loop devices does direct I/O.
    fn direct_io(&self) -> Vec<bool> {
        self.loops()
            .iter()
            .map(|dev| {
                let name = dev.trim_start_matches("/dev/");
                std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
                    .map(|v| v.trim() == "1")
                    .unwrap_or(false)
            })
            .collect()
    }

    fn mounted(&self) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let want = self.mount.to_string_lossy().to_string();
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for _ in 0..3 {
            if !self.mounted() {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        for dev in self.loops() {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
        let _ = self.tmp.path();
    }
}

/// A rootfs tar built from a directory tree with GNU tar (building the
/// archive only; the product unpacks it with `archive::extract`).
fn make_image(files: &[(&str, &[u8])]) -> Vec<u8> {
    let d = tempfile::tempdir().expect("tempdir");
    for (name, data) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let out = Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .args(["-czf", "-", "."])
        .output()
        .expect("tar");
    assert!(out.status.success());
    out.stdout
}

fn import(s: &BtrfsStorage, id: &str, tar: &[u8]) {
    let r = s
        .import_image(id, Box::new(std::io::Cursor::new(tar.to_vec())))
        .expect("import");
    assert!(r.imported);
}

/// A ustar entry by hand, for archives GNU tar will not write.
fn raw_tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn clones_are_isolated_and_reset_restores_the_image() {
    if !btrfs_available("clones_are_isolated_and_reset_restores_the_image") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    import(
        &s,
        "img-a",
        &make_image(&[("system/build.prop", b"ro.a=1\n")]),
    );
    import(
        &s,
        "img-b",
        &make_image(&[("system/build.prop", b"ro.b=2\n")]),
    );
    assert_eq!(s.list_images().unwrap(), vec!["img-a", "img-b"]);
    // Importing again is a no-op that reads nothing.
    let again = s.import_image("img-a", Box::new(std::io::empty())).unwrap();
    assert!(!again.imported);

    let a = s.create_volume("phone-a", "img-a", 64 << 20).unwrap();
    let b = s.create_volume("phone-b", "img-a", 64 << 20).unwrap();
    std::fs::write(a.join("system/build.prop"), b"changed\n").unwrap();
    std::fs::write(a.join("only-a"), b"x").unwrap();
    assert_eq!(
        std::fs::read(b.join("system/build.prop")).unwrap(),
        b"ro.a=1\n"
    );
    assert!(!b.join("only-a").exists());
    // The image itself is read-only.
    assert!(std::fs::write(pool.mount.join("images/img-a/x"), b"x").is_err());

    let a2 = s.reset_volume("phone-a", None).unwrap();
    assert_eq!(a2, a);
    assert_eq!(
        std::fs::read(a.join("system/build.prop")).unwrap(),
        b"ro.a=1\n"
    );
    assert!(!a.join("only-a").exists());

    s.reset_volume("phone-a", Some("img-b")).unwrap();
    assert_eq!(
        std::fs::read(a.join("system/build.prop")).unwrap(),
        b"ro.b=2\n"
    );
    assert!(matches!(
        s.reset_volume("phone-a", Some("img-none")),
        Err(StorageError::UnknownImage(_))
    ));
    assert!(matches!(
        s.create_volume("phone-c", "img-none", 0),
        Err(StorageError::UnknownImage(_))
    ));
    assert!(matches!(
        s.create_volume("phone-b", "img-a", 0),
        Err(StorageError::VolumeExists(_))
    ));
    assert_eq!(s.list_volumes().unwrap(), vec!["phone-a", "phone-b"]);
    // Subvolumes the phone made inside its root (two deep) go with it.
    let nested = a.join("data/nested");
    let deeper = nested.join("deeper");
    std::fs::create_dir_all(a.join("data")).unwrap();
    for sub in [&nested, &deeper] {
        let st = Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(sub)
            .status()
            .unwrap();
        assert!(st.success(), "btrfs subvolume create {}", sub.display());
    }
    std::fs::write(deeper.join("f"), b"x").unwrap();
    s.delete_volume("phone-a").unwrap();
    assert!(!nested.exists());
    s.delete_volume("phone-a").unwrap();
    assert_eq!(s.volume_path("phone-a").unwrap(), None);
    assert!(matches!(
        s.reset_volume("phone-a", None),
        Err(StorageError::UnknownVolume(_))
    ));
    s.teardown().unwrap();
    assert!(!pool.mounted());
    assert!(pool.loops().is_empty());
}

#[test]
fn writes_past_the_disk_size_fail_with_edquot() {
    if !btrfs_available("writes_past_the_disk_size_fail_with_edquot") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    import(&s, "img", &make_image(&[("init", b"#!/bin/sh\n")]));
    let v = s.create_volume("phone-q", "img", 16 << 20).unwrap();
    let (_, err) = fill(&v.join("fill"), 128);
    let err = err.expect("128 MiB written into a 16 MiB volume");
    let code = err.raw_os_error();
    assert!(
        code == Some(libc::EDQUOT) || code == Some(libc::ENOSPC),
        "unexpected error {err}"
    );
    // The neighbour and the pool are unaffected.
    let w = s.create_volume("phone-w", "img", 16 << 20).unwrap();
    std::fs::write(w.join("ok"), vec![1u8; 1 << 20]).unwrap();
    s.teardown().unwrap();
}

#[test]
fn a_grown_volume_takes_more_and_keeps_its_cap_across_a_reset() {
    if !btrfs_available("a_grown_volume_takes_more_and_keeps_its_cap_across_a_reset") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    import(&s, "img", &make_image(&[("init", b"#!/bin/sh\n")]));
    let v = s.create_volume("phone-g", "img", 16 << 20).unwrap();
    assert!(fill(&v.join("fill"), 32).1.is_some(), "32 MiB in 16");
    std::fs::remove_file(v.join("fill")).unwrap();
    // Never smaller; an unknown phone has no volume.
    assert!(matches!(
        s.grow_volume("phone-g", 8 << 20),
        Err(StorageError::Shrink { current, .. }) if current == 16 << 20
    ));
    assert!(matches!(
        s.grow_volume("phone-none", 64 << 20),
        Err(StorageError::UnknownVolume(_))
    ));
    assert_eq!(s.grow_volume("phone-g", 64 << 20).unwrap(), 16 << 20);
    let (written, err) = fill(&v.join("fill"), 40);
    assert!(
        err.is_none(),
        "40 MiB in a volume grown to 64: {err:?} after {written}"
    );
    // A reset clones the image again with the grown cap.
    let v = s.reset_volume("phone-g", None).unwrap();
    let (written, err) = fill(&v.join("fill"), 128);
    assert!(
        err.is_some() && (40..=64).contains(&written),
        "{written} MiB, {err:?}"
    );
    s.teardown().unwrap();
}

/// Fills `path` in 1 MiB synced chunks; the bytes written before an error.
fn fill(path: &Path, max_mib: usize) -> (usize, Option<std::io::Error>) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..max_mib {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            return (i, Some(e));
        }
    }
    (max_mib, None)
}

/// Whether btrfs pools can be made here with simple quotas (kernel 6.7+);
/// otherwise says why the named test is skipped.
fn simple_quotas_available(test: &str) -> bool {
    if !btrfs_available(test) {
        return false;
    }
    if !Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
        eprintln!("SKIPPED {test}: no simple quotas");
        return false;
    }
    true
}

#[test]
fn new_pools_charge_phones_only_for_their_own_writes() {
    if !simple_quotas_available("new_pools_charge_phones_only_for_their_own_writes") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    assert_eq!(quota_mode(&pool.mount).unwrap(), Some(QuotaMode::Simple));
    // A 12 MiB image and a 16 MiB disk: the phone may write 16 MiB of its
    // own (full accounting would stop it at 4 MiB), not 20.
    let big = vec![7u8; 12 << 20];
    import(&s, "img", &make_image(&[("system.img", &big)]));
    let v = s.create_volume("phone-own", "img", 16 << 20).unwrap();
    let (written, err) = fill(&v.join("data.bin"), 20);
    assert!(err.is_some(), "20 MiB written into a 16 MiB disk");
    assert!(
        (12..=16).contains(&written),
        "{written} MiB before the limit"
    );
    // The image's bytes stay readable and shared.
    assert_eq!(std::fs::read(v.join("system.img")).unwrap().len(), 12 << 20);
    s.teardown().unwrap();
}

#[test]
fn subvolumes_a_phone_makes_count_against_its_disk() {
    if !simple_quotas_available("subvolumes_a_phone_makes_count_against_its_disk") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let btrfs = |args: &[&str]| {
        let out = Command::new("btrfs").args(args).output().unwrap();
        assert!(out.status.success(), "btrfs {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let caps = || {
        let out = btrfs(&["qgroup", "show", "--raw", pool.mount.to_str().unwrap()]);
        out.lines().filter(|l| l.starts_with("1/")).count()
    };
    import(&s, "img", &make_image(&[("init", b"#!/bin/sh\n")]));
    let v = s.create_volume("phone-nest", "img", 16 << 20).unwrap();
    // What the phone's root may do: a subvolume (a nested one in it too)
    // in its own volume, and writes into them.
    let nested = v.join("nested");
    btrfs(&["subvolume", "create", nested.to_str().unwrap()]);
    btrfs(&[
        "subvolume",
        "create",
        nested.join("deeper").to_str().unwrap(),
    ]);
    let (own, err) = fill(&v.join("own.bin"), 6);
    assert!(err.is_none() && own == 6, "{own} MiB, {err:?}");
    let (written, err) = fill(&nested.join("deeper/data.bin"), 32);
    assert!(
        err.is_some(),
        "32 MiB written into a 16 MiB disk through a subvolume"
    );
    assert!(
        (6..=10).contains(&written),
        "{written} MiB beside 6 of its own"
    );
    // A grown disk lets it write more there.
    s.grow_volume("phone-nest", 64 << 20).unwrap();
    let (more, err) = fill(&nested.join("more.bin"), 32);
    assert!(
        err.is_none() && more == 32,
        "{more} MiB after growing, {err:?}"
    );
    // The cap goes with the volume, also through a reset.
    assert_eq!(caps(), 1);
    s.reset_volume("phone-nest", None).unwrap();
    assert_eq!(caps(), 1);
    s.delete_volume("phone-nest").unwrap();
    assert_eq!(caps(), 0, "a deleted volume's cap is removed");
    // One a crash left behind, its volume gone, is swept at the next start.
    btrfs(&["qgroup", "create", "1/4242", pool.mount.to_str().unwrap()]);
    s.teardown().unwrap();
    let s = pool.open();
    assert_eq!(caps(), 0, "a cap left by a crash is swept");
    s.teardown().unwrap();
}

#[test]
fn a_pool_with_full_quotas_keeps_them() {
    if !btrfs_available("a_pool_with_full_quotas_keeps_them") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let run = |args: &[&str]| {
        let ok = Command::new("btrfs")
            .args(args)
            .arg(&pool.mount)
            .status()
            .unwrap()
            .success();
        assert!(ok, "btrfs {args:?}");
    };
    run(&["quota", "disable"]);
    run(&["quota", "enable"]);
    s.teardown().unwrap();
    let s = pool.open();
    assert_eq!(quota_mode(&pool.mount).unwrap(), Some(QuotaMode::Full));
    import(&s, "img", &make_image(&[("init", b"#!/bin/sh\n")]));
    let v = s.create_volume("phone-full", "img", 8 << 20).unwrap();
    let (_, err) = fill(&v.join("data.bin"), 32);
    assert!(err.is_some(), "32 MiB written into an 8 MiB disk");
    s.teardown().unwrap();
}

#[test]
fn layout_is_rediscovered_after_restart_and_reboot() {
    if !btrfs_available("layout_is_rediscovered_after_restart_and_reboot") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    // The pool file is read and written past its own page cache where its
    // filesystem allows; elsewhere it is attached all the same, buffered.
    let dio = pool.file_takes_direct_io();
    eprintln!("pool file takes direct I/O: {dio}");
    assert_eq!(pool.direct_io(), vec![dio]);
    import(&s, "img", &make_image(&[("etc/hostname", b"phone\n")]));
    let v = s.create_volume("phone-r", "img", 32 << 20).unwrap();
    std::fs::write(v.join("data.txt"), b"kept").unwrap();
    let files = s.share_paths().unwrap().files;
    std::fs::write(files.join("shared.txt"), b"s").unwrap();
    // A share written with the archive's modes (before shares were made
    // readable by all): made so at the next start.
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    std::fs::create_dir(files.join("private")).unwrap();
    std::fs::write(files.join("private/app.apk"), b"apk").unwrap();
    set(&files.join("private/app.apk"), 0o600);
    set(&files.join("private"), 0o700);
    // Idempotent prepare on a live pool.
    s.prepare().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&files.join("private")), 0o755);
    assert_eq!(mode(&files.join("private/app.apk")), 0o644);
    // Phones' roots and images are root's: no other host user lists them
    // (phones with user namespaces pass through `volumes` to their roots).
    let volumes = v.parent().unwrap().to_path_buf();
    for (dir, want) in [(volumes.with_file_name("images"), 0o700), (volumes, 0o711)] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", dir.display());
    }
    drop(s);

    // Agent restart: a new handle over the mounted pool.
    let s = pool.open();
    assert_eq!(s.list_volumes().unwrap(), vec!["phone-r"]);
    assert_eq!(std::fs::read(v.join("data.txt")).unwrap(), b"kept");

    // Host reboot: unmounted, loop device gone; prepare re-attaches.
    s.teardown().unwrap();
    assert!(!pool.mounted());
    assert!(pool.loops().is_empty());
    drop(s);
    let s = pool.open();
    assert_eq!(pool.direct_io(), vec![dio], "re-attached as first attached");
    assert_eq!(s.volume_path("phone-r").unwrap(), Some(v.clone()));
    assert_eq!(std::fs::read(v.join("data.txt")).unwrap(), b"kept");
    assert!(s.has_image("img").unwrap());
    assert!(s.share_paths().unwrap().files.join("shared.txt").exists());
    // The reset knows its image and size after the reboot.
    s.reset_volume("phone-r", None).unwrap();
    assert!(!v.join("data.txt").exists());
    s.teardown().unwrap();
    assert!(pool.loops().is_empty());
}

#[test]
fn refusals_write_nothing() {
    if !btrfs_available("refusals_write_nothing") {
        return;
    }
    // More space than the host has.
    let pool = Pool::new();
    let mut cfg = pool.config(&pool.owner);
    cfg.device = PoolDevice::LoopFile {
        path: pool.file.clone(),
        size_bytes: 1 << 60,
    };
    match BtrfsStorage::new(cfg).prepare() {
        Err(StorageError::InsufficientSpace { .. }) => {}
        other => panic!("expected insufficient space, got {other:?}"),
    }
    assert!(!pool.file.exists());
    assert!(!pool.mount.exists());

    // A pool owned by another agent.
    let s = pool.open();
    s.teardown().unwrap();
    let other = BtrfsStorage::new(pool.config("someone-else"));
    match other.prepare() {
        Err(StorageError::OwnerConflict { owner, .. }) => assert_eq!(owner, pool.owner),
        other => panic!("expected owner conflict, got {other:?}"),
    }
    assert!(!pool.mounted());
    assert!(pool.loops().is_empty());
}

#[test]
fn bad_archives_leave_no_image() {
    if !btrfs_available("bad_archives_leave_no_image") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let good = make_image(&[("a/b", &[7u8; 100_000])]);
    let mut escaping = raw_tar_entry("../escape", b"evil");
    escaping.extend_from_slice(&[0u8; 1024]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"this is not a tar archive at all".repeat(40)),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("escaping", escaping),
    ];
    for (id, data) in cases {
        match s.import_image(id, Box::new(std::io::Cursor::new(data))) {
            Err(StorageError::BadImage { .. }) => {}
            other => panic!("{id}: expected a bad image, got {other:?}"),
        }
        assert!(!s.has_image(id).unwrap(), "{id}");
    }
    assert!(!pool.tmp.path().join("escape").exists());
    assert!(!pool.mount.join("images/escape").exists());
    let left: Vec<_> = std::fs::read_dir(pool.mount.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(matches!(
        s.import_image("../x", Box::new(std::io::empty())),
        Err(StorageError::InvalidId { .. })
    ));
    s.teardown().unwrap();
}

#[test]
fn sharepool_is_capped_and_reported() {
    if !btrfs_available("sharepool_is_capped_and_reported") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let share = s.share_paths().unwrap();
    std::fs::write(share.files.join("one.bin"), vec![1u8; 4 << 20]).unwrap();
    std::fs::create_dir(share.apps.join("com.example")).unwrap();
    // Sync so the qgroup counts the bytes.
    let _ = Command::new("btrfs")
        .args(["filesystem", "sync"])
        .arg(&pool.mount)
        .status();
    let usage = s.share_usage().unwrap();
    assert_eq!(usage.max, 64 << 20);
    assert!(usage.used >= 4 << 20, "{usage:?}");
    // The pool as a whole: the sharepool's bytes are in it.
    let pool_usage = s.pool_usage().unwrap();
    assert_eq!(s.name(), "btrfs");
    assert!(
        pool_usage.used >= 4 << 20
            && pool_usage.used <= pool_usage.size
            && pool_usage.avail <= pool_usage.size,
        "{pool_usage:?}"
    );
    let (cap, max) = capacity_report(&usage);
    assert_eq!(max, "64M");
    assert_eq!(cap.split(' ').count(), 4, "{cap}");
    assert!(cap.ends_with('%'), "{cap}");
    let page = list_share_dir(&share, "/files", 0, 50).unwrap();
    assert_eq!(page.total, 1);
    assert!(page.files[0].starts_with("4194304 "), "{:?}", page.files);
    assert!(page.files[0].ends_with(" one.bin"), "{:?}", page.files);
    // Writing past the cap fails.
    let (_, err) = fill(&share.files.join("big.bin"), 256);
    assert!(err.is_some(), "sharepool took 256 MiB past a 64 MiB cap");
    // A flavor's cap takes the configured one's place and survives a
    // restart of the agent (the configuration still says 64 MiB).
    s.set_share_limit(128 << 20).unwrap();
    assert_eq!(s.share_usage().unwrap().max, 128 << 20);
    s.teardown().unwrap();
    let s = pool.open();
    assert_eq!(s.share_usage().unwrap().max, 128 << 20);
    s.set_share_limit(0).unwrap();
    assert!(s.share_usage().unwrap().max > 128 << 20, "cap lifted");
    s.teardown().unwrap();
}

#[test]
fn overlay_backend_clones_resets_and_remounts() {
    if !cph_runtime::privilege::check("overlay_backend_clones_resets_and_remounts") {
        return;
    }
    use cph_runtime::storage::{OverlayConfig, OverlayStorage};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = OverlayConfig {
        root: tmp.path().join("dev"),
        owner: unique("agent"),
        max_share_bytes: 1 << 30,
    };
    struct Guard(OverlayStorage);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.teardown();
        }
    }
    let g = Guard(OverlayStorage::new(cfg.clone()));
    let s = &g.0;
    s.prepare().unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in ["images", "volumes"] {
        let mode = std::fs::metadata(cfg.root.join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{d} is root's alone");
    }
    import_dyn(s, "img", &make_image(&[("etc/os", b"one\n")]));
    import_dyn(s, "img2", &make_image(&[("etc/os", b"two\n")]));
    let a = s.create_volume("pa", "img", 0).unwrap();
    let b = s.create_volume("pb", "img", 0).unwrap();
    std::fs::write(a.join("etc/os"), b"mine\n").unwrap();
    assert_eq!(std::fs::read(b.join("etc/os")).unwrap(), b"one\n");
    assert_eq!(
        std::fs::read(tmp.path().join("dev/images/img/etc/os")).unwrap(),
        b"one\n"
    );
    s.reset_volume("pa", None).unwrap();
    assert_eq!(std::fs::read(a.join("etc/os")).unwrap(), b"one\n");
    // Overlay volumes are not capped; an uncapped one stays so.
    assert!(matches!(
        s.grow_volume("pa", 1 << 30),
        Err(StorageError::Shrink { current: 0, .. })
    ));
    s.reset_volume("pa", Some("img2")).unwrap();
    assert_eq!(std::fs::read(a.join("etc/os")).unwrap(), b"two\n");
    check_upgrade(s);
    // Reboot: overlays gone, prepare mounts them again.
    s.teardown().unwrap();
    assert!(!a.join("etc/os").exists());
    let s2 = OverlayStorage::new(cfg.clone());
    s2.prepare().unwrap();
    assert_eq!(std::fs::read(a.join("etc/os")).unwrap(), b"two\n");
    assert_eq!(s2.share_usage().unwrap().max, 1 << 30);
    assert_eq!(s2.name(), "overlay");
    let pool_usage = s2.pool_usage().unwrap();
    assert!(
        pool_usage.size > 0 && pool_usage.used <= pool_usage.size,
        "{pool_usage:?}"
    );
    s2.set_share_limit(5 << 30).unwrap();
    assert_eq!(s2.share_usage().unwrap().max, 5 << 30);
    let other = OverlayStorage::new(OverlayConfig {
        owner: "someone-else".into(),
        ..cfg
    });
    assert!(matches!(
        other.prepare(),
        Err(StorageError::OwnerConflict { .. })
    ));
    s2.delete_volume("pa").unwrap();
    s2.delete_volume("pb").unwrap();
    assert!(s2.list_volumes().unwrap().is_empty());
}

/// An image update on `s`: the phone's `data` and `cache` stay as it left
/// them (its deletions included), everything else becomes the new
/// image's; an unknown image changes nothing; the volume resets to the
/// new image afterwards.
fn check_upgrade(s: &dyn Storage) {
    import_dyn(
        s,
        "up-1",
        &make_image(&[
            ("system/build.prop", b"ro.v=1\n"),
            ("data/seed", b"image 1\n"),
            ("data/app/base.apk", b"apk 1\n"),
            ("etc/os", b"one\n"),
        ]),
    );
    import_dyn(
        s,
        "up-2",
        &make_image(&[
            ("system/build.prop", b"ro.v=2\n"),
            ("data/seed", b"image 2\n"),
            ("data/only-2", b"image 2\n"),
            ("extra/x", b"image 2\n"),
            ("etc/new", b"yes\n"),
        ]),
    );
    let v = s.create_volume("phone-up", "up-1", 64 << 20).unwrap();
    std::fs::write(v.join("data/mine"), b"kept\n").unwrap();
    std::fs::remove_file(v.join("data/seed")).unwrap();
    std::fs::create_dir(v.join("cache")).unwrap();
    std::fs::write(v.join("cache/c"), b"cached\n").unwrap();
    std::fs::write(v.join("system/build.prop"), b"changed\n").unwrap();
    std::fs::write(v.join("top"), b"x").unwrap();
    assert!(matches!(
        s.upgrade_volume("phone-up", "up-none", &["data", "cache"]),
        Err(StorageError::UnknownImage(_))
    ));
    assert_eq!(std::fs::read(v.join("data/mine")).unwrap(), b"kept\n");
    assert_eq!(
        std::fs::read(v.join("system/build.prop")).unwrap(),
        b"changed\n"
    );

    let v2 = s
        .upgrade_volume("phone-up", "up-2", &["data", "cache", "extra"])
        .unwrap();
    assert_eq!(v2, v);
    assert_eq!(
        std::fs::read(v.join("system/build.prop")).unwrap(),
        b"ro.v=2\n"
    );
    assert_eq!(std::fs::read(v.join("etc/new")).unwrap(), b"yes\n");
    assert!(!v.join("etc/os").exists(), "the old image's files go");
    assert!(!v.join("top").exists(), "the phone's files outside data go");
    assert_eq!(std::fs::read(v.join("data/mine")).unwrap(), b"kept\n");
    assert_eq!(std::fs::read(v.join("cache/c")).unwrap(), b"cached\n");
    assert!(
        !v.join("data/seed").exists(),
        "data is the phone's as it left it"
    );
    assert_eq!(
        std::fs::read(v.join("data/app/base.apk")).unwrap(),
        b"apk 1\n",
        "what the old image put in data stays"
    );
    assert!(
        !v.join("data/only-2").exists(),
        "the new image adds nothing to data"
    );
    assert_eq!(
        std::fs::read(v.join("extra/x")).unwrap(),
        b"image 2\n",
        "a kept directory the phone lacks comes from the new image"
    );
    // A reset now goes back to the new image.
    s.reset_volume("phone-up", None).unwrap();
    assert!(!v.join("data/mine").exists());
    assert_eq!(std::fs::read(v.join("data/seed")).unwrap(), b"image 2\n");
    assert!(matches!(
        s.upgrade_volume("phone-none", "up-2", &["data"]),
        Err(StorageError::UnknownVolume(_))
    ));
    s.delete_volume("phone-up").unwrap();
}

#[test]
fn an_image_update_keeps_data_and_cache_on_btrfs() {
    if !btrfs_available("an_image_update_keeps_data_and_cache_on_btrfs") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    check_upgrade(&s);
    s.teardown().unwrap();
    assert!(!pool.mounted());
}

/// An image update cut off by a kill, at each side of the moment the old
/// volume is deleted: the agent's next start keeps the phone's data.
#[test]
fn an_image_update_cut_off_keeps_the_phone_data() {
    if !btrfs_available("an_image_update_cut_off_keeps_the_phone_data") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    import(&s, "img", &make_image(&[("data/seed", b"image\n")]));
    let btrfs = |args: &[&str]| {
        let st = Command::new("btrfs").args(args).output().expect("btrfs");
        assert!(st.status.success(), "btrfs {args:?}: {st:?}");
    };
    let text = |p: &Path| p.to_string_lossy().into_owned();
    for (phone, old_deleted) in [("phone-a", false), ("phone-b", true)] {
        let v = s.create_volume(phone, "img", 32 << 20).unwrap();
        std::fs::write(v.join("data/mine"), b"old volume\n").unwrap();
        // The update's new volume, made beside the old one.
        let tmp = v.with_file_name(format!(".upgrade-{phone}"));
        btrfs(&["subvolume", "snapshot", &text(&v), &text(&tmp)]);
        std::fs::write(tmp.join("data/mine"), b"new volume\n").unwrap();
        if old_deleted {
            btrfs(&["subvolume", "delete", &text(&v)]);
        }
    }
    // A reset cut off after the old volume was deleted: the fresh clone
    // of the image is there, under its temporary name.
    let v = s.create_volume("phone-c", "img", 32 << 20).unwrap();
    std::fs::write(v.join("data/mine"), b"before the reset\n").unwrap();
    let tmp = v.with_file_name(".reset-phone-c");
    let image = v.parent().unwrap().with_file_name("images").join("img");
    btrfs(&["subvolume", "snapshot", &text(&image), &text(&tmp)]);
    btrfs(&["subvolume", "delete", &text(&v)]);
    drop(s);
    // The agent starts again.
    let s = pool.open();
    let vol = |phone: &str| s.volume_path(phone).unwrap().expect("volume");
    let mine = |phone: &str| std::fs::read(vol(phone).join("data/mine")).unwrap();
    assert_eq!(mine("phone-a"), b"old volume\n", "the old volume was whole");
    assert_eq!(
        mine("phone-b"),
        b"new volume\n",
        "the new volume took its place"
    );
    assert_eq!(
        std::fs::read(vol("phone-c").join("data/seed")).unwrap(),
        b"image\n",
        "the reset's fresh volume took its place"
    );
    assert!(!vol("phone-c").join("data/mine").exists());
    let volumes = vol("phone-a").parent().expect("volumes").to_path_buf();
    let left: Vec<String> = std::fs::read_dir(&volumes)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    s.teardown().unwrap();
}

#[test]
fn pushes_onto_a_btrfs_pool_use_one_writer() {
    if !btrfs_available("pushes_onto_a_btrfs_pool_use_one_writer") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let names: Vec<String> = (0..300).map(|i| format!("d{}/f{i}", i % 7)).collect();
    let datas: Vec<Vec<u8>> = (0..300usize).map(|i| vec![i as u8; 100 + 37 * i]).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let tar = make_image(&files);
    let target = pool.mount.join(unique("push"));
    std::fs::create_dir(&target).unwrap();
    let opts = cph_runtime::archive::ExtractOptions {
        sync: true,
        ..Default::default()
    };
    let report =
        cph_runtime::archive::extract(std::io::Cursor::new(tar), &target, &opts).expect("extract");
    assert_eq!(report.writers, 1);
    assert_eq!(report.files, 300);
    // Held back and created directory by directory (GROUP_WINDOW).
    assert_eq!(report.grouped, 300);
    for (name, data) in &files {
        assert_eq!(std::fs::read(target.join(name)).unwrap(), *data, "{name}");
    }
    std::fs::remove_dir_all(&target).unwrap();
    s.teardown().unwrap();
    assert!(!pool.mounted());
}

fn import_dyn(s: &dyn Storage, id: &str, tar: &[u8]) {
    let r = s
        .import_image(id, Box::new(std::io::Cursor::new(tar.to_vec())))
        .expect("import");
    assert!(r.imported);
}

#[test]
fn lvm_thin_pool_snapshots_where_dm_thin_works() {
    use cph_runtime::storage::cmd::{Runner, SystemRunner};
    use cph_runtime::storage::lvm::{self, ThinPool};
    if !cph_runtime::privilege::check("lvm_thin_pool_snapshots_where_dm_thin_works") {
        return;
    }
    if let Some(reason) = lvm::unavailable_reason() {
        eprintln!("SKIPPED lvm_thin_pool_snapshots_where_dm_thin_works: {reason}");
        return;
    }
    if Command::new("lvcreate").arg("--version").output().is_err() {
        eprintln!("SKIPPED lvm_thin_pool_snapshots_where_dm_thin_works: lvm2 is not installed");
        return;
    }
    let pool = Pool::new();
    let f = std::fs::File::create(&pool.file).unwrap();
    f.set_len(POOL_BYTES).unwrap();
    drop(f);
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&pool.file)
        .output()
        .unwrap();
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let tp = ThinPool {
        vg: unique("cphvg").replace('-', "_"),
        pool: "thinpool".into(),
    };
    struct VgGuard(ThinPool, String);
    impl Drop for VgGuard {
        fn drop(&mut self) {
            for inv in self.0.destroy(&self.1) {
                let _ = SystemRunner.run(&inv);
            }
        }
    }
    let _g = VgGuard(tp.clone(), dev.clone());
    let r = SystemRunner;
    for inv in tp.create(&dev, 256 << 20) {
        r.run(&inv).unwrap();
    }
    for inv in tp.create_image("img", 64 << 20) {
        r.run(&inv).unwrap();
    }
    r.run(&tp.seal_image("img")).unwrap();
    for inv in tp.snapshot("img", "p1", 96 << 20) {
        r.run(&inv).unwrap();
    }
    assert!(Path::new(&tp.device("phone-p1")).exists());
    r.run(&tp.remove_phone("p1")).unwrap();
}

fn test_image() -> PathBuf {
    if let Some(p) = std::env::var_os("CPH_TEST_IMAGE") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = repo.join("target/images/cph-test-image.tar.gz");
    if !path.exists() {
        let ok = Command::new(repo.join("image/build-test-image.sh"))
            .arg(&path)
            .status()
            .expect("run build-test-image.sh")
            .success();
        assert!(ok, "building the test image failed");
    }
    path
}

/// Deletes the phones and their cgroups whatever happens.
struct Phones {
    rt: cph_runtime::container::Runtime,
    parent: String,
    names: Vec<String>,
}

impl Drop for Phones {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.rt.delete(n, std::time::Duration::from_millis(500));
        }
        let _ = cph_runtime::container::remove_cgroup_parent(&self.parent);
    }
}

#[test]
fn sharepool_is_seen_by_two_running_phones() {
    use cph_runtime::container::{BindMount, ContainerSpec, Runtime};
    use cph_runtime::storage::{PHONE_SHARE_APPS_DIR, PHONE_SHARE_FILES_DIR};
    use std::time::{Duration, Instant};
    if !btrfs_available("sharepool_is_seen_by_two_running_phones") {
        return;
    }
    let pool = Pool::new();
    let s = pool.open();
    let image = std::fs::File::open(test_image()).expect("test image");
    s.import_image("test-image", Box::new(image))
        .expect("import");
    let share = s.share_paths().unwrap();

    let parent = unique("cph-storage-test");
    let rt = Runtime::new(
        &pool.tmp.path().join("state"),
        &parent,
        Path::new(env!("CARGO_BIN_EXE_cph-shim")),
    )
    .expect("runtime");
    let mut phones = Phones {
        rt,
        parent,
        names: Vec::new(),
    };
    let mut roots = Vec::new();
    for i in 0..2 {
        let name = unique("sharephone");
        let rootfs = s
            .create_volume(&name, "test-image", 256 << 20)
            .expect("volume");
        let mut spec = ContainerSpec::new(&name, &rootfs);
        for (source, target) in share.mounts() {
            spec.mounts.push(BindMount {
                source,
                target,
                read_only: false,
            });
        }
        phones.names.push(name.clone());
        phones
            .rt
            .start(&spec)
            .unwrap_or_else(|e| panic!("start {i}: {e}"));
        roots.push(rootfs);
    }
    for r in &roots {
        let ready = r.join("run/cph-ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "phone never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let sh = |name: &str, script: &str| {
        let out = phones
            .rt
            .exec(
                name,
                &["sh", "-c", script],
                Duration::from_secs(10),
                1 << 20,
            )
            .expect("exec");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            out.exit_code,
        )
    };
    std::fs::write(share.files.join("hello.txt"), b"from host").unwrap();
    for n in &phones.names {
        assert_eq!(
            sh(n, &format!("cat {PHONE_SHARE_FILES_DIR}/hello.txt")).0,
            "from host"
        );
    }
    // A file written by one phone is seen by the other and on the host.
    let (a, b) = (&phones.names[0], &phones.names[1]);
    assert_eq!(
        sh(a, &format!("echo app > {PHONE_SHARE_APPS_DIR}/a.apk")).1,
        Some(0)
    );
    assert_eq!(sh(b, &format!("cat {PHONE_SHARE_APPS_DIR}/a.apk")).0, "app");
    assert!(share.apps.join("a.apk").exists());
    // The phones' own volumes stay apart.
    sh(a, "echo mine > /only-a");
    assert_eq!(sh(b, "test -e /only-a; echo $?").0, "1");
    drop(phones);
    s.teardown().unwrap();
}
