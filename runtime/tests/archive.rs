//! Tar extraction and export against the real filesystem: round trips and
//! malicious archives (each refused with nothing written outside the
//! target, checked on a sentinel directory next to it).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cph_runtime::archive::{
    extract, extract_lent, write_tar, ArchiveError, ExtractOptions, Lend, Ownership, SpecialFiles,
};
use tar::{Builder, EntryType, Header};

/// A target directory and a sentinel directory beside it holding one file.
struct Scene {
    _dir: tempfile::TempDir,
    target: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        let outside = dir.path().join("outside");
        fs::create_dir(&target).expect("target");
        fs::create_dir(&outside).expect("outside");
        fs::write(outside.join("secret"), b"secret").expect("secret");
        Scene {
            _dir: dir,
            target,
            outside,
        }
    }

    /// The sentinel holds exactly its one untouched file and the
    /// target's parent nothing new.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .expect("read outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        let md = fs::symlink_metadata(self.outside.join("secret")).expect("secret");
        assert!(md.is_file());
        assert_eq!(md.nlink(), 1, "secret gained a hard link");
        assert_eq!(
            fs::read(self.outside.join("secret")).expect("read"),
            b"secret"
        );
        let mut top: Vec<_> = fs::read_dir(self.target.parent().expect("parent"))
            .expect("read parent")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        top.sort();
        assert_eq!(top, vec!["outside", "target"]);
    }

    fn extract(&self, tar: &[u8]) -> Result<cph_runtime::archive::ExtractReport, ArchiveError> {
        extract(tar, &self.target, &ExtractOptions::default())
    }
}

/// A header with `name` written verbatim (no validation by the builder).
fn raw_header(name: &[u8], kind: EntryType, size: u64, link: Option<&[u8]>) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_cksum();
    h
}

fn append_raw(
    b: &mut Builder<Vec<u8>>,
    name: &[u8],
    kind: EntryType,
    data: &[u8],
    link: Option<&[u8]>,
) {
    let h = raw_header(name, kind, data.len() as u64, link);
    b.append(&h, data).expect("append");
}

fn file_header(size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_600_000_000);
    h.set_uid(1000);
    h.set_gid(1000);
    h
}

fn add_file(b: &mut Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = file_header(data.len() as u64, mode);
    b.append_data(&mut h, path, data).expect("append file");
}

fn add_dir(b: &mut Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(1_500_000_000);
    b.append_data(&mut h, path, std::io::empty())
        .expect("append dir");
}

fn add_link(b: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(1_600_000_000);
    b.append_link(&mut h, path, target).expect("append link");
}

fn finish(b: Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().expect("finish tar")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sample_tree() -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    add_dir(&mut b, "etc", 0o750);
    add_file(&mut b, "etc/conf", b"key=value\n", 0o640);
    add_file(&mut b, "bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    add_file(&mut b, "empty", b"", 0o600);
    let long = format!("{}/{}", "d".repeat(120), "n".repeat(150));
    add_file(&mut b, &long, b"long name", 0o644);
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    add_file(&mut b, "data/big.bin", &big, 0o644);
    add_link(&mut b, EntryType::Symlink, "bin/sh", "tool");
    add_link(&mut b, EntryType::Symlink, "abs", "/system/bin/sh");
    add_link(&mut b, EntryType::Link, "etc/conf.hard", "etc/conf");
    finish(b)
}

fn check_sample_tree(t: &Path) {
    assert_eq!(fs::read(t.join("etc/conf")).expect("conf"), b"key=value\n");
    let conf = fs::metadata(t.join("etc/conf")).expect("conf md");
    assert_eq!(conf.permissions().mode() & 0o7777, 0o640);
    assert_eq!(conf.mtime(), 1_600_000_000);
    assert_eq!(conf.nlink(), 2, "hard link shares the inode");
    let etc = fs::metadata(t.join("etc")).expect("etc md");
    assert_eq!(etc.permissions().mode() & 0o7777, 0o750);
    assert_eq!(etc.mtime(), 1_500_000_000);
    assert_eq!(
        fs::metadata(t.join("bin/tool"))
            .expect("tool")
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    assert_eq!(fs::read(t.join("empty")).expect("empty").len(), 0);
    let long = t.join("d".repeat(120)).join("n".repeat(150));
    assert_eq!(fs::read(long).expect("long"), b"long name");
    let big = fs::read(t.join("data/big.bin")).expect("big");
    assert_eq!(big.len(), 3 * 1024 * 1024 + 17);
    assert!(big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert_eq!(
        fs::read_link(t.join("bin/sh")).expect("sh"),
        Path::new("tool")
    );
    assert_eq!(
        fs::read_link(t.join("abs")).expect("abs"),
        Path::new("/system/bin/sh")
    );
    assert_eq!(
        fs::metadata(t.join("etc/conf.hard")).expect("hard").ino(),
        conf.ino()
    );
}

#[test]
fn round_trip_files_dirs_links_long_names_modes() {
    let s = Scene::new();
    let report = s.extract(&sample_tree()).expect("extract");
    check_sample_tree(&s.target);
    assert_eq!(report.files, 5);
    assert_eq!(report.symlinks, 2);
    assert_eq!(report.hardlinks, 1);
    // etc, bin, data and the long directory.
    assert_eq!(report.dirs, 4);
    assert_eq!(report.bytes, 10 + 18 + 9 + 3 * 1024 * 1024 + 17);
    let written: Vec<PathBuf> = report.written.iter().collect();
    assert_eq!(written.len(), 12);
    assert!(written.contains(&PathBuf::from("etc/conf.hard")));
    s.assert_outside_untouched();
}

/// `threads` writers and a final sync.
fn synced(threads: usize) -> ExtractOptions {
    ExtractOptions {
        threads,
        sync: true,
        ..Default::default()
    }
}

#[test]
fn single_writer_and_many_writers_agree() {
    for threads in [1, 4] {
        let s = Scene::new();
        let opts = synced(threads);
        let report = extract(&sample_tree()[..], &s.target, &opts).expect("extract");
        check_sample_tree(&s.target);
        assert_eq!(report.writers, threads);
    }
    // Left to choose: one writer per core, at least two, except on btrfs
    // (storage.rs checks that one).
    let tmp = nix::sys::statfs::statfs(&std::env::temp_dir()).expect("statfs");
    if tmp.filesystem_type() != nix::sys::statfs::BTRFS_SUPER_MAGIC {
        let s = Scene::new();
        let report = extract(&sample_tree()[..], &s.target, &synced(0)).expect("extract");
        assert!(report.writers >= 2, "{} writers", report.writers);
    }
}

/// Files over the writers' chunk and writeback steps, with small files
/// between them; every byte differs from its neighbours' positions.
fn large_files() -> Vec<(&'static str, Vec<u8>)> {
    let pattern = |len: usize, seed: u64| -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    vec![
        ("big/a.bin", pattern((20 << 20) + 5, 1)),
        ("big/small1", pattern(700, 2)),
        ("big/b.bin", pattern((3 << 20) + 7, 3)),
        ("big/small2", pattern(1, 4)),
        ("c.bin", pattern((9 << 20) - 1, 5)),
    ]
}

fn large_files_tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    add_dir(&mut b, "big", 0o755);
    for (name, data) in files {
        add_file(&mut b, name, data, 0o644);
    }
    finish(b)
}

fn assert_files(target: &Path, files: &[(&str, Vec<u8>)], how: &str) {
    for (name, data) in files {
        let got = fs::read(target.join(name)).expect("read back");
        assert!(got == *data, "{name} differs after extraction ({how})");
    }
}

#[test]
fn large_files_arrive_whole_through_any_read_sizes() {
    let files = large_files();
    let tar = large_files_tar(&files);
    for threads in [1, 3] {
        let s = Scene::new();
        let opts = synced(threads);
        let report = extract(Jagged::new(tar.clone()), &s.target, &opts).expect("extract");
        assert_eq!(report.files, files.len() as u64);
        assert_files(&s.target, &files, &format!("{threads} writers"));
    }
}

/// A source handing out its bytes in awkward sizes, from one byte to over
/// a MiB, so buffered and direct reads alternate at every offset. It reads
/// or lends ([`Lend`]) pieces of one buffer, counting what it lent and what
/// was copied out of it, and fails once `fail_at` bytes were taken, when set.
struct Jagged {
    data: bytes::Bytes,
    step: usize,
    lent: usize,
    copied: usize,
    fail_at: Option<usize>,
}

impl Jagged {
    fn new(data: Vec<u8>) -> Self {
        Jagged {
            data: data.into(),
            step: 0,
            lent: 0,
            copied: 0,
            fail_at: None,
        }
    }

    /// The size of the next piece, at most `max`.
    fn next(&mut self, max: usize) -> std::io::Result<usize> {
        const SIZES: [usize; 6] = [1, 511, 4097, 70_000, (1 << 20) + 3, 65_536];
        if self.fail_at.is_some_and(|at| self.lent + self.copied >= at) {
            return Err(std::io::Error::other("connection reset"));
        }
        let n = SIZES[self.step % SIZES.len()].min(max).min(self.data.len());
        self.step += 1;
        Ok(n)
    }
}

impl std::io::Read for Jagged {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.next(buf.len())?;
        buf[..n].copy_from_slice(&self.data.split_to(n));
        self.copied += n;
        Ok(n)
    }
}

impl Lend for Jagged {
    fn lend(&mut self, max: usize) -> std::io::Result<bytes::Bytes> {
        let n = self.next(max)?;
        self.lent += n;
        Ok(self.data.split_to(n))
    }
}

/// A run ending with a sync has the filesystem synced while it goes on,
/// not only at its end, for large files too (a few of them make few jobs,
/// so the count of jobs alone would never ask for one): 260 MiB, one file,
/// made as it is read (never whole in memory).
#[test]
fn a_large_file_is_synced_while_it_is_written() {
    const SIZE: u64 = 260 << 20;
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(SIZE);
    h.set_path("big.bin").expect("path");
    h.set_cksum();
    let tail = vec![0u8; 1024]; // SIZE is a multiple of 512: no padding
    let tar = || {
        std::io::Read::chain(
            std::io::Read::chain(
                &h.as_bytes()[..],
                std::io::Read::take(std::io::repeat(7), SIZE),
            ),
            &tail[..],
        )
    };
    let s = Scene::new();
    let report = extract(tar(), &s.target, &synced(2)).expect("extract");
    assert_eq!(report.bytes, SIZE);
    let on_btrfs = nix::sys::statfs::statfs(&s.target)
        .expect("statfs")
        .filesystem_type()
        == nix::sys::statfs::BTRFS_SUPER_MAGIC;
    if on_btrfs {
        // Each sync there commits a transaction the writer waits on.
        assert_eq!(report.background_syncs, 0);
    } else {
        assert!(
            report.background_syncs >= 1,
            "no sync while 260 MiB were written"
        );
    }
    assert_eq!(
        fs::metadata(s.target.join("big.bin")).expect("stat").len(),
        SIZE
    );

    // Without a final sync asked, none in the background either.
    let s = Scene::new();
    let opts = ExtractOptions {
        threads: 2,
        ..Default::default()
    };
    let report = extract(tar(), &s.target, &opts).expect("extract");
    assert_eq!(report.background_syncs, 0);
}

#[test]
fn large_files_are_written_from_lent_buffers() {
    let files = large_files();
    let tar = large_files_tar(&files);
    // Beyond each file's first MiB, all but what the 1 MiB read buffer
    // held when the file's header was read.
    let tails: usize = files
        .iter()
        .map(|(_, d)| d.len().saturating_sub(2 << 20))
        .sum();
    for threads in [1, 3] {
        let s = Scene::new();
        let opts = synced(threads);
        let mut src = Jagged::new(tar.clone());
        let report = extract_lent(&mut src, &s.target, &opts).expect("extract");
        assert_eq!(report.files, files.len() as u64);
        assert_files(&s.target, &files, &format!("lent, {threads} writers"));
        assert!(
            src.lent >= tails,
            "{} bytes lent, {} copied: large files were copied",
            src.lent,
            src.copied
        );
        assert_eq!(src.lent + src.copied, tar.len());
    }

    // A gzip stream is decompressed: nothing can be lent.
    let s = Scene::new();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let mut src = Jagged::new(gz.finish().expect("gzip finish"));
    extract_lent(&mut src, &s.target, &ExtractOptions::default()).expect("extract gzip");
    assert_files(&s.target, &files, "gzip");
    assert_eq!(src.lent, 0);
}

#[test]
fn lent_streams_cut_or_failing_inside_a_large_file() {
    let files = large_files();
    let tar = large_files_tar(&files);
    // Cut 5 MiB into the first large file, where its bytes are being lent.
    let s = Scene::new();
    let mut src = Jagged::new(tar[..5 << 20].to_vec());
    let e = extract_lent(&mut src, &s.target, &ExtractOptions::default()).expect_err("cut");
    assert!(
        matches!(e.root_cause(), ArchiveError::Truncated { .. }),
        "{e}"
    );
    assert!(src.lent > 0, "the cut was not met while lending");
    s.assert_outside_untouched();

    // The source failing there is the source's failure, not a bad archive.
    let s = Scene::new();
    let mut src = Jagged::new(tar);
    src.fail_at = Some(5 << 20);
    let e = extract_lent(&mut src, &s.target, &ExtractOptions::default()).expect_err("fails");
    assert!(matches!(e.root_cause(), ArchiveError::Read(_)), "{e}");
    assert!(!e.is_bad_archive());
    s.assert_outside_untouched();
}

#[test]
fn sparse_files_from_gnu_tar_through_a_lending_source() {
    // GNU tar's sparse entries: pieces of data with holes between them,
    // which the extractor reads rather than lends.
    let dir = tempfile::tempdir().expect("tempdir");
    let src_dir = dir.path().join("src");
    fs::create_dir(&src_dir).expect("src");
    let mut want = vec![0u8; 6 << 20];
    for (at, len, v) in [
        (0usize, 100_000usize, 1u8),
        (2 << 20, 300_000, 2),
        ((6 << 20) - 10, 10, 3),
    ] {
        want[at..at + len].fill(v);
    }
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(src_dir.join("holes.img")).expect("sparse file");
        f.set_len(want.len() as u64).expect("size");
        for (at, len) in [
            (0usize, 100_000usize),
            (2 << 20, 300_000),
            ((6 << 20) - 10, 10),
        ] {
            f.write_all_at(&want[at..at + len], at as u64)
                .expect("write");
        }
    }
    let archive = dir.path().join("sparse.tar");
    let st = std::process::Command::new("tar")
        .args(["--sparse", "--format=gnu", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&src_dir)
        .arg("holes.img")
        .status()
        .expect("GNU tar");
    assert!(st.success());
    let tar = fs::read(&archive).expect("read archive");
    assert!(
        tar.len() < 2 << 20,
        "GNU tar did not write a sparse entry ({} bytes)",
        tar.len()
    );
    let s = Scene::new();
    let mut src = Jagged::new(tar);
    extract_lent(&mut src, &s.target, &ExtractOptions::default()).expect("extract sparse");
    let got = fs::read(s.target.join("holes.img")).expect("read back");
    assert!(got == want, "the sparse file differs after extraction");
    assert_eq!(src.lent, 0);
}

#[test]
fn existing_files_are_replaced_not_written_through() {
    let s = Scene::new();
    // A planted symlink and a hard link to the sentinel at the final component.
    std::os::unix::fs::symlink(s.outside.join("secret"), s.target.join("f")).expect("symlink");
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "f", b"new", 0o644);
    s.extract(&finish(b)).expect("extract");
    assert_eq!(fs::read(s.target.join("f")).expect("f"), b"new");
    assert!(fs::symlink_metadata(s.target.join("f"))
        .expect("md")
        .is_file());
    s.assert_outside_untouched();
}

#[test]
fn dotdot_is_refused() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    append_raw(&mut b, b"../outside/x", EntryType::Regular, b"pwn", None);
    let e = s.extract(&finish(b)).expect_err("refused");
    match e.root_cause() {
        ArchiveError::Escape { entry, .. } => assert_eq!(entry, Path::new("../outside/x")),
        other => panic!("unexpected {other}"),
    }
    s.assert_outside_untouched();
}

#[test]
fn absolute_path_is_refused() {
    let s = Scene::new();
    let abs = s.outside.join("abs");
    let mut b = Builder::new(Vec::new());
    append_raw(
        &mut b,
        abs.to_str().expect("utf8").as_bytes(),
        EntryType::Regular,
        b"pwn",
        None,
    );
    let e = s.extract(&finish(b)).expect_err("refused");
    assert!(matches!(e.root_cause(), ArchiveError::Escape { .. }), "{e}");
    s.assert_outside_untouched();
    assert_eq!(fs::read_dir(&s.target).expect("target").count(), 0);
}

#[test]
fn symlink_then_file_through_it_is_refused() {
    for link in ["ABS", "../outside", "./../outside"] {
        let s = Scene::new();
        let link = if link == "ABS" {
            s.outside.to_str().expect("utf8").to_string()
        } else {
            link.to_string()
        };
        let mut b = Builder::new(Vec::new());
        append_raw(
            &mut b,
            b"esc",
            EntryType::Symlink,
            b"",
            Some(link.as_bytes()),
        );
        add_file(&mut b, "esc/pwned", b"pwn", 0o644);
        let e = s.extract(&finish(b)).expect_err("refused");
        match e.root_cause() {
            ArchiveError::Escape { entry, .. } => assert_eq!(entry, Path::new("esc")),
            other => panic!("unexpected {other} for link {link}"),
        }
        // The symlink itself was written and is named as written.
        let written: Vec<PathBuf> = e.written().expect("incomplete").iter().collect();
        assert_eq!(written, vec![PathBuf::from("esc")]);
        s.assert_outside_untouched();
    }
}

#[test]
fn symlink_planted_in_target_is_not_followed_out() {
    // A running phone can plant a symlink at any time.
    let s = Scene::new();
    std::os::unix::fs::symlink(&s.outside, s.target.join("data")).expect("plant");
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "data/pwned", b"pwn", 0o644);
    let e = s.extract(&finish(b)).expect_err("refused");
    assert!(matches!(e.root_cause(), ArchiveError::Escape { .. }), "{e}");
    s.assert_outside_untouched();
}

#[test]
fn symlink_inside_target_is_followed_beneath() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    add_dir(&mut b, "usr", 0o755);
    add_dir(&mut b, "usr/lib", 0o755);
    add_link(&mut b, EntryType::Symlink, "lib", "usr/lib");
    add_file(&mut b, "lib/libc.so", b"elf", 0o644);
    s.extract(&finish(b)).expect("extract");
    assert_eq!(
        fs::read(s.target.join("usr/lib/libc.so")).expect("lib"),
        b"elf"
    );
}

#[test]
fn hardlink_escapes_are_refused() {
    let s = Scene::new();
    let abs = s.outside.join("secret");
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (abs.to_str().expect("utf8").as_bytes().to_vec(), false),
        (b"../outside/secret".to_vec(), false),
        (b"sl/secret".to_vec(), true),
    ];
    for (target, via_symlink) in cases {
        let s2 = Scene::new();
        let _ = &s;
        let mut b = Builder::new(Vec::new());
        if via_symlink {
            let out = s2.outside.to_str().expect("utf8").as_bytes().to_vec();
            append_raw(&mut b, b"sl", EntryType::Symlink, b"", Some(&out));
        }
        append_raw(&mut b, b"h", EntryType::Link, b"", Some(&target));
        let e = s2.extract(&finish(b)).expect_err("refused");
        assert!(matches!(e.root_cause(), ArchiveError::Escape { .. }), "{e}");
        assert!(fs::symlink_metadata(s2.target.join("h")).is_err());
        s2.assert_outside_untouched();
    }
}

#[test]
fn pax_and_gnu_long_name_escapes_are_refused() {
    // PAX `path` record pointing above the target.
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"../outside/pax"[..])])
        .expect("pax");
    append_raw(&mut b, b"innocent", EntryType::Regular, b"pwn", None);
    let e = s.extract(&finish(b)).expect_err("refused");
    match e.root_cause() {
        ArchiveError::Escape { entry, .. } => assert_eq!(entry, Path::new("../outside/pax")),
        other => panic!("unexpected {other}"),
    }
    s.assert_outside_untouched();

    // GNU long name (`L`) record with an absolute path.
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    let mut name = s
        .outside
        .join("gnu")
        .to_str()
        .expect("utf8")
        .as_bytes()
        .to_vec();
    name.push(0);
    append_raw(
        &mut b,
        b"././@LongLink",
        EntryType::GNULongName,
        &name,
        None,
    );
    append_raw(&mut b, b"innocent", EntryType::Regular, b"pwn", None);
    let e = s.extract(&finish(b)).expect_err("refused");
    assert!(matches!(e.root_cause(), ArchiveError::Escape { .. }), "{e}");
    s.assert_outside_untouched();
    assert!(!s.target.join("innocent").exists());
}

#[test]
fn device_nodes_and_fifos_are_refused_or_skipped() {
    for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
        let s = Scene::new();
        let mut b = Builder::new(Vec::new());
        add_file(&mut b, "before", b"x", 0o644);
        append_raw(&mut b, b"node", kind, b"", None);
        let tar = finish(b);
        let e = s.extract(&tar).expect_err("refused");
        match e.root_cause() {
            ArchiveError::Refused { entry, .. } => assert_eq!(entry, Path::new("node")),
            other => panic!("unexpected {other}"),
        }
        assert!(fs::symlink_metadata(s.target.join("node")).is_err());
        s.assert_outside_untouched();

        let s = Scene::new();
        let opts = ExtractOptions {
            special: SpecialFiles::Skip,
            ..Default::default()
        };
        let report = extract(&tar[..], &s.target, &opts).expect("skipped");
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].path, Path::new("node"));
        assert!(fs::symlink_metadata(s.target.join("node")).is_err());
        for e in fs::read_dir(&s.target).expect("target") {
            let ft = e.expect("entry").file_type().expect("type");
            assert!(!ft.is_char_device() && !ft.is_block_device() && !ft.is_fifo());
        }
    }
}

#[test]
fn setuid_and_setgid_bits_are_stripped() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "su", b"x", 0o6755);
    add_dir(&mut b, "sgid", 0o2775);
    s.extract(&finish(b)).expect("extract");
    let m = fs::metadata(s.target.join("su"))
        .expect("su")
        .permissions()
        .mode();
    assert_eq!(m & 0o7777, 0o755);
    let m = fs::metadata(s.target.join("sgid"))
        .expect("sgid")
        .permissions()
        .mode();
    assert_eq!(m & 0o7777, 0o775);
}

#[test]
fn oversized_archive_is_refused_naming_what_was_written() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "one", &[1u8; 600], 0o644);
    add_file(&mut b, "two", &[2u8; 600], 0o644);
    let opts = ExtractOptions {
        max_bytes: Some(1000),
        ..Default::default()
    };
    let e = extract(&finish(b)[..], &s.target, &opts).expect_err("too large");
    match e.root_cause() {
        ArchiveError::TooLarge { entry, limit } => {
            assert_eq!(entry, Path::new("two"));
            assert_eq!(*limit, 1000);
        }
        other => panic!("unexpected {other}"),
    }
    let written: Vec<PathBuf> = e.written().expect("incomplete").iter().collect();
    assert_eq!(written, vec![PathBuf::from("one")]);
    assert!(!s.target.join("two").exists());
    s.assert_outside_untouched();
}

#[test]
fn truncated_garbage_and_empty_inputs_are_bad_archives() {
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "a", &[7u8; 5000], 0o644);
    add_file(&mut b, "b", &[8u8; 5000], 0o644);
    let tar = finish(b);
    // Cut inside the second file's data, and cut at a header boundary
    // (no end-of-archive blocks).
    for cut in [512 + 5120 + 512 + 100, 512 + 5120] {
        let s = Scene::new();
        let e = s.extract(&tar[..cut]).expect_err("truncated");
        assert!(
            matches!(e.root_cause(), ArchiveError::Truncated { .. }),
            "{e}"
        );
        assert!(e.is_bad_archive());
        s.assert_outside_untouched();
    }
    let s = Scene::new();
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let e = s.extract(&garbage).expect_err("garbage");
    assert!(matches!(e, ArchiveError::NotATar { .. }), "{e}");
    assert!(e.is_bad_archive());
    let e = s.extract(b"hello").expect_err("short garbage");
    assert!(e.is_bad_archive(), "{e}");
    let e = s.extract(b"").expect_err("empty");
    assert!(matches!(e, ArchiveError::NotATar { .. }), "{e}");
    assert_eq!(fs::read_dir(&s.target).expect("target").count(), 0);
}

#[test]
fn source_read_errors_are_not_bad_archives() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(0);
            self.0 -= n;
            Ok(n)
        }
    }
    let s = Scene::new();
    let e = extract(Failing(100), &s.target, &ExtractOptions::default()).expect_err("fails");
    assert!(matches!(e, ArchiveError::Read(_)), "{e}");
    assert!(!e.is_bad_archive());
}

#[test]
fn gzip_is_detected() {
    let s = Scene::new();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_tree()).expect("gzip");
    let gz = gz.finish().expect("gzip finish");
    s.extract(&gz).expect("extract gzip");
    check_sample_tree(&s.target);

    let s = Scene::new();
    let mut bad = gz[..10].to_vec();
    bad.extend_from_slice(&[0xffu8; 300]);
    let e = s.extract(&bad).expect_err("corrupt gzip");
    assert!(e.is_bad_archive(), "{e}");
    s.assert_outside_untouched();
}

#[test]
fn staging_leaves_target_absent_on_failure() {
    let s = Scene::new();
    let fresh = s.target.join("image");
    let opts = ExtractOptions {
        staging: true,
        sync: true,
        ..Default::default()
    };
    let r = extract(&sample_tree()[..], &fresh, &opts).expect("staged");
    assert!(r.files > 0);
    check_sample_tree(&fresh);
    // Target exists now: refused.
    let e = extract(&sample_tree()[..], &fresh, &opts).expect_err("exists");
    assert!(matches!(e, ArchiveError::TargetExists(_)), "{e}");

    let other = s.target.join("other");
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "ok", b"fine", 0o644);
    append_raw(&mut b, b"../../escape", EntryType::Regular, b"pwn", None);
    let e = extract(&finish(b)[..], &other, &opts).expect_err("refused");
    assert!(matches!(e, ArchiveError::Escape { .. }), "{e}");
    assert!(!other.exists());
    let names: Vec<_> = fs::read_dir(&s.target)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("image")],
        "staging dir left behind"
    );
    s.assert_outside_untouched();
}

#[test]
fn xattrs_only_from_the_allow_list() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.user.cph", &b"yes"[..]),
        ("SCHILY.xattr.trusted.evil", &b"no"[..]),
        ("SCHILY.xattr.security.selinux", &b"u:object_r:x:s0"[..]),
    ])
    .expect("pax");
    add_file(&mut b, "x", b"data", 0o644);
    let r = match s.extract(&finish(b)) {
        Ok(r) => r,
        Err(e) => {
            let unsupported = matches!(e.root_cause(), ArchiveError::Io { source, .. }
                if source.raw_os_error() == Some(libc::EOPNOTSUPP));
            if unsupported {
                eprintln!("skipping: filesystem of the temp dir has no user xattrs");
                return;
            }
            panic!("extract: {e}");
        }
    };
    assert_eq!(r.xattrs_dropped, 2);
    let path = std::ffi::CString::new(s.target.join("x").to_str().expect("utf8")).expect("c");
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the stated size.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.cph".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, 3);
    assert_eq!(&buf[..3], b"yes");
    // SAFETY: as above.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.evil".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n < 0);
}

#[test]
fn ownership_is_shifted_or_fixed() {
    if !is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "d/f", b"x", 0o644);
    add_link(&mut b, EntryType::Symlink, "d/l", "f");
    let tar = finish(b);
    let s = Scene::new();
    let opts = ExtractOptions {
        ownership: Ownership::Shift {
            uid: 100_000,
            gid: 200_000,
        },
        ..Default::default()
    };
    extract(&tar[..], &s.target, &opts).expect("extract");
    let md = fs::metadata(s.target.join("d/f")).expect("f");
    assert_eq!((md.uid(), md.gid()), (101_000, 201_000));
    let md = fs::symlink_metadata(s.target.join("d/l")).expect("l");
    assert_eq!((md.uid(), md.gid()), (100_000, 200_000));
    // The implied directory belongs to the shifted root.
    let md = fs::metadata(s.target.join("d")).expect("d");
    assert_eq!((md.uid(), md.gid()), (100_000, 200_000));

    let s = Scene::new();
    let opts = ExtractOptions {
        ownership: Ownership::Fixed {
            uid: 4242,
            gid: 4343,
        },
        ..Default::default()
    };
    extract(&tar[..], &s.target, &opts).expect("extract");
    let md = fs::metadata(s.target.join("d/f")).expect("f");
    assert_eq!((md.uid(), md.gid()), (4242, 4343));
}

/// A file owned as the archive says, with the header's mode and mtime.
fn add_owned(b: &mut Builder<Vec<u8>>, path: &str, data: &[u8], (uid, gid): (u64, u64)) {
    let mut h = file_header(data.len() as u64, 0o640);
    h.set_uid(uid);
    h.set_gid(gid);
    b.append_data(&mut h, path, data).expect("append file");
}

/// Whether the process is marked dumpable, allowing for another test's
/// writer between changing its ids and marking the process again.
fn dumpable_soon() -> bool {
    (0..100).any(|_| {
        // SAFETY: prctl with integer arguments only.
        let d = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 1;
        if !d {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        d
    })
}

#[test]
fn files_are_created_with_their_owners() {
    if !is_root() {
        eprintln!("skipping: creating as other users needs root");
        return;
    }
    // Owners in runs, owners alone between others, links, a large file
    // (written in chunks, closed later) and a set-group-ID directory that
    // was there before, whose files would otherwise take its group.
    let big = vec![5u8; 3 << 20];
    let mut want: Vec<(&str, (u64, u64))> = vec![
        ("a1", (1000, 1000)),
        ("a2", (1000, 1000)),
        ("a3", (1000, 1000)),
        ("lone", (2000, 3000)),
        ("r1", (0, 0)),
        ("r2", (0, 0)),
        ("d/b1", (5000, 5001)),
        ("d/b2", (5000, 5001)),
        ("sg/g1", (1000, 1000)),
        ("sg/g2", (1000, 1000)),
        ("sg/g3", (1000, 1000)),
        ("c1", (1000, 1000)),
    ];
    let mut b = Builder::new(Vec::new());
    for (path, owner) in &want {
        add_owned(&mut b, path, b"data", *owner);
    }
    add_owned(&mut b, "big1", &big, (6000, 6000));
    add_owned(&mut b, "big2", &big, (6000, 6000));
    let mut link = |path: &str, (uid, gid): (u64, u64)| {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(uid);
        h.set_gid(gid);
        b.append_link(&mut h, path, "a1").expect("append symlink");
    };
    link("l1", (7000, 7000));
    link("l2", (7000, 7000));
    link("l3", (8000, 9000));
    let tar = finish(b);
    want.extend([
        ("big1", (6000, 6000)),
        ("big2", (6000, 6000)),
        ("l1", (7000, 7000)),
        ("l2", (7000, 7000)),
        ("l3", (8000, 9000)),
    ]);
    for threads in [1, 3] {
        let s = Scene::new();
        let sg = s.target.join("sg");
        fs::create_dir(&sg).expect("sg");
        std::os::unix::fs::chown(&sg, Some(0), Some(4242)).expect("chown sg");
        fs::set_permissions(&sg, fs::Permissions::from_mode(0o2775)).expect("chmod sg");
        let opts = ExtractOptions {
            ownership: Ownership::Archive,
            threads,
            ..Default::default()
        };
        extract(&tar[..], &s.target, &opts).expect("extract");
        for (path, (uid, gid)) in &want {
            let md = fs::symlink_metadata(s.target.join(path)).expect(path);
            assert_eq!(
                (u64::from(md.uid()), u64::from(md.gid())),
                (*uid, *gid),
                "{path} with {threads} writers"
            );
        }
        assert_eq!(fs::read(s.target.join("big2")).expect("big2"), big);
        assert_eq!(
            fs::metadata(s.target.join("a2")).expect("a2").mode() & 0o7777,
            0o640
        );
    }
    assert!(dumpable_soon(), "the process is left undumpable");
}

#[test]
fn export_round_trip_with_include_and_exclude() {
    let src = Scene::new();
    src.extract(&sample_tree()).expect("extract sample");
    fs::write(src.target.join("etc/skip.me"), b"no").expect("skip file");
    // A symlink leading out of the root is stored as a link, never followed.
    std::os::unix::fs::symlink(&src.outside, src.target.join("etc/out")).expect("symlink");
    let mut out = Vec::new();
    let report = write_tar(
        &src.target,
        &["etc".into(), "data".into(), "bin".into(), "dddd".into()],
        &["etc/skip.me".into()],
        &mut out,
    )
    .expect("write tar");
    assert_eq!((report.files, report.hardlinks, report.symlinks), (3, 1, 2));

    let dst = Scene::new();
    dst.extract(&out).expect("extract export");
    let t = &dst.target;
    assert_eq!(fs::read(t.join("etc/conf")).expect("conf"), b"key=value\n");
    assert!(!t.join("etc/skip.me").exists());
    assert!(!t.join("empty").exists(), "not included");
    assert_eq!(
        fs::read_link(t.join("bin/sh")).expect("sh"),
        Path::new("tool")
    );
    assert_eq!(fs::read_link(t.join("etc/out")).expect("out"), src.outside);
    assert_eq!(
        fs::metadata(t.join("etc/conf"))
            .expect("conf")
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(
        fs::read(t.join("data/big.bin")).expect("big").len(),
        3 * 1024 * 1024 + 17
    );
    // The hard link pair stays one inode.
    assert_eq!(
        fs::metadata(t.join("etc/conf")).expect("a").ino(),
        fs::metadata(t.join("etc/conf.hard")).expect("b").ino()
    );
}

/// Names of the entries of a tar.
fn entry_names(tar: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar);
    let mut names: Vec<String> = a
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            let p = e.path().expect("path").to_string_lossy().into_owned();
            p.trim_end_matches('/').to_string()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn export_patterns_ending_in_a_star() {
    let s = Scene::new();
    for d in [
        "data/app/com.xx.xx-1",
        "data/app/com.xx.xy-2",
        "data/app/other",
        "cache/c",
    ] {
        fs::create_dir_all(s.target.join(d)).expect("dir");
        fs::write(s.target.join(d).join("base.apk"), b"apk").expect("file");
    }
    let names = |include: &[&str], exclude: &[&str]| {
        let own = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let mut out = Vec::new();
        write_tar(&s.target, &own(include), &own(exclude), &mut out).expect("write tar");
        entry_names(&out)
    };
    // The reference's example: one package's directories left out.
    assert_eq!(
        names(&["/data"], &["/data/app/com.xx.xx-*"]),
        [
            "data",
            "data/app",
            "data/app/com.xx.xy-2",
            "data/app/com.xx.xy-2/base.apk",
            "data/app/other",
            "data/app/other/base.apk"
        ]
    );
    // Included by a name prefix: the directory above is stored, not its
    // other entries.
    assert_eq!(
        names(&["/data/app/com.xx.x*"], &[]),
        [
            "data",
            "data/app",
            "data/app/com.xx.xx-1",
            "data/app/com.xx.xx-1/base.apk",
            "data/app/com.xx.xy-2",
            "data/app/com.xx.xy-2/base.apk"
        ]
    );
    // `dir/*`: what is beneath `dir`, with exclude still winning.
    assert_eq!(
        names(&["/cache/*"], &["/cache/c/base.apk"]),
        ["cache", "cache/c"]
    );
    assert_eq!(names(&["/data"], &["/data/*"]), ["data"]);
}

#[test]
fn export_refuses_paths_outside_root() {
    let s = Scene::new();
    let e = write_tar(&s.target, &["../outside".into()], &[], Vec::new()).expect_err("refused");
    assert!(matches!(e, ArchiveError::Escape { .. }), "{e}");
}

/// Files in the archive the strace child extracts (set by the parent test).
const STRACE_ENV: &str = "CPH_ARCHIVE_STRACE_FILES";
/// The directory the strace child extracts into.
const STRACE_DIR: &str = "CPH_ARCHIVE_STRACE_DIR";

/// `n` files over `dirs` directories, each file in the directory after the
/// last one's: no directory is done with before the archive ends.
fn many_small(n: usize, dirs: usize) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for i in 0..n {
        add_file(&mut b, &format!("d{}/f{i}", i % dirs), &[9u8; 700], 0o644);
    }
    finish(b)
}

/// Run by `syscalls_per_regular_file` under strace; does nothing otherwise.
#[test]
#[ignore = "child of syscalls_per_regular_file"]
fn strace_child_extract() {
    let Some(n) = std::env::var(STRACE_ENV).ok().and_then(|v| v.parse().ok()) else {
        return;
    };
    let Some(target) = std::env::var_os(STRACE_DIR) else {
        return;
    };
    // As under the agent's unit (`LimitNOFILE`): the directory cache is
    // sized from the open-file limit.
    raise_open_files_limit(16_384);
    let tar = many_small(n, STRACE_DIRS);
    let opts = ExtractOptions {
        ownership: if is_root() {
            Ownership::Archive
        } else {
            Ownership::Unchanged
        },
        sync: true,
        ..Default::default()
    };
    let r = extract(&tar[..], Path::new(&target), &opts).expect("extract");
    assert_eq!(r.files, n as u64);
    // The parent removes the tree: its unlinks are not the extractor's.
}

/// Directories of the strace child's archives: more than a cache of 512 (as
/// the extractor once had) holds, so files visiting them in turn would each
/// reopen their directory.
const STRACE_DIRS: usize = 600;

/// Raises the soft open-file limit to `want` (or the hard limit if lower).
fn raise_open_files_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

/// Syscalls of the strace child extracting `n` files, by name, and their
/// total (`"total"`).
fn traced_calls(n: usize) -> Option<HashMap<String, u64>> {
    let out = tempfile::NamedTempFile::new().expect("strace output");
    let exe = std::env::current_exe().expect("test binary");
    let s = Scene::new();
    let st = std::process::Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(out.path())
        .arg(exe)
        .args([
            "--exact",
            "strace_child_extract",
            "--ignored",
            "--test-threads=1",
        ])
        .env(STRACE_ENV, n.to_string())
        .env(STRACE_DIR, &s.target)
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    assert!(st.success(), "strace child failed");
    let text = fs::read_to_string(out.path()).expect("read strace summary");
    // "100.00 0.123 1 12345 67 total" (errors may be blank): the calls
    // column is the 4th, the name the last.
    let calls: HashMap<String, u64> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.last()?.to_string(), f.get(3)?.parse().ok()?))
        })
        .collect();
    calls.contains_key("total").then_some(calls)
}

/// Whether strace can count this test binary's calls; says why not.
fn strace_usable() -> bool {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipping: strace is not installed (apt package strace)");
        return false;
    }
    if std::env::var_os("CPH_SPAWN_WRAPPER").is_some() {
        eprintln!("skipping: under an emulator strace would count the emulator's calls");
        return false;
    }
    true
}

#[test]
fn a_synced_run_flushes_while_it_writes() {
    if !strace_usable() {
        return;
    }
    let tmp = nix::sys::statfs::statfs(&std::env::temp_dir()).expect("statfs");
    if tmp.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
        eprintln!("skipping: the temporary directory is on btrfs, where runs do not flush early");
        return;
    }
    // Three times the flusher's step (4,096 jobs): at least one flush
    // before the final one, whatever the threads' timing.
    let Some(calls) = traced_calls(3 * 4096) else {
        eprintln!("skipping: strace could not trace the test binary (ptrace refused?)");
        return;
    };
    let syncs = calls.get("syncfs").copied().unwrap_or(0);
    assert!(
        syncs >= 2,
        "{syncs} syncfs calls: no flush before the final one"
    );
}

#[test]
fn syscalls_per_regular_file() {
    if !strace_usable() {
        return;
    }
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(_, hard)| hard);
    if hard < 8 * STRACE_DIRS as u64 {
        eprintln!(
            "skipping: the open-file limit ({hard}) is too low to cache {STRACE_DIRS} directories"
        );
        return;
    }
    // Both archives make the same directories; the second visits each
    // one more times.
    let (Some(a), Some(b)) = (traced_calls(STRACE_DIRS), traced_calls(STRACE_DIRS + 2000)) else {
        eprintln!("skipping: strace could not trace the test binary (ptrace refused?)");
        return;
    };
    // The difference cancels start-up, the harness and the final sync.
    let per_file = |name: &str| {
        let n = |c: &HashMap<String, u64>| c.get(name).copied().unwrap_or(0) as f64;
        (n(&b) - n(&a)) / 2000.0
    };
    let calls = per_file("total");
    eprintln!(
        "syscalls per regular file: {calls:.2} ({} for {} files, {} for {})",
        a["total"],
        STRACE_DIRS,
        b["total"],
        STRACE_DIRS + 2000
    );
    assert!(calls <= 6.0, "{calls:.2} syscalls per file");
    if is_root() {
        // Every file has the same owner (not root's): the writer creates
        // as that owner rather than chowning each file.
        let chowns = per_file("fchown");
        assert!(chowns < 0.01, "{chowns:.3} fchown calls per file");
        assert!(calls <= 5.0, "{calls:.2} syscalls per file");
    }
}

/// Every path beneath `root` (relative), directories included.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in fs::read_dir(root.join(&rel)).expect("read_dir") {
            let e = e.expect("entry");
            let p = rel.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn the_journal_names_every_path_before_it_is_made() {
    use cph_runtime::archive::read_journal;
    use std::collections::HashSet;
    // A whole run: the journal holds what the report says was written.
    let s = Scene::new();
    let jdir = tempfile::tempdir().expect("tempdir");
    let journal = jdir.path().join("run.journal");
    let opts = ExtractOptions {
        journal: Some(journal.clone()),
        ..Default::default()
    };
    let report = extract(&sample_tree()[..], &s.target, &opts).expect("extract");
    let noted: HashSet<PathBuf> = read_journal(&journal).expect("journal").iter().collect();
    let written: HashSet<PathBuf> = report.written.iter().collect();
    assert_eq!(noted, written);
    assert_eq!(noted.len(), 12);
    fs::remove_file(&journal).expect("remove journal");

    // A run held mid-stream, as a kill would find it: everything on disk
    // is in the journal already; once the source fails, the journal holds
    // what the error names as written.
    let s = Scene::new();
    let journal = jdir.path().join("held.journal");
    let mut b = Builder::new(Vec::new());
    for d in 0..5 {
        add_dir(&mut b, &format!("d{d}"), 0o755);
        for f in 0..100 {
            add_file(&mut b, &format!("d{d}/f{f:03}"), &[f as u8; 300], 0o644);
        }
    }
    let tar = finish(b);
    let cut = tar.len() * 3 / 5;
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    /// Hands out `data` up to `cut`, then says so and blocks until
    /// released, then fails.
    struct Held {
        data: Vec<u8>,
        pos: usize,
        cut: usize,
        reached: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }
    impl std::io::Read for Held {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pos >= self.cut {
                let _ = self.reached.send(());
                let _ = self.release.recv();
                return Err(std::io::Error::other("source cut off"));
            }
            let n = buf.len().min(self.cut - self.pos).min(4096);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }
    let held = Held {
        data: tar,
        pos: 0,
        cut,
        reached: reached_tx,
        release: release_rx,
    };
    let (target, j) = (s.target.clone(), journal.clone());
    let run = std::thread::spawn(move || {
        let opts = ExtractOptions {
            journal: Some(j),
            threads: 2,
            ..Default::default()
        };
        extract(held, &target, &opts)
    });
    reached_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the extraction reads up to the cut");
    // Let the writers finish what they were handed.
    let mut on_disk = tree(&s.target);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = tree(&s.target);
        if now.len() == on_disk.len() {
            break;
        }
        on_disk = now;
    }
    assert!(on_disk.len() > 100, "{} paths written", on_disk.len());
    let noted: HashSet<PathBuf> = read_journal(&journal).expect("journal").iter().collect();
    for p in &on_disk {
        assert!(
            noted.contains(p),
            "{} on disk, not in the journal",
            p.display()
        );
    }
    // Ahead of the disk by at most the batches not yet handed out.
    assert!(
        noted.len() < on_disk.len() + 2 * 64 + 5,
        "{} noted",
        noted.len()
    );
    release_tx.send(()).expect("release");
    let e = run.join().expect("join").expect_err("cut off");
    let written: HashSet<PathBuf> = e.written().expect("incomplete").iter().collect();
    let noted: HashSet<PathBuf> = read_journal(&journal).expect("journal").iter().collect();
    assert!(written.is_subset(&noted));
    assert_eq!(written, tree(&s.target).into_iter().collect::<HashSet<_>>());
    s.assert_outside_untouched();
}

/// One entry of a generated archive; names and targets index small pools,
/// so paths are named again and again.
#[derive(Debug, Clone)]
enum Gen {
    File { name: usize, len: usize, seed: u8 },
    Link { name: usize, target: usize },
    Symlink { name: usize, target: usize },
    Dir { name: usize },
}

/// Names at the top and in `d/` (a directory the archive makes first).
fn gen_name(i: usize) -> String {
    if i < 10 {
        format!("n{i}")
    } else {
        format!("d/m{}", i - 10)
    }
}

const GEN_NAMES: usize = 16;

/// The archive of `entries`: hard links only to a name a file, link or
/// symlink took last (GNU tar fails one to nothing or to a directory) and
/// never to themselves. A directory entry's name is never a parent, so
/// what replaces it finds it empty.
fn gen_archive(entries: &[Gen]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d", std::io::empty()).expect("dir");
    let mut taken = std::collections::HashSet::new();
    for e in entries {
        let mut h = Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        match *e {
            Gen::File { name, len, seed } => {
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                h.set_entry_type(EntryType::Regular);
                h.set_size(len as u64);
                b.append_data(&mut h, gen_name(name), &data[..])
                    .expect("file");
                taken.insert(name);
            }
            Gen::Link { name, target } => {
                if name == target || !taken.contains(&target) {
                    continue;
                }
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, gen_name(name), gen_name(target))
                    .expect("link");
                taken.insert(name);
            }
            Gen::Dir { name } => {
                h.set_entry_type(EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, gen_name(name), std::io::empty())
                    .expect("dir");
                taken.remove(&name);
            }
            Gen::Symlink { name, target } => {
                h.set_entry_type(EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, gen_name(name), format!("nowhere-{target}"))
                    .expect("symlink");
                taken.insert(name);
            }
        }
    }
    b.into_inner().expect("tar")
}

/// What a tree holds: each path's kind and content or link target, and
/// which paths share an inode.
fn tree_state(root: &Path) -> (Vec<(String, String)>, Vec<Vec<String>>) {
    let mut entries = Vec::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p
                .strip_prefix(root)
                .expect("beneath")
                .to_string_lossy()
                .into_owned();
            let md = fs::symlink_metadata(&p).expect("stat");
            let what = if md.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if md.file_type().is_symlink() {
                format!("symlink {}", fs::read_link(&p).expect("readlink").display())
            } else {
                inodes.entry(md.ino()).or_default().push(rel.clone());
                format!("file {:?}", fs::read(&p).expect("read"))
            };
            entries.push((rel, what));
        }
    }
    entries.sort();
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (entries, groups)
}

fn gen_entry() -> impl proptest::strategy::Strategy<Value = Gen> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..GEN_NAMES, 0..40usize, any::<u8>())
            .prop_map(|(name, len, seed)| Gen::File { name, len, seed }),
        3 => (0..GEN_NAMES, 0..GEN_NAMES).prop_map(|(name, target)| Gen::Link { name, target }),
        1 => (0..GEN_NAMES, 0..4usize).prop_map(|(name, target)| Gen::Symlink { name, target }),
        1 => (0..GEN_NAMES).prop_map(|name| Gen::Dir { name }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Archives naming the same paths again and again, as files, hard
    /// links, symlinks and (empty) directories, come out as GNU tar makes
    /// them, with one writer and with four (entries of one path, and a link
    /// and its target, must land in archive order whichever writer takes
    /// them; a directory entry after a file of its name replaces it, and a
    /// file after an empty directory replaces that).
    #[test]
    fn archives_naming_paths_again_come_out_as_gnu_tar_makes_them(
        entries in proptest::collection::vec(gen_entry(), 1..400)
    ) {
        let archive = gen_archive(&entries);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.tar");
        fs::write(&file, &archive).expect("write archive");
        let gnu = dir.path().join("gnu");
        fs::create_dir(&gnu).expect("gnu");
        let out = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&gnu)
            .output()
            .expect("GNU tar");
        proptest::prop_assert!(out.status.success(), "GNU tar: {}", String::from_utf8_lossy(&out.stderr));
        let want = tree_state(&gnu);
        for threads in [1, 4] {
            let ours = dir.path().join(format!("ours-{threads}"));
            fs::create_dir(&ours).expect("ours");
            let opts = ExtractOptions { threads, ..Default::default() };
            extract(&archive[..], &ours, &opts).expect("extract");
            proptest::prop_assert_eq!(&tree_state(&ours), &want, "{} writers", threads);
        }
    }
}

/// `public_modes`: everything readable by all, directories and executables
/// searchable and runnable by all, nothing writable but by its owner,
/// whatever modes the archive gives (a share every phone reads).
#[test]
fn public_modes_make_everything_readable_and_nothing_writable_by_others() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    add_dir(&mut b, "private", 0o700);
    add_dir(&mut b, "open", 0o777);
    add_file(&mut b, "private/secret", b"s", 0o600);
    add_file(&mut b, "open/everyone", b"e", 0o666);
    add_file(&mut b, "open/tool", b"#!/bin/sh\n", 0o700);
    let opts = ExtractOptions {
        public_modes: true,
        ..ExtractOptions::default()
    };
    extract(&finish(b)[..], &s.target, &opts).expect("extract");
    let mode = |p: &str| {
        fs::metadata(s.target.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    for (path, want) in [
        ("private", 0o755),
        ("open", 0o755),
        ("private/secret", 0o644),
        ("open/everyone", 0o644),
        ("open/tool", 0o755),
    ] {
        assert_eq!(mode(path), want, "{path}: {:o}", mode(path));
    }
    s.assert_outside_untouched();
}

/// A hard link to the very file it names (directly, or through a symlinked
/// directory) leaves the file as it was: replacing the name first would
/// delete the file it links to.
#[test]
fn a_hard_link_to_itself_keeps_the_file() {
    let s = Scene::new();
    let mut b = Builder::new(Vec::new());
    add_dir(&mut b, "etc", 0o755);
    add_file(&mut b, "etc/build.prop", b"ro.x=1\n", 0o644);
    add_link(&mut b, EntryType::Symlink, "alias", "etc");
    add_link(&mut b, EntryType::Link, "etc/build.prop", "etc/build.prop");
    add_link(
        &mut b,
        EntryType::Link,
        "alias/build.prop",
        "etc/build.prop",
    );
    extract(&finish(b)[..], &s.target, &ExtractOptions::default()).expect("extract");
    assert_eq!(
        fs::read(s.target.join("etc/build.prop")).expect("kept"),
        b"ro.x=1\n"
    );
    s.assert_outside_untouched();
}

/// Regular files, directories, symlinks and hard links of `root` (relative
/// path, kind, mode, contents or link target, inode group), to compare two
/// extractions.
fn snapshot(root: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>, u64)> {
    let mut paths = tree(root);
    paths.sort();
    // Hard links are compared as "same inode as the first path with it".
    let mut first_of: HashMap<u64, u64> = HashMap::new();
    paths
        .into_iter()
        .enumerate()
        .map(|(n, p)| {
            let full = root.join(&p);
            let md = fs::symlink_metadata(&full).expect("metadata");
            let group = *first_of.entry(md.ino()).or_insert(n as u64);
            let (kind, body) = if md.is_symlink() {
                let t = fs::read_link(&full).expect("read_link");
                ("symlink", t.into_os_string().into_encoded_bytes())
            } else if md.is_dir() {
                ("dir", Vec::new())
            } else {
                ("file", fs::read(&full).expect("read"))
            };
            (p, kind.to_string(), md.mode() & 0o7777, body, group)
        })
        .collect()
}

/// Files held back to be created directory by directory land as they
/// would in archive order: a later entry of a held path wins, a hard
/// link to a held file links its data, a symlink, a directory or a large
/// file between them sees what came before, and a file at the path of a
/// directory held files are in (or beneath a held file) is not reordered.
/// Compared with a run that holds nothing, with windows that release
/// every few files and one that holds everything.
#[test]
fn files_held_back_land_as_in_archive_order() {
    let mut b = Builder::new(Vec::new());
    for i in 0..120 {
        add_file(&mut b, &format!("d{}/f{i}", i % 6), &[i as u8; 300], 0o644);
    }
    add_file(&mut b, "d1/f7", b"second f7", 0o600);
    add_link(&mut b, EntryType::Link, "d2/hard", "d3/f9");
    add_file(&mut b, "d3/f15", b"after the link", 0o644);
    add_link(&mut b, EntryType::Symlink, "d4/sym", "f10");
    add_file(&mut b, "d4/f16", b"after the symlink", 0o644);
    let large: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    add_file(&mut b, "d5/f11", &large, 0o644);
    add_file(&mut b, "d5/f17", b"after the large one", 0o644);
    add_file(&mut b, "d0/f0", b"second f0", 0o644);
    add_dir(&mut b, "late", 0o700);
    add_file(&mut b, "late/x", b"in a late dir", 0o644);
    add_file(&mut b, "plain", b"plain", 0o644);
    add_file(&mut b, "nest/a/b", b"deep", 0o644);
    for i in 120..200 {
        add_file(&mut b, &format!("d{}/f{i}", i % 6), &[i as u8; 900], 0o644);
    }
    let tar = finish(b);

    let run = |window: Option<usize>, threads: usize| {
        let s = Scene::new();
        let opts = ExtractOptions {
            group_window: window,
            threads,
            ..Default::default()
        };
        let report = extract(&tar[..], &s.target, &opts).expect("extract");
        s.assert_outside_untouched();
        (snapshot(&s.target), report)
    };
    let (want, plain) = run(Some(0), 1);
    assert_eq!(plain.grouped, 0);
    let f7 = want
        .iter()
        .find(|e| e.0 == Path::new("d1/f7"))
        .expect("d1/f7");
    assert_eq!(f7.3, b"second f7");
    for (window, threads) in [(1000, 1), (5000, 1), (64 << 20, 1), (3000, 3)] {
        let (got, report) = run(Some(window), threads);
        assert_eq!(got, want, "window {window}, {threads} writers");
        assert_eq!(report.files, plain.files);
        let sorted = |w: &cph_runtime::archive::WrittenPaths| {
            let mut v: Vec<PathBuf> = w.iter().collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&report.written), sorted(&plain.written));
        assert!(
            report.grouped >= 190,
            "window {window}: {} held",
            report.grouped
        );
    }
}

/// Archives whose order matters: a file at the path of the directory a
/// held file is in, and one beneath a held file. Each fails as it does
/// when nothing is held, having written the same.
#[test]
fn files_held_back_fail_as_in_archive_order() {
    let mut cases = Vec::new();
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "a/x", b"x", 0o644);
    add_file(&mut b, "q/r", b"r", 0o644);
    add_file(&mut b, "q", b"a file where a directory is", 0o644);
    cases.push(finish(b));
    // Enough files beneath `e` for a small window to release them before
    // the file `e` itself when it may.
    let mut b = Builder::new(Vec::new());
    add_file(&mut b, "a/x", b"x", 0o644);
    add_file(&mut b, "e", b"a file", 0o644);
    for i in 0..20 {
        add_file(&mut b, &format!("e/x{i}"), &[1u8; 300], 0o644);
    }
    cases.push(finish(b));
    for (n, tar) in cases.iter().enumerate() {
        let run = |window: usize| {
            let s = Scene::new();
            let opts = ExtractOptions {
                group_window: Some(window),
                threads: 1,
                ..Default::default()
            };
            let e = extract(&tar[..], &s.target, &opts).expect_err("fails");
            let mut written: Vec<PathBuf> =
                e.written().map(|w| w.iter().collect()).unwrap_or_default();
            written.sort();
            let target = s.target.to_str().expect("utf8");
            (
                e.to_string().replace(target, "T"),
                written,
                snapshot(&s.target),
            )
        };
        let want = run(0);
        for window in [2000, 1 << 20] {
            assert_eq!(run(window), want, "case {n}, window {window}");
        }
    }
}

/// Held files are created only once released: a run failing with files
/// held names exactly what it wrote, which is what is there.
#[test]
fn a_failed_run_with_files_held_names_what_is_there() {
    let mut b = Builder::new(Vec::new());
    for i in 0..50 {
        add_file(&mut b, &format!("d{}/f{i}", i % 5), &[7u8; 400], 0o644);
    }
    let tar = finish(b);
    // Cut inside the 41st file's data: 40 whole entries of 512 + 512.
    let cut = 40 * 1024 + 512 + 100;
    for window in [2000, 64 << 20] {
        let s = Scene::new();
        let opts = ExtractOptions {
            group_window: Some(window),
            ..Default::default()
        };
        let e = extract(&tar[..cut], &s.target, &opts).expect_err("truncated");
        assert!(
            matches!(e.root_cause(), ArchiveError::Truncated { .. }),
            "{e}"
        );
        let mut written: Vec<PathBuf> = e.written().map(|w| w.iter().collect()).unwrap_or_default();
        written.retain(|p| s.target.join(p).is_file());
        let mut there: Vec<PathBuf> = tree(&s.target)
            .into_iter()
            .filter(|p| s.target.join(p).is_file())
            .collect();
        written.sort();
        there.sort();
        assert_eq!(written, there, "window {window}");
        // A small window released files before the cut; a large one none.
        if window == 2000 {
            assert!(!there.is_empty());
        } else {
            assert!(there.is_empty(), "{there:?}");
        }
    }
}
